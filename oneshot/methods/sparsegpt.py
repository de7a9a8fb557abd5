"""SparseGPT: one-shot pruning with sequential OBS weight updates via an inverse-Hessian Cholesky.

Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot"
(2023), Algorithm 1. Columns are processed left to right; pruning column j changes the remaining
columns by ``-err_j · U[j, j:]`` where ``U`` is the upper Cholesky factor of ``H⁻¹`` (§3.3).
Updates are applied lazily: inside a block of ``block_size`` columns immediately, to the columns
right of the block once per block. The mask is chosen per block (adaptive mask selection, §3.4)
from the OBS saliency ``w² / [U]_jj²``; for N:M it is chosen per group of M columns.
"""

from __future__ import annotations

import torch

from oneshot.methods.base import PruneResult
from oneshot.methods.linalg import inverse_cholesky_upper, prepare_hessian
from oneshot.methods.masks import nm_mask, unstructured_mask


def sparsegpt(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    *,
    nm: tuple[int, int] | None = None,
    block_size: int = 128,
    damp: float = 0.01,
    max_damp_retries: int = 4,
    mask: torch.Tensor | None = None,
) -> PruneResult:
    """Prune ``weight`` ``[out, in]`` to ``sparsity`` (or N:M) and reconstruct with ``hessian`` ``[in, in]``.

    ``mask`` (True = keep, ``[out, in]``) fixes the pattern instead of selecting it; the weights
    are then only reconstructed. Returns the pruned weight, its mask, the OBS loss estimate and the
    relative damping used (``info["damp"]``).
    """
    h, w, dead = prepare_hessian(hessian, weight)  # [in, in], [out, in]
    rows, cols = w.shape
    if nm is not None:
        n, m = nm
        if cols % m != 0:
            raise ValueError(f"N:M sparsity needs the input size ({cols}) to be a multiple of M={m}")
        block_size = max(m, block_size - block_size % m)  # groups never straddle a block edge
    upper, damp_used = inverse_cholesky_upper(h, damp, max_damp_retries)  # [in, in]
    keep = torch.ones_like(w, dtype=torch.bool) if mask is None else mask.to(torch.bool).clone()
    losses = torch.zeros(rows, dtype=torch.float32, device=w.device)  # [out]

    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = w[:, i1:i2].clone()  # [out, b]
        q1 = torch.zeros_like(w1)  # [out, b]
        err1 = torch.zeros_like(w1)  # [out, b]
        u1 = upper[i1:i2, i1:i2]  # [b, b]
        d1 = torch.diagonal(u1)  # [b]
        if mask is None and nm is None:
            keep[:, i1:i2] = unstructured_mask(w1.square() / d1.square(), sparsity, per_row=False)
        for j in range(i2 - i1):
            if mask is None and nm is not None and j % nm[1] == 0:
                group = slice(j, j + nm[1])
                keep[:, i1 + j : i1 + j + nm[1]] = nm_mask(w1[:, group].square() / d1[group].square(), *nm)
            col = w1[:, j]  # [out]
            q = col * keep[:, i1 + j]
            q1[:, j] = q
            losses += (col - q).square() / d1[j].square() / 2
            err = (col - q) / d1[j]  # [out]
            w1[:, j:] -= err.unsqueeze(1) * u1[j, j:].unsqueeze(0)  # [out, b - j]
            err1[:, j] = err
        w[:, i1:i2] = q1
        w[:, i2:] -= err1 @ upper[i1:i2, i2:]  # lazy update of the columns right of the block
    keep[:, dead] = False
    return PruneResult(weight=w, mask=keep, loss=float(losses.sum()), info={"damp": damp_used})
