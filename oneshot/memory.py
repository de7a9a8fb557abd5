"""Memory facts a run plans with: the budget it may use, and the peak it did use."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import resource
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

#: Share of the available memory a run plans to use when ``--max-memory`` is not given.
DEFAULT_SHARE = 0.7

#: glibc ``mallopt`` parameters (``malloc.h``) and the values :func:`tune_allocator` sets.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 1 << 30
TRIM_THRESHOLD = 256 << 20
FOOTPRINT_MMAP_THRESHOLD = 4 << 20
FOOTPRINT_TRIM_THRESHOLD = 128 << 10
#: Environment settings that mean the user chose the allocator's behaviour themselves.
_USER_ALLOCATOR = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def available_memory() -> int:
    """Bytes of memory available to a new allocation (``MemAvailable`` on Linux, else free pages)."""
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def default_budget() -> int:
    """The memory budget of a run without ``--max-memory``: a safe share of what is available."""
    return int(available_memory() * DEFAULT_SHARE)


def peak_rss() -> int:
    """Peak resident memory of this process so far, in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def peak_device_memory(device: torch.device) -> int | None:
    """Peak memory the caching allocator has handed out on a CUDA ``device`` so far (None off CUDA)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return int(torch.cuda.max_memory_allocated(device))


def release_freed_memory() -> None:
    """Hand memory freed by the allocator back to the operating system (glibc's ``malloc_trim``).

    Without it, glibc keeps freed multi-megabyte buffers (per-thread arenas, a dynamic mmap
    threshold) and the resident size of a long block-by-block run drifts upward: the same
    2 GB streaming run peaked anywhere between 0.5 and 1.7 GB; trimmed after every block, at
    0.57-0.64 GB, no slower. A no-op where the C library has no ``malloc_trim``.
    """
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


#: What :func:`tune_allocator` set in this process (None: glibc's defaults are in effect).
_tuned: str | None = None


def tune_allocator(footprint: bool = False) -> str | None:
    """Set glibc's malloc thresholds for a run: speed first (in memory), or footprint first (streaming).

    glibc serves every allocation above its mmap threshold with a new mapping and unmaps it on
    free, and by default moves that threshold up to the largest buffer freed so far (at most
    32 MB), after which such buffers live in the heap and fragment it.

    - Speed (``footprint=False``): thresholds raised to 1 GiB (mmap) and 256 MiB (trim), so large
      CPU tensors are reused from the heap instead of faulted in again: SmolLM2-135M's block
      forwards 20-30% faster on the project's 2-core CPU. The price is fragmentation: a streamed
      SparseGPT run of a 2-block synthetic LLaMA peaked at 1.94 GB instead of 1.41 GB.
    - Footprint (``footprint=True``, streaming runs): the mmap threshold fixed at 4 MiB (trim
      at glibc's 128 KiB), so every buffer of a block's size goes back to the system when freed.
      With glibc's moving threshold the 2 GB streaming test checkpoint (44 blocks of 4-11 MB
      float32 layers) peaked anywhere between 0.68 and 0.85 GB from run to run; fixed, at
      0.59-0.60 GB, 20% slower on this CPU (each such buffer faulted in afresh). Layers over
      32 MB (a 7B model's) are mapped either way. Set it before the checkpoint is read: free heap
      chunks left by earlier large buffers serve later requests whatever the threshold says.

    Returns what is set, or None where nothing is: not glibc, disabled with
    ``ONESHOT_TUNE_MALLOC=0``, or the user chose the allocator (``MALLOC_*_`` settings, or
    jemalloc / tcmalloc / mimalloc preloaded). A later call with the other mode switches the
    process over (glibc's moving threshold, once fixed, cannot be restored).
    """
    global _tuned
    setting = _setting(footprint)
    if _tuned == setting:
        return _tuned
    if os.environ.get("ONESHOT_TUNE_MALLOC", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    if any(name in os.environ for name in _USER_ALLOCATOR):
        return None
    if any(lib in os.environ.get("LD_PRELOAD", "") for lib in ("jemalloc", "tcmalloc", "mimalloc")):
        return None
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return None
    if not _set_thresholds(libc, footprint):
        return None
    _tuned = setting
    return _tuned


@contextlib.contextmanager
def heap_reused() -> Iterator[None]:
    """Inside the ``with``, large buffers freed are kept in the heap for the next allocation; outside,
    footprint first again, the freed pages handed back.

    For a loop that allocates and frees the same weight-sized buffers many times in a process tuned
    footprint first (a streamed run, :func:`tune_allocator`): each sample's weight gradients in a
    streamed backward (43 MB per sample for a float32 LLaMA block of width 1024) were mapped and
    faulted in afresh. Inside, the faults per sample fell from 5,459 to 745 and the per-sample step
    from 3.69x to 3.48x a no-graph forward (32 samples of 128 tokens; 8 of 512: 9,030 to 2,343 and
    3.33x to 3.12x), the medians of rounds alternated in one process on the project's 2-core CPU
    (``benchmarks/results/backward_heap.md``). Inside, glibc's speed thresholds; on leaving, the
    footprint ones and :func:`release_freed_memory`, so what the loop freed goes back before the
    next block is read. Where the buffers are activation-sized it did not pay: around a whole block
    of a streamed Wanda / SparseGPT sweep no faster and a 12-16% higher peak; around the loss head's
    backward (logits of samples x tokens x vocabulary) 30% faster but a peak of 1.48 GB instead of
    1.17 (8 samples of 1024 tokens, 32000 tokens in the vocabulary). Nothing changes in a process
    not tuned footprint first (tuned for speed, untuned, or the user's allocator).
    """
    libc = _libc()
    if _tuned != _setting(footprint=True) or libc is None:
        yield
        return
    _set_thresholds(libc, footprint=False)
    try:
        yield
    finally:
        _set_thresholds(libc, footprint=True)
        release_freed_memory()


def _set_thresholds(libc: ctypes.CDLL, footprint: bool) -> bool:
    """Set a mode's glibc thresholds; whether glibc accepted them (the trim threshold is not tried if
    the mmap one was refused)."""
    mmap, trim = _thresholds(footprint)
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap) and libc.mallopt(_M_TRIM_THRESHOLD, trim))


def _thresholds(footprint: bool) -> tuple[int, int]:
    """A mode's glibc (mmap, trim) thresholds in bytes."""
    return (FOOTPRINT_MMAP_THRESHOLD, FOOTPRINT_TRIM_THRESHOLD) if footprint else (MMAP_THRESHOLD, TRIM_THRESHOLD)


def _setting(footprint: bool) -> str:
    """How :func:`allocator_state` names a mode's thresholds."""
    mmap, trim = _thresholds(footprint)
    return f"glibc mmap threshold {_size(mmap)}, trim threshold {_size(trim)}"


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"


def allocator_state() -> str:
    """The report's ``host_allocator``: what :func:`tune_allocator` set in this process, or ``default``."""
    return _tuned or "default"


def release_scratch() -> None:
    """After a layer's solve or a block: :func:`release_freed_memory`, unless tuned for speed.

    Footprint first or untuned (streaming runs), the small buffers' fragments would let the peak
    creep with depth, so every layer's scratch goes back (a 2 GB streamed checkpoint peaked at
    856 MB, over its 40% test bound, with trims only per block). Tuned for speed (in-memory runs),
    the heap keeps it for the next layer and the next block: each trim costs ~5 ms per layer and
    ~27 ms per block (0.8 s of a 30-block SmolLM2 Wanda run), and the pages are faulted in again by
    the next forward.
    """
    if _tuned != _setting(footprint=False):
        release_freed_memory()


@functools.cache
def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") else None
