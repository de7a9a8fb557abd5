"""DSnoT: training-free refinement of a pruning mask by swapping pruned and kept weights.

Zhang et al., "Dynamic Sparse No Training: Training-Free Fine-tuning for Sparse LLMs" (ICLR 2024).
Pruning row ``i`` of a layer shifts its expected output by the removed weights' expected
contributions, ``e_i = Σ_{j pruned} W_ij · E[x_j]``. DSnoT drives that shift toward zero, one swap per
row per cycle (all rows at once):

- **growth**: among the row's pruned weights, revive the one whose contribution
  ``c_ij = W_ij · E[x_j]`` most reduces ``e_i`` per unit of input variance (largest ``c_ij / Var[x_j]``
  when ``e_i > 0``, smallest when ``e_i < 0``);
- **pruning**: among the kept weights whose contribution has the opposite sign of ``e_i``
  (so removing it also moves ``e_i`` toward zero), remove the one of lowest Wanda score
  ``|W_ij| · ‖X_j‖₂``. With an N:M pattern the removed weight is taken from the revived one's group,
  so every group keeps exactly N.

A swapped weight is not touched again. A row stops when ``|e_i|`` is at most ``threshold``, when
no swap would lower ``|e_i|`` (so, unlike the reference code, a row's expected error never rises),
or after ``max_cycles`` cycles. Each swap revives one weight and removes one in the same row:
every row keeps its count, so sparsity and N:M pattern are kept exactly. The method keeps the
surviving weights' values, so it refines masks of methods that do not update weights (magnitude,
Wanda, RIA); the reference code's defaults are 50 cycles and an absolute threshold of 0.1 on a sum
over 2048 tokens, i.e. about 5e-5 on our per-token mean.
"""

from __future__ import annotations

import torch

from oneshot.methods.base import STAT_COL_NORM, STAT_MEANVAR, LayerStats, MethodOptions, PruneResult, require
from oneshot.options import Knob, at_least

#: The statistics DSnoT reads besides the method's own.
NEEDS = (STAT_MEANVAR, STAT_COL_NORM)
CYCLES = Knob("dsnot_cycles", 50, "DSnoT: most swaps per row.", at_least(1), "at least 1")
THRESHOLD = Knob(
    "dsnot_threshold",
    5e-5,
    "DSnoT: a row stops once its expected output shift is at most this.",
    lambda v: isinstance(v, (int, float)) and v >= 0,
    ">= 0",
)
LAYERS = Knob(
    "dsnot_layers",
    "attention",
    "DSnoT: the layers it refines: attention (the reference code's default; the MLP layers keep the method's "
    "mask), mlp, or all.",
    choices=("attention", "mlp", "all"),
)
#: The knobs of the refinement (``--refine dsnot``).
KNOBS = (CYCLES, THRESHOLD, LAYERS)


def expected_shift(weight: torch.Tensor, keep: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """``e_i = Σ_{j pruned} W_ij · E[x_j]`` per output row ``[out]``: the dense minus the pruned output's mean."""
    return (weight * mean.unsqueeze(0) * ~keep).sum(dim=1)


def dsnot(
    weight: torch.Tensor,
    keep: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    col_sq_norm: torch.Tensor,
    *,
    nm: tuple[int, int] | None = None,
    max_cycles: int = CYCLES.default,
    threshold: float = THRESHOLD.default,
) -> PruneResult:
    """Refine the keep-mask ``keep`` ``[out, in]`` of dense ``weight`` ``[out, in]`` (see the module docstring).

    ``mean`` / ``var`` are the input features' mean and variance ``[in]``, ``col_sq_norm`` their
    ``‖X_j‖₂²``. Returns the refined weight (``weight`` where kept, 0 elsewhere) and mask; ``info``
    has the number of swaps and cycles run.
    """
    out_features, in_features = weight.shape
    contribution = weight * mean.unsqueeze(0)  # c_ij = W_ij · E[x_j]
    growth_key = contribution / var.clamp_min(torch.finfo(var.dtype).eps).unsqueeze(0)
    importance = weight.abs() * col_sq_norm.sqrt().unsqueeze(0)  # Wanda's score orders removals
    keep = keep.clone()
    touched = torch.zeros_like(keep)
    shift = expected_shift(weight, keep, mean)  # [out]
    active = shift.abs() > threshold
    rows = torch.arange(out_features, device=weight.device)
    group_of = torch.arange(in_features, device=weight.device) // nm[1] if nm is not None else None
    swaps = cycles = 0
    while cycles < max_cycles and bool(active.any()):
        cycles += 1
        up = shift > 0  # revive a positive contribution, remove a negative one
        can_grow = ~keep & ~touched
        grow = torch.where(
            up,
            growth_key.masked_fill(~can_grow, float("-inf")).argmax(dim=1),
            growth_key.masked_fill(~can_grow, float("inf")).argmin(dim=1),
        )
        can_prune = keep & ~touched
        if group_of is None:
            can_prune &= torch.where(up.unsqueeze(1), contribution < 0, contribution > 0)
        else:
            can_prune &= group_of.unsqueeze(0) == group_of[grow].unsqueeze(1)
        prune = importance.masked_fill(~can_prune, float("inf")).argmin(dim=1)
        after = shift + contribution[rows, prune] - contribution[rows, grow]
        swap = active & can_grow[rows, grow] & can_prune[rows, prune] & (after.abs() < shift.abs())
        idx = swap.nonzero().squeeze(1)
        keep[idx, grow[idx]] = True
        keep[idx, prune[idx]] = False
        touched[idx, grow[idx]] = True
        touched[idx, prune[idx]] = True
        shift = torch.where(swap, after, shift)
        active = swap & (shift.abs() > threshold)
        swaps += int(idx.numel())
    return PruneResult(
        weight=weight * keep, mask=keep, info={"dsnot_swaps": float(swaps), "dsnot_cycles": float(cycles)}
    )


def refine(weight: torch.Tensor, pruned: PruneResult, stats: LayerStats, opt: MethodOptions) -> PruneResult:
    """DSnoT on a method's result: ``pruned.mask`` refined over the dense ``weight``."""
    mean = require(stats.mean, STAT_MEANVAR, "dsnot")
    var = require(stats.var, STAT_MEANVAR, "dsnot")
    col = require(stats.col_sq_norm, STAT_COL_NORM, "dsnot")
    refined = dsnot(
        weight, pruned.mask, mean, var, col, nm=opt.nm, max_cycles=opt.get(CYCLES), threshold=opt.get(THRESHOLD)
    )
    return PruneResult(refined.weight, refined.mask, pruned.bias, pruned.loss, {**pruned.info, **refined.info})
