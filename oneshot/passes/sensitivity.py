"""The sensitivity allocation pass (``--allocate sensitivity``): measured block errors -> a sparsity per block.

OWL assumes the blocks rich in outliers are the sensitive ones; on the small models measured here
that premise fails (see ``benchmarks/results/``). This pass measures instead: one dense sweep in
which every block, with its own statistics, is pruned by the run's method at a few probe
sparsities around the target (``target ± --allocate-lambda``); each probe costs one forward of the
block over the calibration set, and gives the block's relative output error against its dense
output. The dense weights are then put back and the dense outputs propagated, so every block is
measured on dense inputs. :func:`oneshot.methods.allocation.sensitivity_sparsities` then picks the
per-block sparsities with the least summed error at the parameter-weighted target.

What is summed (``--allocate-error``): ``relative``, each block's ``‖Δy‖² / ‖y‖²``; or ``fisher``,
each block's ``‖Δy‖²`` times the mean squared gradient of the dense model's loss at that block's
output (:func:`oneshot.gradients.block_output_gradients`): with the empirical Fisher ``g gᵀ`` as
the loss curvature and an error uncorrelated with the gradient's direction, the loss grows by about
``Σ_t ‖g_t‖² ‖Δy_t‖² / d``, so the weight says how much an error at block b costs at the model's
output after the blocks behind it have carried and amplified it. On SmolLM2 at 70% the relative
error steers SparseGPT's sparsity the wrong way (worse than uniform); the Fisher weighting does not
(``benchmarks/results/``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from oneshot.calibration.data import CalibrationSet
from oneshot.calibration.stats import Accumulator
from oneshot.config import PruneConfig
from oneshot.distributed import Ranks
from oneshot.engine import PhaseTimes, RefitBatches, SweepIO, layer_stats, resolve_device, sweep
from oneshot.gradients import block_output_gradients
from oneshot.layers import as_matrix, find_blocks, from_matrix
from oneshot.methods.allocation import probe_sparsities, sensitivity_sparsities
from oneshot.methods.base import LayerStats
from oneshot.methods.registry import METHODS
from oneshot.passes.backward import streamed_gradients
from oneshot.passes.reconstruct import in_float32, output_error_sums


@dataclass
class SensitivityAllocation:
    """The result: per-layer sparsities, per block its probe errors and sparsity, and the cost."""

    sparsities: dict[str, float]
    blocks: list[dict[str, object]]
    probes: list[float]
    cost_vs_forward: float  # seconds of probing / seconds of one dense forward over the calibration set
    times: PhaseTimes = field(default_factory=PhaseTimes)
    gradient_seconds: float = 0.0  # the Fisher weights' backward passes (``--allocate-error fisher``)


def sensitivity_allocation(
    model: nn.Module, calib: CalibrationSet, config: PruneConfig, io: SweepIO | None = None, ranks: Ranks | None = None
) -> SensitivityAllocation:
    """Probe every block at a few sparsities with the run's method, then allocate (see the module docstring).

    With ``ranks`` (``calib`` is this rank's share) every rank solves the probes from the reduced
    statistics and the probe errors' numerators and denominators are summed over the ranks, so
    every rank picks the same allocation.
    """
    spec = METHODS[config.method]
    assert spec.run is not None
    options = config.method_options()
    target = float(config.sparsity or 0.0)
    probes = probe_sparsities(target, config.allocate_lambda)
    weights, seconds = _error_weights(model, calib, config, ranks, io)
    pending: dict[str, tuple[nn.Module, LayerStats]] = {}
    curves: dict[int, list[float]] = {}
    energies: dict[int, float] = {}
    params: dict[int, int] = {}
    layers_of: dict[int, list[str]] = {}
    times = PhaseTimes()

    def visit(full: str, block: int, module: nn.Module, accs: dict[str, Accumulator]) -> None:
        pending[full] = (module, layer_stats(accs))
        layers_of.setdefault(block, []).append(full)

    def probe(i: int, block: nn.Module, linears: dict[str, nn.Module], batches: RefitBatches) -> None:
        assert spec.run is not None
        dense = {name: as_matrix(module) for name, (module, _) in pending.items()}
        with in_float32(block):  # the batches run in float32
            try:
                errors = []
                for sparsity in probes:
                    for name, (module, stats) in pending.items():
                        from_matrix(module, spec.run(dense[name], stats, sparsity, options).weight)
                    num, den = _summed(output_error_sums(batches), ranks)
                    errors.append(num / max(den, 1e-30))
                    energies[i] = den
                curves[i] = errors
                params[i] = sum(w.numel() for w in dense.values())
            finally:
                for name, (module, _) in pending.items():
                    from_matrix(module, dense[name])
                pending.clear()

    sweep(model, calib, config, config.stat_needs(), visit, times=times, desc="sensitivity", io=io, refit=probe,
          ranks=ranks, refit_reduces=True)  # fmt: skip
    order = sorted(curves)
    costs = [curves[b] for b in order]  # relative: e_b(s) as measured
    if weights is not None:  # fisher: ‖Δy‖² = e_b(s)·‖y‖², times the block's gradient weight
        costs = [[e * energies[b] * weights[b] for e in curves[b]] for b in order]
    chosen = sensitivity_sparsities(costs, probes, [params[b] for b in order], target)
    sparsities = {name: s for b, s in zip(order, chosen, strict=True) for name in layers_of[b]}
    blocks: list[dict[str, object]] = [
        {
            "block": b,
            "sparsity": s,
            "errors": curves[b],
            "parameters": params[b],
            **({} if weights is None else {"output_energy": energies[b], "gradient_weight": weights[b]}),
        }
        for b, s in zip(order, chosen, strict=True)
    ]
    cost = times.refit / max(times.propagate, 1e-9)
    return SensitivityAllocation(sparsities, blocks, probes, cost, times, seconds)


def _summed(sums: tuple[float, float], ranks: Ranks | None) -> tuple[float, float]:
    """A probe's error numerator and denominator over every rank's samples."""
    if ranks is None:
        return sums
    pooled = torch.tensor(sums, dtype=torch.float64)
    ranks.all_reduce(pooled)
    return float(pooled[0]), float(pooled[1])


def _error_weights(
    model: nn.Module, calib: CalibrationSet, config: PruneConfig, ranks: Ranks | None = None, io: SweepIO | None = None
) -> tuple[list[float] | None, float]:
    """Each block's Fisher weight (``--allocate-error fisher``) and the seconds it took; None for relative.

    A streamed model's come from a backward streamed block by block (kept in ``io.scratch``).
    """
    if config.allocate_error != "fisher":
        return None, 0.0
    t0 = time.perf_counter()
    _, blocks = find_blocks(model)
    found = streamed_gradients(model, calib, config, {}, io, ranks=ranks)
    if found is not None:
        return found.block_output_sq, time.perf_counter() - t0
    device = resolve_device(config.device)
    weights = block_output_gradients(model, calib, blocks, quiet=config.quiet, device=device, ranks=ranks)
    return weights, time.perf_counter() - t0
