"""Types shared by the pruning methods: their result and the statistics they consume.

A method is a pure function of tensors: it takes a float32 ``[out, in]`` weight and the layer's
input statistics, and returns a :class:`PruneResult`. No modules, no device moves, no mutation of
its inputs, so each one can be checked on random matrices against an exact oracle.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypedDict

import torch

from oneshot.methods.linalg import DAMP, MAX_DAMP_RETRIES
from oneshot.methods.quantspec import QuantResult, QuantSpec
from oneshot.options import Knob, T


@dataclass(frozen=True)
class LayerStats:
    """Statistics of one linear layer's input over the calibration tokens.

    ``hessian`` is the mean ``X Xᵀ`` ``[in, in]``; ``col_sq_norm`` is ``‖X_j‖₂²`` ``[in]``;
    ``mean`` / ``var`` are each input feature's mean and (population) variance ``[in]``;
    ``reference`` is the layer's weight in a base checkpoint (for methods with ``reference=True``);
    ``count`` the number of tokens. Each is None when the method did not ask for it.
    """

    hessian: torch.Tensor | None = None
    col_sq_norm: torch.Tensor | None = None
    count: int = 0
    mean: torch.Tensor | None = None
    var: torch.Tensor | None = None
    reference: torch.Tensor | None = None  # the layer's weight in a base checkpoint ``[out, in]`` (movement)
    grad_sq: torch.Tensor | None = None  # E[g²] of the layer's weight ``[out, in]`` (fisher)


@dataclass(frozen=True)
class PruneResult:
    """A pruned layer: new ``weight`` ``[out, in]``, boolean ``mask`` of kept weights ``[out, in]``.

    ``bias`` is set by methods that compensate into the bias; ``loss`` is the method's own estimate
    of the error it introduced (e.g. the OBS saliency sum); ``info`` carries solver facts such as
    the damping actually used. ``quant`` is set by a quantization stage (GPTQ, RTN): the grid the
    weights lie on, which the writer saves in the compressed-tensors format.
    """

    weight: torch.Tensor
    mask: torch.Tensor
    bias: torch.Tensor | None = None
    loss: float | None = None
    info: dict[str, float] = field(default_factory=dict)
    quant: QuantResult | None = None


class Damping(TypedDict):
    """Keywords of the Hessian damping the OBS-family solvers take."""

    damp: float
    max_damp_retries: int


@dataclass(frozen=True)
class MethodOptions:
    """What a method function is given besides the weight and statistics: the run's N:M pattern and
    quantization grid, and the values of the knobs its stage reads (``get(KNOB)``; unset: the default)."""

    nm: tuple[int, int] | None = None
    quant: QuantSpec | None = None  # the grid of a quantization stage (--method gptq / rtn, --then)
    keep_latent: bool = False  # quantizers also return the weights before rounding (--refine block tunes them)
    values: Mapping[str, Any] = field(default_factory=dict)  # knob name -> value, for this stage

    def get(self, knob: Knob[T]) -> T:
        """The value of ``knob`` for this stage (its declared default when the run did not set it)."""
        value: T = self.values.get(knob.name, knob.default)
        return value

    def damping(self) -> Damping:
        """The Hessian damping keywords the OBS-family solvers take (``damp``, ``max_damp_retries``)."""
        return {"damp": self.get(DAMP), "max_damp_retries": self.get(MAX_DAMP_RETRIES)}


#: Statistics a method may ask for; the engine maps each to an accumulator.
STAT_HESSIAN = "hessian"
STAT_COL_NORM = "col_sq_norm"
STAT_MEANVAR = "meanvar"

#: The callable a registry entry wraps: ``(W [out, in], stats, sparsity, options) -> PruneResult``.
LayerPruner = Callable[[torch.Tensor, LayerStats, float, MethodOptions], PruneResult]

#: Several layers that read the same input, solved as one: ``(weights, shared stats, sparsities, options)``.
StackedPruner = Callable[[list[torch.Tensor], LayerStats, list[float], MethodOptions], list[PruneResult]]


def split_rows(result: PruneResult, rows: list[int]) -> list[PruneResult]:
    """Cut the result of a row-stacked solve back into one result per layer (``rows`` each)."""
    out, r0 = [], 0
    for n in rows:
        part = slice(r0, r0 + n)
        bias = None if result.bias is None else result.bias[part]
        out.append(PruneResult(result.weight[part], result.mask[part], bias, None, dict(result.info)))
        r0 += n
    return out


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its callable, the statistics it needs, and a one-line description.

    ``run`` is None for a method that removes whole units (:mod:`oneshot.passes.structured`).
    A method that needs no statistics is data-free: it runs without calibration data.
    ``run_stacked``, where given, solves layers that share an input (q/k/v, gate/up) as one
    (one factorisation, one column loop) with the same result as ``run`` on each.
    ``updates_weights`` is True for a method that changes the kept weights (SparseGPT, OBS), not
    only zeroes the pruned ones; mask refinements (DSnoT) apply to the others. ``reference`` is
    True for a method that reads each layer's weight in a base checkpoint (movement, ``--base``);
    ``gradients`` for one that reads each weight's squared gradient (fisher). ``quantizes`` is
    True for a quantizer (GPTQ, RTN): it puts weights on a grid instead of pruning them, alone
    (``--method gptq``) or as the stage after a pruning method (``--then gptq``).
    """

    name: str
    run: LayerPruner | None
    needs: tuple[str, ...]
    summary: str
    structured: bool = False
    run_stacked: StackedPruner | None = None
    updates_weights: bool = False
    reference: bool = False
    gradients: bool = False
    quantizes: bool = False
    knobs: tuple[Knob, ...] = ()  # the options it reads, declared in its module

    @property
    def data_free(self) -> bool:
        """Whether the method prunes from the weights alone (no calibration data, no forwards)."""
        return not self.needs and not self.structured and not self.gradients


def require(stat: torch.Tensor | None, name: str, method: str) -> torch.Tensor:
    """``stat``, or a RuntimeError naming the statistic ``method`` needs but did not get."""
    if stat is None:
        raise RuntimeError(f"{method} needs the {name} statistic but the engine did not gather it")
    return stat
