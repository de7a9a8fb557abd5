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
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from oneshot.activations import ActivationStore, MemoryStore
from oneshot.calibration.data import CalibrationSet
from oneshot.calibration.hooks import AccumulatorFactory, collect
from oneshot.calibration.stats import Accumulator, ColumnSqNorm, Hessian, MeanVar, TokenSample, relative_error
from oneshot.capture import CapturedInputs, capture_inputs
from oneshot.config import PruneConfig
from oneshot.errors import ConfigError
from oneshot.layers import as_matrix, find_blocks, find_linears, from_matrix, weight_numel
from oneshot.memory import release_freed_memory
from oneshot.methods.allocation import outlier_ratio, owl_sparsities
from oneshot.methods.base import LayerStats, MethodOptions
from oneshot.methods.registry import METHODS, STAT_COL_NORM, STAT_HESSIAN, STAT_MEANVAR, MethodSpec
from oneshot.methods.structured import (
    channel_scores,
    channels_of,
    compensation,
    keep_index,
    lowest,
    lowest_per_group,
    unit_scores,
)
from oneshot.surgery import attention_role, mlp_role, param_count, slice_linear

log = logging.getLogger(__name__)

SAMPLE = "sample"
STAT_FACTORIES: dict[str, AccumulatorFactory] = {
    STAT_HESSIAN: lambda d, dev: Hessian(d, dev),
    STAT_COL_NORM: lambda d, dev: ColumnSqNorm(d, dev),
    SAMPLE: lambda d, dev: TokenSample(d),
    STAT_MEANVAR: lambda d, dev: MeanVar(d, dev),
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
    report: float = 0.0  # reconstruction-error estimates for the report
    propagate: float = 0.0
    per_block: list[float] = field(default_factory=list)  # wall seconds of each block


@dataclass
class SweepResult:
    """Output of :func:`prune_sequential`."""

    blocks_name: str
    layers: list[LayerRecord] = field(default_factory=list)
    times: PhaseTimes = field(default_factory=PhaseTimes)
    skipped: list[str] = field(default_factory=list)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> the first CUDA device if available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _move_outside(model: nn.Module, blocks: nn.ModuleList, device: torch.device) -> None:
    """Move every real parameter and buffer of ``model`` that is not inside ``blocks`` to ``device``."""
    inside = {id(t) for t in blocks.parameters()} | {id(t) for t in blocks.buffers()}
    for module in model.modules():
        for param in module._parameters.values():
            if param is not None and id(param) not in inside and param.device.type != "meta":
                param.data = param.data.to(device)
        for key, buf in module._buffers.items():
            if buf is not None and id(buf) not in inside and buf.device.type != "meta":
                module._buffers[key] = buf.to(device)


def _skipped(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


class BlockSource(Protocol):
    """Where a block's weights come from and go: the model in memory, or shards on disk (streaming)."""

    def load(self, index: int, block: nn.Module) -> None:
        """Make block ``index``'s weights real (on the CPU) before the sweep uses it."""

    def unload(self, index: int, block: nn.Module) -> None:
        """The sweep is done with block ``index`` (after ``after_block``)."""


class InMemory:
    """The model's weights are already in memory; nothing to load or free."""

    def load(self, index: int, block: nn.Module) -> None:
        """Nothing to load."""

    def unload(self, index: int, block: nn.Module) -> None:
        """Nothing to free."""


@dataclass
class SweepIO:
    """How a sweep gets and hands back blocks and activations (defaults: all in memory, from block 0).

    ``start`` > 0 resumes: ``store`` must then hold block ``start``'s inputs. ``after_block`` is
    called with each finished block (weights final, next inputs committed to ``store``).
    """

    source: BlockSource = field(default_factory=InMemory)
    store: ActivationStore | None = None
    start: int = 0
    after_block: Callable[[int, nn.Module], None] | None = None


#: Called once per block after its statistics forward and before propagation:
#: (block index, block module, a lookup from linear-layer name to its accumulators).
BlockVisitor = Callable[[int, nn.Module, Callable[[str], dict[str, Accumulator]]], None]

#: Called for each linear layer of the current block during a sweep:
#: (qualified name, block index, module, that layer's accumulators by statistic name).
LayerVisitor = Callable[[str, int, nn.Module, dict[str, Accumulator]], None]


def _capture(
    model: nn.Module, blocks: nn.ModuleList, calib: CalibrationSet, config: PruneConfig, io: SweepIO
) -> tuple[CapturedInputs, ActivationStore]:
    """Record every block's call arguments; block 0's inputs go into the store (unless resuming)."""
    device = resolve_device(config.device)
    store = io.store if io.store is not None else MemoryStore(pin=device.type == "cuda")
    _move_outside(model, blocks, device)
    io.source.load(0, blocks[0])
    blocks[0].to(device)
    sink = store.put if io.start == 0 else (lambda b, h: None)
    captured = capture_inputs(model, blocks, calib, config.batch_size, device, sink)
    if io.start != 0:
        io.source.unload(0, blocks[0])
    if len(store) != len(captured.calls):
        raise RuntimeError(
            f"the activation store holds {len(store)} batches, the calibration set {len(captured.calls)}"
        )
    return captured, store


def sweep(
    model: nn.Module,
    calib: CalibrationSet,
    config: PruneConfig,
    needs: tuple[str, ...],
    visit: LayerVisitor,
    *,
    times: PhaseTimes | None = None,
    observer: BlockObserver | None = None,
    block_visit: BlockVisitor | None = None,
    desc: str = "blocks",
    io: SweepIO | None = None,
) -> str:
    """Run the calibration set through ``model`` block by block, calling ``visit`` on every linear layer.

    For each block: forward all batches with hooks gathering the statistics named in ``needs``
    (plus a token sample), call ``visit`` for each linear layer (it may rewrite the weights), then
    re-run the block to produce the next block's inputs, so later blocks see what ``visit`` did.
    Layers matching ``config.skip_layers`` are not visited. ``io`` says where blocks and
    activations live (default: in memory). Returns the blocks' qualified name.
    """
    times = times if times is not None else PhaseTimes()
    io = io or SweepIO()
    device = resolve_device(config.device)
    blocks_name, blocks = find_blocks(model)
    home = next(blocks[0].parameters()).device
    if home.type == "meta":
        home = torch.device("cpu")

    t0 = time.perf_counter()
    captured, store = _capture(model, blocks, calib, config, io)
    times.capture += time.perf_counter() - t0
    step = _BlockStep(config, needs, visit, block_visit, times, device, captured, store)
    try:
        bar = tqdm(range(io.start, len(blocks)), desc=desc, unit="block", disable=True if config.quiet else None)
        for i in bar:
            start = time.perf_counter()
            block = blocks[i]
            if i != 0:  # block 0 was loaded for the capture (a resumed sweep starts later)
                io.source.load(i, block)
            block.to(device)
            step.run(i, block, _block_linears(blocks_name, i, block, config), blocks_name)
            if observer is not None:
                observer(i, [store.get(b) for b in range(len(store))])
            block.to(home)
            if io.after_block is not None:
                io.after_block(i, block)
            io.source.unload(i, block)
            release_freed_memory()
            times.per_block.append(time.perf_counter() - start)
    finally:
        _move_outside(model, blocks, home)
    return blocks_name


@dataclass
class _BlockStep:
    """One block of a sweep: statistics forward, visitors, propagation into the store."""

    config: PruneConfig
    needs: tuple[str, ...]
    visit: LayerVisitor
    block_visit: BlockVisitor | None
    times: PhaseTimes
    device: torch.device
    captured: CapturedInputs
    store: ActivationStore

    def run(self, i: int, block: nn.Module, linears: dict[str, nn.Module], blocks_name: str) -> None:
        """Gather statistics, let the visitors prune, then write the block's outputs to the store."""
        times, store, calls = self.times, self.store, self.captured.calls
        factories = {key: STAT_FACTORIES[key] for key in (*self.needs, SAMPLE)}
        t0 = time.perf_counter()
        with torch.no_grad(), collect(linears, factories) as collector:
            for b in range(len(store)):
                collector.next_batch(self.captured.token_masks[b])
                calls[b][i].run(block, store.get(b), self.device)
        times.statistics += collector.seconds
        times.forward += time.perf_counter() - t0 - collector.seconds

        t0, report_before = time.perf_counter(), times.report
        for name, module in linears.items():
            self.visit(f"{blocks_name}.{i}.{name}", i, module, collector.stats(name))
            release_freed_memory()  # a layer's solve scratch (sorts, fp32 copies) back to the OS
        if self.block_visit is not None:
            self.block_visit(i, block, collector.stats)
        times.solve += time.perf_counter() - t0 - (times.report - report_before)  # visitors time their report
        del collector

        t0 = time.perf_counter()
        with torch.no_grad():
            for b in range(len(store)):
                store.put(b, calls[b][i].run(block, store.get(b), self.device))
        store.commit()
        times.propagate += time.perf_counter() - t0


def layer_stats(accs: dict[str, Accumulator]) -> LayerStats:
    """Finalise a layer's accumulators into the :class:`LayerStats` a method consumes."""
    hessian = accs.get(STAT_HESSIAN)
    col = accs.get(STAT_COL_NORM)
    return LayerStats(
        hessian=hessian.finalize() if isinstance(hessian, Hessian) else None,
        col_sq_norm=col.finalize() if isinstance(col, ColumnSqNorm) else None,
        count=accs[SAMPLE].count,
    )


def prune_sequential(
    model: nn.Module,
    calib: CalibrationSet,
    config: PruneConfig,
    *,
    method: MethodSpec | None = None,
    sparsities: Mapping[str, float | None] | None = None,
    observer: BlockObserver | None = None,
    io: SweepIO | None = None,
    result: SweepResult | None = None,
) -> SweepResult:
    """Prune ``model`` in place, block by block, with ``config.method`` (or an explicit ``method``).

    ``sparsities`` maps qualified layer names to a sparsity that overrides ``config.sparsity``
    (layer-wise allocation; None = leave dense). Layers matching ``config.skip_layers`` globs are
    left dense too. ``io`` streams blocks and activations (see :class:`SweepIO`); ``result``
    carries the records of blocks finished before a resume and receives the new ones.
    """
    spec = method or METHODS[config.method]
    if spec.run is None:
        raise ConfigError(f"{spec.name} removes whole units: use prune_structured()")
    run = spec.run
    sparsity = float(config.sparsity or 0.0)
    options = MethodOptions(
        nm=config.nm,
        block_size=config.block_size,
        damp=config.damp,
        max_damp_retries=config.max_damp_retries,
        memory_budget=config.obs_memory_mb << 20,
    )
    device = resolve_device(config.device)
    result = result if result is not None else SweepResult(blocks_name="")

    def prune_layer(full: str, block: int, module: nn.Module, accs: dict[str, Accumulator]) -> None:
        target = sparsities.get(full, sparsity) if sparsities else sparsity
        if target is None:  # "skip" in a sparsity map
            result.skipped.append(full)
            return
        t0 = time.perf_counter()
        weight = as_matrix(module).to(device)  # [out, in]
        pruned = run(weight, layer_stats(accs), target, options)
        from_matrix(module, pruned.weight, pruned.bias)
        seconds = time.perf_counter() - t0
        t1 = time.perf_counter()
        sample = accs[SAMPLE]
        rows = sample.finalize() if isinstance(sample, TokenSample) else torch.zeros(0)
        record = LayerRecord(
            name=full,
            block=block,
            shape=(int(weight.shape[0]), int(weight.shape[1])),
            target_sparsity=target,
            achieved_sparsity=float((pruned.weight == 0).sum()) / pruned.weight.numel(),
            relative_error=relative_error(weight, pruned.weight, rows),
            seconds=seconds,
            damp=pruned.info.get("damp"),
        )
        result.layers.append(record)
        result.times.report += time.perf_counter() - t1
        log.debug("%s: sparsity %.4f, rel. error %.3g", full, record.achieved_sparsity, record.relative_error)

    result.blocks_name = sweep(
        model, calib, config, spec.needs, prune_layer, times=result.times, observer=observer, desc=spec.name, io=io
    )
    return result


def _block_linears(blocks_name: str, index: int, block: nn.Module, config: PruneConfig) -> dict[str, nn.Module]:
    """The block's linear layers by block-relative name, without those matching ``config.skip_layers``."""
    return {
        name: module
        for name, module in find_linears(block).items()
        if not _skipped(f"{blocks_name}.{index}.{name}", config.skip_layers)
    }


def prunable_layers(model: nn.Module, config: PruneConfig) -> dict[str, int]:
    """Qualified names of the linear layers a run would prune (not skipped), with their sizes."""
    blocks_name, blocks = find_blocks(model)
    return {
        f"{blocks_name}.{i}.{name}": weight_numel(module)
        for i, block in enumerate(blocks)
        for name, module in _block_linears(blocks_name, i, block, config).items()
    }


@dataclass(frozen=True)
class OwlAllocation:
    """OWL's result: per-layer sparsities and, per block, its outlier ratio and sparsity."""

    sparsities: dict[str, float]
    blocks: list[dict[str, float]]


def owl_allocation(
    model: nn.Module, calib: CalibrationSet, config: PruneConfig, io: SweepIO | None = None
) -> OwlAllocation:
    """One dense, statistics-only sweep: each block's outlier ratio -> per-block sparsity (OWL).

    Scores are Wanda's ``|W_ij|·‖X_j‖`` over all linear layers of the block; the ratio is the
    share above ``config.owl_m`` times their mean. Nothing is pruned during the sweep.
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

    sweep(model, calib, config, (STAT_COL_NORM,), visit, block_visit=finish_block, desc="owl statistics", io=io)
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


@dataclass(frozen=True)
class UnitRecord:
    """Units removed from one block by structured pruning."""

    block: int
    target: str  # "mlp" or "attention"
    before: int
    after: int
    removed: list[int]
    compensated: bool


@dataclass
class StructuredResult:
    """Output of :func:`prune_structured`."""

    blocks_name: str
    units: list[UnitRecord] = field(default_factory=list)
    times: PhaseTimes = field(default_factory=PhaseTimes)
    params_before: int = 0
    params_after: int = 0


def _needs_new_bias(model: nn.Module, block: nn.Module, layer: str, flag: str | None, what: str) -> bool:
    """Whether compensating into ``layer`` must create its bias; ConfigError if the config cannot express one."""
    if getattr(block.get_submodule(layer), "bias", None) is not None:
        return False
    if flag is not None and hasattr(getattr(model, "config", None), flag):
        return True
    raise ConfigError(
        f"{type(model).__name__}'s {what} has no bias and its config offers none, so the removed units' mean "
        "cannot be folded in; pass --no-bias-compensation"
    )


def prune_structured(
    model: nn.Module,
    calib: CalibrationSet,
    config: PruneConfig,
    *,
    observer: BlockObserver | None = None,
    io: SweepIO | None = None,
) -> StructuredResult:
    """Remove the same share of MLP neurons and/or attention heads from every block, in place.

    Units are scored from the mean/variance of their channels at the input of the next
    projection (over calibration tokens, blocks calibrated on the already pruned ones), the lowest
    are removed, and (unless ``config.bias_compensation`` is off) their mean contribution is added
    to the next projection's bias. The model config is updated so ``save_pretrained`` output
    reloads with stock transformers.
    """
    ratio = float(config.ratio or 0.0)
    model_config: Any = getattr(model, "config", None)
    blocks_name, blocks = find_blocks(model)
    targets = ("mlp", "attention") if config.target == "both" else (config.target,)
    mlp = mlp_role(blocks[0]) if "mlp" in targets else None
    attn = attention_role(blocks[0], model_config) if "attention" in targets else None
    result = StructuredResult(blocks_name=blocks_name, params_before=param_count(model))

    new_mlp_bias = new_attn_bias = False
    if mlp is not None:
        width = int(as_matrix(blocks[0].get_submodule(mlp.down)).shape[1])
        remove_mlp = int(round(ratio * width))
        if not 0 < remove_mlp < width:
            raise ConfigError(f"--ratio {ratio} removes {remove_mlp} of {width} MLP neurons; choose a ratio in (0, 1)")
        if config.bias_compensation:
            new_mlp_bias = _needs_new_bias(model, blocks[0], mlp.down, mlp.bias_flag, "MLP")
    if attn is not None:
        heads = int(model_config.num_attention_heads)
        kv = int(getattr(model_config, "num_key_value_heads", None) or heads)
        head_dim = int(model_config.head_dim)
        group = heads // kv
        remove_per_group = int(round(ratio * group))
        if not 0 < remove_per_group < group:
            raise ConfigError(
                f"--ratio {ratio} removes {remove_per_group} of the {group} query heads sharing each key/value head; "
                f"choose a ratio between {0.5 / group:.2f} and {1 - 0.5 / group:.2f}"
            )
        new_heads = heads - kv * remove_per_group
        hidden = int(getattr(model_config, "hidden_size", 0) or 0)
        if hidden and hidden % new_heads:
            raise ConfigError(
                f"removing {remove_per_group} of every {group} query heads leaves {new_heads} heads, but transformers "
                f"requires hidden_size ({hidden}) to be a multiple of the head count; choose another --ratio"
            )
        if config.bias_compensation:
            new_attn_bias = _needs_new_bias(model, blocks[0], attn.out, attn.bias_flag, "attention output")

    def block_visit(i: int, block: nn.Module, stats: Callable[[str], dict[str, Accumulator]]) -> None:
        if mlp is not None:
            mean, var = _meanvar(stats(mlp.down))
            w_down = as_matrix(block.get_submodule(mlp.down))  # [hidden, inter]
            removed = lowest(channel_scores(var, w_down, config.score), remove_mlp)
            delta = compensation(w_down, mean, removed) if config.bias_compensation else None
            keep = keep_index(w_down.shape[1], removed)
            for up in mlp.ups:
                slice_linear(block, up, keep, "out", add_bias=new_mlp_bias)
            slice_linear(block, mlp.down, keep, "in", bias_delta=delta, add_bias=new_mlp_bias)
            result.units.append(
                UnitRecord(i, "mlp", width, width - remove_mlp, removed.tolist(), config.bias_compensation)
            )
        if attn is not None:
            mean, var = _meanvar(stats(attn.out))
            w_out = as_matrix(block.get_submodule(attn.out))  # [hidden, heads * head_dim]
            scores = unit_scores(channel_scores(var, w_out, config.score), head_dim)  # [heads]
            removed_heads = lowest_per_group(scores, kv, remove_per_group)
            channels = channels_of(removed_heads, head_dim)
            delta = compensation(w_out, mean, channels) if config.bias_compensation else None
            keep = keep_index(w_out.shape[1], channels)
            slice_linear(block, attn.query, keep, "out", add_bias=new_attn_bias)
            if new_attn_bias:  # the config flag gives k/v biases too: zeros keep them exact
                for name in attn.kv:
                    rows = as_matrix(block.get_submodule(name)).shape[0]
                    slice_linear(block, name, torch.arange(rows), "out", add_bias=True)
            slice_linear(block, attn.out, keep, "in", bias_delta=delta, add_bias=new_attn_bias)
            module: Any = block.get_submodule(attn.module)
            if hasattr(module, "num_key_value_groups"):
                module.num_key_value_groups = group - remove_per_group
            result.units.append(
                UnitRecord(
                    i,
                    "attention",
                    heads,
                    heads - kv * remove_per_group,
                    removed_heads.tolist(),
                    config.bias_compensation,
                )
            )

    def no_visit(full: str, block: int, module: nn.Module, accs: dict[str, Accumulator]) -> None:
        return None

    sweep(
        model,
        calib,
        config,
        (STAT_MEANVAR,),
        no_visit,
        times=result.times,
        observer=observer,
        block_visit=block_visit,
        desc="structured",
        io=io,
    )
    if mlp is not None:
        for key in mlp.size_keys:
            setattr(model_config, key, width - remove_mlp)
        if new_mlp_bias and mlp.bias_flag:
            setattr(model_config, mlp.bias_flag, True)
    if attn is not None:
        model_config.num_attention_heads = heads - kv * remove_per_group
        model_config.head_dim = head_dim
        if new_attn_bias and attn.bias_flag:
            setattr(model_config, attn.bias_flag, True)
    result.params_after = param_count(model)
    return result


def _meanvar(accs: dict[str, Accumulator]) -> tuple[torch.Tensor, torch.Tensor]:
    acc = accs[STAT_MEANVAR]
    assert isinstance(acc, MeanVar)
    return acc.finalize()
