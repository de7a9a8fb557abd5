"""Squared gradients of each prunable weight: the empirical Fisher diagonal, or a saved optimizer state.

``empirical_fisher`` runs the dense model over the calibration samples one at a time and averages
each sample's squared gradient of the model's own loss: next-token cross-entropy for a causal LM,
and for any other model with logits (a fine-tuned encoder) the cross-entropy against its own
predictions (no labels are needed). Only the prunable linear weights get gradients; the model is
used as it is (whole, on its device); a streamed checkpoint's gradients come from
:mod:`oneshot.passes.backward`, block by block.

``load_optimizer_state`` reads ``E[g²]`` saved by training instead: a safetensors file or a
``torch.save``'d dict ``{parameter name: exp_avg_sq}``, or a torch optimizer ``state_dict`` with one
parameter group in the model's parameter order. Files are read with ``weights_only=True``; one that
needs full unpickling is refused (re-save it as safetensors), never unpickled.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from oneshot.calibration.data import CalibrationSet
from oneshot.checkpoint import key_candidates
from oneshot.distributed import Ranks
from oneshot.errors import ModelError
from oneshot.layers import is_conv1d, layer_part, leaf_of, weight_leaves

log = logging.getLogger(__name__)


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` predicts the next token (its loss is next-token cross-entropy)."""
    name = type(model).__name__
    return name.endswith("ForCausalLM") or name.endswith("LMHeadModel")


def own_loss(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The model's loss on one batch without labels: next-token CE (causal LM) or CE against its own argmax."""
    out = model(input_ids=ids, attention_mask=mask)
    logits = getattr(out, "logits", None)
    if logits is None:
        raise ModelError(
            f"{type(model).__name__} gives no logits, so it has no loss to take gradients of; load the model "
            "with its head (e.g. AutoModelForCausalLM or the task model), or pass --optimizer-state"
        )
    real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    if is_causal_lm(model):
        logits, targets, real = logits[:, :-1], ids[:, 1:], real[:, 1:] & real[:, :-1]
    else:
        targets = logits.detach().argmax(dim=-1)
    return F.cross_entropy(logits[real].float(), targets[real])


@contextmanager
def gradients_only_for(module: nn.Module, tensors: Sequence[torch.Tensor], *, clear: bool = False) -> Iterator[None]:
    """Only ``tensors`` of ``module``'s parameters require gradients inside; every flag restored after.

    ``clear`` drops the parameters' ``.grad`` on the way out (a refit that steps an optimizer).
    """
    flags = {id(p): p.requires_grad for p in module.parameters()}
    try:
        for p in module.parameters():
            p.requires_grad_(False)
        for t in tensors:
            t.requires_grad_(True)
        yield
    finally:
        for p in module.parameters():
            if clear:
                p.grad = None
            p.requires_grad_(flags.get(id(p), False))


@contextmanager
def computed_on(model: nn.Module, device: torch.device) -> Iterator[torch.device]:
    """The whole model on ``device`` (``--device``) for a backward through it; back where it was afterwards.

    Yields where it was (the home of the results). A backward needs the whole model at once, so it
    must fit there; the sweeps move one block at a time.
    """
    home = next(model.parameters()).device
    if home == device:
        yield home
        return
    model.to(device)
    try:
        yield home
    finally:
        model.to(home)


def _samples(
    calib: CalibrationSet, device: torch.device, desc: str, quiet: bool
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """The calibration samples one at a time, ``(ids [1, T], mask [1, T] or None)`` on ``device``."""
    for s in tqdm(range(calib.nsamples), desc=desc, unit="sample", disable=True if quiet else None):
        mask = None if calib.attention_mask is None else calib.attention_mask[s : s + 1].to(device)
        yield calib.input_ids[s : s + 1].to(device), mask


def empirical_fisher(
    model: nn.Module,
    calib: CalibrationSet,
    layers: Mapping[str, nn.Module],
    *,
    quiet: bool = True,
    ranks: Ranks | None = None,
    device: torch.device | None = None,
) -> dict[str, torch.Tensor]:
    """``E[g²]`` of each layer's weight as float32 ``[out, in]``: the mean over samples of the squared gradient.

    With ``ranks``, ``calib`` is this rank's share: the sums and sample counts are all-reduced.
    ``device`` (default: where the model sits) is where the backward runs; the results come back
    to where the model sits.
    """
    device = device or next(model.parameters()).device
    with computed_on(model, device) as home:
        weights = [leaf for leaf, _ in weight_leaves(dict(layers))]  # experts: their fused parameters
        sums = [torch.zeros(w.shape, dtype=torch.float32, device=w.device) for w in weights]
        with gradients_only_for(model, weights):
            for ids, mask in _samples(calib, device, "fisher", quiet):
                grads = torch.autograd.grad(own_loss(model, ids, mask), weights)
                for acc, grad in zip(sums, grads, strict=True):
                    add_square(acc, grad)
        sums = [acc.to(home) for acc in sums]
    nsamples = calib.nsamples
    if ranks is not None:
        for acc in sums:
            ranks.all_reduce(acc)
        nsamples = sum(ranks.all_gather_object(nsamples))
    return layer_means(layers, weights, sums, nsamples)


def add_square(acc: torch.Tensor, grad: torch.Tensor) -> None:
    """``acc += grad²`` in float32, fused (no squared temporary of a weight's size)."""
    g = grad.float()
    acc.addcmul_(g, g)


def layer_means(
    layers: Mapping[str, nn.Module], leaves: Sequence[torch.Tensor], sums: Sequence[torch.Tensor], count: int
) -> dict[str, torch.Tensor]:
    """Each layer's ``[out, in]`` part of its leaf's sum (``sums[k]`` for ``leaves[k]``, see
    :func:`~oneshot.layers.weight_leaves`), divided by ``count``: the mean per layer (views of ``sums``)."""
    by_leaf = {id(leaf): acc for leaf, acc in zip(leaves, sums, strict=True)}
    return {name: layer_part(module, by_leaf[id(leaf_of(module))]) / count for name, module in layers.items()}


def block_output_gradients(
    model: nn.Module,
    calib: CalibrationSet,
    blocks: nn.ModuleList,
    *,
    quiet: bool = True,
    device: torch.device | None = None,
    ranks: Ranks | None = None,
) -> list[float]:
    """Per block, the mean over real tokens of ``‖∂L/∂y‖²``, ``y`` the block's output hidden state.

    ``L`` is :func:`own_loss` on one calibration sample at a time (the same loss as the empirical
    Fisher); the samples' sums are pooled (with ``ranks``: over every rank's share). No weight gets a
    gradient: the graph starts at the input embeddings' output. Needs the whole model in memory (a
    streamed model: :func:`oneshot.passes.backward.streamed_backward`);
    runs on ``device`` (default: where it sits).
    """
    device = device or next(model.parameters()).device
    with computed_on(model, device):
        sums, tokens = _block_output_gradients(model, calib, blocks, quiet, device)
    if ranks is not None:
        pooled = torch.cat([sums, torch.tensor([float(tokens)], dtype=torch.float64)])
        ranks.all_reduce(pooled)
        sums, tokens = pooled[:-1], int(pooled[-1])
    return [float(v) / max(tokens, 1) for v in sums]


def _block_output_gradients(
    model: nn.Module, calib: CalibrationSet, blocks: nn.ModuleList, quiet: bool, device: torch.device
) -> tuple[torch.Tensor, int]:
    embeddings = model.get_input_embeddings()  # type: ignore[operator]
    if embeddings is None:
        raise ModelError(f"{type(model).__name__} has no input embeddings to start a gradient from")
    outputs: list[torch.Tensor] = []

    def start(module: nn.Module, args: object, output: torch.Tensor) -> torch.Tensor:
        return output.detach().requires_grad_(True)

    def keep(module: nn.Module, args: object, output: object) -> None:
        hidden = output[0] if isinstance(output, tuple) else output
        assert isinstance(hidden, torch.Tensor)
        outputs.append(hidden)

    sums = torch.zeros(len(blocks), dtype=torch.float64)
    tokens = 0
    handles = [embeddings.register_forward_hook(start)] + [b.register_forward_hook(keep) for b in blocks]
    try:
        with gradients_only_for(model, []):  # gradients of the activations only
            for ids, mask in _samples(calib, device, "block gradients", quiet):
                outputs.clear()
                with torch.enable_grad():
                    loss = own_loss(model, ids, mask)
                    if len(outputs) != len(blocks):
                        raise ModelError(f"a forward ran {len(outputs)} of the model's {len(blocks)} blocks")
                    grads = torch.autograd.grad(loss, outputs)
                real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
                for i, grad in enumerate(grads):
                    sums[i] += float(grad[real].float().square().sum())
                tokens += int(real.sum())
    finally:
        for handle in handles:
            handle.remove()
        outputs.clear()
    return sums, tokens


def load_optimizer_state(path: str | Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """``{parameter name: exp_avg_sq}`` from a saved optimizer state (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"optimizer state {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(path)))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        raise ModelError(
            f"{path} is not a weights-only file ({str(exc).splitlines()[0][:120]}); oneshot never unpickles "
            "arbitrary objects: re-save it as a safetensors file of {parameter name: exp_avg_sq}"
        ) from exc
    if isinstance(state, dict) and "state" in state and "param_groups" in state:
        return _from_state_dict(state, model, path)
    if isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values()):
        return {str(k): v for k, v in state.items()}
    raise ModelError(f"{path} holds neither {{name: exp_avg_sq}} tensors nor a torch optimizer state_dict")


def _from_state_dict(state: dict[str, object], model: nn.Module, path: Path) -> dict[str, torch.Tensor]:
    """A torch optimizer state_dict mapped to names: one group, parameters in the model's order."""
    groups = state["param_groups"]
    assert isinstance(groups, list)
    names = [name for name, _ in model.named_parameters()]
    if len(groups) != 1 or len(groups[0]["params"]) != len(names):
        raise ModelError(
            f"{path} has {len(groups)} parameter groups over {sum(len(g['params']) for g in groups)} parameters; "
            f"only an optimizer built on model.parameters() ({len(names)}) can be matched to names; save "
            "{name: exp_avg_sq} as safetensors instead"
        )
    per_param = state["state"]
    assert isinstance(per_param, dict)
    return {
        names[i]: per_param[index]["exp_avg_sq"]
        for i, index in enumerate(groups[0]["params"])
        if index in per_param and "exp_avg_sq" in per_param[index]
    }


def stored_shape(module: nn.Module) -> torch.Size:
    """The shape ``module.weight`` is stored in."""
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    return weight.shape


def layer_grad_sq(
    saved: Mapping[str, torch.Tensor], layers: Mapping[str, nn.Module], prefix: str
) -> dict[str, torch.Tensor]:
    """Each layer's ``E[g²]`` ``[out, in]`` from ``{parameter name: tensor}``; ModelError naming a missing one."""
    out: dict[str, torch.Tensor] = {}
    for name, module in layers.items():
        key = f"{name}.weight"
        found = next((c for c in key_candidates(key, prefix) if c in saved), None)
        if found is None:
            raise ModelError(f"the optimizer state has no exp_avg_sq for {key}; was it saved from this model?")
        value, shape = saved[found].float(), tuple(stored_shape(module))
        if tuple(value.shape) != shape:
            raise ModelError(f"the optimizer state's {found} is {tuple(value.shape)}, the model's weight {shape}")
        out[name] = value.T if is_conv1d(module) else value
    return out
