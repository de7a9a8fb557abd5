"""The GGUF conversion cache: keyed by the file's content, not its path or modification time."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from oneshot import loading
from oneshot.loading import file_fingerprint, gguf_folder


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_fingerprint_follows_content_not_path_or_mtime(tmp_path: Path) -> None:
    data = os.urandom(5000)
    a = _write(tmp_path / "a.gguf", data)
    b = _write(tmp_path / "sub.gguf", data)
    os.utime(b, (1, 1))  # another modification time, as after a reinstall
    assert file_fingerprint(a) == file_fingerprint(b)
    changed = bytearray(data)
    changed[2500] ^= 1  # one bit in the middle of a small file (hashed whole)
    assert file_fingerprint(_write(tmp_path / "c.gguf", bytes(changed))) != file_fingerprint(a)
    assert file_fingerprint(_write(tmp_path / "d.gguf", data + b"\0")) != file_fingerprint(a)  # the size


@pytest.mark.parametrize("where", ["head", "tail", "sample"])
def test_fingerprint_of_a_large_file_reads_head_tail_and_samples(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    monkeypatch.setattr(loading, "FINGERPRINT_CHUNK", 4)  # head / tail 32 bytes, samples of 4 bytes
    data = bytes(range(256)) * 8  # 2048 bytes > 2 x 32 + 16 x 4: the sampled path
    base = file_fingerprint(_write(tmp_path / "base.gguf", data))
    size, head = len(data), 32
    offset = {"head": 5, "tail": size - 3, "sample": head + 3 * (size - 2 * head) // 16 + 1}[where]
    changed = bytearray(data)
    changed[offset] ^= 0xFF
    assert file_fingerprint(_write(tmp_path / "x.gguf", bytes(changed))) != base
    unsampled = bytearray(data)
    unsampled[head + (size - 2 * head) // 16 + 10] ^= 0xFF  # between two samples: not read
    assert file_fingerprint(_write(tmp_path / "y.gguf", bytes(unsampled))) == base


def test_a_moved_gguf_reuses_its_conversion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONESHOT_CACHE", str(tmp_path / "cache"))
    data = os.urandom(3000)
    first = _write(tmp_path / "m.gguf", data)
    folder = loading.cache_dir() / "gguf-v3" / f"m-{file_fingerprint(first)[:16]}"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")  # a finished conversion
    (tmp_path / "elsewhere").mkdir()
    moved = _write(tmp_path / "elsewhere" / "m.gguf", data)
    assert gguf_folder(moved) == folder  # found without converting (which would fail on random bytes)


def test_fingerprint_reads_at_most_32_mib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    big = tmp_path / "big.gguf"
    with big.open("wb") as f:
        f.truncate(100 << 20)  # a sparse 100 MiB file: nothing written, all zeros
    read: list[int] = []
    real_open = Path.open

    class Counting:
        def __init__(self, handle: object) -> None:
            self.handle = handle

        def __enter__(self) -> Counting:
            return self

        def __exit__(self, *exc: object) -> None:
            self.handle.close()  # type: ignore[attr-defined]

        def seek(self, offset: int) -> None:
            self.handle.seek(offset)  # type: ignore[attr-defined]

        def read(self, size: int) -> bytes:
            data: bytes = self.handle.read(size)  # type: ignore[attr-defined]
            read.append(len(data))
            return data

    monkeypatch.setattr(Path, "open", lambda self, *a, **k: Counting(real_open(self, *a, **k)))
    key = file_fingerprint(big)
    assert sum(read) == 32 << 20 and len(read) == 18  # head and tail of 8 MiB, 16 samples of 1 MiB
    monkeypatch.undo()
    assert file_fingerprint(big) == key


def test_fingerprint_hashes_files_up_to_head_tail_and_samples_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With 4-byte chunks the cut is 2 x 32 + 16 x 4 = 128 bytes: below it every byte counts."""
    monkeypatch.setattr(loading, "FINGERPRINT_CHUNK", 4)

    def counts(size: int, position: int) -> bool:
        data = bytes(range(size))
        changed = bytearray(data)
        changed[position] ^= 0xFF
        a, b = _write(tmp_path / "a.gguf", data), _write(tmp_path / "b.gguf", bytes(changed))
        return file_fingerprint(a) != file_fingerprint(b)

    assert all(counts(100, p) for p in range(100))
    data = bytes(range(100))  # hashed whole: exactly the size, then the bytes
    assert file_fingerprint(_write(tmp_path / "c.gguf", data)) == hashlib.sha256(b"100" + data).hexdigest()
    assert not counts(150, 36)  # above the cut: samples every 5 bytes from 32, 4 bytes each
    assert counts(150, 35)
