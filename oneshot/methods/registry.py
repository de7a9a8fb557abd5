"""The methods oneshot knows, in one explicit list (no import magic).

Each method module defines its pure tensor function and a ``SPEC`` (:class:`MethodSpec`) that adapts
it to the engine's call ``(W, stats, sparsity, options)`` and declares which input statistics it
needs, so the engine gathers only those. Adding a method is one module plus one line here.
"""

from __future__ import annotations

from oneshot.methods import magnitude, obs, sparsegpt, structured, wanda
from oneshot.methods.base import STAT_COL_NORM, STAT_HESSIAN, STAT_MEANVAR, MethodSpec

__all__ = ["METHODS", "STAT_COL_NORM", "STAT_HESSIAN", "STAT_MEANVAR", "MethodSpec", "list_methods"]

METHODS: dict[str, MethodSpec] = {
    spec.name: spec for spec in (magnitude.SPEC, wanda.SPEC, sparsegpt.SPEC, obs.SPEC, structured.SPEC)
}


def list_methods() -> list[MethodSpec]:
    """All registered methods, sorted by name."""
    return [METHODS[name] for name in sorted(METHODS)]
