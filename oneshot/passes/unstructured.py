"""The unstructured pass: prune every linear layer of each block with a registered method.

Each layer is pruned from its block's statistics as the sweep reaches it (the method is a pure
tensor function, :mod:`oneshot.methods`); the sweep then propagates the pruned block, so the next
block is calibrated on pruned outputs. A data-free method (magnitude) sweeps without calibration.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from oneshot.calibration.data import CalibrationSet
from oneshot.calibration.stats import Accumulator, TokenSample, hessian_relative_error, relative_error
from oneshot.checkpoint import ReferenceWeights, model_prefix
from oneshot.config import PruneConfig
from oneshot.distributed import Ranks
from oneshot.engine import (
    SAMPLE,
    BlockObserver,
    BlockRefit,
    PhaseTimes,
    RefitBatches,
    SweepIO,
    layer_stats,
    prunable_layers,
    prunable_modules,
    resolve_device,
    sweep,
)
from oneshot.errors import ConfigError
from oneshot.gradients import empirical_fisher, layer_grad_sq, load_optimizer_state
from oneshot.layers import as_matrix, find_blocks, from_matrix, is_attention, is_conv1d, weight_dtype
from oneshot.methods.base import LayerStats, MethodOptions, MethodSpec, PruneResult
from oneshot.methods.gptq import quantize_stacked, quantize_stage
from oneshot.methods.quantspec import QuantResult
from oneshot.methods.registry import METHODS, REFINERS, Refiner
from oneshot.passes.backward import streamed_gradients
from oneshot.passes.reconstruct import BlockRefitter, RefitRecord
from oneshot.quantized import QuantizedLayer, compress

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerRecord:
    """What happened to one linear layer (``relative_error`` is None without calibration data)."""

    name: str
    block: int
    shape: tuple[int, int]
    target_sparsity: float
    achieved_sparsity: float  # the share of weights the mask removed
    relative_error: float | None
    seconds: float
    damp: float | None = None
    dsnot_swaps: int | None = None
    bits: int | None = None  # a quantized layer's bits per weight
    zero_fraction: float | None = None  # the share of weights equal to zero as written (pruned or rounded to 0)
    tokens: int | None = None  # the calibration tokens its statistics were gathered from
    routed_tokens: int | None = None  # an expert's projection: the real calibration tokens routed to the expert


@dataclass
class SweepResult:
    """Output of :func:`prune_sequential`."""

    blocks_name: str
    layers: list[LayerRecord] = field(default_factory=list)
    times: PhaseTimes = field(default_factory=PhaseTimes)
    skipped: list[str] = field(default_factory=list)
    refits: list[RefitRecord] = field(default_factory=list)  # --refine block, one per block
    quantized: dict[str, QuantizedLayer] = field(default_factory=dict)  # layer -> its compressed-tensors form


def _record(
    name: str,
    block: int,
    weight: torch.Tensor,
    pruned: PruneResult,
    target: float,
    stats: LayerStats,
    sample: Accumulator | None,
    seconds: float,
) -> LayerRecord:
    """The report's record of one pruned layer.

    Its relative error is exact over all calibration tokens when the layer has a Hessian (the one
    its method was given), else measured on the sampled tokens (None without calibration data).
    """
    error = None
    if stats.hessian is not None:
        error = hessian_relative_error(weight, pruned.weight, stats.hessian)
    elif isinstance(sample, TokenSample):
        error = relative_error(weight, pruned.weight, sample.finalize())
    return LayerRecord(
        name=name,
        block=block,
        shape=(int(weight.shape[0]), int(weight.shape[1])),
        target_sparsity=target,
        achieved_sparsity=pruned_fraction(pruned.mask),
        relative_error=error,
        seconds=seconds,
        damp=pruned.info.get("damp"),
        dsnot_swaps=int(pruned.info["dsnot_swaps"]) if "dsnot_swaps" in pruned.info else None,
        bits=None if pruned.quant is None else pruned.quant.spec.bits,
        zero_fraction=zero_fraction(pruned.weight),
        tokens=stats.count or None,
    )


def pruned_fraction(mask: torch.Tensor) -> float:
    """The share of weights a keep-mask ``[out, in]`` removes (False = pruned)."""
    return 1.0 - float(mask.sum()) / mask.numel()


def zero_fraction(weight: torch.Tensor) -> float:
    """The share of weights equal to zero: the pruned ones, plus any a quantizer rounded to zero."""
    return float((weight == 0).sum()) / weight.numel()


@dataclass
class _Pruner:
    """The per-layer and per-group visitors of one unstructured sweep."""

    spec: MethodSpec
    options: MethodOptions
    device: torch.device
    sparsity: float
    sparsities: Mapping[str, float | None] | None
    result: SweepResult
    refine: Refiner | None = None
    reference: ReferenceWeights | None = None
    grad_sq: Mapping[str, torch.Tensor] | None = None
    then: str | None = None  # the quantization stage after the method (--then)
    refine_layers: str = "all"  # DSnoT: attention, mlp or all layers
    grids: dict[nn.Module, tuple[str, QuantResult]] | None = None  # --refine block: quantized layers to tune
    changed: dict[nn.Module, str] = field(default_factory=dict)  # the layers this run wrote, by module
    then_options: MethodOptions | None = None  # the quantizer's (--then), each knob its own

    def options_for(self, module: nn.Module, stage: str = "method") -> MethodOptions:
        """A stage's options for one layer (``then``: the quantizer's): a grid's scales in the layer's dtype."""
        options = self.then_options if stage == "then" and self.then_options is not None else self.options
        if options.quant is None:
            return options
        quant = dataclasses.replace(options.quant, scale_dtype=weight_dtype(module))
        return dataclasses.replace(options, quant=quant)

    def target_of(self, full: str) -> float | None:
        """The layer's sparsity (an allocation overrides the run's); None = leave it dense, recorded as skipped."""
        target = self.sparsities.get(full, self.sparsity) if self.sparsities else self.sparsity
        if target is None:  # "skip" in a sparsity map
            self.result.skipped.append(full)
        return target

    def write(
        self,
        full: str,
        block: int,
        module: nn.Module,
        weight: torch.Tensor,
        pruned: PruneResult,
        *,
        target: float,
        stats: LayerStats,
        accs: Mapping[str, Accumulator],
        seconds: float,
    ) -> None:
        """Put the pruned weight into the layer and record it (a quantized layer's saved form too)."""
        from_matrix(module, pruned.weight, pruned.bias)
        self.changed[module] = full
        if pruned.quant is not None and self.grids is not None:  # the block refit tunes the grid, then saves it
            self.grids[module] = (full, pruned.quant)
        elif pruned.quant is not None:
            self.result.quantized[full] = compress(pruned.quant, weight_dtype(module))
        t1 = time.perf_counter()
        record = _record(full, block, weight, pruned, target, stats, accs.get(SAMPLE), seconds)
        record = dataclasses.replace(record, routed_tokens=getattr(module, "routed_tokens", None))
        self.result.layers.append(record)
        self.result.times.report += time.perf_counter() - t1
        log.debug("%s: sparsity %.4f, rel. error %s", full, record.achieved_sparsity, record.relative_error)

    def refit_changed(self, refit: BlockRefit, ranks: Ranks | None = None) -> BlockRefit:
        """``refit`` on the layers this run changed only (not those a sparsity map skips); their records'
        zero fractions are then taken again from the refitted weights. With ``ranks`` the layers any
        rank changed (each layer is solved by its owner)."""

        def run(i: int, block: nn.Module, linears: dict[str, nn.Module], batches: RefitBatches) -> None:
            changed = [name for name, module in linears.items() if module in self.changed]
            if ranks is not None:
                changed = [name for part in ranks.all_gather_object(changed) for name in part]
            mine = {name: module for name, module in linears.items() if name in changed}
            if not mine:
                return
            refit(i, block, mine, batches)
            names = {self.changed[module]: module for module in mine.values() if module in self.changed}  # my records
            for k, record in enumerate(self.result.layers):
                if record.name in names:  # zeros counted on the weight as it is (a float32 copy would add 4 B/weight)
                    weight = names[record.name].weight
                    assert isinstance(weight, torch.Tensor)
                    self.result.layers[k] = dataclasses.replace(record, zero_fraction=zero_fraction(weight.detach()))

        return run

    def layer(self, full: str, block: int, module: nn.Module, accs: dict[str, Accumulator]) -> None:
        """Prune one layer from its statistics."""
        target = self.target_of(full)
        if target is None:
            return
        assert self.spec.run is not None
        t0 = time.perf_counter()
        weight = as_matrix(module).to(self.device)  # [out, in]
        stats = layer_stats(accs)
        if self.reference is not None:
            base = self.reference.matrix(full, (int(weight.shape[0]), int(weight.shape[1])), is_conv1d(module))
            stats = dataclasses.replace(stats, reference=base.to(self.device))
        if self.grad_sq is not None:
            stats = dataclasses.replace(stats, grad_sq=self.grad_sq[full].to(self.device))
        pruned = self.spec.run(weight, stats, target, self.options_for(module))
        if self.refine is not None and self.refine_layers in ("all", "attention" if is_attention(full) else "mlp"):
            pruned = self.refine(weight, pruned, stats, self.options)
        if self.then is not None:
            pruned = quantize_stage(pruned, stats, self.options_for(module, "then"), self.then)
        seconds = time.perf_counter() - t0
        self.write(full, block, module, weight, pruned, target=target, stats=stats, accs=accs, seconds=seconds)

    def group(self, names: list[str], block: int, modules: list[nn.Module], accs: dict[str, Accumulator]) -> None:
        """Prune layers that read the same input with one stacked solve (``spec.run_stacked``)."""
        assert self.spec.run_stacked is not None
        todo = [(n, m, t) for n, m in zip(names, modules, strict=True) for t in [self.target_of(n)] if t is not None]
        if len(todo) < 2:
            for name, module, _ in todo:
                self.layer(name, block, module, accs)
            return
        t0 = time.perf_counter()
        weights = [as_matrix(module).to(self.device) for _, module, _ in todo]  # each [out, in]
        stats = layer_stats(accs)
        options = self.options_for(todo[0][1])  # a quantizer's scales in the layers' dtype
        solved = self.spec.run_stacked(weights, stats, [t for _, _, t in todo], options)
        if self.then is not None:  # the quantizer stacked too: one more column loop for the group
            solved = quantize_stacked(solved, stats, self.options_for(todo[0][1], "then"), self.then)
        seconds = (time.perf_counter() - t0) / len(todo)  # one solve, shared
        for (name, module, target), weight, pruned in zip(todo, weights, solved, strict=True):
            self.write(name, block, module, weight, pruned, target=target, stats=stats, accs=accs, seconds=seconds)


def _reference(model: nn.Module, config: PruneConfig) -> ReferenceWeights:
    """The base checkpoint's weights, every prunable layer checked to be there before any work."""
    assert config.base is not None  # PruneConfig refuses a method that reads a base without --base
    reference = ReferenceWeights(config.base, model_prefix(model))
    for layer in prunable_layers(model, config):
        reference.key(layer)
    return reference


def _grad_sq(
    model: nn.Module,
    calib: CalibrationSet | None,
    config: PruneConfig,
    ranks: Ranks | None = None,
    io: SweepIO | None = None,
    times: PhaseTimes | None = None,
) -> Mapping[str, torch.Tensor]:
    """Each prunable weight's E[g²]: from ``--optimizer-state``, else the empirical Fisher over ``calib``
    (a streamed model's through a backward streamed block by block, kept in ``io.scratch``)."""
    layers = prunable_modules(model, config)
    if config.optimizer_state is not None:
        return layer_grad_sq(load_optimizer_state(config.optimizer_state, model), layers, model_prefix(model))
    if calib is None:
        raise ConfigError(f"--method {config.method} needs calibration data for its gradients")
    t0 = time.perf_counter()
    found = streamed_gradients(model, calib, config, layers, io, ranks=ranks)
    if found is not None:
        if times is not None:
            times.gradients += time.perf_counter() - t0
            times.gradients_forward += found.forward_seconds
            times.gradients_head += found.head_seconds
        return found.grad_sq
    device = resolve_device(config.device)
    fisher = empirical_fisher(model, calib, layers, quiet=config.quiet, ranks=ranks, device=device)
    if times is not None:
        times.gradients += time.perf_counter() - t0
    return fisher


def prune_sequential(
    model: nn.Module,
    calib: CalibrationSet | None,
    config: PruneConfig,
    *,
    method: MethodSpec | None = None,
    sparsities: Mapping[str, float | None] | None = None,
    observer: BlockObserver | None = None,
    io: SweepIO | None = None,
    result: SweepResult | None = None,
    single_pass: bool = False,
    ranks: Ranks | None = None,
) -> SweepResult:
    """Prune ``model`` in place, block by block, with ``config.method`` (or an explicit ``method``).

    ``sparsities`` maps qualified layer names to a sparsity that overrides ``config.sparsity``
    (layer-wise allocation; None = leave dense). Layers matching ``config.skip_layers`` globs are
    left dense too. ``io`` streams blocks and activations (see :class:`SweepIO`); ``result``
    carries the records of blocks finished before a resume and receives the new ones.
    ``single_pass`` prunes each layer inside the block's one forward (see :func:`sweep`). With
    ``ranks`` each layer group is pruned by one owner rank (in a single pass: by every rank, the
    results compared); after each block every rank holds all of its records (in layer order) and
    rank 0 its quantized layers.
    """
    spec = method or METHODS[config.method]
    if spec.run is None:
        raise ConfigError(f"{spec.name} removes whole units: use prune_structured()")
    result = result if result is not None else SweepResult(blocks_name="")
    pruner, refit = _pruner(
        model, calib, config, spec, own=method is None, sparsities=sparsities, result=result, ranks=ranks, io=io
    )
    needs = config.stat_needs() if method is None else spec.needs
    if not needs and refit is None and observer is None:
        calib = None  # nothing to gather from the data in this sweep: no forwards
    stacked = spec.run_stacked is not None and config.stack
    if ranks is not None and not single_pass:  # a single pass solves every layer on every rank: nothing to gather
        io = dataclasses.replace(io or SweepIO(), after_block=_synced(ranks, result, model, config, io))
    result.blocks_name = sweep(
        model,
        calib,
        config,
        needs,
        pruner.layer,
        times=result.times,
        observer=observer,
        desc=spec.name,
        io=io,
        single_pass=single_pass,
        visit_group=pruner.group if stacked else None,
        refit=None if refit is None else pruner.refit_changed(refit, ranks),
        ranks=ranks,
        owned=True,
        refit_reduces=True,  # the refitter sums its gradients and errors over the ranks
    )
    return result


def _pruner(
    model: nn.Module,
    calib: CalibrationSet | None,
    config: PruneConfig,
    spec: MethodSpec,
    *,
    own: bool,
    sparsities: Mapping[str, float | None] | None,
    result: SweepResult,
    ranks: Ranks | None,
    io: SweepIO | None = None,
) -> tuple[_Pruner, BlockRefitter | None]:
    """The layer visitors of a sweep and its block refitter (``own``: the run's own method, with its
    refinement and quantizer; else an explicit method alone, as a sensitivity probe runs it)."""
    refine = REFINERS.get(config.refine or "") if own else None
    reference = _reference(model, config) if spec.reference else None
    grad_sq = _grad_sq(model, calib, config, ranks, io, result.times) if spec.gradients else None
    refit = None
    if config.refine == "block" and own:
        refit = BlockRefitter(config.recon_epochs, config.refit_lr(), result.refits, result.quantized, ranks=ranks)
    then = config.then if own else None
    device, target = resolve_device(config.device), float(config.sparsity or 0.0)
    pruner = _Pruner(
        spec, config.method_options(), device, target, sparsities, result, refine, reference, grad_sq, then,
        config.dsnot_layers,
    )  # fmt: skip
    if refit is not None and config.quantizes:
        pruner.grids = refit.grids
    if then is not None:
        pruner.then_options = config.method_options("then")
    return pruner, refit


def _synced(
    ranks: Ranks, result: SweepResult, model: nn.Module, config: PruneConfig, io: SweepIO | None
) -> Callable[[int, nn.Module], None]:
    """An ``after_block`` that first gathers block ``i``'s records from the owner ranks (then calls ``io``'s).

    Records and skipped layers reach every rank, in the order a single process makes them; the
    quantized layers (packed codes) reach rank 0, the writer, only.
    """
    order = {name: k for k, name in enumerate(prunable_layers(model, config))}
    blocks_name, _ = find_blocks(model)
    inner = io.after_block if io is not None else None

    def after_block(i: int, block: nn.Module) -> None:
        prefix = f"{blocks_name}.{i}."  # block i's layers, as the streaming writer picks them
        mine = [r for r in result.layers if r.block == i]
        skipped = [n for n in result.skipped if n.startswith(prefix)]
        quantized = {n: q for n, q in result.quantized.items() if n.startswith(prefix)}
        found = ranks.all_gather_object((mine, skipped))
        everyone = ranks.gather_object(quantized if not ranks.writes else {})
        result.layers[:] = [r for r in result.layers if r.block != i]
        result.layers.extend(sorted((r for part, _ in found for r in part), key=lambda r: order[r.name]))
        result.skipped[:] = [n for n in result.skipped if n not in skipped]
        result.skipped.extend(sorted((n for _, part in found for n in part), key=order.__getitem__))
        if everyone is not None:
            for part in everyone:
                result.quantized.update(part)
        elif quantized:
            for name in quantized:
                del result.quantized[name]
        if inner is not None:
            inner(i, block)

    return after_block
