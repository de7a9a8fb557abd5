"""Host allocator tuning: applied once per process, skipped where the user chose, and effective."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable

import pytest
import torch
from torch import nn

from oneshot import memory

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"

_PROBE = """
import json, resource, sys, torch
from oneshot.memory import allocator_state, tune_allocator
footprint, numel = sys.argv[1] == "footprint", int(sys.argv[2])
setting = tune_allocator(footprint) if sys.argv[1] != "none" else None
t = torch.empty(8 << 20)  # 32 MB freed: glibc's moving mmap threshold rises to it
t.fill_(1.0)
del t
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    t = torch.empty(numel)
    t.fill_(1.0)
    del t
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
again = tune_allocator(footprint) == setting if setting else None
print(json.dumps({"setting": setting, "faults": faults, "again": again, "state": allocator_state()}))
"""


def _probe(mode: str = "speed", numel: int = 16 << 20, **env: str) -> dict[str, object]:
    """Fault count of 20 buffers of ``numel`` float32 allocated and freed after ``tune_allocator`` in ``mode``."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "ONESHOT_TUNE_MALLOC"}
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, mode, str(numel)],
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


@pytest.mark.skipif(not GLIBC, reason="the thresholds are glibc's")
def test_tuned_allocator_reuses_large_buffers_instead_of_faulting_them_in_again() -> None:
    tuned, default = _probe(), _probe(ONESHOT_TUNE_MALLOC="0")
    assert tuned["setting"] == "glibc mmap threshold 1024 MiB, trim threshold 256 MiB" and tuned["again"]
    assert default["setting"] is None and default["state"] == "default" and tuned["state"] == tuned["setting"]
    pages = (64 << 20) // os.sysconf("SC_PAGE_SIZE")
    assert int(default["faults"]) > 10 * pages  # a fresh mapping, faulted in page by page, each time
    assert int(tuned["faults"]) < 3 * pages  # the first buffer's pages, then reused from the heap


@pytest.mark.skipif(not GLIBC, reason="the thresholds are glibc's")
def test_footprint_mode_hands_every_block_sized_buffer_back() -> None:
    """Streaming's setting: an 8 MB buffer goes back to the system at free (faulted in again each time),
    where glibc's moving threshold, raised by a 32 MB buffer freed before, keeps it in the heap."""
    footprint, moving = _probe("footprint", 2 << 20), _probe("none", 2 << 20)
    assert footprint["setting"] == "glibc mmap threshold 4 MiB, trim threshold 128 KiB" and footprint["again"]
    assert footprint["state"] == footprint["setting"] and moving["state"] == "default"
    pages = (8 << 20) // os.sysconf("SC_PAGE_SIZE")
    assert int(footprint["faults"]) > 10 * pages
    assert int(moving["faults"]) < 3 * pages


_HEAP_PROBE = """
import json, resource, sys, torch
from oneshot.memory import allocator_state, heap_reused, tune_allocator
setting = tune_allocator(footprint=True) if sys.argv[1] == "footprint" else None

def faults(numel):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        t = torch.empty(numel)
        t.fill_(1.0)
        del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

with heap_reused():
    inside = faults(2 << 20)
after = faults(8 << 20)  # larger than any chunk the heap kept inside: served by the thresholds alone
print(json.dumps({"setting": setting, "inside": inside, "after": after, "state": allocator_state()}))
"""


@pytest.mark.skipif(not GLIBC, reason="the thresholds are glibc's")
def test_heap_reused_keeps_buffers_inside_and_hands_them_back_after() -> None:
    """Footprint first (streaming): inside ``heap_reused`` an 8 MB buffer freed serves the next one (faulted in
    once); after it, the footprint thresholds again (every 32 MB buffer faulted in afresh), and the report's
    state unchanged."""
    done = subprocess.run([sys.executable, "-c", _HEAP_PROBE, "footprint"], capture_output=True, text=True, check=True)
    probe = json.loads(done.stdout.strip().splitlines()[-1])
    pages = (8 << 20) // os.sysconf("SC_PAGE_SIZE")
    assert probe["state"] == probe["setting"] == "glibc mmap threshold 4 MiB, trim threshold 128 KiB"
    assert int(probe["inside"]) < 3 * pages
    assert int(probe["after"]) > 10 * 4 * pages


class _CountingLibc:
    def __init__(self) -> None:
        self.trims = 0

    def malloc_trim(self, pad: int) -> int:
        assert pad == 0
        self.trims += 1
        return 1


class _ThresholdLibc(_CountingLibc):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, int]] = []

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return 1


@pytest.mark.parametrize(
    ("tuned", "switched"),
    [
        (None, False),
        ("glibc mmap threshold 1024 MiB, trim threshold 256 MiB", False),
        ("glibc mmap threshold 4 MiB, trim threshold 128 KiB", True),
    ],
)
def test_heap_reused_switches_only_a_process_tuned_footprint_first(
    monkeypatch: pytest.MonkeyPatch, tuned: str | None, switched: bool
) -> None:
    libc = _ThresholdLibc()
    monkeypatch.setattr(memory, "_libc", lambda: libc)
    monkeypatch.setattr(memory, "_tuned", tuned)
    with pytest.raises(RuntimeError, match="inside"), memory.heap_reused():
        inside = list(libc.calls)
        raise RuntimeError("inside")
    if not switched:
        assert libc.calls == [] and libc.trims == 0
        return
    assert sorted(inside) == sorted([(-3, memory.MMAP_THRESHOLD), (-1, memory.TRIM_THRESHOLD)])
    after = libc.calls[len(inside) :]
    assert sorted(after) == sorted([(-3, memory.FOOTPRINT_MMAP_THRESHOLD), (-1, memory.FOOTPRINT_TRIM_THRESHOLD)])
    assert libc.trims == 1 and memory.allocator_state() == tuned  # even when the body raised


@pytest.mark.parametrize(
    "env",
    [
        {"ONESHOT_TUNE_MALLOC": "off"},
        {"ONESHOT_TUNE_MALLOC": "0"},
        {"MALLOC_TRIM_THRESHOLD_": "131072"},
        {"MALLOC_MMAP_THRESHOLD_": "65536"},
        {"MALLOC_TOP_PAD_": "0"},
        {"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"},
        {"LD_PRELOAD": "libtcmalloc_minimal.so.4"},
    ],
)
def test_allocator_left_alone_when_the_user_chose(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(memory, "_tuned", None)  # as in a fresh process
    assert memory.tune_allocator() is None


def test_allocator_left_alone_without_mallopt(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("ONESHOT_TUNE_MALLOC", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("LD_PRELOAD", "")
    monkeypatch.setattr(memory, "_tuned", None)
    monkeypatch.setattr(memory, "_libc", lambda: object())  # a C library without mallopt
    assert memory.tune_allocator() is None and memory.allocator_state() == "default"
    monkeypatch.setattr(memory, "_libc", lambda: None)  # not Linux / no C library found
    assert memory.tune_allocator() is None


@pytest.mark.parametrize(
    ("tuned", "trimmed"),
    [
        (None, True),
        ("glibc mmap threshold 1024 MiB, trim threshold 256 MiB", False),
        ("glibc mmap threshold 4 MiB, trim threshold 128 KiB", True),
    ],
)
def test_scratch_goes_back_unless_the_allocator_was_tuned_for_speed(
    monkeypatch: pytest.MonkeyPatch, tuned: str | None, trimmed: bool
) -> None:
    libc = _CountingLibc()
    monkeypatch.setattr(memory, "_libc", lambda: libc)
    monkeypatch.setattr(memory, "_tuned", tuned)
    memory.release_scratch()
    memory.release_freed_memory()  # unconditional
    assert libc.trims == (2 if trimmed else 1)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_capture_stores_each_tensor_of_a_batch_once(tiny_model: Callable[[str], nn.Module], family: str) -> None:
    """The mask and position embeddings the model hands every block are stored once per batch, shared by
    all the blocks' recorded calls (on a GPU each block's copy to the host was a copy of its own)."""
    from oneshot.calibration.data import CalibrationSet
    from oneshot.capture import capture_inputs
    from oneshot.layers import find_blocks

    model = tiny_model(family)
    _, blocks = find_blocks(model)
    ids = torch.randint(4, 100, (4, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # padding: a real mask tensor reaches the blocks
    stored = torch.device("meta")  # a storage other than the compute device: every tensor is copied
    captured = capture_inputs(
        model, blocks, CalibrationSet(ids, mask), 2, torch.device("cpu"), lambda b, h: None, stored
    )

    def tensors(call: object) -> list[torch.Tensor]:
        found: list[torch.Tensor] = []

        def walk(obj: object) -> None:
            if isinstance(obj, torch.Tensor):
                found.append(obj)
            elif isinstance(obj, (tuple, list)):
                for o in obj:
                    walk(o)
            elif isinstance(obj, dict):
                for o in obj.values():
                    walk(o)

        walk((call.args, call.kwargs))  # type: ignore[attr-defined]
        return found

    assert len(captured.calls) == 2 and len(blocks) >= 2
    for batch in captured.calls:
        per_block = [[id(t) for t in tensors(call)] for call in batch]
        assert per_block[0] and all(t.device.type == "meta" for call in batch for t in tensors(call))
        if family == "llama":  # one mask, one rotary pair for every block: the very same stored tensors
            assert all(ids == per_block[0] for ids in per_block)
        distinct = {i for ids in per_block for i in ids}
        assert len(distinct) <= 2 * len(per_block[0]) < sum(map(len, per_block)) + 1  # Gemma: sliding and global
    other = {id(t) for t in tensors(captured.calls[1][0])}
    assert not other & {id(t) for t in tensors(captured.calls[0][0])}  # a batch's own copies


_MASK_PROBE = """
import json, resource, torch
from oneshot.methods.masks import unstructured_mask
scores = torch.rand(8192, 8192, generator=torch.Generator().manual_seed(0))  # 268 MB, as a 28672 x 2340 layer
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
keep = unstructured_mask(scores, 0.5, per_row=False)
extra = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
print(json.dumps({"extra": extra, "scores": scores.numel() * 4, "kept": int(keep.sum())}))
"""


def test_a_layer_wide_mask_needs_scratch_of_a_chunk_not_of_the_layer() -> None:
    """A mask over a whole layer (RIA, Fisher, magnitude) selects in chunks: kthvalue's value + int64 index copy
    and an int64 tie count over the layer took 4.7x the scores' size on top of them; now about one mask's worth."""
    done = subprocess.run([sys.executable, "-c", _MASK_PROBE], capture_output=True, text=True, check=True, timeout=300)
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["kept"] == 8192 * 8192 // 2
    assert found["extra"] < 1.5 * found["scores"], found


def test_to_device_casts_floating_tensors_only_and_copies_each_tensor_once() -> None:
    from oneshot.capture import to_device

    mask, ids = torch.ones(2, 3, dtype=torch.bfloat16), torch.arange(3)
    out = to_device({"mask": mask, "ids": ids, "pair": (mask, 3)}, torch.device("cpu"), torch.float32)
    assert out["mask"].dtype == torch.float32 and out["ids"].dtype == torch.int64 and out["pair"][1] == 3
    kept = to_device({"mask": mask, "ids": ids}, torch.device("cpu"))
    assert kept["mask"].dtype == torch.bfloat16 and kept["ids"] is ids
    memo: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    first = to_device((mask, [mask]), torch.device("meta"), memo=memo)
    assert first[0] is first[1][0] and first[0].device.type == "meta" and len(memo) == 1


class _RefusingLibc:
    """A C library whose ``mallopt`` takes the mmap threshold and refuses the trim threshold."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return int(param == memory._M_MMAP_THRESHOLD)

    def malloc_trim(self, pad: int) -> int:
        return 1


@pytest.mark.parametrize("footprint", [False, True])
def test_a_threshold_the_library_refuses_leaves_the_state_untuned(
    monkeypatch: pytest.MonkeyPatch, footprint: bool
) -> None:
    for key in ("ONESHOT_TUNE_MALLOC", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("LD_PRELOAD", "")
    monkeypatch.setattr(memory, "_tuned", None)
    libc = _RefusingLibc()
    monkeypatch.setattr(memory, "_libc", lambda: libc)
    assert memory.tune_allocator(footprint) is None and memory.allocator_state() == "default"
    mmap = memory.FOOTPRINT_MMAP_THRESHOLD if footprint else memory.MMAP_THRESHOLD
    trim = memory.FOOTPRINT_TRIM_THRESHOLD if footprint else memory.TRIM_THRESHOLD
    assert libc.calls == [(memory._M_MMAP_THRESHOLD, mmap), (memory._M_TRIM_THRESHOLD, trim)]


def test_sizes_are_named_in_the_largest_whole_unit() -> None:
    assert [memory._size(n) for n in (128 << 10, (1 << 20) - 1024, 1 << 20, 4 << 20, 1 << 30)] == [
        "128 KiB", "1023 KiB", "1 MiB", "4 MiB", "1024 MiB"
    ]  # fmt: skip
