"""Find a model's transformer blocks and their linear layers; view weights as ``[out, in]`` matrices.

Blocks are found generically: the ``nn.ModuleList`` whose children are of a class named in the
model's ``_no_split_modules`` (what accelerate uses to place whole blocks on devices), else the
largest homogeneous ``ModuleList``. No per-family code paths.
"""

from __future__ import annotations

import torch
from torch import nn

from oneshot.errors import ModelError


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' GPT-2 style Conv1D, which stores its weight as ``[in, out]``."""
    # matched by name to avoid importing a private module path that has moved between versions
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_linear(module: nn.Module) -> bool:
    """True for ``nn.Linear`` and transformers' ``Conv1D`` (GPT-2)."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return ``(qualified name, ModuleList)`` of the model's repeated transformer blocks.

    Raises :class:`ModelError` when no repeated block structure exists.
    """
    no_split = set(getattr(model, "_no_split_modules", None) or [])
    candidates: list[tuple[int, str, nn.ModuleList]] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        classes = {type(child) for child in module}
        if len(classes) != 1:
            continue
        if not any(is_linear(m) for m in module[0].modules()):
            continue
        preferred = next(iter(classes)).__name__ in no_split
        candidates.append((int(preferred), name, module))
    if not candidates:
        raise ModelError(
            f"could not find repeated transformer blocks in {type(model).__name__}: no ModuleList of "
            "identical modules containing linear layers"
        )
    candidates.sort(key=lambda c: (c[0], _params(c[2])), reverse=True)
    _, name, blocks = candidates[0]
    return name, blocks


def find_linears(block: nn.Module) -> dict[str, nn.Module]:
    """Linear layers (``nn.Linear`` or ``Conv1D``) inside ``block``, by qualified name, in order."""
    return {name: m for name, m in block.named_modules() if name and is_linear(m)}


def _tensor(module: nn.Module, name: str) -> torch.Tensor:
    value = getattr(module, name)
    if not isinstance(value, torch.Tensor):
        raise ModelError(f"{type(module).__name__}.{name} is not a tensor")
    return value


def input_width(module: nn.Module) -> int:
    """A linear layer's input width (the ``in`` of its ``[out, in]`` matrix; works on the meta device)."""
    shape = _tensor(module, "weight").shape
    return int(shape[0] if is_conv1d(module) else shape[1])


def is_attention(name: str) -> bool:
    """Whether a linear layer's qualified name puts it in an attention module (``self_attn``, ``attention``, ``attn``).

    Everything else in a block (``mlp``, BERT's ``intermediate`` / ``output.dense``, OPT's ``fc1``) is
    the MLP.
    """
    return any("attn" in part or "attention" in part for part in name.lower().split("."))


def weight_dtype(module: nn.Module) -> torch.dtype:
    """The dtype the layer's weight is stored (and saved) in."""
    return _tensor(module, "weight").dtype


def as_matrix(module: nn.Module) -> torch.Tensor:
    """The layer's weight as a float32 ``[out, in]`` copy (Conv1D's ``[in, out]`` is transposed)."""
    weight = _tensor(module, "weight").detach()
    if is_conv1d(module):
        weight = weight.T
    return weight.to(torch.float32).clone()  # [out, in]


def from_matrix(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """Write a ``[out, in]`` matrix (and optionally a bias) back into the layer, in its own dtype/device."""
    target = _tensor(module, "weight")
    if is_conv1d(module):
        weight = weight.T
    if tuple(weight.shape) != tuple(target.shape):
        raise ValueError(f"shape mismatch writing weight: {tuple(weight.shape)} into {tuple(target.shape)}")
    with torch.no_grad():
        target.copy_(weight.to(target.device, target.dtype))
        if bias is not None:
            if getattr(module, "bias", None) is None:
                raise ValueError("layer has no bias to write into")
            target_bias = _tensor(module, "bias")
            target_bias.copy_(bias.to(target_bias.device, target_bias.dtype))
