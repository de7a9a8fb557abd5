"""Exact OBS: greedy optimal-brain-surgeon pruning of each output row (the ExactOBS of OBC).

Frantar, Singh & Alistarh, "Optimal Brain Compression" (2022), §4 / Alg. 1. Each row's loss
``(w − w′)ᵀ H (w − w′)`` is separable across rows, so every row is handled independently with its
own copy of ``H⁻¹``: repeatedly remove the weight ``q`` with the smallest saliency
``w_q² / [H⁻¹]_qq``, compensate the rest of the row with ``δw = −w_q / [H⁻¹]_qq · H⁻¹[:, q]``
(Hassibi & Stork 1993), and downdate ``H⁻¹ ← H⁻¹ − H⁻¹[:, q] H⁻¹[q, :] / [H⁻¹]_qq`` so that it is
the inverse Hessian of the remaining weights. Rows are processed in batches whose size follows a
memory budget. The per-row downdates are kept as low-rank factors (see :func:`obs_rows`), so the
cost is O(rows · k² · in) flops and memory traffic rather than O(rows · k · in²): still slow by nature.
"""

from __future__ import annotations

import logging
import time

import torch

from oneshot.errors import ConfigError
from oneshot.methods.base import STAT_HESSIAN, LayerStats, MethodOptions, MethodSpec, PruneResult, require, split_rows
from oneshot.methods.linalg import DAMP, MAX_DAMP_RETRIES, inverse_cholesky_upper, prepare_hessian
from oneshot.methods.masks import prune_count
from oneshot.options import Knob, at_least

log = logging.getLogger(__name__)

#: Default bytes of per-row inverse-Hessian copies held at once.
MEMORY_MB = Knob("obs_memory_mb", 1024, "OBS working memory per batch of rows, in MiB.", at_least(1), "at least 1")
DEFAULT_MEMORY_BUDGET = MEMORY_MB.default << 20


def damped_inverse(hessian: torch.Tensor, damp: float, max_retries: int) -> tuple[torch.Tensor, float]:
    """``(H + λI)⁻¹`` with the same relative damping and retry rule as SparseGPT."""
    upper, used = inverse_cholesky_upper(hessian, damp, max_retries)  # (H + λI)⁻¹ = Uᵀ U
    return upper.T @ upper, used


def rows_per_batch(cols: int, removals: int, memory_budget: int) -> int:
    """How many rows' ``[removals, cols]`` float32 downdate factors fit in ``memory_budget`` bytes."""
    return max(1, memory_budget // (max(removals, 1) * cols * 4))


def obs_rows(
    weight: torch.Tensor, hinv: torch.Tensor, removals: int, nm: tuple[int, int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy OBS on a batch of rows sharing ``hinv`` ``[in, in]``.

    ``weight`` is ``[B, in]``; removes ``removals`` weights from each row (for N:M, exactly
    ``M − N`` per group of M). Returns ``(pruned weights [B, in], removal order [B, removals])``.

    Each row's downdated inverse is kept implicitly as ``H⁻¹ − Σ_s v_s v_sᵀ`` with
    ``v_s = H⁻¹_s[:, q_s] / sqrt([H⁻¹_s]_qq)``: the diagonal is updated in O(in) per step and only
    column q is rebuilt (O(step · in)), instead of rewriting an ``[in, in]`` matrix per row per step.
    """
    w = weight.clone()  # [B, in]
    rows, cols = w.shape
    diag = torch.diagonal(hinv).unsqueeze(0).repeat(rows, 1)  # [B, in]
    factors = torch.zeros(rows, removals, cols, dtype=w.dtype, device=w.device)  # [B, k, in]
    removed = torch.zeros(rows, cols, dtype=torch.bool, device=w.device)  # [B, in]
    order = torch.zeros(rows, removals, dtype=torch.long, device=w.device)  # [B, k]
    batch = torch.arange(rows, device=w.device)
    if nm is not None:
        group_of = torch.arange(cols, device=w.device) // nm[1]  # [in]
        per_group = torch.zeros(rows, cols // nm[1], dtype=torch.long, device=w.device)  # [B, in/m]
    for step in range(removals):
        blocked = removed
        if nm is not None:
            blocked = blocked | (per_group[:, group_of] >= nm[1] - nm[0])
        saliency = torch.where(blocked, torch.inf, w.square() / torch.where(blocked, 1.0, diag))  # [B, in]
        q = torch.argmin(saliency, dim=1)  # [B]; first index on ties
        col = hinv[q]  # [B, in]: column q of H⁻¹ (symmetric)
        if step:
            past = factors[:, :step]  # [B, s, in]
            col = col - torch.bmm(past[batch, :, q].unsqueeze(1), past).squeeze(1)  # [B, in]
        dq = col[batch, q]  # [B]
        w -= (w[batch, q] / dq).unsqueeze(1) * col
        v = col / dq.sqrt().unsqueeze(1)  # [B, in]
        factors[:, step] = v
        diag -= v.square()
        removed[batch, q] = True
        w.masked_fill_(removed, 0.0)  # removed weights stay exactly zero despite rounding
        order[:, step] = q
        if nm is not None:
            per_group[batch, group_of[q]] += 1
    return w, order


def obs(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    *,
    nm: tuple[int, int] | None = None,
    damp: float = DAMP.default,
    max_damp_retries: int = MAX_DAMP_RETRIES.default,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> PruneResult:
    """Prune each row of ``weight`` ``[out, in]`` to ``sparsity`` (or N:M) with exact greedy OBS.

    ``hessian`` is ``[in, in]``. Each row loses exactly round(sparsity · in) weights.
    """
    h, w, dead = prepare_hessian(hessian, weight)  # [in, in], [out, in]
    rows, cols = w.shape
    if nm is not None:
        if cols % nm[1] != 0:
            raise ConfigError(f"N:M sparsity needs the input size ({cols}) to be a multiple of M={nm[1]}")
        removals = (nm[1] - nm[0]) * (cols // nm[1])
    else:
        removals = prune_count(cols, sparsity)
    hinv, damp_used = damped_inverse(h, damp, max_damp_retries)  # [in, in]
    batch = rows_per_batch(cols, removals, memory_budget)
    out = torch.empty_like(w)
    keep = torch.ones_like(w, dtype=torch.bool)
    start = time.perf_counter()
    for r0 in range(0, rows, batch):
        r1 = min(r0 + batch, rows)
        out[r0:r1], order = obs_rows(w[r0:r1], hinv, removals, nm)
        keep[r0:r1].scatter_(1, order, False)
    log.info("obs: %d x %d layer in %.1fs (%d rows per batch)", rows, cols, time.perf_counter() - start, batch)
    out[:, dead] = 0.0
    keep[:, dead] = False
    return PruneResult(weight=out, mask=keep, info={"damp": damp_used})


def _run(w: torch.Tensor, stats: LayerStats, sparsity: float, opt: MethodOptions) -> PruneResult:
    hessian = require(stats.hessian, STAT_HESSIAN, "obs")
    return obs(w, hessian, sparsity, nm=opt.nm, memory_budget=opt.get(MEMORY_MB) << 20, **opt.damping())


def _run_stacked(
    ws: list[torch.Tensor], stats: LayerStats, sparsities: list[float], opt: MethodOptions
) -> list[PruneResult]:
    """Rows are independent in OBS: layers at one sparsity share one damped inverse and row batches."""
    if len(set(sparsities)) > 1:
        return [_run(w, stats, s, opt) for w, s in zip(ws, sparsities, strict=True)]
    return split_rows(_run(torch.cat(ws, dim=0), stats, sparsities[0], opt), [int(w.shape[0]) for w in ws])


SPEC = MethodSpec(
    "obs",
    _run,
    (STAT_HESSIAN,),
    "exact greedy OBS per row (Frantar et al. 2022, OBC); most accurate, slow: O(rows·in³)",
    run_stacked=_run_stacked,
    updates_weights=True,
    knobs=(DAMP, MAX_DAMP_RETRIES, MEMORY_MB),
)
