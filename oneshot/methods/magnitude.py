"""Magnitude pruning: remove the weights of smallest absolute value (no calibration data)."""

from __future__ import annotations

import torch

from oneshot.methods.base import LayerStats, MethodOptions, MethodSpec, PruneResult
from oneshot.methods.masks import select_mask


def magnitude(
    weight: torch.Tensor, sparsity: float, *, nm: tuple[int, int] | None = None, per_row: bool = False
) -> PruneResult:
    """Zero the smallest ``|W|``; compared over the whole layer (the usual baseline) or per row.

    ``weight`` is ``[out, in]`` float32. N:M groups are always within a row.
    """
    mask = select_mask(weight.abs(), sparsity, nm, per_row=per_row)  # [out, in]
    return PruneResult(weight=weight * mask, mask=mask)


def _run(w: torch.Tensor, stats: LayerStats, sparsity: float, opt: MethodOptions) -> PruneResult:
    return magnitude(w, sparsity, nm=opt.nm)


SPEC = MethodSpec("magnitude", _run, (), "smallest |W| per layer; needs no calibration data")
