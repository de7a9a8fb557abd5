"""Block-output reconstruction (``--refine block``): refit a pruned block's kept weights to the dense block.

After a block's masks are chosen (by any unstructured method), its kept linear weights are trained
with Adam so the pruned block's outputs match the dense block's outputs on the same calibration
inputs: the loss is ``Σ ‖f_pruned(x) − f_dense(x)‖² / Σ ‖f_dense(x)‖²`` over the real (unpadded)
tokens, in the spirit of the local block reconstruction of ALPS (Meng et al. 2024) and of
BRECQ-style block fitting. Masks are fixed: a pruned weight stays exactly zero. The block is
refit in float32 (a bf16 block is cast for the refit and cast back), one Adam step per calibration
batch, ``epochs`` passes. After every pass the whole calibration error is measured again; a pass
that does not lower it is undone and the learning rate halved, so the recorded errors never rise.

In a quantized run the same loop tunes the grid instead (:func:`refit_quantized_block`): each
quantized layer's weight becomes a :class:`FakeQuant` parametrization of a latent weight and
per-group log-scales, trained through a straight-through rounding; the layers' grids wait in
:class:`BlockRefitter` from the solve until the block's tuning replaces their saved form.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from oneshot.distributed import Ranks
from oneshot.engine import RefitBatches
from oneshot.gradients import gradients_only_for
from oneshot.layers import as_matrix, from_matrix, input_width, is_conv1d, output_width, weight_dtype, weight_leaves
from oneshot.methods.quantspec import QuantResult
from oneshot.quantized import QuantizedLayer, compress


@dataclass(frozen=True)
class RefitRecord:
    """One block's refit: relative output error before it, then after each accepted pass."""

    block: int
    errors: list[float]
    seconds: float


@contextlib.contextmanager
def in_float32(block: nn.Module) -> Iterator[None]:
    """Hold ``block`` in float32 inside the ``with`` (what :class:`RefitBatches` runs in), then cast it back.

    bf16 / fp16 values are exact in float32, so a block whose weights are not changed comes back
    bit for bit.
    """
    dtype = next(block.parameters()).dtype
    block.float()
    try:
        yield
    finally:
        block.to(dtype)


#: Device bytes a block refit holds per refitted weight: the float32 weight, its gradient, Adam's two
#: moments and the best pass's copy (4 bytes each), and its keep mask (1 byte).
REFIT_BYTES_PER_WEIGHT = 4 * 5 + 1


def refit_bytes(block: nn.Module, linears: dict[str, nn.Module], tokens: int) -> int:
    """Estimated peak device bytes of :func:`refit_block` on ``block`` with batches of ``tokens`` tokens.

    The block in float32 (4 bytes per parameter), plus :data:`REFIT_BYTES_PER_WEIGHT` - 4 more per
    refitted weight (gradient, Adam's moments, the best pass's copy, the keep mask), plus the Adam
    step's two temporaries of the largest weight, plus one batch's graph: every layer's float32
    input and output, ``4 · tokens · Σ (in + out)``, which counts an input several layers share once
    per layer and every token at every expert (an upper bound for a sparse mixture). The
    calibration inputs and the dense targets stay on the host.
    """
    leaves = [leaf.numel() for leaf, _ in weight_leaves(linears)]
    block_floats = sum(p.numel() for p in block.parameters())
    widths = sum(input_width(m) + output_width(m) for m in linears.values())
    step = 2 * 4 * max(leaves, default=0)
    return 4 * block_floats + (REFIT_BYTES_PER_WEIGHT - 4) * sum(leaves) + step + 4 * tokens * widths


def _squared(diff: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Sum of squares of ``diff`` ``[B, T, d]`` over the real tokens (``mask`` ``[B, T]``, None = all)."""
    if mask is not None and diff.dim() == 3 and mask.shape == diff.shape[:2]:
        diff = diff[mask.to(diff.device).bool()]
    return diff.float().square().sum()


def output_error(batches: RefitBatches, ranks: Ranks | None = None) -> float:
    """The block's relative output error ``Σ‖f(x) − target‖² / Σ‖target‖²`` over every batch (of every rank)."""
    num, den = summed(output_error_sums(batches), ranks)
    return num / max(den, 1e-30)


def summed(values: tuple[float, float], ranks: Ranks | None) -> tuple[float, float]:
    """Two sums over every rank's samples (as they are without ranks)."""
    if ranks is None:
        return values
    pooled = torch.tensor(values, dtype=torch.float64)
    ranks.all_reduce(pooled)
    return float(pooled[0]), float(pooled[1])


def output_error_sums(batches: RefitBatches) -> tuple[float, float]:
    """``(Σ‖f(x) − target‖², Σ‖target‖²)`` over the real tokens of every batch."""
    num = den = 0.0
    with torch.no_grad():
        for b, target in enumerate(batches.targets):
            out = batches.run(b)
            target = target.to(out.device, torch.float32)
            num += float(_squared(out - target, batches.token_masks[b]))
            den += float(_squared(target, batches.token_masks[b]))
    return num, den


def refit_block(
    block: nn.Module,
    linears: dict[str, nn.Module],
    batches: RefitBatches,
    *,
    epochs: int,
    lr: float,
    ranks: Ranks | None = None,
) -> list[float]:
    """Refit the kept weights of ``linears`` (masks = their nonzeros now) in place; returns the errors.

    ``errors[0]`` is the error before the refit, then one entry per accepted pass (each lower than
    the one before). Other parameters of the block (norms, biases) are left as they are.
    """
    leaves = weight_leaves(linears)  # experts: the fused parameters, with the entries of the given experts
    weights = [leaf for leaf, _ in leaves]
    keep = [(w.detach() != 0) if region is None else (w.detach() != 0) | ~region for w, region in leaves]
    frozen = [None if region is None else (~region, w.detach()[~region].clone()) for w, region in leaves]

    def masked() -> None:
        for w, k, rest in zip(weights, keep, frozen, strict=True):
            w.mul_(k)
            if rest is not None:  # entries of experts not refitted: as they were
                w[rest[0]] = rest[1]

    with in_float32(block), gradients_only_for(block, weights, clear=True):
        return _fit(weights, batches, epochs=epochs, lr=lr, after_step=masked, ranks=ranks)


def _fit(
    params: list[torch.Tensor],
    batches: RefitBatches,
    *,
    epochs: int,
    lr: float,
    after_step: Callable[[], None] | None = None,
    ranks: Ranks | None = None,
) -> list[float]:
    """Adam on ``params`` (leaves the block's forward reads) toward the batches' targets, one step per batch.

    ``after_step`` runs after each step, without autograd (a projection, e.g. back onto the masks).
    A pass that does not lower the whole calibration error is undone and the learning rate halved;
    returns the error before, then after each accepted pass. With ``ranks`` step ``k`` takes the
    ``k``-th batch of every rank: the gradients are summed over the ranks (the loss is normalised
    by the global target energy) before each step, so every rank holds the same weights, and a pass
    is accepted on the global error.
    """
    local = sum(float(_squared(t.float(), m)) for t, m in zip(batches.targets, batches.token_masks, strict=True))
    denominator, _ = summed((local, 0.0), ranks)
    steps = len(batches.targets) if ranks is None else max(ranks.all_gather_object(len(batches.targets)))
    # per tensor, not foreach: a block's few large weights take no longer, and a foreach step's
    # temporaries (a second copy of every weight) would count in the refit's peak
    optimizer = torch.optim.Adam(params, lr=lr, foreach=False)
    errors = [output_error(batches, ranks)]
    best = [p.detach().clone() for p in params]
    for _ in range(epochs):
        for b in range(steps):
            optimizer.zero_grad(set_to_none=True)
            if b < len(batches.targets):  # a rank with fewer batches adds nothing to this step
                out = batches.run(b)
                target = batches.targets[b].to(out.device, torch.float32)
                (_squared(out - target, batches.token_masks[b]) / denominator).backward()
            if ranks is not None:
                for p in params:
                    p.grad = torch.zeros_like(p) if p.grad is None else p.grad
                    ranks.all_reduce(p.grad)
            optimizer.step()
            if after_step is not None:
                with torch.no_grad():
                    after_step()
        optimizer.zero_grad(set_to_none=True)  # the gradients are not held while the error is measured
        error = output_error(batches, ranks)
        if error < errors[-1]:
            errors.append(error)
            with torch.no_grad():
                for saved, p in zip(best, params, strict=True):
                    saved.copy_(p)  # in place: never two copies
        else:  # undo the pass, take smaller steps
            with torch.no_grad():
                for p, saved in zip(params, best, strict=True):
                    p.copy_(saved)
            for group in optimizer.param_groups:
                group["lr"] /= 2
    return errors


class FakeQuant(nn.Module):
    """A layer's weight as its grid rounds it, for training through the rounding (a parametrization).

    The latent weight ``u`` is held in units of the layer's first grid step ``s0`` (so one learning
    rate means the same fraction of a step in every group). ``forward(u)`` is
    ``s · (clamp(round(u · s0 / s) + z, 0, maxq) − z) · mask`` per group, the rounding straight
    through (its gradient taken as 1: LSQ's gradients for the latent and the scale), the zero
    points ``z`` fixed integer codes and the scales ``s = s0 · exp(log_scale)`` rounded to the dtype
    they are saved in (straight through as well), so the weight the forward uses is the one the
    saved codes and scales hold. ``u`` is ``[out, in]``, or ``[in, out]`` for a ``Conv1D``
    (``transposed``).
    """

    scales0: torch.Tensor  # [out, groups] the grid's scales before the tuning
    zeros: torch.Tensor  # [out, groups] integer zero points (float32)
    mask: torch.Tensor  # [out, in] bool, the kept weights
    group: torch.Tensor  # [in] each input column's group

    def __init__(self, grid: QuantResult, transposed: bool = False) -> None:
        super().__init__()
        self.spec, self.transposed = grid.spec, transposed
        self.log_scale = nn.Parameter(torch.zeros_like(grid.scales, dtype=torch.float32))
        self.register_buffer("scales0", grid.scales.float().clone())
        self.register_buffer("zeros", grid.zeros.float().clone())
        self.register_buffer("mask", grid.mask.clone())
        self.register_buffer("group", grid.spec.group_of(grid.weight.shape[1], grid.weight.device))

    def scales(self) -> torch.Tensor:
        """The current scales ``[out, groups]``, float32 values of the saved dtype (straight through)."""
        s = self.scales0 * self.log_scale.exp()
        return s + (s.to(self.spec.scale_dtype).float() - s).detach()

    def units(self, weight: torch.Tensor) -> torch.Tensor:
        """A ``[out, in]`` weight in units of the first grid step, in the layer's layout (a latent)."""
        u = weight.float() / self.scales0[:, self.group]
        return u.t() if self.transposed else u

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        """The quantized weight of ``latent`` (in the layer's own layout)."""
        u = latent.t() if self.transposed else latent
        s = self.scales()  # [out, groups]: expanded to the weights once each, below
        x = u * (self.scales0 / s)[:, self.group]
        z = self.zeros[:, self.group]
        codes = torch.clamp(x + (torch.round(x) - x).detach() + z, 0, self.spec.maxq)
        q = s[:, self.group] * (codes - z) * self.mask
        return q.t() if self.transposed else q

    def result(self, latent: torch.Tensor, grid: QuantResult) -> QuantResult:
        """The layer's grid and quantized weight now (``grid`` the one it started from), as a QuantResult."""
        with torch.no_grad():
            s = self.scales()
            weight = self.forward(latent)
            weight = weight.t() if self.transposed else weight
        return dataclasses.replace(grid, weight=weight.detach().clone(), scales=s.detach().clone(), latent=None)


def _original(module: nn.Module) -> torch.Tensor:
    """The tensor a parametrized ``weight`` is computed from (the latent the refit trains)."""
    original = module.parametrizations["weight"].original  # type: ignore[index,union-attr]
    assert isinstance(original, torch.Tensor)
    return original


def refit_quantized_block(
    block: nn.Module,
    linears: dict[str, nn.Module],
    grids: dict[str, QuantResult],
    batches: RefitBatches,
    *,
    epochs: int,
    lr: float,
) -> tuple[list[float], dict[str, QuantResult]]:
    """Tune a quantized block's rounding and scales so its output matches the dense block's.

    Each layer of ``grids`` (by its name in ``linears``) trains a latent weight and one log-scale
    per group through :class:`FakeQuant`, with Adam on the block-output loss of :func:`refit_block`
    (``lr``: a fraction of a grid step, and of ``log s``, per step). The latent starts where the
    quantizer left each weight before rounding it (``grid.latent``; else its quantized value), so the
    first error is the quantizer's and the weights it rounded on a close call move first; the codes
    change where a latent crosses a rounding boundary, the scales move freely, zero points and masks
    stay (a pruned weight stays exactly zero). In the spirit of AutoRound's signed-gradient rounding
    (Cheng et al. 2023) and EfficientQAT's block-wise training of weights and scales (Chen et al.
    2024). Returns the errors (as :func:`refit_block`) and each layer's new grid; the layers hold
    the new quantized weights.
    """
    tuned = {name: linears[name] for name in grids}
    fakes = {name: FakeQuant(grids[name], is_conv1d(module)) for name, module in tuned.items()}
    latents: list[torch.Tensor] = []
    with in_float32(block):
        for name, module in tuned.items():
            fake = fakes[name].to(as_matrix(module).device)
            parametrize.register_parametrization(module, "weight", fake)
            latents.append(_original(module))
            start = grids[name].latent
            with torch.no_grad():
                latents[-1].copy_(fake.units(grids[name].weight if start is None else start))
        try:
            params = latents + [fake.log_scale for fake in fakes.values()]
            with gradients_only_for(block, params, clear=True):
                errors = _fit(params, batches, epochs=epochs, lr=lr)
            results = {
                name: fakes[name].result(latent.detach(), grids[name])
                for name, latent in zip(tuned, latents, strict=True)
            }
        finally:
            for module in tuned.values():
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
    for name, module in tuned.items():
        from_matrix(module, results[name].weight)
    return errors, results


@dataclass
class BlockRefitter:
    """The sweep's ``refit`` callback for ``--refine block``; collects one record per block.

    A quantized run's layers leave their grids in ``grids`` (by module) as they are solved; the
    refitter then tunes their rounding and scales (:func:`refit_quantized_block`) and replaces
    their saved form in ``quantized`` (by qualified name). Without grids it refits kept weights.
    """

    epochs: int
    lr: float
    records: list[RefitRecord]
    quantized: dict[str, QuantizedLayer]  # the sweep's saved forms, by qualified name
    grids: dict[nn.Module, tuple[str, QuantResult]] = field(default_factory=dict)
    ranks: Ranks | None = None  # several processes: every rank refits on its samples, gradients summed

    def __call__(self, i: int, block: nn.Module, linears: dict[str, nn.Module], batches: RefitBatches) -> None:
        """Refit block ``i`` and record its errors."""
        t0 = time.perf_counter()
        mine = {name: self.grids.pop(module) for name, module in linears.items() if module in self.grids}
        if mine:
            errors, tuned = refit_quantized_block(
                block, linears, {n: grid for n, (_, grid) in mine.items()}, batches, epochs=self.epochs, lr=self.lr
            )
            for name, (full, _) in mine.items():
                self.quantized[full] = compress(tuned[name], weight_dtype(linears[name]))
        else:
            errors = refit_block(block, linears, batches, epochs=self.epochs, lr=self.lr, ranks=self.ranks)
        self.records.append(RefitRecord(i, errors, time.perf_counter() - t0))
