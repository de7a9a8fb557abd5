"""Faults and bad input, as the user meets them: a one-line error, and nothing half-written on disk.

Each test is one row of the "Bad input and faults" table in docs/errors.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import oneshot
from oneshot.cli import main

Checkpoint = Callable[[str], Path]


def _prune(src: Path, out: Path, *extra: str, method: str = "wanda") -> Any:
    args = ["prune", str(src), "--method", method, "--sparsity", "0.5", "--out", str(out), "--quiet", *extra]
    if method != "magnitude":
        args += ["--nsamples", "2", "--seqlen", "32"]
    return CliRunner().invoke(main, args)


def _one_line_error(res: Any, message: str) -> None:
    assert res.exit_code != 0
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:") and message in lines[0], res.output


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _shards(folder: Path, size: int = 20_000) -> Path:
    """Re-save ``folder``'s model in several shards (with an index)."""
    model = oneshot.load_model(folder)[0]
    (folder / "model.safetensors").unlink()
    model.save_pretrained(folder, max_shard_size=size)
    assert (folder / "model.safetensors.index.json").exists()
    return folder


@pytest.mark.parametrize("stream", ["--no-stream", "--stream"])
def test_corrupt_header(tiny_checkpoint: Checkpoint, tmp_path: Path, stream: str) -> None:
    src = tiny_checkpoint("llama")
    shard = src / "model.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[10:20] = b"\x00" * 10
    shard.write_bytes(bytes(raw))
    before = _listing(tmp_path)
    _one_line_error(_prune(src, tmp_path / "out", stream), "not a valid safetensors file")
    assert _listing(tmp_path) == before


@pytest.mark.parametrize("stream", ["--no-stream", "--stream"])
def test_truncated_shard(tiny_checkpoint: Checkpoint, tmp_path: Path, stream: str) -> None:
    src = _shards(tiny_checkpoint("llama"))
    shard = sorted(src.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-7])
    before = _listing(tmp_path)
    _one_line_error(_prune(src, tmp_path / "out", stream), "is truncated")
    assert _listing(tmp_path) == before


def test_shard_named_in_the_index_is_missing(tiny_checkpoint: Checkpoint, tmp_path: Path) -> None:
    src = _shards(tiny_checkpoint("llama"))
    sorted(src.glob("model-*.safetensors"))[0].unlink()
    before = _listing(tmp_path)
    _one_line_error(_prune(src, tmp_path / "out"), "is missing")
    assert _listing(tmp_path) == before


@pytest.mark.parametrize("stream", ["--no-stream", "--stream"])
def test_tensor_missing_from_the_shards(tiny_checkpoint: Checkpoint, tmp_path: Path, stream: str) -> None:
    src = tiny_checkpoint("llama")
    tensors = load_file(src / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    before = _listing(tmp_path)
    _one_line_error(_prune(src, tmp_path / "out", stream), "model.layers.1.mlp.up_proj.weight")
    assert _listing(tmp_path) == before


def test_nan_in_a_weight_names_the_layer(tiny_checkpoint: Checkpoint, tmp_path: Path) -> None:
    src = tiny_checkpoint("llama")
    tensors = load_file(src / "model.safetensors")
    tensors["model.layers.2.self_attn.k_proj.weight"][3, 5] = float("nan")
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    for method in ("wanda", "magnitude"):  # with and without calibration data
        res = _prune(src, tmp_path / "out", method=method)
        _one_line_error(res, "model.layers.2.self_attn.k_proj.weight holds 1 NaN/Inf values")
    assert not (tmp_path / "out").exists()


def test_overflowing_activations_name_the_block(tiny_checkpoint: Checkpoint, tmp_path: Path) -> None:
    src = tiny_checkpoint("llama")
    tensors = load_file(src / "model.safetensors")
    tensors["model.layers.0.post_attention_layernorm.weight"][:] = 1e38  # finite, but the MLP overflows
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    _one_line_error(_prune(src, tmp_path / "out"), "the inputs of model.layers.1 contain NaN/Inf")
    tensors["model.layers.0.post_attention_layernorm.weight"][:] = 1.0
    tensors["model.embed_tokens.weight"][:] = float("inf")
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    _one_line_error(_prune(src, tmp_path / "out"), "the inputs of model.layers.0 contain NaN/Inf")
    assert not (tmp_path / "out").exists()


def test_pickled_bin_checkpoint(tiny_checkpoint: Checkpoint, tiny_model: Callable[[str], Any], tmp_path: Path) -> None:
    src = tiny_checkpoint("llama")
    (src / "model.safetensors").unlink()
    torch.save(tiny_model("llama").state_dict(), src / "pytorch_model.bin")
    # in memory, transformers' weights-only loader reads plain tensors; the output is safetensors
    res = _prune(src, tmp_path / "out", "--no-stream")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "out" / "model.safetensors").exists()
    # streaming reads safetensors only
    _one_line_error(_prune(src, tmp_path / "out2", "--stream"), "no safetensors weights (found: pytorch_model.bin)")
    # a pickle that would run code is never unpickled
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.system, (f"touch {marker}",))

    torch.save({"model.embed_tokens.weight": Evil()}, src / "pytorch_model.bin")
    _one_line_error(_prune(src, tmp_path / "out3", "--no-stream"), "could not load the weights")
    assert not marker.exists() and not (tmp_path / "out3").exists()


def test_disk_full_while_writing_keeps_the_earlier_output(
    tiny_checkpoint: Checkpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, out = tiny_checkpoint("llama"), tmp_path / "out"
    assert _prune(src, out, method="magnitude").exit_code == 0
    earlier = {p: (out / p).read_bytes() for p in _listing(out)}
    import transformers.modeling_utils

    def full(*args: Any, **kwargs: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full)
    res = _prune(src, out, "--overwrite", method="magnitude")
    _one_line_error(res, "No space left on device")
    assert {p: (out / p).read_bytes() for p in _listing(out)} == earlier  # the earlier output, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "tiny-llama"]  # no temporary folder left


def test_ctrl_c_leaves_nothing_half_written(
    tiny_checkpoint: Checkpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from oneshot.methods import wanda
    from oneshot.methods.registry import METHODS

    src = tiny_checkpoint("llama")
    calls = {"n": 0}
    original = wanda.SPEC.run
    assert original is not None

    def interrupted(*args: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 9:  # inside block 1
            raise KeyboardInterrupt
        return original(*args)

    monkeypatch.setitem(METHODS, "wanda", dataclasses.replace(wanda.SPEC, run=interrupted))
    for stream in ("--no-stream", "--stream"):
        calls["n"] = 0
        res = _prune(src, tmp_path / "out", stream)
        assert res.exit_code != 0 and "Aborted" in res.output
        assert not (tmp_path / "out").exists()
    # streaming keeps its finished block for --resume, in the partial folder only
    progress = json.loads((tmp_path / ".out.oneshot-partial" / "progress.json").read_text())
    assert progress["next_block"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.oneshot-partial", "tiny-llama"]
