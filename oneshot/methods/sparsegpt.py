"""SparseGPT: one-shot pruning with sequential OBS weight updates via an inverse-Hessian Cholesky.

Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot"
(2023), Algorithm 1. Columns are processed left to right; pruning column j changes the remaining
columns by ``-err_j · U[j, j:]`` where ``U`` is the upper Cholesky factor of ``H⁻¹`` (§3.3).
Updates are applied lazily: inside a block of ``block_size`` columns immediately, to the columns
right of the block once per block. The mask is chosen per block (adaptive mask selection, §3.4)
from the OBS saliency ``w² / [U]_jj²``; for N:M it is chosen per group of M columns. With the
block's mask fixed at its start (unstructured, or a given mask), the column loop is replaced by
one batched triangular solve per row (:func:`solve_block`); N:M keeps the loop, whose masks depend
on the updates within the block. On a CPU the loop is faster, so it stays the default.
"""

from __future__ import annotations

from typing import Any

import torch

from oneshot.errors import ConfigError
from oneshot.methods import linalg
from oneshot.methods.base import STAT_HESSIAN, LayerStats, MethodOptions, MethodSpec, PruneResult, require, split_rows
from oneshot.methods.linalg import BLOCK_SIZE, DAMP, MAX_DAMP_RETRIES, inverse_cholesky_upper, prepare_hessian
from oneshot.methods.masks import nm_mask, unstructured_mask

#: Rows solved at once by the vectorised block: each holds a ``[b, b]`` triangular system.
SOLVE_ROWS_ELEMENTS = 1 << 24


def solve_block(w1: torch.Tensor, u1: torch.Tensor, keep1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The column loop of one SparseGPT block with a fixed mask, as one triangular solve per row.

    Pruning column j of the block sets ``err_j = w̃_j / U_jj`` where ``w̃_j`` is column j after the
    updates of the columns before it: ``w̃_j = w_j − Σ_{k<j} err_k U_kj``. Hence, per row, the
    errors on the pruned positions P solve ``e_P · U_PP = w_P`` (U_PP is upper triangular) and are
    zero on kept positions; the block's kept weights are then ``(w − e·U)`` there. Solved for all
    rows at once with ``M = (p pᵀ) ∘ U + diag(1 − p)``, which leaves kept errors at ``w_j · 0``.
    ``w1`` ``[out, b]``, ``u1`` ``[b, b]`` (upper), ``keep1`` bool ``[out, b]``; returns
    ``(q1, err1)``, the block's new weights and errors, both ``[out, b]``.
    """
    rows, b = w1.shape
    err = torch.empty_like(w1)  # [out, b]
    step = max(1, SOLVE_ROWS_ELEMENTS // (b * b))
    eye = torch.eye(b, dtype=w1.dtype, device=w1.device)
    for r0 in range(0, rows, step):
        p = (~keep1[r0 : r0 + step]).to(w1.dtype)  # [r, b] 1 = pruned
        system = p.unsqueeze(2) * p.unsqueeze(1) * u1 + (1 - p).unsqueeze(2) * eye  # [r, b, b], upper
        rhs = (w1[r0 : r0 + step] * p).unsqueeze(1)  # [r, 1, b]
        err[r0 : r0 + step] = torch.linalg.solve_triangular(system, rhs, upper=True, left=False).squeeze(1)
    q1 = (w1 - err @ u1) * keep1  # [out, b]
    return q1, err


def loop_block(
    w1: torch.Tensor, u1: torch.Tensor, keep1: torch.Tensor, nm: tuple[int, int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The column loop of one SparseGPT block (Alg. 1): prune column j, update the columns after it.

    With ``nm`` the mask of each group of M columns is chosen from the updated weights when the
    loop reaches it and written into ``keep1`` (a view of the layer's mask); otherwise ``keep1`` is
    used as given. Returns ``(q1, err1)`` like :func:`solve_block`.

    The updates are applied lazily one level further down, as Alg. 1 does across blocks: column
    j updates the rest of its sub-block of ``linalg.INNER_COLUMNS`` (a multiple of M, so an N:M group
    always sees every earlier column's update), and each finished sub-block updates the rest of
    the block with one ``[s, b'] @ [s, out]`` product. The loop runs on the transposed block, so
    every column is one contiguous row, and costs two element-wise ops and one rank-1 update per
    column. The same sums in another order: measured 2-4x faster on a CPU than updating the whole
    rest of the block after every column; the transposed layout takes another 5-40% off a whole
    SmolLM2-shaped layer on one CPU thread.
    """
    b = w1.shape[1]
    d1 = torch.diagonal(u1)  # [b]
    wt = w1.t().clone(memory_format=torch.contiguous_format)  # [b, out]: column j of the block is row j
    pruned = (~keep1).t().to(w1.dtype)  # [b, out]: 1 = pruned (rows of an N:M group set when reached)
    errt = torch.zeros_like(wt)  # [b, out]
    width = linalg.INNER_COLUMNS
    inner = width if nm is None else max(nm[1], width - width % nm[1])
    for s in range(0, b, inner):
        e = min(s + inner, b)
        for j in range(s, e):
            if nm is not None and j % nm[1] == 0:
                group = slice(j, j + nm[1])
                keep1[:, group] = nm_mask(wt[group].t().square() / d1[group].square(), *nm)
                pruned[group] = (~keep1[:, group]).t()
            err = errt[j]  # [out]
            torch.mul(wt[j], pruned[j], out=err)
            err.div_(d1[j])  # (w̃_j − q_j) / U_jj, zero where kept
            wt[j + 1 : e].addr_(u1[j, j + 1 : e], err, alpha=-1)  # [e - j - 1, out] (empty for the last)
        if e < b:
            wt[e:].addmm_(u1[s:e, e:].t(), errt[s:e], alpha=-1)  # [b - e, out]: the sub-block's updates at once
    return wt.t() * keep1, errt.t()


def sparsegpt(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    *,
    nm: tuple[int, int] | None = None,
    block_size: int = BLOCK_SIZE.default,
    damp: float = DAMP.default,
    max_damp_retries: int = MAX_DAMP_RETRIES.default,
    mask: torch.Tensor | None = None,
    vectorised: bool = False,
    segments: list[tuple[int, float]] | None = None,
) -> PruneResult:
    """Prune ``weight`` ``[out, in]`` to ``sparsity`` (or N:M) and reconstruct with ``hessian`` ``[in, in]``.

    ``mask`` (True = keep, ``[out, in]``) fixes the pattern instead of selecting it; the weights
    are then only reconstructed. ``vectorised`` solves each fixed-mask block with
    :func:`solve_block` instead of the column loop (same result; measured 3-5x slower than the loop
    on a 2-core CPU, so off by default). ``segments`` ``[(rows, sparsity), ...]`` marks ``weight``
    as several layers stacked by rows (they share ``hessian``): each block's mask is then chosen
    within each layer at its own sparsity, so the result equals pruning each layer alone
    (:func:`sparsegpt_stacked`). Returns the pruned weight, its mask, the OBS loss estimate and the
    relative damping used (``info["damp"]``).
    """
    h, w, dead = prepare_hessian(hessian, weight)  # [in, in], [out, in]
    rows, cols = w.shape
    if nm is not None:
        n, m = nm
        if cols % m != 0:
            raise ConfigError(f"N:M sparsity needs the input size ({cols}) to be a multiple of M={m}")
        block_size = max(m, block_size - block_size % m)  # groups never straddle a block edge
    upper, damp_used = inverse_cholesky_upper(h, damp, max_damp_retries)  # [in, in]
    keep = torch.ones_like(w, dtype=torch.bool) if mask is None else mask.to(torch.bool).clone()
    losses = torch.zeros(rows, dtype=torch.float32, device=w.device)  # [out]

    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = w[:, i1:i2]  # [out, b]
        u1 = upper[i1:i2, i1:i2]  # [b, b]
        if mask is None and nm is None:
            scores = w1.square() / torch.diagonal(u1).square()  # [out, b]: the OBS saliency w² / [U]_jj²
            r0 = 0
            for n, layer_sparsity in segments or [(rows, sparsity)]:
                keep[r0 : r0 + n, i1:i2] = unstructured_mask(scores[r0 : r0 + n], layer_sparsity, per_row=False)
                r0 += n
        if vectorised and nm is None:  # the block's mask is fixed: one batched triangular solve
            q1, err1 = solve_block(w1, u1, keep[:, i1:i2])
        else:
            q1, err1 = loop_block(w1, u1, keep[:, i1:i2], nm if mask is None else None)
        losses += err1.square().sum(dim=1) / 2  # the OBS loss of each pruned weight is err² / 2
        w[:, i1:i2] = q1
        w[:, i2:] -= err1 @ upper[i1:i2, i2:]  # lazy update of the columns right of the block
    keep[:, dead] = False
    return PruneResult(weight=w, mask=keep, loss=float(losses.sum()), info={"damp": damp_used})


def sparsegpt_stacked(
    weights: list[torch.Tensor], hessian: torch.Tensor, sparsities: list[float], **options: Any
) -> list[PruneResult]:
    """SparseGPT on layers that read the same input, as one matrix with stacked rows.

    One damping, one Cholesky and one column loop for all of them; every layer's mask is chosen
    within its own rows at its own sparsity, so each result equals :func:`sparsegpt` on that layer
    alone (up to float rounding). ``options`` are :func:`sparsegpt`'s keywords.
    """
    rows = [int(w.shape[0]) for w in weights]
    stacked = torch.cat(weights, dim=0)  # [Σ out, in]
    result = sparsegpt(stacked, hessian, sparsities[0], segments=list(zip(rows, sparsities, strict=True)), **options)
    return split_rows(result, rows)


def _run(w: torch.Tensor, stats: LayerStats, sparsity: float, opt: MethodOptions) -> PruneResult:
    hessian = require(stats.hessian, STAT_HESSIAN, "sparsegpt")
    return sparsegpt(w, hessian, sparsity, nm=opt.nm, block_size=opt.get(BLOCK_SIZE), **opt.damping())


def _run_stacked(
    ws: list[torch.Tensor], stats: LayerStats, sparsities: list[float], opt: MethodOptions
) -> list[PruneResult]:
    hessian = require(stats.hessian, STAT_HESSIAN, "sparsegpt")
    return sparsegpt_stacked(ws, hessian, sparsities, nm=opt.nm, block_size=opt.get(BLOCK_SIZE), **opt.damping())


SPEC = MethodSpec(
    "sparsegpt",
    _run,
    (STAT_HESSIAN,),
    "OBS updates with blocked inverse-Hessian Cholesky (Frantar & Alistarh 2023); accurate and fast",
    run_stacked=_run_stacked,
    updates_weights=True,
    knobs=(BLOCK_SIZE, DAMP, MAX_DAMP_RETRIES),
)
