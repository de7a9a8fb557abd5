"""Several processes on one run: data-parallel calibration, layer-parallel solves (torch.distributed).

Under ``torchrun`` (or inside any initialised process group of more than one rank) a run splits
its calibration samples into one contiguous share per rank; the sample draw is the single-process
one, so the union of the shares is exactly the single-process calibration set. Every rank holds
its own activations and runs every block over its own share. Per block:

1. the statistics are reduced: sums (Hessians ``X Xᵀ``, Wanda's column norms) by an all-reduce,
   token counts too, and per-channel mean / variance by gathering every rank's part and merging
   them in rank order with Chan's formula, so every rank holds the very same statistics;
2. each group of layers that share an input (q/k/v, gate/up) is solved by one owner rank, groups
   assigned by cost (greedy, largest first: ~ rows·in² for Hessian methods, rows·in otherwise),
   so the ranks finish together; then the owners broadcast the new weights;
3. every rank propagates its own samples through the pruned block.

Passes that do not change weights per layer (OWL's statistics, structured pruning's unit choice)
run on every rank from the same reduced statistics, so they agree without any broadcast. Only rank
0 writes. A rank that fails says so at the next agreement point and every rank raises; a rank
that dies makes the others' next collective fail, reported as :class:`DistributedError`.

Without a process group (or with one rank) nothing here is used and nothing changes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from oneshot.calibration.data import CalibrationSet
from oneshot.calibration.stats import Accumulator, ColumnSqNorm, Hessian, MeanVar
from oneshot.errors import DataError, OneshotError

log = logging.getLogger(__name__)

T = TypeVar("T")


class DistributedError(OneshotError):
    """Another rank failed or stopped: this rank stops too, and no output is published."""


@dataclass
class Ranks:
    """This process's place in the group and what it communicated (bytes, seconds, per block)."""

    rank: int
    world: int
    device: torch.device  # where the backend wants tensors: CUDA for NCCL, CPU for Gloo
    bytes: int = 0
    seconds: float = 0.0
    block_bytes: list[int] = field(default_factory=list)
    block_seconds: list[float] = field(default_factory=list)
    _reduced: set[int] = field(default_factory=set)
    _load: list[float] = field(default_factory=list)  # solve cost given to each rank in this block
    _mark: tuple[int, float] = (0, 0.0)

    @classmethod
    def current(cls) -> Ranks | None:
        """The ranks of the initialised default process group; None without one or with a single rank."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return None
        backend = str(dist.get_backend()).lower()
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        return cls(rank=dist.get_rank(), world=dist.get_world_size(), device=device)

    @property
    def writes(self) -> bool:
        """Whether this rank writes the output (rank 0)."""
        return self.rank == 0

    # -- calibration ---------------------------------------------------------------------------

    def bounds(self, nsamples: int) -> tuple[int, int]:
        """This rank's contiguous share ``[start, stop)`` of ``nsamples`` (sizes differ by at most one)."""
        return self.rank * nsamples // self.world, (self.rank + 1) * nsamples // self.world

    def share(self, calib: CalibrationSet) -> CalibrationSet:
        """This rank's samples of the (globally drawn) calibration set."""
        if calib.nsamples < self.world:
            raise DataError(
                f"{calib.nsamples} calibration samples cannot be shared by {self.world} ranks: pass --nsamples "
                f"{self.world} or more, or run fewer processes"
            )
        start, stop = self.bounds(calib.nsamples)
        mask = None if calib.attention_mask is None else calib.attention_mask[start:stop]
        return CalibrationSet(calib.input_ids[start:stop], mask)

    # -- per block -----------------------------------------------------------------------------

    def begin_block(self) -> None:
        """Start counting a block's traffic (statistics reduced in it are forgotten at the next)."""
        self._reduced.clear()
        self._load = [0.0] * self.world
        self._mark = (self.bytes, self.seconds)

    def end_block(self) -> None:
        """Record the block's bytes and seconds of communication."""
        self.block_bytes.append(self.bytes - self._mark[0])
        self.block_seconds.append(self.seconds - self._mark[1])

    def reduce(self, accs: dict[str, Accumulator]) -> None:
        """Make one layer group's accumulators the statistics of all ranks' tokens (once per block)."""
        if id(accs) in self._reduced:
            return
        self._reduced.add(id(accs))
        counts = torch.tensor([acc.count for acc in accs.values()], dtype=torch.int64)
        parts = self.all_gather(counts)  # [world, n accumulators]
        for k, acc in enumerate(accs.values()):
            if isinstance(acc, (Hessian, ColumnSqNorm)):
                self.all_reduce(acc.sum)
                acc.count = int(parts[:, k].sum())
            elif isinstance(acc, MeanVar):
                states = self.all_gather(torch.stack([acc.mean, acc.m2]))  # [world, 2, d]
                merged = MeanVar(int(acc.mean.shape[0]), acc.mean.device)
                for r in range(self.world):  # in rank order: the same merge, bit for bit, on every rank
                    merged.merge(int(parts[r, k]), states[r, 0], states[r, 1])
                acc.mean, acc.m2, acc.count = merged.mean, merged.m2, merged.count
            # a TokenSample stays local: it only feeds the report's error estimate, made by the owner

    # -- owners --------------------------------------------------------------------------------

    def owners(self, costs: Sequence[float]) -> list[int]:
        """An owner rank per job: largest cost first, each to the least loaded rank in this block so far
        (ties: lowest rank); the same answer on every rank."""
        if len(self._load) != self.world:  # the first jobs since the run (or block) began
            self._load = [0.0] * self.world
        owner: dict[int, int] = {}
        for job in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
            rank = min(range(self.world), key=lambda r: (self._load[r], r))
            owner[job] = rank
            self._load[rank] += costs[job]
        return [owner[job] for job in range(len(costs))]

    def broadcast_modules(self, modules: Sequence[nn.Module], src: int) -> None:
        """The owner's weights (and biases) of ``modules`` on every rank."""
        for tensor in _weights_and_biases(modules):
            self.broadcast(tensor, src)

    def confirm_same(self, modules: Sequence[nn.Module], where: str) -> None:
        """Check by fingerprint that every rank holds the same weights (and biases) of ``modules``; if
        not, rank 0's are broadcast to all and a warning says so."""
        prints = torch.stack([fingerprint(t) for t in _weights_and_biases(modules)])  # [k, 2]
        found = self.all_gather(prints)  # [world, k, 2]
        if not bool((found == found[0]).all()):
            log.warning("the ranks' solves of %s differ (different hardware?): using rank 0's weights", where)
            self.broadcast_modules(modules, 0)

    # -- agreement -----------------------------------------------------------------------------

    def agree(self, error: BaseException | None, where: str) -> None:
        """Raise on every rank if any rank failed ``where`` (the failing rank re-raises its own error)."""
        found = self.all_gather_object(None if error is None else f"{type(error).__name__}: {error}")
        failed = [(r, message) for r, message in enumerate(found) if message is not None]
        if error is not None:
            raise error
        if failed:
            rank, message = failed[0]
            raise DistributedError(
                f"rank {rank} failed {where} ({message}); every rank stops and no output is published"
            )

    @contextlib.contextmanager
    def guard(self, where: str) -> Iterator[None]:
        """Run the body, then :meth:`agree` on whether it failed on any rank."""
        error: BaseException | None = None
        try:
            yield
        except Exception as exc:  # handed to every rank by agree, which re-raises it here
            error = exc
        self.agree(error, where)

    def all_true(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every rank."""
        return all(self.all_gather_object(flag))

    # -- collectives (bytes and seconds counted; a lost peer is a DistributedError) --------------

    def all_reduce(self, tensor: torch.Tensor) -> None:
        """Sum ``tensor`` over the ranks, in place."""
        with self._comm(tensor.numel() * tensor.element_size()):
            moved = tensor.to(self.device)
            dist.all_reduce(moved)
            if moved is not tensor:
                tensor.copy_(moved)

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's ``tensor``, stacked along a new first dimension ``[world, ...]`` (on the CPU)."""
        with self._comm(tensor.numel() * tensor.element_size() * self.world):
            moved = tensor.contiguous().to(self.device)
            parts = [torch.empty_like(moved) for _ in range(self.world)]
            dist.all_gather(parts, moved)
            return torch.stack(parts).to(tensor.device)

    def broadcast(self, tensor: torch.Tensor, src: int) -> None:
        """``src``'s ``tensor`` on every rank, in place."""
        with self._comm(tensor.numel() * tensor.element_size()):
            moved = tensor.contiguous().to(self.device)
            dist.broadcast(moved, src)
            if moved.data_ptr() != tensor.data_ptr():
                tensor.copy_(moved)

    def all_gather_object(self, obj: T) -> list[T]:
        """Every rank's picklable ``obj``, in rank order."""
        with self._comm(len(pickle.dumps(obj)) * self.world):
            found: list[Any] = [None] * self.world
            dist.all_gather_object(found, obj)
            return found

    def gather_object(self, obj: T) -> list[T] | None:
        """Every rank's ``obj`` on rank 0 (in rank order), None on the others."""
        with self._comm(len(pickle.dumps(obj))):
            found: list[Any] | None = [None] * self.world if self.rank == 0 else None
            dist.gather_object(obj, found, dst=0)
            return found

    @contextlib.contextmanager
    def _comm(self, nbytes: int) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        except RuntimeError as exc:  # Gloo / NCCL: a peer closed its connection, or timed out
            raise DistributedError(
                f"rank {self.rank} lost contact with the other ranks ({exc}); another rank stopped or failed "
                "(see its log): every rank stops and no output is published"
            ) from exc
        self.bytes += nbytes
        self.seconds += time.perf_counter() - t0

    def facts(self) -> dict[str, Any]:
        """The report's entry: world size, this rank, bytes and seconds communicated (per block too)."""
        return {
            "world_size": self.world,
            "rank": self.rank,
            "bytes_communicated": self.bytes,
            "communication_seconds": self.seconds,
            "bytes_per_block": list(self.block_bytes),
            "communication_seconds_per_block": list(self.block_seconds),
        }


def _weights_and_biases(modules: Sequence[nn.Module]) -> list[torch.Tensor]:
    """The data of each module's weight and (where it has one) bias, in order."""
    found = [getattr(m, name, None) for m in modules for name in ("weight", "bias")]
    return [t.data for t in found if isinstance(t, torch.Tensor)]


def fingerprint(tensor: torch.Tensor, chunk: int = 1 << 24) -> torch.Tensor:
    """Two int64 checksums of a tensor's bits (plain and position-weighted), computed where it lives."""
    flat = tensor.detach().contiguous().flatten()
    bits = flat.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()])
    total = torch.zeros(2, dtype=torch.int64, device=flat.device)
    for start in range(0, bits.numel(), chunk):  # int64 copies of one chunk at a time
        part = bits[start : start + chunk].to(torch.int64)
        weights = torch.arange(start, start + part.numel(), device=flat.device) % 65521 + 1
        total += torch.stack([part.sum(), (part * weights).sum()])
    return total


def guarded(ranks: Ranks | None, where: str) -> contextlib.AbstractContextManager[None]:
    """With several ranks, every rank raises if the body failed on any (:meth:`Ranks.guard`); else nothing."""
    return ranks.guard(where) if ranks is not None else contextlib.nullcontext()


def init_from_env(device: str) -> bool:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1 in the environment) if not joined yet.

    NCCL when the run computes on CUDA (each process on its ``LOCAL_RANK``'s GPU), else Gloo.
    Returns whether this call initialised the group (the caller then destroys it).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) < 2 or not dist.is_available() or dist.is_initialized():
        return False
    cuda = torch.cuda.is_available() and device in ("auto", "cuda") or device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    log.info("rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), dist.get_backend())
    return True


def leave() -> None:
    """Leave the process group :func:`init_from_env` joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
