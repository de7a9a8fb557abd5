"""The methods oneshot knows, in one explicit list (no import magic).

Each method module defines its pure tensor function and a ``SPEC`` (:class:`MethodSpec`) that adapts
it to the engine's call ``(W, stats, sparsity, options)`` and declares which input statistics it
needs, so the engine gathers only those. Adding a method is one module plus one line here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from oneshot.methods import dsnot, fisher, gptq, magnitude, movement, obs, ria, sparsegpt, structured, wanda
from oneshot.methods.base import (
    STAT_COL_NORM,
    STAT_HESSIAN,
    STAT_MEANVAR,
    LayerStats,
    MethodOptions,
    MethodSpec,
    PruneResult,
)

__all__ = [
    "METHODS",
    "REFINERS",
    "Refiner",
    "STAT_COL_NORM",
    "STAT_HESSIAN",
    "STAT_MEANVAR",
    "MethodSpec",
    "QUANTIZERS",
    "list_methods",
]

METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        magnitude.SPEC,
        wanda.SPEC,
        ria.SPEC,
        sparsegpt.SPEC,
        obs.SPEC,
        fisher.SPEC,
        movement.SPEC,
        structured.SPEC,
        gptq.SPEC,
        gptq.RTN_SPEC,
    )
}

#: The quantizers ``--then`` may name after a pruning method (see :data:`oneshot.config.QUANTIZERS`).
QUANTIZERS = tuple(name for name, spec in METHODS.items() if spec.quantizes)


#: A mask refinement: ``(dense W [out, in], the method's result, stats, options) -> refined result``.
Refiner = Callable[[torch.Tensor, PruneResult, LayerStats, MethodOptions], PruneResult]

#: The refinements ``--refine`` names (see :data:`oneshot.config.REFINES`).
REFINERS: dict[str, Refiner] = {"dsnot": dsnot.refine}


def list_methods() -> list[MethodSpec]:
    """All registered methods, sorted by name."""
    return [METHODS[name] for name in sorted(METHODS)]
