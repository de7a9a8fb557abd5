"""The OWL allocation pass: one dense, statistics-only sweep -> a sparsity per block.

Yin et al., "Outlier Weighed Layerwise Sparsity (OWL)" (ICML 2024), §3: a block's outlier ratio is
the share of its Wanda scores ``|W_ij|·‖X_j‖`` above M times their mean; blocks with more outliers
are pruned less (:func:`oneshot.methods.allocation.owl_sparsities`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from oneshot.calibration.data import CalibrationSet
from oneshot.calibration.stats import Accumulator
from oneshot.config import PruneConfig
from oneshot.distributed import Ranks
from oneshot.engine import SweepIO, layer_stats, sweep
from oneshot.layers import as_matrix
from oneshot.methods.allocation import outlier_ratio, owl_sparsities
from oneshot.methods.base import STAT_COL_NORM


@dataclass(frozen=True)
class OwlAllocation:
    """OWL's result: per-layer sparsities and, per block, its outlier ratio and sparsity."""

    sparsities: dict[str, float]
    blocks: list[dict[str, float]]


def owl_allocation(
    model: nn.Module,
    calib: CalibrationSet,
    config: PruneConfig,
    io: SweepIO | None = None,
    single_pass: bool = False,
    ranks: Ranks | None = None,
) -> OwlAllocation:
    """One dense, statistics-only sweep: each block's outlier ratio -> per-block sparsity (OWL).

    Scores are Wanda's ``|W_ij|·‖X_j‖`` over all linear layers of the block; the ratio is the
    share above ``config.owl_m`` times their mean. Nothing is pruned during the sweep. With
    ``ranks`` every rank scores every layer from the reduced statistics: all get the same allocation.
    """
    counts: dict[int, list[float]] = {}  # block -> [outliers, scores, parameters]
    block_layers: dict[int, list[str]] = {}
    pending: list[torch.Tensor] = []

    def visit(full: str, block: int, module: nn.Module, accs: dict[str, Accumulator]) -> None:
        col = layer_stats(accs).col_sq_norm
        assert col is not None
        scores = as_matrix(module).abs() * col.sqrt().unsqueeze(0)  # [out, in]
        pending.append(scores.flatten())
        block_layers.setdefault(block, []).append(full)

    def finish_block(block: int, module: nn.Module, stats: Callable[[str], dict[str, Accumulator]]) -> None:
        if not pending:
            return
        scores = torch.cat(pending)
        pending.clear()
        counts[block] = [outlier_ratio(scores, config.owl_m), float(scores.numel())]

    sweep(
        model,
        calib,
        config,
        (STAT_COL_NORM,),
        visit,
        block_visit=finish_block,
        desc="owl statistics",
        io=io,
        single_pass=single_pass,
        ranks=ranks,
    )
    order = sorted(counts)
    ratios = [counts[b][0] for b in order]
    block_sparsity = owl_sparsities(
        ratios, [int(counts[b][1]) for b in order], float(config.sparsity or 0.0), config.owl_lambda
    )
    sparsities = {name: s for b, s in zip(order, block_sparsity, strict=True) for name in block_layers[b]}
    blocks = [
        {"block": b, "outlier_ratio": r, "sparsity": s, "parameters": counts[b][1]}
        for b, r, s in zip(order, ratios, block_sparsity, strict=True)
    ]
    return OwlAllocation(sparsities=sparsities, blocks=blocks)
