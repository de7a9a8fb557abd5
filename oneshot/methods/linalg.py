"""Damped inverse-Hessian factorisation shared by the second-order methods (SparseGPT, OBS)."""

from __future__ import annotations

import torch

from oneshot.errors import NumericalError
from oneshot.options import Knob, at_least, positive

#: The knobs of the OBS-family solvers (SparseGPT, OBS, GPTQ), declared once for all of them.
BLOCK_SIZE = Knob(
    "block_size",
    128,
    "Lazy-update block width in columns (SparseGPT chooses its unstructured mask per block of this width).",
    at_least(1),
    "at least 1",
)
DAMP = Knob("damp", 0.01, "Relative Hessian damping: damp · mean(diag H) added to the diagonal.", positive, "positive")
MAX_DAMP_RETRIES = Knob(
    "max_damp_retries", 4, "Times the damping is raised ×10 when a Cholesky fails.", at_least(0), "at least 0"
)

#: Columns of the innermost loop of the column-by-column solvers (SparseGPT, GPTQ): within a
#: block, each column updates only the rest of its sub-block of this many columns; the rest of
#: the block gets the sub-block's updates as one matrix product (2-4x faster on a CPU).
INNER_COLUMNS = 16


def all_finite(tensor: torch.Tensor) -> bool:
    """True when ``tensor`` holds no NaN / Inf (an empty one included).

    ``aminmax`` reads the tensor once and allocates nothing (NaN propagates to both results):
    16-20x faster on a CPU than ``isfinite(tensor).all()``, which builds a boolean copy.
    """
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


def prepare_hessian(hessian: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Handle dead inputs: columns never activated (``H_jj = 0``) get ``H_jj = 1`` and ``W[:, j] = 0``.

    Returns copies ``(H [in, in], W [out, in], dead [in] bool)``; the inputs are not modified.
    """
    h = hessian.to(torch.float32).clone()  # [in, in]
    w = weight.to(torch.float32).clone()  # [out, in]
    dead = torch.diagonal(h) == 0  # [in]
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    return h, w, dead


def inverse_cholesky_upper(hessian: torch.Tensor, damp: float, max_retries: int) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor ``U`` of ``(H + λI)⁻¹`` with ``λ = damp · mean(diag H)``.

    Frantar & Alistarh, SparseGPT (2023) §3.3/Alg. 1: the rows of U give the sequential OBS
    updates. If a factorisation fails, damping is multiplied by 10, at most ``max_retries`` times;
    the relative damping finally used is returned. Never falls back to the identity.
    """
    mean_diag = float(torch.diagonal(hessian).mean())
    rel = damp
    for _ in range(max_retries + 1):
        # At most two [in, in] buffers besides the input are alive at a time (a 13824-wide FFN
        # Hessian is 0.76 GB in float32): damped -> lower -> inverse -> upper, each freed when used.
        damped = hessian.clone()  # [in, in]
        damped.diagonal().add_(rel * mean_diag)
        lower, info = torch.linalg.cholesky_ex(damped)
        del damped
        if int(info) == 0:
            inverse = torch.cholesky_inverse(lower)  # [in, in]
            del lower
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            del inverse
            if int(info) == 0 and all_finite(upper):
                return upper, rel
        rel *= 10.0
    raise NumericalError(
        f"Cholesky factorisation failed even with relative damping {rel / 10:g} after {max_retries} "
        "retries; the calibration Hessian is degenerate: use more calibration samples or a larger --damp"
    )
