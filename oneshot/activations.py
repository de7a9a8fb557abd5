"""The calibration activations between blocks: one ``[B, T, d]`` tensor per calibration batch.

Block ``i`` reads its inputs from the store and writes its (pruned) outputs back as block
``i + 1``'s inputs. :class:`MemoryStore` keeps them in RAM (pinned when a GPU computes, so copies
overlap); :class:`DiskStore` keeps them in two files, reading block ``i``'s inputs from one and
writing its outputs to the other, so that after a crash the inputs of the unfinished block are
still intact (what makes a streaming run resumable) and resident memory holds one batch at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch

from oneshot.shards import fsync_path


def to_host(tensor: torch.Tensor, dtype: torch.dtype, pin: bool) -> torch.Tensor:
    """``tensor`` in ``dtype`` on the CPU; with ``pin``, in page-locked memory, copied there directly.

    A GPU tensor goes straight into a pinned buffer in one DMA copy (PyTorch's host allocator
    caches freed pinned buffers, so block after block reuses them), instead of ``.to("cpu")`` into
    freshly faulted pageable memory and ``pin_memory()`` copying it again: for 2 GB of activations
    per block that was most of a GPU block's time.
    """
    if not pin:
        return tensor.to("cpu", dtype)
    out = torch.empty(tensor.shape, dtype=dtype, pin_memory=True)
    out.copy_(tensor)
    return out


class ActivationStore(Protocol):
    """Per-batch hidden states: ``get`` block inputs, ``put`` block outputs, ``commit`` after a block."""

    def __len__(self) -> int:
        """Number of batches."""
        ...

    def get(self, batch: int) -> torch.Tensor:
        """The current input of ``batch`` ``[B, T, d]``."""
        ...

    def put(self, batch: int, hidden: torch.Tensor) -> None:
        """Set the next block's input of ``batch`` (appends when ``batch == len(self)``)."""
        ...

    def commit(self) -> None:
        """Every batch has been put: what was put becomes what ``get`` returns."""
        ...


class MemoryStore:
    """Activations in RAM; ``put`` replaces a batch in place, so one extra batch is the overhead."""

    def __init__(self, pin: bool = False) -> None:
        self._batches: list[torch.Tensor] = []
        self._pin = pin

    def __len__(self) -> int:
        return len(self._batches)

    def get(self, batch: int) -> torch.Tensor:
        """The current input of ``batch``."""
        return self._batches[batch]

    def put(self, batch: int, hidden: torch.Tensor) -> None:
        """Store ``hidden`` on the CPU (pinned if asked) as the next input of ``batch``."""
        hidden = to_host(hidden.detach(), hidden.dtype, self._pin)
        if batch == len(self._batches):
            self._batches.append(hidden)
        else:
            self._batches[batch] = hidden

    def commit(self) -> None:
        """Nothing to do: ``put`` already replaced the inputs."""


class DiskStore:
    """Activations in two files (``acts-0.bin``, ``acts-1.bin``) of raw tensor bytes, batch after batch.

    ``get`` reads from the current file; ``put`` writes into the other one; ``commit`` flushes it
    to disk and makes it current. ``state()`` / ``DiskStore(folder, state=...)`` resume it.

    With ``memory_budget`` (bytes), once the capture has put every batch and the current and next
    inputs together fit that budget, the store also keeps them in memory and writes behind: ``get``
    returns the kept tensor, ``put`` only keeps, and ``commit`` hands what was put to
    :meth:`take_pending`, whose writer (the streaming run's background job) writes and flushes it
    while the next block computes. The files then hold what the progress record says, one block
    behind the sweep, and a resumed run reads them as before.
    """

    def __init__(
        self, folder: Path, dtype: torch.dtype, state: dict[str, Any] | None = None, memory_budget: int | None = None
    ) -> None:
        self.folder = folder
        self.dtype = dtype
        self.current = 0
        self.shapes: list[tuple[int, ...]] = []
        if state is not None:
            self.current = int(state["current"])
            self.shapes = [tuple(s) for s in state["shapes"]]
        else:
            for k in (0, 1):
                self._path(k).write_bytes(b"")
        self._itemsize = torch.empty(0, dtype=dtype).element_size()
        self._pin = False  # a GPU computes (seen at the first put from it): stage copies in pinned memory
        self._budget = memory_budget
        self._keep: bool | None = None  # decided at the first put after the capture
        self._kept: dict[int, torch.Tensor] = {}  # the current inputs, in memory (write-behind mode)
        self._next: dict[int, torch.Tensor] = {}
        self._pending: tuple[int, dict[int, torch.Tensor]] | None = None  # (file, batches) to write behind

    @property
    def in_memory(self) -> bool:
        """Whether the store keeps the inputs in memory and writes the files behind the sweep."""
        return bool(self._keep)

    def _path(self, k: int) -> Path:
        return self.folder / f"acts-{k}.bin"

    def _offset(self, batch: int) -> int:
        return sum(math.prod(s) for s in self.shapes[:batch]) * self._itemsize

    def __len__(self) -> int:
        return len(self.shapes)

    def state(self) -> dict[str, Any]:
        """What a resumed run needs to reopen the store."""
        return {"current": self.current, "shapes": [list(s) for s in self.shapes], "dtype": str(self.dtype)}

    def get(self, batch: int) -> torch.Tensor:
        """The current input of ``batch``: the kept tensor, or read from the current file."""
        kept = self._kept.get(batch)
        if kept is not None:
            return kept
        shape = self.shapes[batch]
        out = torch.empty(shape, dtype=self.dtype, pin_memory=self._pin)
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]
        with self._path(self.current).open("rb") as f:
            f.seek(self._offset(batch))
            if f.readinto(view) != len(view):
                raise RuntimeError(f"activation file {self._path(self.current)} is shorter than expected")
        return out

    def put(self, batch: int, hidden: torch.Tensor) -> None:
        """Write ``hidden`` as the next input of ``batch`` into the other file (appends a new batch)."""
        self._pin = self._pin or hidden.is_cuda
        capture = batch == len(self.shapes)  # block 0's inputs: appended straight into the current file
        if not capture and tuple(hidden.shape) != self.shapes[batch]:
            raise RuntimeError(f"block output {tuple(hidden.shape)} differs from its input {self.shapes[batch]}")
        host = to_host(hidden.detach(), self.dtype, hidden.is_cuda)
        if capture:
            self.shapes.append(tuple(hidden.shape))
            self._write(self.current, batch, host)
            return
        if self._keep is None:  # every batch is known now: keep two sets of inputs if they fit
            total = sum(math.prod(s) for s in self.shapes) * self._itemsize
            self._keep = self._budget is not None and 2 * total <= self._budget
        if self._keep:
            self._next[batch] = host
        else:
            self._write(1 - self.current, batch, host)

    def _write(self, file: int, batch: int, host: torch.Tensor) -> None:
        data = host.contiguous().reshape(-1).view(torch.uint8).numpy()
        with self._path(file).open("r+b") as f:
            f.seek(self._offset(batch))
            f.write(data.data)

    def commit(self) -> None:
        """Make what was put the current inputs: flushed to disk now, or (in memory) written behind."""
        target = 1 - self.current
        if self._keep:
            self._kept, self._next = self._next, {}
            self._pending = (target, self._kept)
        else:
            fsync_path(self._path(target))
        self.current = target

    def take_pending(self) -> Callable[[], None]:
        """A job that writes and flushes the last committed inputs (a no-op when nothing is pending).

        Call it on the sweep's thread right after the block; the job may run on another thread, but
        before the next job that this store hands out (the two files alternate).
        """
        pending, self._pending = self._pending, None

        def write() -> None:
            if pending is not None:
                file, batches = pending
                for batch, host in sorted(batches.items()):
                    self._write(file, batch, host)
                fsync_path(self._path(file))

        return write

    def sync(self) -> None:
        """Flush the current file to disk (after the capture filled it)."""
        fsync_path(self._path(self.current))
