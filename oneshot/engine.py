"""The engine: the one layer-by-layer sweep every pass runs on.

For each block: forward every calibration batch through it with hooks that gather the statistics
a pass needs, let the pass's visitors act on its linear layers (prune, score, remove units), then
run the block again so the next block is calibrated on the *modified* block's outputs. Only the
current block (and the model's stem during capture) has to sit on the compute device; captured
activations live in an activation store between blocks. What a pass does lives in
:mod:`oneshot.passes`.

Single pass (``single_pass=True``): the whole calibration set is one batch, and each layer is
visited from its own forward pre-hook, so the block's one forward goes on with the visited weights
and its output is already the next block's input (a ``block_visit`` must then not change the
block). Layers that read the very same input (q/k/v, gate/up) share one set of accumulators; with
a group visitor they are visited together (in a single pass, at the first one's pre-hook, the
groups learnt once by a probe forward). A sweep without calibration data (a data-free method)
only loads, visits and hands back each block.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from oneshot.activations import ActivationStore, MemoryStore
from oneshot.calibration.data import CalibrationSet
from oneshot.calibration.hooks import AccumulatorFactory, Collector, collect, no_input
from oneshot.calibration.stats import Accumulator, ColumnSqNorm, Hessian, MeanVar, TokenSample
from oneshot.capture import BlockCall, CapturedInputs, capture_inputs
from oneshot.config import PruneConfig
from oneshot.distributed import Ranks, guarded
from oneshot.errors import ModelError
from oneshot.experts import ALL, CalibrationRule, ExpertProjection, routed_through_layers
from oneshot.layers import find_blocks, find_linears, find_routers, input_width, output_width
from oneshot.memory import release_scratch
from oneshot.methods.base import STAT_COL_NORM, STAT_HESSIAN, STAT_MEANVAR, LayerStats
from oneshot.methods.linalg import all_finite

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


@dataclass
class PhaseTimes:
    """Seconds spent in each phase of the sweep (statistics are timed inside the forwards)."""

    capture: float = 0.0
    forward: float = 0.0
    statistics: float = 0.0
    solve: float = 0.0
    report: float = 0.0  # reconstruction-error estimates for the report
    refit: float = 0.0  # block-output reconstruction (--refine block)
    propagate: float = 0.0
    activations: float = 0.0  # reading / writing the activation store (not in forward or propagate)
    load: float = 0.0  # a block's weights read (streamed from the shards) and moved to the device
    write: float = 0.0  # a block moved back and handed to the writer (streaming: written, flushed, recorded)
    communicate: float = 0.0  # in collectives (several ranks); also counted in the phase they happen in
    gradients: float = 0.0  # the empirical Fisher's forwards and backwards (--method fisher), before the sweep
    gradients_forward: float = 0.0  # of which a streamed backward's first forward (saving each block's inputs)
    gradients_head: float = 0.0  # and its loss head's backward (the output head, once per sample)
    per_block: list[float] = field(default_factory=list)  # wall seconds of each block


def resolve_device(name: str) -> torch.device:
    """``auto`` -> the first CUDA device if available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def move_outside(model: nn.Module, blocks: nn.ModuleList, device: torch.device) -> None:
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
    scratch: Path | None = None  # a folder a pass may keep files in (a streamed backward's activations)


#: Called once per block after its statistics forward and before propagation:
#: (block index, block module, a lookup from linear-layer name to its accumulators).
BlockVisitor = Callable[[int, nn.Module, Callable[[str], dict[str, Accumulator]]], None]

#: Called for a group of linear layers that read the same input (q/k/v, gate/up) during a sweep:
#: (qualified names, block index, modules, their shared accumulators).
GroupVisitor = Callable[[list[str], int, list[nn.Module], dict[str, Accumulator]], None]

#: Called for each linear layer of the current block during a sweep:
#: (qualified name, block index, module, that layer's accumulators by statistic name).
LayerVisitor = Callable[[str, int, nn.Module, dict[str, Accumulator]], None]


@dataclass
class RefitBatches:
    """What a block refit sees: ``run(b)`` is the block's output on batch ``b``, computed in float32
    (the refit casts the block), with autograd where enabled; ``targets[b]`` the dense block's output
    on the same inputs; ``token_masks[b]`` the real tokens ``[B, T]`` (None: all)."""

    run: Callable[[int], torch.Tensor]
    targets: list[torch.Tensor]
    token_masks: list[torch.Tensor | None]


#: Called after a block's layers are pruned, before its outputs are propagated (two-pass sweeps):
#: (block index, block, its linear layers, the batches) — e.g. to refit the kept weights.
BlockRefit = Callable[[int, nn.Module, dict[str, nn.Module], RefitBatches], None]


def capture_calls(
    model: nn.Module, blocks: nn.ModuleList, calib: CalibrationSet, config: PruneConfig, io: SweepIO, batch_size: int
) -> tuple[CapturedInputs, ActivationStore]:
    """Record every block's call arguments; block 0's inputs go into the store (unless resuming)."""
    device = resolve_device(config.device)
    store = io.store if io.store is not None else MemoryStore(pin=device.type == "cuda")
    move_outside(model, blocks, device)
    io.source.load(0, blocks[0])
    blocks[0].to(device)
    sink = store.put if io.start == 0 else (lambda b, h: None)
    captured = capture_inputs(model, blocks, calib, batch_size, device, sink)
    if io.start != 0:
        io.source.unload(0, blocks[0])
    if len(store) != len(captured.calls):
        raise RuntimeError(
            f"the activation store holds {len(store)} batches, the calibration set {len(captured.calls)}"
        )
    return captured, store


def sweep(
    model: nn.Module,
    calib: CalibrationSet | None,
    config: PruneConfig,
    needs: tuple[str, ...],
    visit: LayerVisitor,
    *,
    times: PhaseTimes | None = None,
    observer: BlockObserver | None = None,
    block_visit: BlockVisitor | None = None,
    desc: str = "blocks",
    io: SweepIO | None = None,
    single_pass: bool = False,
    visit_group: GroupVisitor | None = None,
    refit: BlockRefit | None = None,
    ranks: Ranks | None = None,
    owned: bool = False,
    refit_reduces: bool = False,
) -> str:
    """Run the calibration set through ``model`` block by block, calling ``visit`` on every linear layer.

    Two passes per block by default, one with ``single_pass``, none with ``calib=None`` (see the
    module docstring); ``visit`` may rewrite the weights and later blocks see what it did.
    ``needs`` names the statistics gathered; ``visit_group`` visits layers sharing an input
    together; layers matching ``config.skip_layers`` are not visited; ``io`` says where blocks and
    activations live (default: in memory); ``refit`` is called after each block's visitors with the
    dense block's outputs kept from the statistics forward (two passes only). With ``ranks`` (a
    process group, :mod:`oneshot.distributed`) ``calib`` is this rank's share: statistics are
    reduced before any visitor sees them, and with ``owned`` each layer group is visited by one
    owner rank and its weights broadcast (else every rank visits every layer, on the same
    statistics; a ``refit`` must then reduce what it measures itself: ``refit_reduces``). Returns the
    blocks' qualified name.
    """
    times = times if times is not None else PhaseTimes()
    io = io or SweepIO()
    device = resolve_device(config.device)
    blocks_name, blocks = find_blocks(model)
    home = blocks_home(blocks)
    _check_sweep(calib is not None, needs, observer is not None, refit is not None, single_pass)
    if refit is not None and ranks is not None and not refit_reduces:
        raise RuntimeError("a block refit takes optimizer steps on one process's samples: not with several ranks")
    shared = _Shared(ranks, owned, needs)
    step: _BlockStep | _DataFreeStep = _DataFreeStep(visit, block_visit, times, device, shared)
    if calib is not None:
        t0 = time.perf_counter()
        size = calib.nsamples if single_pass else config.batch_size
        captured, store = capture_calls(model, blocks, calib, config, io, size)
        store = _TimedStore(store, times)
        times.capture += time.perf_counter() - t0
        kind = _SinglePassStep if single_pass else _BlockStep
        step = kind(config, needs, visit, block_visit, times, device, captured, store, shared, visit_group, refit)
        step.experts = expert_rule(config, single_pass)
    loop = _Loop(blocks, blocks_name, step, io, config, times, device, ranks, observer, home, calib is not None)
    rule = step.experts if isinstance(step, _BlockStep) else None
    try:
        with routed_through_layers(model, rule):
            for i in tqdm(range(io.start, len(blocks)), desc=desc, unit="block", disable=config.quiet or None):
                loop.block(i)
    finally:
        move_outside(model, blocks, home)
    return blocks_name


def expert_rule(config: PruneConfig, single_pass: bool) -> CalibrationRule:
    """How a sweep gathers the experts' statistics (``--expert-calibration``, ``--expert-min-tokens``)."""
    return CalibrationRule(rule=config.expert_calibration, min_tokens=config.expert_min_tokens, inline=single_pass)


@dataclass
class _Loop:
    """What every block of one sweep shares."""

    blocks: nn.ModuleList
    blocks_name: str
    step: _BlockStep | _DataFreeStep
    io: SweepIO
    config: PruneConfig
    times: PhaseTimes
    device: torch.device
    ranks: Ranks | None
    observer: BlockObserver | None
    home: torch.device  # where blocks live between their turns
    has_data: bool

    def block(self, i: int) -> None:
        """Block ``i``: loaded onto the device, its step run, moved back home, handed to the writer, freed."""
        start = time.perf_counter()
        block = self.blocks[i]
        if i != 0 or not self.has_data:  # block 0 was loaded for the capture (a resumed sweep starts later)
            self.io.source.load(i, block)
        block.to(self.device)
        self.times.load += time.perf_counter() - start
        if self.ranks is not None:
            self.ranks.begin_block()
        self.step.run(i, block, block_linears(self.blocks_name, i, block, self.config), self.blocks_name)
        if self.observer is not None and not isinstance(self.step, _DataFreeStep):
            self.observer(i, [self.step.store.get(b) for b in range(len(self.step.store))])
        t0 = time.perf_counter()
        block.to(self.home)
        # the block's seconds so far are recorded before the hand-off, which may save them (a resume keeps
        # them); the hand-off and the freeing are added to that entry afterwards
        self.times.per_block.append(t0 - start)
        handing = f"handing {self.blocks_name}.{i} to the writer"
        with guarded(self.ranks, handing):  # every rank agrees, writer or not
            if self.io.after_block is not None:
                self.io.after_block(i, block)
        self.times.write += time.perf_counter() - t0
        if self.ranks is not None:
            self.ranks.end_block()
            self.times.communicate += self.ranks.block_seconds[-1]
        self.io.source.unload(i, block)
        release_scratch()
        self.times.per_block[-1] = time.perf_counter() - start


def blocks_home(blocks: nn.ModuleList) -> torch.device:
    """Where the blocks live between their turns (the CPU for a skeleton on the meta device)."""
    home = next(blocks[0].parameters()).device
    return torch.device("cpu") if home.type == "meta" else home


def _check_sweep(has_data: bool, needs: tuple[str, ...], observed: bool, refit: bool, single_pass: bool) -> None:
    """RuntimeError for a sweep asked for what it cannot give (a programming error, not a user's)."""
    if not has_data and (needs or observed or refit):
        raise RuntimeError(f"a sweep gathering {needs or 'block outputs'} needs calibration data")
    if refit and single_pass:
        raise RuntimeError("a block refit needs the dense block's outputs: it runs in two-pass sweeps only")


@dataclass
class _DataFreeStep:
    """One block of a data-free sweep: the visitors only (no statistics, nothing to propagate)."""

    visit: LayerVisitor
    block_visit: BlockVisitor | None
    times: PhaseTimes
    device: torch.device
    shared: _Shared

    def run(self, i: int, block: nn.Module, linears: dict[str, nn.Module], blocks_name: str) -> None:
        """Call the visitors on the block's layers with empty statistics."""
        t0, report_before = time.perf_counter(), self.times.report
        with guarded(self.shared.ranks, f"checking {blocks_name}.{i}"):
            check_weights(blocks_name, i, linears)
        groups = [[name] for name in linears]
        self.shared.visit_all(self.visit, None, blocks_name, i, linears, groups, lambda group: {})
        if self.block_visit is not None:
            self.block_visit(i, block, lambda name: {})
        self.times.solve += time.perf_counter() - t0 - (self.times.report - report_before)


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
    shared: _Shared
    visit_group: GroupVisitor | None = None
    refit: BlockRefit | None = None
    experts: CalibrationRule = field(default_factory=CalibrationRule)

    def _forward_stats(
        self, i: int, block: nn.Module, linears: dict[str, nn.Module], blocks_name: str, targets: list[Tensor] | None
    ) -> Collector:
        """One statistics forward of every calibration batch through block ``i`` (its outputs into ``targets``)."""
        times, store, calls = self.times, self.store, self.captured.calls
        t0, io_before = time.perf_counter(), times.activations
        forward = guarded(self.shared.ranks, f"the statistics forward of {blocks_name}.{i}")
        with torch.no_grad(), collect(linears, stat_factories(self.needs)) as collector, forward:
            check_weights(blocks_name, i, linears)
            for b in range(len(store)):
                collector.next_batch(self.captured.token_masks[b])
                self.experts.token_mask = self.captured.token_masks[b]
                hidden = _finite_inputs(store, b, i, blocks_name, self.device)
                out = calls[b][i].run(block, hidden, self.device)
                if targets is not None:
                    targets.append(out.to("cpu"))  # the store's side: one batch at a time on the device
            synchronize(self.device)
        times.statistics += collector.seconds
        times.forward += time.perf_counter() - t0 - collector.seconds - (times.activations - io_before)
        return collector

    def _statistics(
        self, i: int, block: nn.Module, linears: dict[str, nn.Module], blocks_name: str, targets: list[Tensor] | None
    ) -> Callable[[str], dict[str, Accumulator]]:
        """Every layer's accumulators after the statistics forward (and the rare experts' second forward)."""
        rule = self.experts
        rule.counts.clear()
        rule.counting = True
        try:
            collector = self._forward_stats(i, block, linears, blocks_name, targets)
        finally:
            rule.counting = False
        ranks = self.shared.ranks
        rare = rare_experts(linears, rule, ranks)
        if ranks is not None:  # an expert routed tokens on other ranks only: empty statistics here, then reduced
            for name, layer in linears.items():
                if isinstance(layer, ExpertProjection) and name not in rare:
                    collector.ensure(name, input_width(layer), self.device)
        if not rare:
            return collector.stats
        rule.everything = {rare[n].key for n in rare}
        try:
            again = self._forward_stats(i, block, {n: linears[n] for n in rare}, blocks_name, None)
        finally:
            rule.everything = set()
        return lambda name: again.stats(name) if name in rare else collector.stats(name)

    def run(self, i: int, block: nn.Module, linears: dict[str, nn.Module], blocks_name: str) -> None:
        """Gather statistics, let the visitors prune, then write the block's outputs to the store."""
        times, store, calls = self.times, self.store, self.captured.calls
        targets: list[torch.Tensor] = []  # the dense block's outputs, kept for a refit
        ranks = self.shared.ranks
        stats = self._statistics(i, block, linears, blocks_name, targets if self.refit is not None else None)

        t0, report_before = time.perf_counter(), times.report
        groups: dict[int, list[str]] = {}  # layers sharing accumulators read the same input
        missing = [name for name in linears if not _received(stats, name)]
        if missing:
            raise no_input(f"{blocks_name}.{i}.{missing[0]}")
        for name in linears:
            groups.setdefault(id(stats(name)), []).append(name)
        if ranks is not None:
            for group in groups.values():
                ranks.reduce(stats(group[0]))
        self.shared.visit_all(
            self.visit, self.visit_group, blocks_name, i, linears, list(groups.values()), _first_of(stats)
        )
        if self.block_visit is not None:
            with guarded(ranks, f"the block visit of {blocks_name}.{i}"):
                self.block_visit(i, block, stats)
        times.solve += time.perf_counter() - t0 - (times.report - report_before)  # visitors time their report
        del stats
        if self.refit is not None:
            t0 = time.perf_counter()
            run = lambda b: calls[b][i].run(block, store.get(b), self.device, torch.float32)  # noqa: E731
            self.refit(i, block, linears, RefitBatches(run, targets, self.captured.token_masks))
            times.refit += time.perf_counter() - t0

        t0, io_before = time.perf_counter(), times.activations
        with torch.no_grad():
            for b in range(len(store)):
                out = calls[b][i].run(block, store.get(b), self.device)
                synchronize(self.device)  # the forward's queued kernels count as propagate, not the copy
                store.put(b, out)
        store.commit()
        times.propagate += time.perf_counter() - t0 - (times.activations - io_before)


def _first_of(stats: Callable[[str], dict[str, Accumulator]]) -> Callable[[list[str]], dict[str, Accumulator]]:
    """A layer group's shared accumulators: its first layer's."""
    return lambda group: stats(group[0])


def _received(stats: Callable[[str], dict[str, Accumulator]], name: str) -> bool:
    """Whether layer ``name`` has statistics (its block's forward called it)."""
    try:
        stats(name)
    except ModelError:
        return False
    return True


def rare_experts(
    linears: dict[str, nn.Module], rule: CalibrationRule, ranks: Ranks | None
) -> dict[str, ExpertProjection]:
    """The expert projections of ``linears`` routed fewer than ``rule.min_tokens`` real tokens (over all ranks).

    Nothing under :data:`~oneshot.experts.ALL`, where every expert already sees every token.
    """
    experts = {n: m for n, m in linears.items() if isinstance(m, ExpertProjection)}
    if not experts:
        return {}
    counts = {n: m.routed_tokens or 0 for n, m in experts.items()}
    if ranks is not None:  # the counts and REAP saliencies of all ranks' tokens
        parts = ranks.all_gather_object({n: (counts[n], m.routed_saliency) for n, m in experts.items()})
        for n, m in experts.items():
            m.routed_tokens = counts[n] = sum(part[n][0] for part in parts)
            m.routed_saliency = sum(part[n][1] for part in parts)
    if rule.rule == ALL:
        return {}
    return {n: experts[n] for n, c in counts.items() if c < rule.min_tokens}


def _visit(
    visit: LayerVisitor,
    visit_group: GroupVisitor | None,
    blocks_name: str,
    i: int,
    linears: dict[str, nn.Module],
    group: list[str],
    accs: dict[str, Accumulator],
) -> None:
    """Visit layers that share ``accs``: together through ``visit_group`` if given and several, else one by one."""
    full = [f"{blocks_name}.{i}.{name}" for name in group]
    if visit_group is not None and len(group) > 1:
        visit_group(full, i, [linears[name] for name in group], accs)
    else:
        for name, qualified in zip(group, full, strict=True):
            visit(qualified, i, linears[name], accs)


@dataclass
class _Shared:
    """How a sweep's visits are shared between ranks (nothing to share without ``ranks``)."""

    ranks: Ranks | None
    owned: bool  # each layer group visited by one owner rank, its weights then broadcast
    needs: tuple[str, ...]

    def visit_all(
        self,
        visit: LayerVisitor,
        visit_group: GroupVisitor | None,
        blocks_name: str,
        i: int,
        linears: dict[str, nn.Module],
        groups: list[list[str]],
        stats_of: Callable[[list[str]], dict[str, Accumulator]],
        replicate: bool = False,
    ) -> None:
        """Visit each group of layers here, or (owned, several ranks) on its owner rank, then broadcast.

        ``replicate`` (a single-pass sweep, where the groups are solved one after the other anyway):
        every rank solves every group from the same statistics, and the ranks only compare
        fingerprints of the result (rank 0's weights are broadcast if they ever differ).
        """
        ranks = self.ranks
        if ranks is None or not self.owned or replicate:
            with guarded(ranks if self.owned else None, f"solving {blocks_name}.{i}"):
                for group in groups:
                    _visit(visit, visit_group, blocks_name, i, linears, group, stats_of(group))
                    release_scratch()
            if ranks is not None and self.owned:
                ranks.confirm_same([linears[n] for group in groups for n in group], f"{blocks_name}.{i}")
            return
        owners = ranks.owners([_cost([linears[n] for n in group], self.needs) for group in groups])
        with ranks.guard(f"solving {blocks_name}.{i}"):
            for group, owner in zip(groups, owners, strict=True):
                if owner == ranks.rank:
                    _visit(visit, visit_group, blocks_name, i, linears, group, stats_of(group))
                    release_scratch()
        for group, owner in zip(groups, owners, strict=True):
            ranks.broadcast_modules([linears[n] for n in group], owner)


def _cost(modules: list[nn.Module], needs: tuple[str, ...]) -> float:
    """A layer group's solve cost: ~ rows·in² + in³ with a Hessian (SparseGPT, OBS), rows·in otherwise."""
    width = input_width(modules[0])
    rows = sum(output_width(m) for m in modules)
    return float(rows * width * width + width**3) if STAT_HESSIAN in needs else float(rows * width)


class _Probed(Exception):
    """Ends a probe forward once every linear layer has been reached."""


def _input_groups(
    block: nn.Module, call: BlockCall, hidden: torch.Tensor, device: torch.device, linears: dict[str, nn.Module]
) -> dict[str, list[str]]:
    """Which layers read the very same input tensor, learnt from one forward of the block up to its last layer."""
    order: list[tuple[str, torch.Tensor]] = []  # holding the inputs keeps their ids unique

    def hook(name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def record(module: nn.Module, inputs: tuple[Any, ...]) -> None:
            order.append((name, inputs[0]))
            if len({n for n, _ in order}) == len(linears):
                raise _Probed

        return record

    handles = [module.register_forward_pre_hook(hook(name)) for name, module in linears.items()]
    try:
        with torch.no_grad(), contextlib.suppress(_Probed):
            call.run(block, hidden, device)
    finally:
        for handle in handles:
            handle.remove()
    by_input: dict[int, list[str]] = {}
    for name, x in order:
        members = by_input.setdefault(id(x), [])
        if name not in members:
            members.append(name)
    return {name: members for members in by_input.values() for name in members}


def synchronize(device: torch.device) -> None:
    """Wait for ``device``'s queued kernels (CUDA), so that a phase's time is its own work's."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _TimedStore:
    """An activation store whose reads and writes are timed into ``times.activations``."""

    def __init__(self, store: ActivationStore, times: PhaseTimes) -> None:
        self.store, self.times = store, times

    def __len__(self) -> int:
        return len(self.store)

    def get(self, batch: int) -> torch.Tensor:
        """The store's ``get``, timed."""
        t0 = time.perf_counter()
        try:
            return self.store.get(batch)
        finally:
            self.times.activations += time.perf_counter() - t0

    def put(self, batch: int, hidden: torch.Tensor) -> None:
        """The store's ``put``, timed."""
        t0 = time.perf_counter()
        self.store.put(batch, hidden)
        self.times.activations += time.perf_counter() - t0

    def commit(self) -> None:
        """The store's ``commit``, timed."""
        t0 = time.perf_counter()
        self.store.commit()
        self.times.activations += time.perf_counter() - t0


def _finite_inputs(store: ActivationStore, b: int, i: int, blocks_name: str, device: torch.device) -> torch.Tensor:
    """Batch ``b``'s inputs of block ``i``, on ``device``; ModelError naming the block if they hold NaN / Inf.

    Checked where they will be computed on: a scan of gigabytes of activations is cheap on a GPU.
    """
    hidden = store.get(b).to(device, non_blocking=True)
    if not all_finite(hidden):
        raise ModelError(
            f"the inputs of {blocks_name}.{i} contain NaN/Inf (calibration batch {b})"
            + ("" if i == 0 else f": {blocks_name}.{i - 1} overflowed")
            + (
                f" in {hidden.dtype}; try --dtype bfloat16 or float32"
                if hidden.dtype == torch.float16
                else "; check the checkpoint's norm weights and the calibration text"
            )
        )
    return hidden


@dataclass
class _SinglePassStep(_BlockStep):
    """One block of a single-pass sweep: each layer visited in its own pre-hook, one forward in all."""

    groups: dict[str, list[str]] | None = None  # layer -> the layers sharing its input (learnt on block 0)

    def run(self, i: int, block: nn.Module, linears: dict[str, nn.Module], blocks_name: str) -> None:
        """Forward the one calibration batch; layers are visited as the forward reaches them."""
        times, store = self.times, self.store
        if len(store) != 1:
            raise RuntimeError(f"a single-pass sweep needs the calibration set as one batch, not {len(store)}")
        factories = stat_factories(self.needs)
        visited: list[str] = []
        solve, report_before = 0.0, times.report

        with guarded(self.shared.ranks, f"the inputs of {blocks_name}.{i}"):
            check_weights(blocks_name, i, linears)
            hidden = _finite_inputs(store, 0, i, blocks_name, self.device)
        if self.visit_group is not None and self.groups is None:
            self.groups = _input_groups(block, self.captured.calls[0][i], hidden, self.device, linears)
        groups = self.groups or {}

        def on_stats(name: str, accs: dict[str, Accumulator]) -> None:
            nonlocal solve
            if name in visited:  # a layer called twice in one forward, or visited with its group
                return
            t0 = time.perf_counter()
            group = [n for n in groups.get(name, [name]) if n in linears and n not in visited]
            if self.shared.ranks is not None:
                self.shared.ranks.reduce(accs)
            self.shared.visit_all(
                self.visit, self.visit_group, blocks_name, i, linears, [group], lambda g: accs, replicate=True
            )
            visited.extend(group)
            release_scratch()
            solve += time.perf_counter() - t0

        t0, io_before = time.perf_counter(), times.activations
        rule = self.experts
        with torch.no_grad(), collect(linears, factories, on_stats) as collector:
            collector.next_batch(self.captured.token_masks[0])
            rule.counts.clear()
            rule.counting, rule.token_mask = True, self.captured.token_masks[0]
            try:
                out = self.captured.calls[0][i].run(block, hidden, self.device)
            finally:
                rule.counting = False
            missing = [name for name in linears if name not in visited]
            if missing:
                raise no_input(f"{blocks_name}.{i}.{missing[0]}")
            if self.block_visit is not None:
                self.block_visit(i, block, collector.stats)
        synchronize(self.device)  # the forward's queued kernels count as forward, not the store's copy
        store.put(0, out)
        store.commit()
        report = times.report - report_before
        times.statistics += collector.seconds
        times.solve += solve - report
        times.forward += time.perf_counter() - t0 - collector.seconds - solve - (times.activations - io_before)


def single_pass_bytes(model: nn.Module, nsamples: int, seqlen: int) -> int:
    """Rough peak bytes of one block's forward over all ``nsamples`` at once (single-pass mode).

    The hidden states in and out and the MLP's intermediate activations for every token, plus one
    ``[heads, T, T]`` score matrix per sample for attention implementations that materialise it.
    """
    config: Any = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    hidden = int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0) or 1024)
    inter = (
        int(
            getattr(config, "intermediate_size", 0)
            or getattr(config, "ffn_dim", 0)
            or getattr(config, "n_inner", 0)
            or 0
        )
        or 4 * hidden
    )
    heads = int(getattr(config, "num_attention_heads", 0) or getattr(config, "n_head", 0) or 1)
    item = next(model.parameters()).element_size()
    tokens = nsamples * seqlen
    return (tokens * (6 * hidden + 3 * inter) + 2 * nsamples * heads * seqlen * seqlen) * item


def check_weights(blocks_name: str, index: int, linears: dict[str, nn.Module]) -> None:
    """ModelError naming the first linear layer of block ``index`` whose weight holds NaN / Inf."""
    for name, module in linears.items():
        weight = module.weight
        if isinstance(weight, torch.Tensor) and not all_finite(weight):
            bad = int((~torch.isfinite(weight)).sum())
            raise ModelError(
                f"{blocks_name}.{index}.{name}.weight holds {bad} NaN/Inf values: the checkpoint is damaged "
                "(re-download it) or was saved from a diverged run"
            )


def stat_factories(needs: tuple[str, ...]) -> dict[str, AccumulatorFactory]:
    """The accumulators a sweep gathers: the method's, plus a token sample for the report's error
    estimate unless a Hessian gives that error exactly (see ``passes.unstructured._record``)."""
    keys = needs if STAT_HESSIAN in needs else (*needs, SAMPLE)
    return {key: STAT_FACTORIES[key] for key in keys}


def layer_stats(accs: dict[str, Accumulator]) -> LayerStats:
    """Finalise a layer's accumulators into the :class:`LayerStats` a method consumes."""
    hessian = accs.get(STAT_HESSIAN)
    col = accs.get(STAT_COL_NORM)
    meanvar = accs.get(STAT_MEANVAR)
    mean, var = meanvar.finalize() if isinstance(meanvar, MeanVar) else (None, None)
    return LayerStats(
        hessian=hessian.finalize() if isinstance(hessian, Hessian) else None,
        col_sq_norm=col.finalize() if isinstance(col, ColumnSqNorm) else None,
        count=next((acc.count for acc in accs.values()), 0),
        mean=mean,
        var=var,
    )


def block_linears(blocks_name: str, index: int, block: nn.Module, config: PruneConfig) -> dict[str, nn.Module]:
    """The block's linear layers by block-relative name, without those matching ``config.skip_layers``.

    Mixture-of-experts routers are left dense unless the sparsity map gives them a sparsity by name.
    """
    found = find_linears(block)
    targeted = [glob for glob, value in config.sparsity_map if value != "skip"]
    for name, router in find_routers(block).items():
        if any(fnmatch.fnmatchcase(f"{blocks_name}.{index}.{name}", glob) for glob in targeted):
            found[name] = router
    return {
        name: module
        for name, module in found.items()
        if not _skipped(f"{blocks_name}.{index}.{name}", config.skip_layers)
    }


def prunable_modules(model: nn.Module, config: PruneConfig) -> dict[str, nn.Module]:
    """The linear layers a run would prune (not skipped), by qualified name."""
    blocks_name, blocks = find_blocks(model)
    return {
        f"{blocks_name}.{i}.{name}": module
        for i, block in enumerate(blocks)
        for name, module in block_linears(blocks_name, i, block, config).items()
    }


def prunable_layers(model: nn.Module, config: PruneConfig) -> dict[str, int]:
    """Qualified names of the linear layers a run would prune (not skipped), with their input widths."""
    return {name: input_width(module) for name, module in prunable_modules(model, config).items()}
