"""The quantization grid of a layer (:class:`QuantSpec`) and a quantized layer (:class:`QuantResult`).

Shared by the quantizers (:mod:`oneshot.methods.gptq`), the method types (:mod:`oneshot.methods.base`)
and the writer; this module depends on none of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from oneshot.errors import ConfigError
from oneshot.options import Knob

#: How a group's scale is chosen: its min-max range, or that range shrunk to minimise the rounding error.
OBSERVERS = ("minmax", "mse")
#: The MSE search of the GPTQ reference's quantizer (``mse=True``): shrink factors 1 − i/GRID for
#: i < MAX_SHRINK · GRID, error Σ|w − q(w)|^NORM per row.
MSE_GRID, MSE_MAX_SHRINK, MSE_NORM = 100, 0.8, 2.4
#: The bit widths a grid may have.
BIT_WIDTHS = (2, 3, 4, 8)

#: The knobs of the quantizers (GPTQ, RTN), declared once for both.
BITS = Knob("bits", 4, "Quantization: bits per weight (2, 3, 4 or 8).", lambda v: v in BIT_WIDTHS, "2, 3, 4 or 8")
GROUP_SIZE = Knob(
    "group_size",
    None,
    "Quantization: input columns sharing a scale; -1 = one scale per output row [default: the largest of "
    "128, 64, 32 that divides every quantized layer's input width, named in the output and the report].",
    lambda v: v is None or (isinstance(v, int) and (v == -1 or v > 0)),
    "positive, or -1 for one scale per row",
    type=int,
)
SYMMETRIC = Knob(
    "symmetric",
    True,
    "Quantization: symmetric grid (zero point in the middle); --no-symmetric fits min and max with a zero point "
    "(saved packed, as vLLM loads it; stock transformers 5.23 + compressed-tensors 0.20 cannot load that).",
)
ACT_ORDER = Knob(
    "act_order",
    False,
    "GPTQ: round columns in decreasing order of their input's energy (diag H), groups kept in place.",
)
OBSERVER = Knob(
    "observer",
    "minmax",
    "Quantization: how each group's scale is chosen: minmax (the group's range) or mse (that range shrunk "
    "by the factor in 1.00, 0.99, ... 0.21 that minimises sum |w - q(w)|^2.4, the GPTQ reference's search).",
    choices=OBSERVERS,
)


@dataclass(frozen=True)
class QuantSpec:
    """A weight quantization grid: ``bits`` per weight, per group of ``group_size`` inputs (None = per row)."""

    bits: int = BITS.default
    group_size: int | None = 128
    symmetric: bool = SYMMETRIC.default
    act_order: bool = ACT_ORDER.default
    scale_dtype: torch.dtype = torch.float32  # the dtype scales are saved in (the model's)
    observer: str = OBSERVER.default

    def __post_init__(self) -> None:
        BITS.check(self.bits)
        OBSERVER.check(self.observer)
        if self.group_size is not None and self.group_size < 1:
            raise ConfigError(f"--group-size must be positive, or -1 for one scale per row (got {self.group_size})")

    @property
    def maxq(self) -> int:
        """The largest code, ``2^bits − 1``."""
        return (1 << self.bits) - 1

    def group_of(self, cols: int, device: torch.device | None = None) -> torch.Tensor:
        """The group of each of ``cols`` input columns ``[cols]``: consecutive runs of ``group_size``."""
        return torch.arange(cols, device=device) // (self.group_size or cols)


@dataclass(frozen=True)
class QuantResult:
    """A quantized layer: dequantized ``weight`` ``[out, in]`` (float32) and its grid.

    ``scales`` / ``zeros`` are ``[out, groups]`` float32 (zeros are integer codes; ``(maxq + 1) / 2``
    for a symmetric grid; scales exactly representable in ``spec.scale_dtype``), ``mask`` the kept
    weights (all True without pruning), ``loss`` the sum of ``err² / 2`` and ``info`` the damping used.
    ``latent`` (when asked for) holds each weight as the solve left it just before rounding it (zero
    where pruned): a block refit tunes the rounding from there (:mod:`oneshot.passes.reconstruct`).
    """

    weight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    mask: torch.Tensor
    spec: QuantSpec
    loss: float = 0.0
    info: dict[str, float] = field(default_factory=dict)
    latent: torch.Tensor | None = None

    def expand(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each weight's scale and zero point, both ``[out, in]``."""
        groups = self.spec.group_of(self.weight.shape[1], self.weight.device)
        return self.scales[:, groups], self.zeros[:, groups]

    def codes(self) -> torch.Tensor:
        """The integer code of every weight ``[out, in]`` (in ``[0, maxq]``)."""
        scale, zero = self.expand()
        return torch.round(self.weight / scale + zero).to(torch.int32)
