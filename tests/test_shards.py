"""The incremental shard writer, the on-disk activation store and checkpoint reading errors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import saved_tensors
from safetensors.torch import save_file

from oneshot import writer
from oneshot.activations import DiskStore, MemoryStore
from oneshot.checkpoint import Checkpoint, read_header
from oneshot.errors import ModelError, OutputError
from oneshot.shards import ShardWriter, digest, header_room, iter_saved, tensor_bytes, verify_shards
from oneshot.writer import _same_bytes


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(8, 16, generator=gen).to(torch.bfloat16),
        "b.weight": torch.randn(32, 4, generator=gen),
        "c.bias": torch.arange(7, dtype=torch.int64),
        "d.scale": torch.randn(3, generator=gen).to(torch.float16),
        "e.flag": torch.tensor([True, False, True]),
    }


def test_writer_round_trips_through_safe_open_and_rotates_shards(tmp_path: Path) -> None:
    tensors = _tensors()
    writer = ShardWriter(tmp_path, header_room(tensors), max_shard_bytes=300)
    for key, value in tensors.items():
        writer.add(key, value)
    weight_map = writer.finish()
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(files) >= 2 and all(
        f.startswith("model-") and f.endswith(f"-of-{len(files):05d}.safetensors") for f in files
    )
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == weight_map and set(weight_map) == set(tensors)
    for file in files:  # no shard above the limit unless one tensor alone exceeds it
        sizes = [tensors[k].numel() * tensors[k].element_size() for k, f in weight_map.items() if f == file]
        assert sum(sizes) <= 300 or len(sizes) == 1, (file, sizes)
    assert len(files) == 3  # a: 256 bytes | b: 512 (alone, above the limit) | c, d, e: 56 + 6 + 3
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    back = saved_tensors(tmp_path)
    for key, value in tensors.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key
    assert verify_shards(tmp_path, writer.digests) == index["metadata"]["total_size"]


def test_single_shard_is_named_like_save_pretrained(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path, header_room(["x"]), max_shard_bytes=10**9)
    writer.add("x", torch.ones(3))
    writer.finish()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    assert torch.equal(saved_tensors(tmp_path)["x"], torch.ones(3))


def test_writer_resumes_after_partial_writes_and_a_rotation(tmp_path: Path) -> None:
    tensors = _tensors()
    keys = list(tensors)
    whole = tmp_path / "whole"
    whole.mkdir()
    writer = ShardWriter(whole, header_room(keys), max_shard_bytes=300)
    for key in keys:
        writer.add(key, tensors[key])
    writer.finish()

    crashed = tmp_path / "crashed"
    crashed.mkdir()
    writer = ShardWriter(crashed, header_room(keys), max_shard_bytes=300)
    writer.add(keys[0], tensors[keys[0]])
    state = json.loads(json.dumps(writer.state()))  # what progress.json keeps
    for key in keys[1:4]:  # a crashed block: written (shards closed and begun, longer), never recorded
        writer.add(key, torch.zeros(3 * tensors[key].numel(), dtype=tensors[key].dtype))
    resumed = ShardWriter(crashed, header_room(keys), max_shard_bytes=300, state=state)
    for key in keys[1:]:
        resumed.add(key, tensors[key])
    resumed.finish()
    assert sorted(p.name for p in crashed.iterdir()) == sorted(p.name for p in whole.iterdir())
    for name in (p.name for p in whole.iterdir()):
        assert (crashed / name).read_bytes() == (whole / name).read_bytes(), name


def test_verify_names_a_corrupted_tensor(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path, header_room(["a", "b"]), max_shard_bytes=10**9)
    writer.add("a", torch.zeros(4))
    writer.add("b", torch.ones(4))
    writer.finish()
    good = (tmp_path / "model.safetensors").read_bytes()
    assert verify_shards(tmp_path, writer.digests) == 32
    raw = bytearray(good)
    raw[-1] ^= 0xFF  # flip bits in b's last byte
    (tmp_path / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(OutputError, match="saved tensor b differs"):
        verify_shards(tmp_path, writer.digests)
    (tmp_path / "model.safetensors").write_bytes(good)
    with pytest.raises(OutputError, match="not expected"):
        verify_shards(tmp_path, {"a": writer.digests["a"]})
    with pytest.raises(OutputError, match="missing"):
        verify_shards(tmp_path, {**writer.digests, "c": "0"})


def test_writer_refuses_a_tensor_twice(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path, header_room(["a"]), max_shard_bytes=10**9)
    writer.add("a", torch.zeros(2))
    with pytest.raises(OutputError, match="twice"):
        writer.add("a", torch.zeros(2))


def test_iter_saved_reads_what_save_file_wrote(tmp_path: Path) -> None:
    tensors = _tensors()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    seen = {t.key: t for t in iter_saved(tmp_path)}
    assert (seen["a.weight"].dtype, seen["a.weight"].shape) == ("BF16", (8, 16))
    assert (seen["e.flag"].dtype, seen["e.flag"].shape) == ("BOOL", (3,))
    for key, value in tensors.items():  # read back in 5-byte chunks: the bytes and the digest agree
        raw = b"".join(bytes(c) for c in seen[key].chunks(size=5))
        assert raw == bytes(tensor_bytes(value)) and seen[key].digest() == digest(tensor_bytes(value))


def test_disk_store_double_buffers_and_resumes(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, torch.bfloat16)
    batches = [torch.randn(2, 5, 4).to(torch.bfloat16), torch.randn(1, 3, 4).to(torch.bfloat16)]
    for b, h in enumerate(batches):
        store.put(b, h)  # capture: appended to the current file
    store.sync()
    assert len(store) == 2 and all(torch.equal(store.get(b), h) for b, h in enumerate(batches))
    store.put(0, batches[0] + 1)  # a block's output goes to the other file ...
    assert torch.equal(store.get(0), batches[0])  # ... so the inputs stay intact until commit
    state = store.state()
    reopened = DiskStore(tmp_path, torch.bfloat16, state=json.loads(json.dumps(state)))
    assert torch.equal(reopened.get(1), batches[1])  # a crash before commit: the old inputs
    store.put(1, batches[1] * 2)
    store.commit()
    assert torch.equal(store.get(0), batches[0] + 1) and torch.equal(store.get(1), batches[1] * 2)
    with pytest.raises(RuntimeError, match="differs from its input"):
        store.put(0, torch.zeros(2, 6, 4))


def test_disk_store_in_memory_writes_behind(tmp_path: Path) -> None:
    batches = [torch.randn(2, 5, 4).to(torch.bfloat16), torch.randn(1, 3, 4).to(torch.bfloat16)]
    nbytes = sum(h.numel() * 2 for h in batches)
    store = DiskStore(tmp_path, torch.bfloat16, memory_budget=2 * nbytes)  # two sets fit exactly
    for b, h in enumerate(batches):
        store.put(b, h)
    store.sync()
    assert not store.in_memory  # undecided until the capture is over
    before = (tmp_path / "acts-1.bin").read_bytes()
    outputs = [h + 1 for h in batches]
    for b, h in enumerate(outputs):
        store.put(b, h)
    assert store.in_memory and (tmp_path / "acts-1.bin").read_bytes() == before  # kept, not written
    assert all(torch.equal(store.get(b), h) for b, h in enumerate(batches))  # inputs intact until commit
    store.commit()
    assert all(torch.equal(store.get(b), h) for b, h in enumerate(outputs))  # from memory ...
    state = json.loads(json.dumps(store.state()))
    assert (tmp_path / "acts-1.bin").read_bytes() == before  # ... the file still the old one
    store.take_pending()()  # the background job: write and flush
    assert store.take_pending() is not None  # nothing pending any more: a no-op job
    reopened = DiskStore(tmp_path, torch.bfloat16, state=state)
    assert all(torch.equal(reopened.get(b), h) for b, h in enumerate(outputs))
    store.put(0, outputs[0] * 3)  # the next block writes behind into the other file
    store.put(1, outputs[1] * 3)
    store.commit()
    job = store.take_pending()
    assert torch.equal(DiskStore(tmp_path, torch.bfloat16, state=state).get(0), outputs[0])  # not yet
    job()
    assert torch.equal(DiskStore(tmp_path, torch.bfloat16, state=store.state()).get(0), outputs[0] * 3)

    (tmp_path / "s").mkdir()
    small = DiskStore(tmp_path / "s", torch.bfloat16, memory_budget=2 * nbytes - 1)
    for b, h in enumerate(batches):
        small.put(b, h)
    small.put(0, outputs[0])
    assert not small.in_memory  # two sets do not fit: written at once, as without a budget
    assert (tmp_path / "s" / "acts-1.bin").stat().st_size == batches[0].numel() * 2


def test_memory_store_replaces_in_place() -> None:
    store = MemoryStore()
    store.put(0, torch.ones(1, 2, 3))
    store.put(0, torch.zeros(1, 2, 3))
    store.commit()
    assert len(store) == 1 and torch.equal(store.get(0), torch.zeros(1, 2, 3))


def _checkpoint(folder: Path, shards: int = 2) -> Path:
    folder.mkdir()
    tensors = _tensors()
    keys = list(tensors)
    weight_map = {}
    for i in range(shards):
        part = {k: tensors[k] for k in keys[i::shards]}
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, str(folder / name))
        weight_map.update(dict.fromkeys(part, name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


def test_checkpoint_index_dtype_and_reads(tmp_path: Path) -> None:
    ck = Checkpoint(_checkpoint(tmp_path / "ck"))
    assert set(ck.tensors) == set(_tensors()) and ck.dtype() == torch.float32  # most floating-point bytes
    got = ck.read(["a.weight", "d.scale"])
    assert torch.equal(got["a.weight"], _tensors()["a.weight"])
    assert len(ck.fingerprint()) == 64


def test_corrupt_header_is_a_clear_error(tmp_path: Path) -> None:
    folder = _checkpoint(tmp_path / "ck")
    shard = next(folder.glob("model-00001-*"))
    raw = bytearray(shard.read_bytes())
    raw[10:20] = b"\x00" * 10
    shard.write_bytes(bytes(raw))
    with pytest.raises(ModelError, match=r"not a valid safetensors file.*re-download"):
        Checkpoint(folder)


def test_truncated_shard_is_a_clear_error(tmp_path: Path) -> None:
    folder = _checkpoint(tmp_path / "ck")
    shard = next(folder.glob("model-00002-*"))
    shard.write_bytes(shard.read_bytes()[:-5])
    with pytest.raises(ModelError, match="is truncated"):
        Checkpoint(folder)
    with pytest.raises(ModelError, match="truncated"):
        read_header(shard)


def test_shard_missing_from_the_folder_is_named(tmp_path: Path) -> None:
    folder = _checkpoint(tmp_path / "ck")
    next(folder.glob("model-00002-*")).unlink()
    with pytest.raises(ModelError, match=r"shard model-00002-of-00002.safetensors .* is missing"):
        Checkpoint(folder)


def test_pickle_only_checkpoint_cannot_stream(tmp_path: Path) -> None:
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(ModelError, match=r"no safetensors weights \(found: pytorch_model.bin\)"):
        Checkpoint(folder)


def test_in_memory_verification_catches_a_differing_or_missing_tensor(tmp_path: Path, tiny_model) -> None:  # type: ignore[no-untyped-def]
    from oneshot.writer import verify_saved_model

    model = tiny_model("llama")
    model.save_pretrained(tmp_path)
    assert verify_saved_model(model, tmp_path) == sum(t.numel() * t.element_size() for t in model.state_dict().values())
    weight = model.model.layers[0].mlp.down_proj.weight
    original = weight.detach().clone()
    with torch.no_grad():
        weight[0, 0] += 1
    with pytest.raises(OutputError, match="down_proj.weight differs"):
        verify_saved_model(model, tmp_path)
    with torch.no_grad():
        weight.copy_(original)
    model.register_buffer("extra", torch.ones(3))  # persistent: in the state dict, not in the files
    with pytest.raises(OutputError, match="were not saved"):
        verify_saved_model(model, tmp_path)


class _Saved:
    """A saved tensor's bytes, served in chunks as :class:`oneshot.shards.SavedTensor` does."""

    def __init__(self, data: bytes, chunk: int) -> None:
        self.data, self.chunk, self.nbytes = data, chunk, len(data)

    def chunks(self) -> Iterator[memoryview]:
        buf = memoryview(bytearray(self.data))
        for start in range(0, self.nbytes, self.chunk):
            yield buf[start : start + self.chunk]


@pytest.mark.parametrize("slice_bytes", [3, 1 << 20])  # slices inside a chunk, or the chunk at once
@pytest.mark.parametrize("where", [0, 5, 39])  # first chunk, inside, the last byte
def test_the_re_reading_check_finds_one_changed_byte(
    where: int, slice_bytes: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(writer, "COMPARE_SLICE", slice_bytes)
    tensor = torch.arange(10, dtype=torch.float32)  # 40 bytes
    data = bytes(tensor_bytes(tensor))
    assert _same_bytes(tensor, _Saved(data, 16))
    changed = bytearray(data)
    changed[where] ^= 1
    assert not _same_bytes(tensor, _Saved(bytes(changed), 16))
    assert not _same_bytes(tensor, _Saved(data[:-4], 16))
