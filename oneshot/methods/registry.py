"""The methods oneshot knows, in one explicit dict (no import magic).

Each entry adapts a pure method function to the driver's call ``(W, stats, sparsity, options)`` and
declares which input statistics it needs, so the driver gathers only those.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from oneshot.methods.base import LayerPruner, LayerStats, MethodOptions, PruneResult
from oneshot.methods.magnitude import magnitude
from oneshot.methods.obs import obs
from oneshot.methods.sparsegpt import sparsegpt
from oneshot.methods.wanda import wanda

#: Statistics a method may ask for; the driver maps each to an accumulator.
STAT_HESSIAN = "hessian"
STAT_COL_NORM = "col_sq_norm"
STAT_MEANVAR = "meanvar"


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its callable, the statistics it needs, and a one-line description."""

    name: str
    run: LayerPruner | None
    needs: tuple[str, ...]
    summary: str
    structured: bool = False  # removes whole units (driver.prune_structured) instead of weights


def _require(stat: torch.Tensor | None, name: str, method: str) -> torch.Tensor:
    if stat is None:
        raise RuntimeError(f"{method} needs the {name} statistic but the driver did not gather it")
    return stat


def _magnitude(w: torch.Tensor, stats: LayerStats, sparsity: float, opt: MethodOptions) -> PruneResult:
    return magnitude(w, sparsity, nm=opt.nm)


def _wanda(w: torch.Tensor, stats: LayerStats, sparsity: float, opt: MethodOptions) -> PruneResult:
    return wanda(w, _require(stats.col_sq_norm, STAT_COL_NORM, "wanda"), sparsity, nm=opt.nm)


def _sparsegpt(w: torch.Tensor, stats: LayerStats, sparsity: float, opt: MethodOptions) -> PruneResult:
    return sparsegpt(
        w,
        _require(stats.hessian, STAT_HESSIAN, "sparsegpt"),
        sparsity,
        nm=opt.nm,
        block_size=opt.block_size,
        damp=opt.damp,
        max_damp_retries=opt.max_damp_retries,
    )


def _obs(w: torch.Tensor, stats: LayerStats, sparsity: float, opt: MethodOptions) -> PruneResult:
    return obs(
        w,
        _require(stats.hessian, STAT_HESSIAN, "obs"),
        sparsity,
        nm=opt.nm,
        damp=opt.damp,
        max_damp_retries=opt.max_damp_retries,
        memory_budget=opt.memory_budget,
    )


METHODS: dict[str, MethodSpec] = {
    "magnitude": MethodSpec("magnitude", _magnitude, (), "smallest |W| per layer; needs no calibration data"),
    "wanda": MethodSpec("wanda", _wanda, (STAT_COL_NORM,), "|W|·‖X_j‖ per output row (Sun et al. 2023); fast"),
    "sparsegpt": MethodSpec(
        "sparsegpt",
        _sparsegpt,
        (STAT_HESSIAN,),
        "OBS updates with blocked inverse-Hessian Cholesky (Frantar & Alistarh 2023); accurate and fast",
    ),
    "obs": MethodSpec(
        "obs",
        _obs,
        (STAT_HESSIAN,),
        "exact greedy OBS per row (Frantar et al. 2022, OBC); most accurate, slow: O(rows·in³)",
    ),
    "structured": MethodSpec(
        "structured",
        None,
        (STAT_MEANVAR,),
        "removes whole MLP neurons / attention heads by fluctuation, folds their mean into the bias",
        structured=True,
    ),
}


def list_methods() -> list[MethodSpec]:
    """All registered methods, sorted by name."""
    return [METHODS[name] for name in sorted(METHODS)]
