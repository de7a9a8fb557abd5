"""Write safetensors shards one tensor at a time, and verify saved shards one tensor at a time.

The safetensors library writes a whole dict of tensors at once; a streaming run has one block in
memory, so :class:`ShardWriter` writes the format itself (it is simple: an 8-byte little-endian
header length, a JSON header of names, dtypes, shapes and data offsets, then the raw bytes). Each
shard reserves room for its header, appends tensors as they come, and writes the header (padded
with spaces, which the format allows) when the shard is closed. The writer's state is a small dict,
so a resumed run truncates the open shard to its last recorded tensor and goes on.
:func:`verify_shards` re-reads every saved tensor with plain file reads (no second model, no
growing memory map) and compares digests; ``safe_open`` checks each file parses.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from oneshot.checkpoint import INDEX_FILE, SINGLE_FILE, ST_DTYPES, read_header
from oneshot.errors import OutputError

_NAMES = {v: k for k, v in ST_DTYPES.items()}
_PART = "part-{:05d}.safetensors"


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a tensor (a CPU copy when needed)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())  # type: ignore[arg-type]


def digest(data: memoryview | bytes) -> str:
    """A short content digest (BLAKE2b, 128 bits)."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def header_room(keys: Iterable[str]) -> int:
    """Bytes that always fit the header of a shard holding any subset of ``keys`` (8-byte aligned)."""
    per_key = len('"":{"dtype":"BF16","shape":[],"data_offsets":[,]},') + 8 * 21 + 2 * 21
    room = len('{"__metadata__":{"format":"pt"},}') + sum(len(json.dumps(k)) + per_key for k in keys)
    return (room + 7) // 8 * 8


class ShardWriter:
    """Append tensors to numbered shards of at most ``max_shard_bytes``; ``finish`` names and indexes them."""

    def __init__(self, folder: Path, room: int, max_shard_bytes: int, state: dict[str, Any] | None = None) -> None:
        self.folder = folder
        self.room = room
        self.max_shard_bytes = max_shard_bytes
        self.closed: list[dict[str, Any]] = []  # [{"file", "entries": {key: [dtype, shape, start, end]}}]
        self.entries: dict[str, list[Any]] = {}
        self.digests: dict[str, str] = {}
        self.end = 0
        if state is not None:
            self.closed = state["closed"]
            self.entries = state["entries"]
            self.digests = state["digests"]
            self.end = int(state["end"])
            self._truncate()

    @property
    def _current(self) -> Path:
        return self.folder / _PART.format(len(self.closed) + 1)

    def _truncate(self) -> None:
        """Drop whatever was appended after the recorded state (a crashed block's partial writes)."""
        path = self._current
        if path.exists():
            with path.open("r+b") as f:
                f.truncate(8 + self.room + self.end)

    def state(self) -> dict[str, Any]:
        """A JSON-serialisable snapshot; call :meth:`flush` first so it matches the disk."""
        return {"closed": self.closed, "entries": self.entries, "digests": self.digests, "end": self.end}

    def add(self, key: str, tensor: torch.Tensor) -> None:
        """Append one tensor (a new shard is started when this one would exceed the size limit)."""
        if key in self.digests:
            raise OutputError(f"tensor {key} written twice")
        data = tensor_bytes(tensor)
        if self.entries and self.end + data.nbytes > self.max_shard_bytes:
            self._close()
        with self._current.open("r+b" if self.entries else "wb") as f:  # a new shard starts empty
            f.seek(8 + self.room + self.end)
            f.write(data)
        self.entries[key] = [_NAMES[tensor.dtype], list(tensor.shape), self.end, self.end + data.nbytes]
        self.digests[key] = digest(data)
        self.end += data.nbytes

    def _close(self) -> None:
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        for key, (dtype, shape, start, end) in self.entries.items():
            header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}
        text = json.dumps(header, separators=(",", ":")).encode()
        if len(text) > self.room:
            raise OutputError(f"shard header needs {len(text)} bytes but {self.room} were reserved")
        with self._current.open("r+b") as f:
            f.write(self.room.to_bytes(8, "little") + text + b" " * (self.room - len(text)))
        fsync_path(self._current)  # a closed shard is never touched again: durable before the state says closed
        self.closed.append({"file": self._current.name, "entries": self.entries})
        self.entries, self.end = {}, 0

    def flush(self) -> None:
        """Make what was added durable (fsync of the open shard)."""
        if self._current.exists():
            fsync_path(self._current)

    def close_shard(self) -> None:
        """Close the open shard (write its header, make it durable); the state then holds every shard closed."""
        if self.entries:
            self._close()

    def finish(self) -> dict[str, str]:
        """Close the last shard, give the shards their final names, write the index; returns key -> file.

        Renaming is idempotent: a shard already renamed (a finish interrupted and run again) is left.
        """
        self.close_shard()
        total = len(self.closed)
        weight_map: dict[str, str] = {}
        size = 0
        for i, shard in enumerate(self.closed, start=1):
            name = SINGLE_FILE if total == 1 else f"model-{i:05d}-of-{total:05d}.safetensors"
            if (self.folder / shard["file"]).exists():
                (self.folder / shard["file"]).rename(self.folder / name)
            for key, entry in shard["entries"].items():
                weight_map[key] = name
                size += entry[3] - entry[2]
        if total > 1:
            index = {"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))}
            (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        fsync_path(self.folder)
        return weight_map


def fsync_path(path: Path) -> None:
    """Flush a file, or a folder's entries (renames, new files), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(path: Path, text: str) -> None:
    """Replace ``path``'s content with ``text`` atomically and durably: written to a sibling, flushed,
    renamed over ``path``, and the rename flushed (a crash leaves the old file or the new one)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent)


def saved_files(folder: Path) -> list[str]:
    """The safetensors files of a saved model folder (from its index, or the single file)."""
    index = folder / INDEX_FILE
    if index.exists():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return [SINGLE_FILE]


#: Bytes read at a time when re-reading a saved tensor (a 128k x 8192 bf16 embedding is 2 GB).
READ_CHUNK = 64 << 20


@dataclass(frozen=True)
class SavedTensor:
    """Where one tensor sits in a saved safetensors file; its bytes are read in chunks on demand."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    path: Path
    start: int  # absolute file offset of the first byte
    nbytes: int

    def chunks(self, size: int = READ_CHUNK) -> Iterator[memoryview]:
        """The tensor's bytes, ``size`` at a time (one reused buffer: use each chunk before the next)."""
        buf = memoryview(bytearray(max(1, min(size, self.nbytes))))
        with self.path.open("rb") as f:
            f.seek(self.start)
            left = self.nbytes
            while left > 0:
                got = f.readinto(buf[: min(len(buf), left)])
                if not got:
                    raise OutputError(f"{self.path} ends inside tensor {self.key}")
                yield buf[:got]
                left -= got

    def digest(self) -> str:
        """:func:`digest` of the tensor's bytes, computed chunk by chunk."""
        h = hashlib.blake2b(digest_size=16)
        for chunk in self.chunks():
            h.update(chunk)
        return h.hexdigest()


def iter_saved(folder: Path) -> Iterator[SavedTensor]:
    """Every tensor of a saved model folder, in file order (headers only: data is read on demand)."""
    for name in saved_files(folder):
        path = folder / name
        header, data_start = read_header(path)
        for key, meta in header.items():
            if key != "__metadata__":
                start, end = meta["data_offsets"]
                yield SavedTensor(key, meta["dtype"], tuple(meta["shape"]), path, data_start + start, end - start)


def verify_shards(folder: Path, expected: dict[str, str]) -> int:
    """Check every saved tensor's digest against ``expected`` and that each file parses; returns bytes read.

    Tensors are re-read in chunks of ``READ_CHUNK`` bytes, so memory stays small whatever their size.
    Raises :class:`OutputError` for a missing, extra or differing tensor.
    """
    from safetensors import safe_open

    seen: set[str] = set()
    total = 0
    for saved in iter_saved(folder):
        if saved.key not in expected:
            raise OutputError(f"saved tensor {saved.key} was not expected; not saved")
        if saved.digest() != expected[saved.key]:
            raise OutputError(f"saved tensor {saved.key} differs from the pruned model on re-reading; not saved")
        seen.add(saved.key)
        total += saved.nbytes
    missing = sorted(set(expected) - seen)
    if missing:
        raise OutputError(f"{len(missing)} tensors missing from the saved shards (e.g. {missing[0]}); not saved")
    for name in saved_files(folder):
        with safe_open(str(folder / name), framework="pt") as f:
            list(f.keys())
    return total
