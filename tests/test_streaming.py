"""Streaming runs: equal to in-memory pruning tensor for tensor, lean in memory, resumable after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from conftest import char_tokenizer, saved_tensors

import oneshot
from benchmarks.synthetic import llama_config, write_checkpoint
from oneshot.cli import main
from oneshot.errors import OutputError
from oneshot.memory import allocator_state
from oneshot.streaming import PROGRESS_FILE, partial_dir
from oneshot.writer import REPORT_FILE

ROOT = Path(__file__).resolve().parents[1]


def assert_same_tensors(a: Path, b: Path) -> None:
    ta, tb = saved_tensors(a), saved_tensors(b)
    assert sorted(ta) == sorted(tb)
    for key in ta:
        assert ta[key].dtype == tb[key].dtype, key
        assert torch.equal(ta[key], tb[key]), key


def make_checkpoint(folder: Path, dtype: torch.dtype, layers: int = 3, hidden: int = 64, shard: int = 10**5) -> Path:
    config = llama_config(hidden, layers, intermediate=96, heads=4, kv_heads=2, vocab=128)
    write_checkpoint(folder, config, dtype, max_shard_bytes=shard)
    char_tokenizer().save_pretrained(folder)  # type: ignore[attr-defined]
    return folder


IDS = torch.randint(4, 100, (8, 32), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    ("dtype", "options"),
    [
        (torch.bfloat16, {"method": "wanda", "sparsity": 0.5}),
        (torch.bfloat16, {"method": "magnitude", "sparsity": 0.5}),  # data-free: no capture, no activations
        (torch.float32, {"method": "sparsegpt", "nm": "2:4"}),
        (torch.float32, {"method": "wanda", "sparsity": 0.6, "owl": True, "owl_lambda": 0.05}),
        (torch.bfloat16, {"method": "sparsegpt", "sparsity": 0.5, "sparsity_map": {"model.layers.1.*": "skip"}}),
        (torch.float32, {"method": "structured", "ratio": 0.5, "target": "both"}),  # shapes change, biases appear
        (torch.bfloat16, {"method": "sparsegpt", "sparsity": 0.5, "max_memory": "48KB"}),  # activations on disk
        (torch.bfloat16, {"method": "wanda", "sparsity": 0.5, "max_memory": "160KB"}),  # 2 x 32 KB fit half of it
    ],
)
def test_streaming_equals_in_memory(tmp_path: Path, dtype: torch.dtype, options: dict[str, object]) -> None:
    src = make_checkpoint(tmp_path / "ck", dtype)
    memory = oneshot.prune(src, calibration=IDS, out=tmp_path / "mem", stream=False, quiet=True, **options)
    streamed = oneshot.prune(src, calibration=IDS, out=tmp_path / "str", stream=True, quiet=True, **options)
    assert memory.extra["mode"] == "in-memory" and streamed.extra["mode"] == "streaming"
    assert_same_tensors(tmp_path / "mem", tmp_path / "str")
    assert {t.dtype for t in saved_tensors(tmp_path / "str").values()} == {dtype}  # the checkpoint's own dtype
    assert [r.name for r in streamed.layers] == [r.name for r in memory.layers]
    assert streamed.achieved_sparsity == pytest.approx(memory.achieved_sparsity)
    report = json.loads((tmp_path / "str" / REPORT_FILE).read_text())
    assert report["mode"] == "streaming" and len(report["seconds_per_block"]) == 3 and report["peak_rss_bytes"] > 0
    assert report["host_allocator"] == allocator_state()  # footprint first, where glibc is there to tune
    assert allocator_state() in ("default", "glibc mmap threshold 4 MiB, trim threshold 128 KiB")
    if options["method"] != "magnitude":  # two sets of 8 x 32 x 64 activations fit half the budget, or not
        on_disk = options.get("max_memory") == "48KB"  # 2 sets of 32 KB > 24 KB; with 160 KB: <= 80 KB, > 53 KB
        assert report["activation_store"] == ("disk" if on_disk else "memory, written behind")
    assert report["verified_bytes"] == sum(
        t.numel() * t.element_size() for t in saved_tensors(tmp_path / "str").values()
    )
    assert not partial_dir(tmp_path / "str").exists()
    reloaded = oneshot.load_model(tmp_path / "str")[0]
    assert next(reloaded.parameters()).dtype == dtype


def test_auto_mode_streams_when_over_budget(tmp_path: Path) -> None:
    src = make_checkpoint(tmp_path / "ck", torch.float32)
    options: dict[str, Any] = {"method": "wanda", "sparsity": 0.5, "passes": "single", "quiet": True}
    small = oneshot.prune(src, calibration=IDS, out=tmp_path / "a", max_memory="10KB", **options)
    large = oneshot.prune(src, calibration=IDS, out=tmp_path / "b", max_memory="10GB", **options)
    assert small.extra["mode"] == "streaming" and large.extra["mode"] == "in-memory"
    assert_same_tensors(tmp_path / "a", tmp_path / "b")


def test_streaming_needs_an_output_and_a_checkpoint(tmp_path: Path) -> None:
    src = make_checkpoint(tmp_path / "ck", torch.float32)
    with pytest.raises(oneshot.ConfigError, match="pass out="):
        oneshot.prune(src, calibration=IDS, method="wanda", sparsity=0.5, stream=True, quiet=True)
    model = oneshot.load_model(src)[0]
    with pytest.raises(oneshot.ConfigError, match="not a loaded model"):
        oneshot.prune(model, calibration=IDS, method="wanda", sparsity=0.5, stream=True, out=tmp_path / "o")


KILLER = textwrap.dedent(
    """
    import os, signal, sys, time
    from oneshot.shards import ShardWriter
    from oneshot.cli import main
    original, calls = ShardWriter.add, [0]
    def add(self, key, tensor):
        calls[0] += 1
        if calls[0] == int(os.environ["KILL_AT"]):
            os.kill(os.getpid(), signal.SIGKILL)
        original(self, key, tensor)
    ShardWriter.add = add
    if os.environ.get("SLOW_FLUSH"):  # the block written behind lags: the sweep runs ahead of it
        flush = ShardWriter.flush
        ShardWriter.flush = lambda self: (time.sleep(float(os.environ["SLOW_FLUSH"])), flush(self))[1]
    main(sys.argv[1:])
    """
)


def _cli(src: Path, out: Path, text: Path, *extra: str) -> list[str]:
    return [
        "prune", str(src), "--method", "sparsegpt", "--sparsity", "0.5", "--calib", str(text),
        "--nsamples", "4", "--seqlen", "32", "--stream", "--quiet", "--out", str(out), *extra,
    ]  # fmt: skip


QUANT = ("--then", "gptq", "--bits", "4", "--group-size", "16")


@pytest.mark.parametrize(
    ("kill_at", "extra"),
    [
        (14, ()),  # inside block 1's writes
        (22, ()),  # just after block 1 finished
        (45, QUANT),  # a quantized run (4 tensors per layer): inside block 1's compressed tensors
        (14, ("--max-memory", "48KB")),  # the activations on disk, written at each block (not behind)
    ],
)
def test_sigkill_then_resume_is_identical(
    tmp_path: Path, text_file: Path, kill_at: int, extra: tuple[str, ...]
) -> None:
    if extra == QUANT:
        pytest.importorskip("compressed_tensors")
    src = make_checkpoint(tmp_path / "ck", torch.bfloat16, layers=4)
    runner = CliRunner()
    whole = runner.invoke(main, _cli(src, tmp_path / "whole", text_file, *extra))
    assert whole.exit_code == 0, whole.output

    out = tmp_path / "out"
    env = {**os.environ, "KILL_AT": str(kill_at), "PYTHONPATH": str(ROOT)}
    child = subprocess.run([sys.executable, "-c", KILLER, *_cli(src, out, text_file, *extra)], env=env, cwd=tmp_path)
    assert child.returncode == -signal.SIGKILL
    assert not out.exists()
    progress = json.loads((partial_dir(out) / PROGRESS_FILE).read_text())
    assert 1 <= progress["next_block"] < 4  # killed part-way

    again = runner.invoke(main, _cli(src, out, text_file, *extra))
    assert again.exit_code != 0 and "--resume" in again.output  # an interrupted run is not silently restarted
    resumed = runner.invoke(main, _cli(src, out, text_file, *extra, "--resume"))
    assert resumed.exit_code == 0, resumed.output
    assert_same_tensors(tmp_path / "whole", out)
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["resumed_from_block"] == progress["next_block"]
    assert len(report["layers"]) == 4 * 7  # records of the blocks before the kill are kept
    assert not partial_dir(out).exists()
    assert report["activation_store"] == ("disk" if "--max-memory" in extra else "memory, written behind")
    if extra == QUANT:  # every layer saved in its compressed form, before and after the kill
        assert report["quantization"]["layers"] == 4 * 7
        assert sum(k.endswith("weight_packed") for k in saved_tensors(out)) == 4 * 7


def test_resume_after_the_sweep_ran_ahead_of_the_writer(tmp_path: Path, text_file: Path) -> None:
    """Each block's progress record holds the activation store as it was when the block finished.

    With the writer slowed down, the sweep commits the next block's outputs (the store's current
    file flips) before the finished block's record is written; a record of the live store would
    point the resumed run at inputs that were never written.
    """
    src = make_checkpoint(tmp_path / "ck", torch.bfloat16, layers=4)
    runner = CliRunner()
    assert runner.invoke(main, _cli(src, tmp_path / "whole", text_file)).exit_code == 0
    out = tmp_path / "out"
    env = {**os.environ, "KILL_AT": "22", "SLOW_FLUSH": "0.5", "PYTHONPATH": str(ROOT)}
    child = subprocess.run([sys.executable, "-c", KILLER, *_cli(src, out, text_file)], env=env, cwd=tmp_path)
    assert child.returncode == -signal.SIGKILL
    progress = json.loads((partial_dir(out) / PROGRESS_FILE).read_text())
    assert progress["next_block"] == 2  # killed while writing block 2, with the sweep ahead
    resumed = runner.invoke(main, _cli(src, out, text_file, "--resume"))
    assert resumed.exit_code == 0, resumed.output
    assert_same_tensors(tmp_path / "whole", out)


def _interrupted(tmp_path: Path, text_file: Path) -> tuple[Path, Path]:
    src = make_checkpoint(tmp_path / "ck", torch.float32, layers=4)
    out = tmp_path / "out"
    env = {**os.environ, "KILL_AT": "14", "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", KILLER, *_cli(src, out, text_file)], env=env, cwd=tmp_path, check=False)
    assert partial_dir(out).exists()
    return src, out


def test_resume_with_changed_config_or_checkpoint_is_refused(tmp_path: Path, text_file: Path) -> None:
    src, out = _interrupted(tmp_path, text_file)
    runner = CliRunner()
    changed = [a if a != "0.5" else "0.6" for a in _cli(src, out, text_file, "--resume")]
    res = runner.invoke(main, changed)
    assert res.exit_code != 0 and "configuration changed (sparsity)" in res.output
    res = runner.invoke(main, _cli(src, out, text_file, "--resume", "--seed", "3"))
    assert res.exit_code != 0 and "calibration tokens differ" in res.output
    shard = next(src.glob("model-00002-*.safetensors"))
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))  # "changed" checkpoint
    res = runner.invoke(main, _cli(src, out, text_file, "--resume"))
    assert res.exit_code != 0 and "checkpoint's shards changed" in res.output
    assert not out.exists() and partial_dir(out).exists()  # refusing leaves the progress for a correct resume
    res = runner.invoke(main, _cli(src, out, text_file, "--overwrite"))
    assert res.exit_code == 0, res.output
    assert not partial_dir(out).exists()


def test_resume_refuses_a_folder_without_progress(tmp_path: Path, text_file: Path) -> None:
    src = make_checkpoint(tmp_path / "ck", torch.float32)
    out = tmp_path / "out"
    partial_dir(out).mkdir()
    res = CliRunner().invoke(main, _cli(src, out, text_file, "--resume"))
    assert res.exit_code != 0 and "progress.json" in res.output


def test_streaming_error_keeps_progress_and_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from oneshot import streaming

    src = make_checkpoint(tmp_path / "ck", torch.float32)
    original = streaming.StreamingRun._write_block

    def fail_on_block_two(self: streaming.StreamingRun, index: int, block: torch.nn.Module, quantized: dict) -> Any:
        if index == 2:
            raise OutputError("disk full")
        return original(self, index, block, quantized)

    monkeypatch.setattr(streaming.StreamingRun, "_write_block", fail_on_block_two)
    with pytest.raises(OutputError, match="disk full"):
        oneshot.prune(src, calibration=IDS, method="wanda", sparsity=0.5, stream=True, out=tmp_path / "o", quiet=True)
    assert not (tmp_path / "o").exists()
    assert json.loads((partial_dir(tmp_path / "o") / PROGRESS_FILE).read_text())["next_block"] == 2
    monkeypatch.undo()
    done = oneshot.prune(
        src, calibration=IDS, method="wanda", sparsity=0.5, stream=True, resume=True, out=tmp_path / "o", quiet=True
    )
    assert done.extra["resumed_from_block"] == 2
    oneshot.prune(src, calibration=IDS, method="wanda", sparsity=0.5, stream=False, out=tmp_path / "m", quiet=True)
    assert_same_tensors(tmp_path / "o", tmp_path / "m")


PEAK = textwrap.dedent(
    """
    import resource, subprocess, sys
    subprocess.run(sys.argv[1:], check=True)
    print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
    """
)


@pytest.mark.slow
def test_two_gigabyte_checkpoint_streams_in_a_fraction_of_its_size(tmp_path: Path, text_file: Path) -> None:
    config = llama_config(1024, 44, heads=16, kv_heads=4, vocab=8192)
    src = tmp_path / "big"
    size = write_checkpoint(src, config, torch.float32, max_shard_bytes=700 * 10**6)
    char_tokenizer().save_pretrained(src)  # type: ignore[attr-defined]
    assert size >= 2 * 10**9 and len(list(src.glob("*.safetensors"))) >= 3
    out = tmp_path / "streamed"
    cli = [sys.executable, "-m", "oneshot", *_cli(src, out, text_file)]
    cli[cli.index("sparsegpt")] = "wanda"
    res = subprocess.run([sys.executable, "-c", PEAK, *cli], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    peak = int(res.stdout.split()[-1])
    assert peak < 0.4 * size, f"peak RSS {peak / 1e6:.0f} MB for a {size / 1e6:.0f} MB checkpoint"
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["mode"] == "streaming" and report["dtype"] == "float32"

    calib = oneshot.CalibrationConfig(source=str(text_file), nsamples=4, seqlen=32)
    oneshot.prune(src, method="wanda", sparsity=0.5, calibration=calib, out=tmp_path / "mem", stream=False, quiet=True)
    assert_same_tensors(out, tmp_path / "mem")


class _Killed(BaseException):
    """Stands for a kill: not an Exception, so no handler on the way out mistakes it for an error it handles."""


FINISH_STEPS = [
    ("oneshot.shards.ShardWriter.close_shard", "after"),  # the last shard's header written, not yet recorded
    ("oneshot.streaming.StreamingRun.save_progress", "after"),  # the shards' closing recorded
    ("oneshot.shards.ShardWriter.finish", "after"),  # the shards renamed, the index written
    ("oneshot.streaming.StreamingRun._write_metadata", "after"),  # config and tokenizer saved
    ("oneshot.streaming.verify_shards", "after"),  # verified, no report yet
    ("oneshot.streaming.write_run_files", "after"),  # the report written, progress.json still there
    ("oneshot.streaming.publish", "before"),  # progress.json gone: only the rename into place was left
]


@pytest.mark.parametrize(("target", "when"), FINISH_STEPS)
def test_a_kill_at_each_step_of_the_finish_resumes_or_says_where_the_output_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, target: str, when: str
) -> None:
    """The finish's on-disk order is crash-safe: after a kill at any step, ``--resume`` completes the folder
    (the same tensors as an uninterrupted run) or, when only the rename was left, puts it in place."""
    import importlib

    src = make_checkpoint(tmp_path / "ck", torch.float32, layers=3)
    options: dict[str, Any] = {"method": "wanda", "sparsity": 0.5, "calibration": IDS, "stream": True, "quiet": True}
    oneshot.prune(str(src), out=tmp_path / "whole", **options)
    module_name, _, attr = target.rpartition(".")
    owner: Any
    try:
        owner = importlib.import_module(module_name)
    except ModuleNotFoundError:
        parent, _, cls = module_name.rpartition(".")
        owner = getattr(importlib.import_module(parent), cls)
    original = getattr(owner, attr)

    def killed(*args: Any, **kwargs: Any) -> Any:
        if attr == "save_progress" and not args[0].progress.get("finishing"):
            return original(*args, **kwargs)  # the record after each block: not the step under test
        if when == "before":
            raise _Killed
        original(*args, **kwargs)
        raise _Killed

    monkeypatch.setattr(owner, attr, killed)
    out = tmp_path / "out"
    t0 = time.perf_counter()
    with caplog.at_level("ERROR"), pytest.raises(_Killed):
        oneshot.prune(str(src), out=out, **options)
    monkeypatch.setattr(owner, attr, original)
    assert ("rerun with --resume" in caplog.text) == (when == "after")  # said only where a resume can go on
    assert not out.exists()
    if when == "before":  # everything but the rename was done: the resume only publishes the folder
        with pytest.raises(OutputError, match="had finished and verified its output"):
            oneshot.prune(str(src), out=out, resume=True, **options)
    else:
        report = oneshot.prune(str(src), out=out, resume=True, **options)
        assert report.extra["resumed_from_block"] == 3
        assert len(report.extra["seconds_per_block"]) == 3  # the blocks before the kill keep their times
        assert report.phase_seconds()["solve"] > 0
        assert sum(report.extra["seconds_per_block"]) <= report.seconds <= time.perf_counter() - t0
    assert_same_tensors(tmp_path / "whole", out)
    assert not partial_dir(out).exists()
    assert json.loads((out / REPORT_FILE).read_text())["achieved_sparsity"] == pytest.approx(0.5)
    assert not any(p.is_dir() for p in out.iterdir())  # no activation folders published


def test_a_streamed_output_that_fails_its_check_cannot_be_resumed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shards that do not re-read as written: the progress record goes (no resume onto bad files), and the
    error says so; the partial folder is named for inspection."""
    import oneshot.streaming as streaming

    src = make_checkpoint(tmp_path / "ck", torch.float32, layers=2)

    def corrupt(folder: Path, digests: dict[str, str]) -> int:
        raise OutputError("saved tensor x differs from the pruned model on re-reading; not saved")

    monkeypatch.setattr(streaming, "verify_shards", corrupt)
    out = tmp_path / "out"
    with pytest.raises(OutputError, match="differs from the pruned model"):
        oneshot.prune(str(src), method="wanda", sparsity=0.5, calibration=IDS, stream=True, out=out, quiet=True)
    assert not out.exists() and not (partial_dir(out) / PROGRESS_FILE).exists()
