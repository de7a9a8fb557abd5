"""Forward hooks that feed layer inputs into accumulators.

``collect(modules, factories)`` is a context manager: while it is open, every forward call of a
watched module flattens its input to ``[tokens, d]`` (dropping padding positions) and updates that
module's accumulators. Modules that receive the very same input tensor in a forward pass (q/k/v,
gate/up) share one set of accumulators, so a Hessian is computed once per distinct input.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from oneshot.calibration.stats import Accumulator
from oneshot.errors import ModelError
from oneshot.experts import Routed, shared_inputs

AccumulatorFactory = Callable[[int, torch.device], Accumulator]
#: Token rows fed to the accumulators at a time.
STATS_CHUNK_ROWS = 4096


def flatten_tokens(x: torch.Tensor, token_mask: torch.Tensor | None, rows: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, T, d]`` or ``[B·T, d]`` activations -> ``[tokens, d]``, keeping positions where ``token_mask`` is 1.

    ``token_mask`` is the calibration batch's ``[B, T]`` attention mask (or None: keep all). Layers
    fed a flattened ``[B·T, d]`` input (OPT's ``fc1`` / ``fc2``) are masked row by row; an expert's
    input ``[n, d]`` is masked through ``rows``, each row's position among the ``B·T`` tokens; any
    other shape that does not line up with the mask is a ModelError, never silently unmasked.
    """
    d = x.shape[-1]
    if token_mask is None:
        return x.reshape(-1, d)
    keep = token_mask.to(x.device).bool()
    if rows is not None and x.dim() == 2 and x.shape[0] == rows.numel():
        return x[keep.reshape(-1)[rows.to(x.device)]]  # [tokens, d]: the routed rows that are real tokens
    if tuple(x.shape[:-1]) == tuple(keep.shape):
        return x.reshape(-1, d) if bool(keep.all()) else x[keep]  # [tokens, d]; no padding: a view, no copy
    if x.dim() == 2 and x.shape[0] == keep.numel():
        return x[keep.reshape(-1)]  # [tokens, d]: rows are (batch, position) in order
    raise ModelError(
        f"a layer input of shape {tuple(x.shape)} does not line up with the padding mask {tuple(keep.shape)}; "
        "calibrate without padding (equal-length samples) for this model"
    )


#: Called from a module's pre-hook, after its statistics took the input: (module name, its accumulators).
StatsReady = Callable[[str, dict[str, Accumulator]], None]


class Collector:
    """State of an open :func:`collect` block; ask it for each module's finalised statistics.

    With ``on_stats`` every watched module's pre-hook calls it once the input is in the
    accumulators, before the module's own forward runs: a single-pass sweep prunes the layer
    there, so the forward goes on with the pruned weight.
    """

    def __init__(self, factories: Mapping[str, AccumulatorFactory], on_stats: StatsReady | None = None) -> None:
        self.factories = dict(factories)
        self.on_stats = on_stats
        self.token_mask: torch.Tensor | None = None
        self._accs: dict[str, dict[str, Accumulator]] = {}
        self._alias: dict[str, str] = {}  # module -> module whose accumulators it shares
        self._seen: dict[int, tuple[torch.Tensor, str]] = {}  # id(input) -> (input, module), this batch
        self._first_batch = True
        self.seconds = 0.0  # time spent updating statistics

    def next_batch(self, token_mask: torch.Tensor | None) -> None:
        """Call before each calibration batch's forward pass with that batch's ``[B, T]`` mask."""
        if self._seen:
            self._first_batch = False
        self._seen.clear()
        self.token_mask = token_mask

    def _hook(self, name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(module: nn.Module, inputs: tuple[Any, ...]) -> None:
            self._gather(name, inputs[0], getattr(module, "routed", None))
            if self.on_stats is not None:
                self.on_stats(name, self.stats(name))

        return hook

    def _gather(self, name: str, x: torch.Tensor, routed: Routed | None = None) -> None:
        """Feed ``x`` into ``name``'s accumulators, unless it shares them with a module that saw ``x``.

        ``routed`` (an expert's projection): which tokens the rows are, and their routing weights
        to weight the statistics by (a row weighted by ``w`` counts as ``√w·x``: ``w·x xᵀ`` in a Hessian).
        """
        if name in self._alias:
            return
        seen = self._seen.get(id(x))
        if seen is not None and seen[0] is x:
            if self._first_batch and name not in self._accs:
                self._alias[name] = seen[1]
                return
        else:
            self._seen[id(x)] = (x, name)  # holding x keeps its id unique for this batch
        t0 = time.perf_counter()
        x = x.detach()
        if routed is not None and routed.weights is not None:
            x = x * routed.weights.to(x.dtype).sqrt()[:, None]  # [n, d]
        rows = flatten_tokens(x, self.token_mask, None if routed is None else routed.rows)
        accs = self._accs.get(name)
        if accs is None:
            accs = {key: make(rows.shape[-1], rows.device) for key, make in self.factories.items()}
            self._accs[name] = accs
        for chunk in rows.split(STATS_CHUNK_ROWS):  # cache-sized pieces: one big batch is no slower than many
            for acc in accs.values():
                acc.update(chunk)
        self.seconds += time.perf_counter() - t0

    def received(self, name: str) -> bool:
        """Whether module ``name`` was called (its input gathered) since the collector opened."""
        return self._root(name) in self._accs

    def ensure(self, name: str, dim: int, device: torch.device) -> None:
        """Give module ``name`` empty accumulators if its input never came (an expert routed no token on
        this rank: its statistics are then the other ranks' after the reduce)."""
        root = self._root(name)
        if root not in self._accs:
            self._accs[root] = {key: make(dim, device) for key, make in self.factories.items()}

    def stats(self, name: str) -> dict[str, Accumulator]:
        """The accumulators of module ``name`` (shared ones for modules with identical inputs)."""
        if not self.received(name):
            raise no_input(name)
        return self._accs[self._root(name)]

    def _root(self, name: str) -> str:
        """The module whose accumulators ``name`` uses (an expert's up shares its gate's, which may share another's)."""
        while name in self._alias:
            name = self._alias[name]
        return name


def no_input(name: str) -> ModelError:
    """The error for a layer its block's forward never called on the calibration tokens (with the way out)."""
    return ModelError(
        f"layer {name} received no input during calibration: its block's forward does not call it (a layer the "
        f"model does not use, or an expert no calibration token was routed to); leave it dense with --skip '{name}'"
    )


@contextmanager
def collect(
    modules: Mapping[str, nn.Module], factories: Mapping[str, AccumulatorFactory], on_stats: StatsReady | None = None
) -> Iterator[Collector]:
    """Gather statistics of each module's input while the block is open; hooks removed on exit."""
    collector = Collector(factories, on_stats)
    collector._alias.update(shared_inputs(dict(modules)))
    handles = [module.register_forward_pre_hook(collector._hook(name)) for name, module in modules.items()]
    try:
        yield collector
    finally:
        for handle in handles:
            handle.remove()
