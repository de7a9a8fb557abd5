"""Options: one declaration each, the CLI generated from them, refusals, and the data-free magnitude path."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import oneshot
import oneshot.api
from oneshot.calibration.hooks import collect, flatten_tokens
from oneshot.calibration.stats import ColumnSqNorm
from oneshot.cli import main
from oneshot.config import CalibrationConfig, PruneConfig
from oneshot.errors import ConfigError, ModelError
from oneshot.layers import as_matrix, find_blocks, find_linears
from oneshot.methods.magnitude import magnitude
from oneshot.methods.registry import METHODS
from oneshot.writer import CONFIG_FILE

Checkpoint = Callable[[str], Path]


def _flags() -> dict[str, str]:
    """Field name -> CLI flag of every declared option."""
    out = {}
    for cls in (PruneConfig, CalibrationConfig):
        for f in dataclasses.fields(cls):
            if "help" in f.metadata:
                out[f.name] = f.metadata["flag"] or "--" + f.name.replace("_", "-")
    return out


def test_every_declared_option_is_on_the_cli_with_its_help() -> None:
    res = CliRunner().invoke(main, ["prune", "--help"], terminal_width=400)
    assert res.exit_code == 0
    for name, flag in _flags().items():
        assert flag in res.output, name
    undeclared = [f.name for f in dataclasses.fields(PruneConfig) if "help" not in f.metadata]
    assert undeclared == ["calibration"]  # the nested calibration options are declared on CalibrationConfig
    for name in METHODS:
        assert name in res.output  # the method choices are listed


def test_cli_options_map_onto_the_config(tiny_checkpoint: Checkpoint, tmp_path: Path, monkeypatch: Any) -> None:
    seen: list[PruneConfig] = []

    def fake(model: str, *, config: PruneConfig, out: Path, overwrite: bool) -> Any:
        seen.append(config)
        raise oneshot.errors.DataError("stop here")

    monkeypatch.setattr(oneshot.api, "prune", fake)
    args = ["prune", "m", "--out", str(tmp_path / "o"), "--method", "structured", "--ratio", "0.25"]
    args += ["--no-bias-compensation", "--target", "both", "--score", "variance", "--calib", "x.txt"]
    args += ["--nsamples", "3", "--seqlen", "17", "--seed", "5", "--batch-size", "2", "--dtype", "bfloat16"]
    res = CliRunner().invoke(main, args)
    assert "stop here" in res.output
    expected = PruneConfig(
        method="structured",
        ratio=0.25,
        bias_compensation=False,
        target="both",
        score="variance",
        calibration=CalibrationConfig(source="x.txt", nsamples=3, seqlen=17, seed=5),
        batch_size=2,
        dtype="bfloat16",
    )
    assert seen == [expected]
    res = CliRunner().invoke(main, ["prune", "m", "--out", "o", "--sparsity", "0.5", "--skip", "a*", "--skip", "b*"])
    assert seen[-1] == PruneConfig(sparsity=0.5, skip_layers=("a*", "b*"))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"method": "structured", "ratio": 0.2, "nm": "2:4"}, "--nm does not apply"),
        ({"method": "structured", "ratio": 0.2, "owl": True}, "--owl does not apply"),
        ({"method": "wanda", "sparsity": 0.5, "damp": 0.1}, "--damp does not apply"),
        ({"method": "sparsegpt", "sparsity": 0.5, "obs_memory_mb": 8}, "--obs-memory-mb does not apply"),
        ({"method": "wanda", "sparsity": 0.5, "score": "variance"}, "--score does not apply"),
        ({"method": "wanda", "sparsity": 0.5, "bias_compensation": False}, "--bias-compensation does not apply"),
        ({"method": "wanda", "sparsity": 0.5, "owl_lambda": 0.1}, "only matters with --owl"),
        ({"method": "magnitude", "sparsity": 0.5, "batch_size": 2}, "--batch-size does not apply"),
        ({"method": "magnitude", "sparsity": 0.5, "calibration": CalibrationConfig(nsamples=4)}, "no calibration"),
        ({"method": "wanda", "nm": "2:4", "sparsity_map": {"*.q_proj": 0.3}}, "can only leave layers dense"),
        ({"method": "wanda", "sparsity": 0.5, "observer": "mse"}, "--observer does not apply"),
        ({"method": "rtn", "observer": "percentile"}, "--observer must be"),
    ],
)
def test_options_that_do_not_apply_are_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        PruneConfig(**options)


def test_options_that_apply_are_accepted() -> None:
    PruneConfig(method="magnitude", sparsity=0.5, owl=True, batch_size=2)  # OWL reads data, so batches apply
    PruneConfig(method="wanda", nm="2:4", sparsity_map={"*.q_proj": "skip"})
    PruneConfig(method="structured", ratio=0.2, skip_layers=[])  # an empty list is the default
    PruneConfig(method="obs", sparsity=0.5, damp=0.1, obs_memory_mb=8, max_damp_retries=1)
    assert PruneConfig(method="rtn", observer="mse", group_size=32).quant_spec().observer == "mse"
    assert (
        PruneConfig(method="sparsegpt", sparsity=0.5, then="gptq", observer="mse", group_size=-1).quant_spec().observer
        == "mse"
    )


def test_sparsity_map_from_a_file_path(tmp_path: Path) -> None:
    path = tmp_path / "map.yaml"
    path.write_text("'*.mlp.*': 0.7\n'*.q_proj': skip\n")
    config = PruneConfig(method="wanda", sparsity=0.5, sparsity_map=str(path))
    assert config.sparsity_map == (("*.mlp.*", 0.7), ("*.q_proj", "skip"))
    with pytest.raises(ConfigError, match="not a file"):
        PruneConfig(method="wanda", sparsity=0.5, sparsity_map=str(tmp_path / "none.json"))


def test_api_records_the_calibration_file_it_used(tiny_checkpoint: Checkpoint, tmp_path: Path, text_file: Path) -> None:
    src = tiny_checkpoint("llama")
    oneshot.prune(src, method="wanda", sparsity=0.5, calibration=str(text_file), out=tmp_path / "o", quiet=True)
    saved = json.loads((tmp_path / "o" / CONFIG_FILE).read_text())
    assert saved["calibration"]["source"] == str(text_file)


def test_magnitude_reads_no_data(tiny_model: Callable[[str], nn.Module], monkeypatch: Any) -> None:
    model = tiny_model("llama")
    before = {name: as_matrix(m) for name, m in find_linears(model).items() if "layers" in name}

    def no_forward(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("magnitude ran a forward")

    monkeypatch.setattr(model, "forward", no_forward)
    report = oneshot.prune(model, None, method="magnitude", sparsity=0.5, quiet=True)  # no tokenizer either
    assert report.extra["calibration"] is None and report.mean_relative_error is None
    assert all(r.relative_error is None for r in report.layers) and len(report.layers) == len(before)
    assert "n/a" in report.summary()
    for name, module in find_linears(model).items():
        if name in before:
            assert torch.equal(as_matrix(module), magnitude(before[name], 0.5).weight), name


def test_padding_never_enters_flattened_inputs(tiny_model: Callable[[str], nn.Module]) -> None:
    x = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert torch.equal(flatten_tokens(x.reshape(6, 2), mask), x[mask.bool()])  # OPT's [B·T, d] layout
    with pytest.raises(ModelError, match="does not line up"):
        flatten_tokens(x.reshape(3, 4), mask)
    # through OPT, whose fc1 / fc2 see [B·T, d]: every layer counts exactly the real tokens
    model = tiny_model("opt")
    _, blocks = find_blocks(model)
    ids = torch.randint(4, 100, (3, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    mask[2, 3:] = 0
    linears = find_linears(blocks[0])
    with torch.no_grad(), collect(linears, {"n": lambda d, dev: ColumnSqNorm(d, dev)}) as col:
        col.next_batch(mask)
        model(input_ids=ids, attention_mask=mask)
    for name in ("fc1", "fc2", "self_attn.q_proj"):
        acc = col.stats(name)["n"]
        assert isinstance(acc, ColumnSqNorm) and acc.count == int(mask.sum()), name
