"""The layer-by-layer driver: calibrate, prune and propagate one transformer block at a time.

For each block: forward every calibration batch through it with hooks that gather the statistics
the method needs, prune each of its linear layers from those statistics, write the weights back,
then run the block again so the next block is calibrated on the *pruned* block's outputs.
Only the current block (and the model's stem during capture) has to sit on the compute device;
captured activations live on the CPU between blocks.
"""

from __future__ import annotations

import fnmatch
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from oneshot.calibration.data import CalibrationSet
from oneshot.calibration.hooks import AccumulatorFactory, collect
from oneshot.calibration.stats import ColumnSqNorm, Hessian, TokenSample, relative_error
from oneshot.capture import capture_inputs
from oneshot.config import PruneConfig
from oneshot.layers import as_matrix, find_blocks, find_linears, from_matrix
from oneshot.methods.base import LayerStats, MethodOptions
from oneshot.methods.registry import METHODS, STAT_COL_NORM, STAT_HESSIAN, MethodSpec

log = logging.getLogger(__name__)

_SAMPLE = "sample"
STAT_FACTORIES: dict[str, AccumulatorFactory] = {
    STAT_HESSIAN: lambda d, dev: Hessian(d, dev),
    STAT_COL_NORM: lambda d, dev: ColumnSqNorm(d, dev),
    _SAMPLE: lambda d, dev: TokenSample(d),
}

#: Called after each block with (block index, that block's outputs per calibration batch).
BlockObserver = Callable[[int, list[torch.Tensor]], None]


@dataclass(frozen=True)
class LayerRecord:
    """What happened to one linear layer."""

    name: str
    block: int
    shape: tuple[int, int]
    target_sparsity: float
    achieved_sparsity: float
    relative_error: float
    seconds: float
    damp: float | None = None


@dataclass
class PhaseTimes:
    """Seconds spent in each phase of the sweep (statistics are timed inside the forwards)."""

    capture: float = 0.0
    forward: float = 0.0
    statistics: float = 0.0
    solve: float = 0.0
    propagate: float = 0.0


@dataclass
class SweepResult:
    """Output of :func:`prune_sequential`."""

    blocks_name: str
    layers: list[LayerRecord] = field(default_factory=list)
    times: PhaseTimes = field(default_factory=PhaseTimes)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> the first CUDA device if available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _move_outside(model: nn.Module, blocks: nn.ModuleList, device: torch.device) -> None:
    """Move every parameter and buffer of ``model`` that is not inside ``blocks`` to ``device``."""
    inside = {id(t) for t in blocks.parameters()} | {id(t) for t in blocks.buffers()}
    for module in model.modules():
        for param in module._parameters.values():
            if param is not None and id(param) not in inside:
                param.data = param.data.to(device)
        for key, buf in module._buffers.items():
            if buf is not None and id(buf) not in inside:
                module._buffers[key] = buf.to(device)


def _skipped(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def prune_sequential(
    model: nn.Module,
    calib: CalibrationSet,
    config: PruneConfig,
    *,
    method: MethodSpec | None = None,
    sparsities: Mapping[str, float] | None = None,
    observer: BlockObserver | None = None,
) -> SweepResult:
    """Prune ``model`` in place, block by block, with ``config.method`` (or an explicit ``method``).

    ``sparsities`` maps qualified layer names to a sparsity that overrides ``config.sparsity``
    (layer-wise allocation). Layers matching ``config.skip_layers`` globs are left dense.
    """
    spec = method or METHODS[config.method]
    sparsity = float(config.sparsity or 0.0)
    options = MethodOptions(
        nm=config.nm, block_size=config.block_size, damp=config.damp, max_damp_retries=config.max_damp_retries
    )
    device = resolve_device(config.device)
    blocks_name, blocks = find_blocks(model)
    result = SweepResult(blocks_name=blocks_name)
    factories = {key: STAT_FACTORIES[key] for key in (*spec.needs, _SAMPLE)}
    home = next(blocks[0].parameters()).device

    t0 = time.perf_counter()
    _move_outside(model, blocks, device)
    blocks[0].to(device)
    captured = capture_inputs(model, blocks, calib, config.batch_size, device)
    result.times.capture = time.perf_counter() - t0
    hidden = captured.hidden

    bar = tqdm(blocks, desc=f"{spec.name}", unit="block", disable=True if config.quiet else None)
    for i, block in enumerate(bar):
        block.to(device)
        linears = {
            name: module
            for name, module in find_linears(block).items()
            if not _skipped(f"{blocks_name}.{i}.{name}", config.skip_layers)
        }
        t0 = time.perf_counter()
        with torch.no_grad(), collect(linears, factories) as collector:
            for b, h in enumerate(hidden):
                collector.next_batch(captured.token_masks[b])
                captured.calls[b][i].run(block, h, device)
        result.times.statistics += collector.seconds
        result.times.forward += time.perf_counter() - t0 - collector.seconds

        for name, module in linears.items():
            t0 = time.perf_counter()
            full = f"{blocks_name}.{i}.{name}"
            accs = collector.stats(name)
            stats = LayerStats(
                hessian=accs[STAT_HESSIAN].finalize() if STAT_HESSIAN in accs else None,  # type: ignore[attr-defined]
                col_sq_norm=accs[STAT_COL_NORM].finalize() if STAT_COL_NORM in accs else None,  # type: ignore[attr-defined]
                count=accs[_SAMPLE].count,
            )
            weight = as_matrix(module).to(device)  # [out, in]
            target = float(sparsities.get(full, sparsity)) if sparsities else sparsity
            pruned = spec.run(weight, stats, target, options)
            from_matrix(module, pruned.weight, pruned.bias)
            seconds = time.perf_counter() - t0
            result.times.solve += seconds
            sample = accs[_SAMPLE].finalize()  # type: ignore[attr-defined]
            record = LayerRecord(
                name=full,
                block=i,
                shape=(int(weight.shape[0]), int(weight.shape[1])),
                target_sparsity=target,
                achieved_sparsity=float((pruned.weight == 0).sum()) / pruned.weight.numel(),
                relative_error=relative_error(weight, pruned.weight, sample),
                seconds=seconds,
                damp=pruned.info.get("damp"),
            )
            result.layers.append(record)
            log.debug("%s: sparsity %.4f, rel. error %.3g", full, record.achieved_sparsity, record.relative_error)
        del collector

        t0 = time.perf_counter()
        with torch.no_grad():
            hidden = [captured.calls[b][i].run(block, h, device).to(h.device) for b, h in enumerate(hidden)]
        result.times.propagate += time.perf_counter() - t0
        if observer is not None:
            observer(i, hidden)
        block.to(home)
    _move_outside(model, blocks, home)
    return result
