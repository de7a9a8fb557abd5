"""Find a model's transformer blocks and their linear layers; view weights as ``[out, in]`` matrices.

Blocks are found generically: the ``nn.ModuleList`` whose children are of a class named in the
model's ``_no_split_modules`` (what accelerate uses to place whole blocks on devices), else the
largest homogeneous ``ModuleList``. No per-family code paths.
"""

from __future__ import annotations

import torch
from torch import nn

from oneshot.errors import ModelError
from oneshot.experts import ExpertProjection, is_experts, projections


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
    """The layers of ``block`` by qualified name, in order: ``nn.Linear``, ``Conv1D`` and each expert's projections.

    An experts module (:func:`oneshot.experts.is_experts`) contributes every expert's gate, up and
    down projection as ``{module}.{expert}.{gate|up|down}_proj`` (:class:`~oneshot.experts.ExpertProjection`).
    """
    found: dict[str, nn.Module] = {}
    routers = set(find_routers(block))
    for name, m in block.named_modules():
        if name and is_linear(m) and name not in routers:
            found[name] = m
        elif is_experts(m):
            found.update({f"{name}.{key}" if name else key: p for key, p in projections(m).items()})
    return found


def modules_and_layers(module: nn.Module) -> dict[str, nn.Module]:
    """Every submodule of ``module`` by qualified name, with every layer of :func:`find_linears` (an expert's
    projection is a layer, not a submodule): where a layer's name is looked up, routers included."""
    return {**dict(module.named_modules()), **find_linears(module)}


def _is_router_name(child: str) -> bool:
    return child == "gate" or child.endswith("_gate") or "router" in child


def find_routers(block: nn.Module) -> dict[str, nn.Module]:
    """The routers of ``block``'s mixtures of experts, by qualified name: left dense, never pruned.

    A router is a sibling of an experts module named ``gate``, ``*_gate`` or ``*router*`` (Mixtral's
    ``mlp.gate``, GPT-OSS's ``mlp.router``, Qwen2-MoE's ``mlp.shared_expert_gate``) whose weight
    has one row per expert (or one: a shared expert's gate).
    """
    modules = dict(block.named_modules())
    found: dict[str, nn.Module] = {}
    for name, m in modules.items():
        if not is_experts(m):
            continue
        parent = name.rpartition(".")[0]
        experts = int(getattr(m, "num_experts", 0))
        for child_name, child in modules[parent].named_children():
            weight = getattr(child, "weight", None)
            rows = int(weight.shape[0]) if isinstance(weight, torch.Tensor) and weight.dim() == 2 else -1
            if _is_router_name(child_name) and rows in (experts, 1):
                found[f"{parent}.{child_name}" if parent else child_name] = child
    return found


#: What each parameter of a block is, for the report's account of what stayed dense.
LAYER, ROUTER, VECTOR, OTHER = "layer", "router", "vector", "other"


def parameter_roles(block: nn.Module) -> dict[str, str]:
    """Each parameter of ``block`` by qualified name: :data:`LAYER` (a prunable layer's weight, an experts
    module's fused weights), :data:`ROUTER`, :data:`VECTOR` (norms, biases, an experts module's
    biases, attention sinks) or :data:`OTHER` (a matrix no rule understands: never pruned, reported)."""
    layer_ids = {id(m.weight) for m in find_linears(block).values() if not is_expert(m)}
    expert_ids: set[int] = set()
    for m in block.modules():
        if is_experts(m):
            expert_ids.update(id(getattr(m, n)) for n in ("gate_up_proj", "up_proj", "down_proj") if hasattr(m, n))
    router_ids = {id(p) for r in find_routers(block).values() for p in r.parameters()}
    roles: dict[str, str] = {}
    for name, param in block.named_parameters():
        if id(param) in layer_ids or id(param) in expert_ids:
            roles[name] = LAYER
        elif id(param) in router_ids:
            roles[name] = ROUTER
        elif param.dim() <= 1 or name.endswith("_bias") or name.endswith(".bias"):
            roles[name] = VECTOR
        else:
            roles[name] = OTHER
    return roles


def is_expert(module: nn.Module) -> bool:
    """Whether ``module`` is one expert's projection (a view of a fused experts parameter)."""
    return isinstance(module, ExpertProjection)


def _tensor(module: nn.Module, name: str) -> torch.Tensor:
    value = getattr(module, name)
    if not isinstance(value, torch.Tensor):
        raise ModelError(f"{type(module).__name__}.{name} is not a tensor")
    return value


def weight_of(module: nn.Module) -> torch.Tensor:
    """A layer's weight as it holds it (an expert projection's: its view of the fused parameter)."""
    return _tensor(module, "weight")


def input_width(module: nn.Module) -> int:
    """A linear layer's input width (the ``in`` of its ``[out, in]`` matrix; works on the meta device)."""
    shape = _tensor(module, "weight").shape
    return int(shape[0] if is_conv1d(module) else shape[1])


def output_width(module: nn.Module) -> int:
    """A layer's output width (the ``out`` of its ``[out, in]`` matrix; works on the meta device)."""
    shape = _tensor(module, "weight").shape
    return int(shape[1] if is_conv1d(module) else shape[0])


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


def weight_leaves(layers: dict[str, nn.Module]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """The parameters holding the layers' weights, each once, with the part the layers cover (None: all of it).

    A linear layer's weight is its own parameter; experts' projections share their experts module's
    fused parameters, and ``layers`` may hold only some of the experts: the boolean region marks
    their entries. What gradients and optimizers act on (the views themselves are not leaves).
    """
    leaves: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
    for module in layers.values():
        if isinstance(module, ExpertProjection):
            fused = leaf_of(module)
            blank = torch.zeros(fused.shape, dtype=torch.bool, device=fused.device)
            _, region = leaves.setdefault(id(fused), (fused, blank))
            assert region is not None
            module.select(region).fill_(True)
        else:
            weight = leaf_of(module)
            leaves.setdefault(id(weight), (weight, None))
    return [(p, None if r is not None and bool(r.all()) else r) for p, r in leaves.values()]


def leaf_of(module: nn.Module) -> torch.Tensor:
    """The parameter holding a layer's weight (an expert's: its experts module's fused parameter)."""
    if isinstance(module, ExpertProjection):
        fused: torch.Tensor = getattr(module.__dict__["experts"], module.fused_name)
        return fused
    return _tensor(module, "weight")


def layer_part(module: nn.Module, leaf_shaped: torch.Tensor) -> torch.Tensor:
    """A layer's ``[out, in]`` part of a tensor shaped like its weight's leaf (a gradient, a sum of squares)."""
    if isinstance(module, ExpertProjection):
        return module.select(leaf_shaped)
    return leaf_shaped.T if is_conv1d(module) else leaf_shaped
