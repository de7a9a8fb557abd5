"""The Python API and the CLI: round trips, reports and one-line errors for bad input."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import char_tokenizer
from transformers import AutoModelForCausalLM

import oneshot
from oneshot.cli import main
from oneshot.writer import CONFIG_FILE, REPORT_FILE

Checkpoint = Callable[[str], Path]


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_api_prunes_in_memory_and_saves_reloadable(
    family: str, tiny_model: Callable[[str], torch.nn.Module], tmp_path: Path, text_file: Path
) -> None:
    model = tiny_model(family)
    tok = char_tokenizer()
    out = tmp_path / "pruned"
    calib = oneshot.CalibrationConfig(source=str(text_file), nsamples=8, seqlen=32)
    report = oneshot.prune(model, tok, method="sparsegpt", sparsity=0.5, calibration=calib, out=out, quiet=True)
    assert abs(report.achieved_sparsity - 0.5) < 1e-3
    assert all(abs(r.achieved_sparsity - 0.5) < 0.02 for r in report.layers)
    ids = torch.randint(4, 100, (2, 20), generator=torch.Generator().manual_seed(0))
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(_logits(reloaded, ids), _logits(model, ids), atol=1e-5, rtol=1e-5)
    saved = json.loads((out / REPORT_FILE).read_text())
    assert saved["method"] == "sparsegpt" and len(saved["layers"]) == len(report.layers)
    assert saved["verified_bytes"] == sum(v.numel() * v.element_size() for v in model.state_dict().values()) - (
        model.lm_head.weight.numel() * 4 if model.config.tie_word_embeddings else 0
    )
    assert {"name", "achieved_sparsity", "relative_error", "seconds", "damp"} <= set(saved["layers"][0])
    config = json.loads((out / CONFIG_FILE).read_text())
    assert config["method"] == "sparsegpt" and config["sparsity"] == 0.5
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".pruned")]  # no temp folders left


def test_embeddings_and_head_untouched(tiny_model: Callable[[str], torch.nn.Module]) -> None:
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items() if "embed" in k or "lm_head" in k or "norm" in k}
    ids = torch.randint(4, 100, (4, 32), generator=torch.Generator().manual_seed(0))
    oneshot.prune(model, method="wanda", nm="2:4", calibration=ids, quiet=True)
    for k, v in before.items():
        assert torch.equal(model.state_dict()[k], v), k
    w = model.model.layers[0].mlp.down_proj.weight
    assert ((w != 0).reshape(w.shape[0], -1, 4).sum(-1) == 2).all()


def test_cli_prune_then_eval(tiny_checkpoint: Checkpoint, tmp_path: Path, text_file: Path) -> None:
    src = tiny_checkpoint("llama")
    out = tmp_path / "out"
    runner = CliRunner()
    res = runner.invoke(
        main,
        [
            "prune",
            str(src),
            "--method",
            "wanda",
            "--sparsity",
            "0.75",
            "--calib",
            str(text_file),
            "--nsamples",
            "4",
            "--seqlen",
            "64",
            "--out",
            str(out),
            "--quiet",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "achieved sparsity 75.0000%" in res.output
    res = runner.invoke(main, ["eval", str(out), "--data", str(text_file), "--seqlen", "64", "--json", "--quiet"])
    assert res.exit_code == 0, res.output
    ppl = json.loads(res.output.strip().splitlines()[-1])["perplexity"]
    assert ppl > 1.0
    # existing output folder is refused, then replaced with --overwrite
    args = [
        "prune",
        str(src),
        "--method",
        "magnitude",
        "--sparsity",
        "0.3",
        "--out",
        str(out),
        "--quiet",
    ]
    res = runner.invoke(main, args)
    assert res.exit_code != 0 and "--overwrite" in res.output
    res = runner.invoke(main, [*args, "--overwrite"])
    assert res.exit_code == 0, res.output
    assert json.loads((out / REPORT_FILE).read_text())["method"] == "magnitude"


def test_cli_methods_lists_all() -> None:
    res = CliRunner().invoke(main, ["methods"])
    assert res.exit_code == 0
    for name in ("magnitude", "wanda", "sparsegpt"):
        assert name in res.output


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--sparsity", "1.0"], "must be in [0, 1)"),
        (["--sparsity", "-0.1"], "must be in [0, 1)"),
        (["--nm", "4:4"], "0 < N < M"),
        (["--nm", "5:4"], "0 < N < M"),
        (["--nm", "two:four"], "not of the form N:M"),
        (
            ["--sparsity", "0.5", "--method", "bogus"],
            "choose one of: fisher, gptq, magnitude, movement, obs, ria, rtn, sparsegpt, structured, wanda",
        ),
        (["--sparsity", "0.5", "--seqlen", "100000"], "exceeds the model's context length 256"),
        (["--sparsity", "0.5", "--calib", "EMPTY"], "contains no text"),
        (["--sparsity", "0.5", "--calib", "SHORT"], "fewer than one sample"),
        (["--sparsity", "0.5", "--calib", "./missing.txt"], "does not exist"),
        ([], "no sparsity given"),
        (["--sparsity", "0.5", "--ratio", "0.2"], "--ratio does not apply to --method sparsegpt"),
        (["--method", "structured", "--ratio", "0.2", "--sparsity", "0.5"], "--sparsity does not apply"),
        (["--method", "structured", "--ratio", "0.2", "--skip", "*.q_proj"], "--skip does not apply"),
        (["--method", "wanda", "--sparsity", "0.5", "--block-size", "64"], "--block-size does not apply"),
        (["--sparsity", "0.5", "--owl-m", "3"], "--owl-m only matters with --owl"),
        (["--method", "magnitude", "--sparsity", "0.5"], "needs no calibration data"),
        (["--nm", "2:3"], "multiple of 3"),
        (["--nm", "2:4", "--sparsity-map", "MAP"], "can only leave layers dense"),
        (["--sparsity", "0.5", "--skip", "*"], "found no linear layer to prune"),
    ],
)
def test_cli_bad_input_one_line_error_nothing_written(
    extra: list[str], message: str, tiny_checkpoint: Checkpoint, tmp_path: Path
) -> None:
    src = tiny_checkpoint("llama")
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "short.txt").write_text("only a few words here")
    (tmp_path / "map.json").write_text('{"*.mlp.*": 0.7}')
    files = {"EMPTY": "empty.txt", "SHORT": "short.txt", "MAP": "map.json"}
    extra = [str(tmp_path / files[e]) if e in files else e for e in extra]
    out = tmp_path / "out"
    before = sorted(p.name for p in tmp_path.iterdir())
    args = ["prune", str(src), "--out", str(out), "--seqlen", "64", "--nsamples", "2", "--quiet", *extra]
    res = CliRunner().invoke(main, args)
    assert res.exit_code != 0
    error_lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(error_lines) == 1 and error_lines[0].startswith("Error:"), res.output
    assert message in error_lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, no temp folder


def test_cli_missing_model_path(tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["prune", str(tmp_path / "nope"), "--sparsity", "0.5", "--out", str(tmp_path / "o")])
    assert res.exit_code != 0
    assert "does not exist" in res.output and len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_failure_during_write_leaves_nothing(
    tiny_model: Callable[[str], torch.nn.Module], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import oneshot.writer as writer

    def boom(model: torch.nn.Module, folder: Path, *quantized: object) -> float:
        raise RuntimeError("disk full")

    monkeypatch.setattr(writer, "verify_saved_model", boom)
    ids = torch.randint(4, 100, (2, 16))
    with pytest.raises(RuntimeError, match="disk full"):
        oneshot.prune(
            tiny_model("llama"), method="magnitude", sparsity=0.5, calibration=ids, out=tmp_path / "o", quiet=True
        )
    assert list(tmp_path.iterdir()) == []


def test_perplexity_matches_hf_loss(tiny_model: Callable[[str], torch.nn.Module], text_file: Path) -> None:
    import math

    from oneshot.calibration.data import tokenize_text

    model, tok = tiny_model("llama"), char_tokenizer()
    text = tokenize_text(tok, text_file.read_text())
    # "window": BOS before every window, every text token scored
    ppl = oneshot.evaluate_perplexity(model, tok, text_file, seqlen=64, max_windows=3, bos="window", quiet=True)
    ids = torch.cat([torch.ones(3, 1, dtype=torch.long), text[: 3 * 63].reshape(3, 63)], 1)  # the tokenizer's BOS
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert math.isclose(ppl, math.exp(float(loss)), rel_tol=1e-4)
    # "once" (the papers' protocol, auto for LLaMA): one BOS before the text, windows cut from that stream
    ppl = oneshot.evaluate_perplexity(model, tok, text_file, seqlen=64, max_windows=3, quiet=True)
    ids = torch.cat([torch.ones(1, dtype=torch.long), text])[: 3 * 64].reshape(3, 64)
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert math.isclose(ppl, math.exp(float(loss)), rel_tol=1e-4)


def test_bos_protocol_auto_follows_the_model_family(tiny_model: Callable[[str], torch.nn.Module]) -> None:
    from oneshot.errors import ConfigError
    from oneshot.evaluation import bos_protocol

    assert bos_protocol(tiny_model("llama")) == "once"
    assert bos_protocol(tiny_model("gemma3")) == "window"
    assert bos_protocol(tiny_model("gemma3"), "once") == "once"
    with pytest.raises(ConfigError, match="--bos"):
        bos_protocol(tiny_model("llama"), "always")
