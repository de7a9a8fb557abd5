"""Wanda: prune by ``|W_ij| · ‖X_j‖₂`` compared within each output row.

Sun et al., "A Simple and Effective Pruning Approach for Large Language Models" (2023), §3:
the score is the weight magnitude times the norm of its input feature, and the comparison group
is each output row (per-output), which the paper found essential for LLMs.
"""

from __future__ import annotations

import torch

from oneshot.methods.base import STAT_COL_NORM, LayerStats, MethodOptions, MethodSpec, PruneResult, require
from oneshot.methods.masks import select_mask


def wanda(
    weight: torch.Tensor, col_sq_norm: torch.Tensor, sparsity: float, *, nm: tuple[int, int] | None = None
) -> PruneResult:
    """Prune ``weight`` ``[out, in]`` given ``‖X_j‖₂²`` per input column ``[in]``."""
    scores = weight.abs() * col_sq_norm.sqrt().unsqueeze(0)  # [out, in]
    mask = select_mask(scores, sparsity, nm, per_row=True)
    return PruneResult(weight=weight * mask, mask=mask)


def _run(w: torch.Tensor, stats: LayerStats, sparsity: float, opt: MethodOptions) -> PruneResult:
    return wanda(w, require(stats.col_sq_norm, STAT_COL_NORM, "wanda"), sparsity, nm=opt.nm)


SPEC = MethodSpec("wanda", _run, (STAT_COL_NORM,), "|W|·‖X_j‖ per output row (Sun et al. 2023); fast")
