"""Streaming statistics of a layer's inputs: ``update(x[tokens, d])`` then ``finalize()``.

All accumulate in float32 (float64 for the mean/variance merge) whatever the model dtype, and
count tokens so that results do not depend on how the calibration set was batched.
"""

from __future__ import annotations

from typing import Protocol

import torch


class Accumulator(Protocol):
    """A statistic gathered over the token rows fed to a layer."""

    def update(self, x: torch.Tensor) -> None:
        """Add a batch of rows ``x`` of shape ``[tokens, d]``."""

    @property
    def count(self) -> int:
        """Number of token rows seen so far."""
        ...


class Hessian:
    """Running ``X Xᵀ`` (``[d, d]``, fp32): the layer-wise least-squares Hessian up to a factor 2.

    Only the lower triangle is accumulated (``sum``'s strictly upper part holds partial values
    and is ignored): rows ``s:e`` of the sum get ``X[:, s:e]ᵀ X[:, :e]``, one matrix product
    per panel of ``PANEL`` rows, about half the multiply-adds of the full product (1.2x faster
    at d = 576, 1.8x at d = 1536 on a 2-core CPU). ``finalize()`` mirrors it into the exactly
    symmetric mean ``Σ x xᵀ / n``; solvers only need it up to scale because damping is relative
    to its diagonal.
    """

    PANEL = 256

    def __init__(self, dim: int, device: torch.device | str = "cpu") -> None:
        self.sum = torch.zeros(dim, dim, dtype=torch.float32, device=device)  # [d, d], lower triangle
        self._count = 0

    def update(self, x: torch.Tensor) -> None:
        """Add rows ``x`` ``[tokens, d]``."""
        x = x.to(self.sum.device, torch.float32)
        d = x.shape[1]
        for s in range(0, d, self.PANEL):
            e = min(s + self.PANEL, d)
            self.sum[s:e, :e].addmm_(x[:, s:e].T, x[:, :e])  # [e-s, e] += [e-s, t] @ [t, e]
        self._count += int(x.shape[0])

    @property
    def count(self) -> int:
        """Token rows seen (set by a cross-rank reduce to the total over all ranks)."""
        return self._count

    @count.setter
    def count(self, value: int) -> None:
        self._count = value

    def finalize(self) -> torch.Tensor:
        """Mean ``X Xᵀ / n`` ``[d, d]``, exactly symmetric."""
        lower = self.sum.tril()
        return (lower + lower.tril(-1).T) / max(self._count, 1)


class ColumnSqNorm:
    """Per-input-channel sum of squares ``Σ_t x_tj²`` (``[d]``): Wanda's ``‖X_j‖₂²``.

    The squares are summed in float64, so the float32 result does not depend on how the tokens
    were batched or split between ranks (Wanda's masks are then identical, not merely close).
    """

    def __init__(self, dim: int, device: torch.device | str = "cpu") -> None:
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)  # [d]
        self._count = 0

    def update(self, x: torch.Tensor) -> None:
        """Add rows ``x`` ``[tokens, d]``."""
        x = x.to(self.sum.device, torch.float32)
        self.sum += (x * x).sum(dim=0, dtype=torch.float64)
        self._count += int(x.shape[0])

    @property
    def count(self) -> int:
        """Token rows seen (set by a cross-rank reduce to the total over all ranks)."""
        return self._count

    @count.setter
    def count(self, value: int) -> None:
        self._count = value

    def finalize(self) -> torch.Tensor:
        """``‖X_j‖₂²`` per column ``[d]`` in float32 (a sum, not a mean, as in the Wanda paper)."""
        return self.sum.float()


class MeanVar:
    """Per-channel mean and (population) variance, merged batch by batch with Chan et al.'s formula.

    Chan, Golub & LeVeque (1979): for two parts with counts n_a, n_b, means μ_a, μ_b and sums of
    squared deviations M_a, M_b: δ = μ_b − μ_a, μ = μ_a + δ n_b / n, M = M_a + M_b + δ² n_a n_b / n.
    """

    def __init__(self, dim: int, device: torch.device | str = "cpu") -> None:
        self.mean = torch.zeros(dim, dtype=torch.float64, device=device)  # [d]
        self.m2 = torch.zeros(dim, dtype=torch.float64, device=device)  # [d]
        self._count = 0

    def update(self, x: torch.Tensor) -> None:
        """Add rows ``x`` ``[tokens, d]``."""
        nb = int(x.shape[0])
        if nb == 0:
            return
        x = x.to(self.mean.device, torch.float64)
        mean_b = x.mean(dim=0)
        self.merge(nb, mean_b, ((x - mean_b) ** 2).sum(dim=0))

    def merge(self, nb: int, mean_b: torch.Tensor, m2_b: torch.Tensor) -> None:
        """Add a part with ``nb`` rows, mean ``mean_b`` and squared deviations ``m2_b`` (Chan's formula)."""
        if nb == 0:
            return
        na = self._count
        n = na + nb
        delta = mean_b.to(self.mean) - self.mean
        self.mean = self.mean + delta * (nb / n)
        self.m2 = self.m2 + m2_b.to(self.m2) + delta * delta * (na * nb / n)
        self._count = n

    @property
    def count(self) -> int:
        """Token rows seen."""
        return self._count

    @count.setter
    def count(self, value: int) -> None:
        self._count = value

    def finalize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean [d], variance [d])`` in float32; variance is the population variance (÷ n)."""
        var = self.m2 / max(self._count, 1)
        return self.mean.float(), var.float()


class TokenSample:
    """A deterministic subsample of input rows (every ``stride``-th token, at most ``max_rows``).

    Used to report each layer's relative reconstruction error ``‖(W − W′) X‖² / ‖W X‖²`` for any
    method at a small fraction of the cost of a full Hessian. The defaults span the first 8,192
    calibration tokens with 256 rows: 1,024 rows (stride 8, the same span) cost 2.6 s of a 67 s
    SmolLM2 Wanda run (4% of it, ``speed_wanda_s10_rerun.md``) for an estimate only the report reads.
    """

    def __init__(self, dim: int, stride: int = 32, max_rows: int = 256) -> None:
        self.dim = dim
        self.stride = stride
        self.max_rows = max_rows
        self._rows: list[torch.Tensor] = []
        self._kept = 0
        self._count = 0

    def update(self, x: torch.Tensor) -> None:
        """Add rows ``x`` ``[tokens, d]``; keeps rows whose global index is a multiple of ``stride``."""
        first = (-self._count) % self.stride
        self._count += int(x.shape[0])
        room = self.max_rows - self._kept
        if room <= 0:
            return
        picked = x[first :: self.stride][:room].detach().to("cpu", torch.float32)
        self._rows.append(picked)
        self._kept += int(picked.shape[0])

    @property
    def count(self) -> int:
        """Token rows seen (not kept)."""
        return self._count

    def finalize(self) -> torch.Tensor:
        """The kept rows ``[rows, d]``."""
        if not self._rows:
            return torch.zeros(0, self.dim)
        return torch.cat(self._rows)


def relative_error(weight: torch.Tensor, pruned: torch.Tensor, x: torch.Tensor) -> float:
    """``‖(W − W′) Xᵀ‖²_F / ‖W Xᵀ‖²_F`` for rows ``x`` ``[tokens, in]``; 0 when there are no rows."""
    if x.numel() == 0:
        return 0.0
    x = x.to(weight.device, torch.float32)
    dense = x @ weight.T  # [t, out]
    diff = x @ (weight - pruned).T  # [t, out]
    denom = float((dense * dense).sum())
    return float((diff * diff).sum()) / denom if denom > 0 else 0.0


def hessian_relative_error(weight: torch.Tensor, pruned: torch.Tensor, hessian: torch.Tensor) -> float:
    """:func:`relative_error` over every calibration token, from their ``X Xᵀ / n`` (``hessian`` ``[in, in]``).

    ``‖(W − W′) Xᵀ‖² / ‖W Xᵀ‖² = tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)``: exact over all tokens, for the
    layers of a Hessian method, whose Hessian is there already (``2 · out · in²`` multiply-adds per
    layer, against ``4 · out · in · 256`` for the token sample's estimate).
    """
    h = hessian.to(weight.device, torch.float32)
    w = weight.to(torch.float32)
    diff = w - pruned.to(w.device, torch.float32)  # [out, in]
    denom = float(((w @ h) * w).sum())
    return float(((diff @ h) * diff).sum()) / denom if denom > 0 else 0.0
