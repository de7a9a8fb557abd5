"""GPTQ: one-shot weight quantization with the same inverse-Hessian column updates as SparseGPT.

Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers"
(ICLR 2023), Algorithm 1. Columns are quantized left to right (or in decreasing ``diag(H)`` order:
``act_order``); quantizing column j moves the columns after it by ``-err_j · U[j, j:]``, with ``U``
the upper Cholesky factor of the damped ``H⁻¹`` and ``err_j = (w_j − q(w_j)) / U_jj``, applied
lazily per block of 128 columns. The grid is asymmetric or symmetric min-max per output row, per
channel or per group of ``group_size`` input columns; a group's scale and zero point are set from
the *updated* weights when the loop reaches its first column (the reference's behaviour). With a
``mask`` (a pruned layer) the pruned weights stay exactly zero and the kept ones land on the grid:
SparseGPT's joint prune-and-quantize solve (its grid is set from the kept weights only, where the
reference includes the ones about to be pruned, so the range is not spent on them).
Round-to-nearest (:func:`rtn`) is the baseline.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from oneshot.errors import ConfigError
from oneshot.methods.linalg import inverse_cholesky_upper, prepare_hessian


@dataclass(frozen=True)
class QuantSpec:
    """A weight quantization grid: ``bits`` per weight, per group of ``group_size`` inputs (None = per row)."""

    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = True
    act_order: bool = False

    def __post_init__(self) -> None:
        if self.bits not in (2, 3, 4, 8):
            raise ConfigError(f"--bits must be 2, 3, 4 or 8 (got {self.bits})")
        if self.group_size is not None and self.group_size < 1:
            raise ConfigError(f"--group-size must be positive or None for one group per row (got {self.group_size})")

    @property
    def maxq(self) -> int:
        """The largest code, ``2^bits − 1``."""
        return (1 << self.bits) - 1


@dataclass(frozen=True)
class QuantResult:
    """A quantized layer: dequantized ``weight`` ``[out, in]`` and its grid.

    ``scales`` / ``zeros`` are ``[out, groups]`` (zeros are integer codes; ``(maxq + 1) / 2`` for a
    symmetric grid), ``g_idx`` ``[in]`` the group of each input column (not monotone with
    ``act_order``), ``mask`` the kept weights (all True without pruning), ``loss`` the sum of
    ``err² / 2`` and ``info`` the damping used.
    """

    weight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    mask: torch.Tensor
    loss: float = 0.0
    info: dict[str, float] = field(default_factory=dict)

    def codes(self) -> torch.Tensor:
        """The integer code of every weight ``[out, in]`` (in ``[0, maxq]``)."""
        scale = self.scales.gather(1, self.g_idx.expand(self.weight.shape[0], -1))
        zero = self.zeros.gather(1, self.g_idx.expand(self.weight.shape[0], -1))
        return torch.round(self.weight / scale + zero).to(torch.int32)


def grid(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max scale and zero point per row of ``x`` ``[out, g]``, both ``[out, 1]`` (GPTQ's quantizer).

    The range always contains 0 (so a zero weight stays exactly zero); symmetric grids use
    ``±max|x|`` and the middle code as zero point, for every row (the GPTQ reference leaves a row
    without negative weights at ``[0, max]``, where the middle zero point clamps its upper half);
    an all-zero row gets the range ``[−1, 1]``.
    """
    xmin = x.min(dim=1).values.clamp(max=0)
    xmax = x.max(dim=1).values.clamp(min=0)
    if spec.symmetric:  # ±max|x| (the reference keeps [0, max] for a row with no negative weight)
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)
    xmin, xmax = torch.where(empty, -1.0, xmin), torch.where(empty, 1.0, xmax)
    scale = (xmax - xmin) / spec.maxq
    zero = torch.full_like(scale, (spec.maxq + 1) / 2) if spec.symmetric else torch.round(-xmin / scale)
    return scale.unsqueeze(1), zero.unsqueeze(1)


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Round ``x`` onto the grid and back: ``scale · (clamp(round(x/scale) + zero, 0, maxq) − zero)``."""
    codes = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
    return scale * (codes - zero)


def _groups(cols: int, spec: QuantSpec) -> int:
    return 1 if spec.group_size is None else -(-cols // spec.group_size)


def rtn(weight: torch.Tensor, spec: QuantSpec) -> QuantResult:
    """Round-to-nearest on the same grid (the baseline): each group's min-max from the original weights."""
    w = weight.to(torch.float32)
    rows, cols = w.shape
    size = cols if spec.group_size is None else spec.group_size
    scales = torch.empty(rows, _groups(cols, spec), device=w.device)
    zeros = torch.empty_like(scales)
    out = torch.empty_like(w)
    for g, c0 in enumerate(range(0, cols, size)):
        scale, zero = grid(w[:, c0 : c0 + size], spec)
        out[:, c0 : c0 + size] = quantize(w[:, c0 : c0 + size], scale, zero, spec.maxq)
        scales[:, g], zeros[:, g] = scale[:, 0], zero[:, 0]
    g_idx = torch.arange(cols, device=w.device) // size
    return QuantResult(out, scales, zeros, g_idx, torch.ones_like(w, dtype=torch.bool))


def gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    spec: QuantSpec,
    *,
    mask: torch.Tensor | None = None,
    block_size: int = 128,
    damp: float = 0.01,
    max_damp_retries: int = 4,
) -> QuantResult:
    """Quantize ``weight`` ``[out, in]`` with ``hessian`` ``[in, in]`` (see the module docstring).

    ``mask`` (True = keep) holds pruned weights at exactly zero while the kept ones are quantized
    and the error is propagated (SparseGPT's joint solve; the mask is not chosen here).
    """
    h, w, dead = prepare_hessian(hessian, weight)  # [in, in], [out, in]
    rows, cols = w.shape
    keep = torch.ones_like(w, dtype=torch.bool) if mask is None else mask.to(torch.bool).clone()
    order = torch.argsort(torch.diagonal(h), descending=True, stable=True) if spec.act_order else None
    if order is not None:
        h, w, keep = h[order][:, order], w[:, order], keep[:, order]
    upper, damp_used = inverse_cholesky_upper(h, damp, max_damp_retries)  # [in, in]
    size = cols if spec.group_size is None else spec.group_size
    scales = torch.empty(rows, _groups(cols, spec), device=w.device)
    zeros = torch.empty_like(scales)
    losses = torch.zeros(rows, device=w.device)
    scale = zero = torch.empty(0)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = w[:, i1:i2].clone()  # [out, b]
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        u1 = upper[i1:i2, i1:i2]
        for j in range(i2 - i1):
            col = i1 + j
            if col % size == 0:  # a new group: its grid from the kept weights as updated so far
                ahead = torch.cat([w1[:, j:], w[:, i2:]], dim=1)[:, :size] * keep[:, col : col + size]
                scale, zero = grid(ahead, spec)
                scales[:, col // size], zeros[:, col // size] = scale[:, 0], zero[:, 0]
            q = quantize(w1[:, j : j + 1] * keep[:, col : col + 1], scale, zero, spec.maxq)[:, 0]  # [out]
            q1[:, j] = q
            err = (w1[:, j] - q) / u1[j, j]
            w1[:, j:] -= err.unsqueeze(1) * u1[j, j:].unsqueeze(0)
            err1[:, j] = err
        losses += err1.square().sum(dim=1) / 2
        w[:, i1:i2] = q1
        w[:, i2:] -= err1 @ upper[i1:i2, i2:]
    g_idx = torch.arange(cols, device=w.device) // size  # group of each position in loop order
    if order is not None:
        inverse = torch.argsort(order)
        w, keep, g_idx = w[:, inverse], keep[:, inverse], g_idx[inverse]
    keep[:, dead] = False
    return QuantResult(w, scales, zeros, g_idx, keep, float(losses.sum()), {"damp": damp_used})
