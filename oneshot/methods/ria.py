"""RIA: relative importance times activation, compared over the whole layer (or per row).

Zhang et al., "Plug-and-Play: An Efficient Post-training Pruning Method for Large Language Models"
(ICLR 2024), eq. 4: the relative importance of a weight is its magnitude relative to the sum of
its row plus its magnitude relative to the sum of its column,

    RI_ij = |W_ij| / Σ_k |W_ik| + |W_ij| / Σ_k |W_kj|,

and the score multiplies it by the input feature's norm to the power ``a`` (0.5 in the paper):
``S_ij = RI_ij · ‖X_j‖₂^a``. The reference code compares scores over the whole layer by default
(``--per_outneuron`` compares within rows); N:M groups are always within a row. The paper's
channel permutation for N:M is left out: it makes the pattern N:M only in a permuted column order,
which the dense-with-zeros output would not keep.
"""

from __future__ import annotations

import torch

from oneshot.methods.base import STAT_COL_NORM, LayerStats, MethodOptions, MethodSpec, PruneResult, require
from oneshot.methods.masks import COMPARE, select_mask
from oneshot.options import Knob

ALPHA = Knob("ria_alpha", 0.5, "RIA's exponent a of the input norm: score = relative importance · ‖X_j‖^a.")


def ria_scores(weight: torch.Tensor, col_sq_norm: torch.Tensor, alpha: float = ALPHA.default) -> torch.Tensor:
    """RIA's score ``(|W|/row sums + |W|/column sums) · ‖X_j‖₂^alpha`` for ``weight`` ``[out, in]``."""
    magnitude = weight.abs()
    row_sum = magnitude.sum(dim=1, keepdim=True)  # [out, 1]: Σ_k |W_ik|
    col_sum = magnitude.sum(dim=0, keepdim=True)  # [1, in]: Σ_k |W_kj|
    tiny = torch.finfo(magnitude.dtype).tiny  # an all-zero row or column scores 0, not NaN
    relative = magnitude / row_sum.clamp_min(tiny) + magnitude / col_sum.clamp_min(tiny)
    return relative * col_sq_norm.sqrt().pow(alpha).unsqueeze(0)


def ria(
    weight: torch.Tensor,
    col_sq_norm: torch.Tensor,
    sparsity: float,
    *,
    nm: tuple[int, int] | None = None,
    alpha: float = ALPHA.default,
    per_row: bool = False,
) -> PruneResult:
    """Prune ``weight`` ``[out, in]`` by RIA given ``‖X_j‖₂²`` per input column ``[in]``."""
    mask = select_mask(ria_scores(weight, col_sq_norm, alpha), sparsity, nm, per_row=per_row)
    return PruneResult(weight=weight * mask, mask=mask)


def _run(w: torch.Tensor, stats: LayerStats, sparsity: float, opt: MethodOptions) -> PruneResult:
    col = require(stats.col_sq_norm, STAT_COL_NORM, "ria")
    return ria(w, col, sparsity, nm=opt.nm, alpha=opt.get(ALPHA), per_row=opt.get(COMPARE) == "row")


SPEC = MethodSpec(
    "ria",
    _run,
    (STAT_COL_NORM,),
    "relative importance · ‖X_j‖^a per layer (Zhang et al. 2024); cost of Wanda",
    knobs=(ALPHA, COMPARE),
)
