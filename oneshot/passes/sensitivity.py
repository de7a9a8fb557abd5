"""The sensitivity allocation pass (``--allocate sensitivity``): measured block errors -> a sparsity per block.

OWL assumes the blocks rich in outliers are the sensitive ones; on the small models measured here
that premise fails (see ``benchmarks/results/``). This pass measures instead: one dense sweep in
which every block, with its own statistics, is pruned by the run's method at a few probe
sparsities around the target (``target ± --allocate-lambda``); each probe costs one forward of the
block over the calibration set, and gives the block's relative output error against its dense
output. The dense weights are then put back and the dense outputs propagated, so every block is
measured on dense inputs. :func:`oneshot.methods.allocation.sensitivity_sparsities` then picks the
per-block sparsities with the least summed error at the parameter-weighted target.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from oneshot.calibration.data import CalibrationSet
from oneshot.calibration.stats import Accumulator
from oneshot.config import PruneConfig
from oneshot.engine import PhaseTimes, RefitBatches, SweepIO, layer_stats, sweep
from oneshot.layers import as_matrix, from_matrix
from oneshot.methods.allocation import probe_sparsities, sensitivity_sparsities
from oneshot.methods.base import LayerStats
from oneshot.methods.registry import METHODS
from oneshot.passes.reconstruct import in_float32, output_error


@dataclass
class SensitivityAllocation:
    """The result: per-layer sparsities, per block its probe errors and sparsity, and the cost."""

    sparsities: dict[str, float]
    blocks: list[dict[str, object]]
    probes: list[float]
    cost_vs_forward: float  # seconds of probing / seconds of one dense forward over the calibration set
    times: PhaseTimes = field(default_factory=PhaseTimes)


def sensitivity_allocation(
    model: nn.Module, calib: CalibrationSet, config: PruneConfig, io: SweepIO | None = None
) -> SensitivityAllocation:
    """Probe every block at a few sparsities with the run's method, then allocate (see the module docstring)."""
    spec = METHODS[config.method]
    assert spec.run is not None
    options = config.method_options()
    target = float(config.sparsity or 0.0)
    probes = probe_sparsities(target, config.allocate_lambda)
    pending: dict[str, tuple[nn.Module, LayerStats]] = {}
    curves: dict[int, list[float]] = {}
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
                    errors.append(output_error(batches))
                curves[i] = errors
                params[i] = sum(w.numel() for w in dense.values())
            finally:
                for name, (module, _) in pending.items():
                    from_matrix(module, dense[name])
                pending.clear()

    sweep(model, calib, config, config.stat_needs(), visit, times=times, desc="sensitivity", io=io, refit=probe)
    order = sorted(curves)
    chosen = sensitivity_sparsities([curves[b] for b in order], probes, [params[b] for b in order], target)
    sparsities = {name: s for b, s in zip(order, chosen, strict=True) for name in layers_of[b]}
    blocks: list[dict[str, object]] = [
        {"block": b, "sparsity": s, "errors": curves[b], "parameters": params[b]}
        for b, s in zip(order, chosen, strict=True)
    ]
    return SensitivityAllocation(sparsities, blocks, probes, times.refit / max(times.propagate, 1e-9), times)
