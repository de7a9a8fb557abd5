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
            if "help" in f.metadata and f.metadata.get("cli"):  # cli=False: recorded by a run, not typed
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


def test_each_stage_reads_its_own_knobs(tiny_model: Callable[[str], nn.Module]) -> None:
    """GPTQ's damping, block width and retries are its own: --damp for the method that reads it, --then-damp for
    the quantizer after a pruning method (the one --damp went to both stages silently before)."""
    from oneshot.methods.linalg import BLOCK_SIZE, DAMP
    from oneshot.methods.quantspec import BITS

    gptq_only = PruneConfig(method="gptq", damp=0.05, block_size=64, group_size=32)
    assert gptq_only.method_options().get(DAMP) == 0.05 and gptq_only.method_options().get(BLOCK_SIZE) == 64
    both = PruneConfig(method="sparsegpt", sparsity=0.5, then="gptq", damp=0.05, group_size=32)
    assert both.method_options().get(DAMP) == 0.05 and both.method_options("then").get(DAMP) == DAMP.default
    own = PruneConfig(method="sparsegpt", sparsity=0.5, then="gptq", then_damp=0.1, group_size=32)
    assert own.method_options().get(DAMP) == DAMP.default and own.method_options("then").get(DAMP) == 0.1
    assert "bits" not in both.method_options().values and both.method_options("then").get(BITS) == 4  # per stage
    from oneshot.methods import dsnot

    refined = PruneConfig(method="wanda", sparsity=0.5, refine="dsnot", dsnot_cycles=7)
    assert refined.method_options().get(dsnot.CYCLES) == 7  # the refinement runs in the method's stage
    PruneConfig(method="sparsegpt", sparsity=0.5, stack=False)  # SparseGPT solves q/k/v as one: it applies
    with pytest.raises(ConfigError, match="--stack does not apply to --method wanda .it is used by the methods that solve "
                       "layers sharing an input as one: sparsegpt, obs, gptq."):  # fmt: skip
        PruneConfig(method="wanda", sparsity=0.5, stack=False)
    after_wanda = PruneConfig(method="wanda", sparsity=0.5, then="gptq", damp=0.05, group_size=32)
    assert after_wanda.method_options("then").get(DAMP) == 0.05  # the only stage that reads it
    with pytest.raises(
        ConfigError, match=r"--then-damp does not apply to --method sparsegpt \(it is used by --then gptq\)"
    ):
        PruneConfig(method="sparsegpt", sparsity=0.5, then_damp=0.1)
    with pytest.raises(ConfigError, match="--then-damp does not apply to --method sparsegpt --then rtn"):
        PruneConfig(method="sparsegpt", sparsity=0.5, then="rtn", then_damp=0.1, group_size=32)
    with pytest.raises(ConfigError, match="--damp does not apply to --method wanda --then rtn"):
        PruneConfig(method="wanda", sparsity=0.5, then="rtn", damp=0.1, group_size=32)
    with pytest.raises(ConfigError, match=r"--damp must be positive \(got 0.0\)"):
        PruneConfig(method="sparsegpt", sparsity=0.5, damp=0.0)
    with pytest.raises(ConfigError, match=r"--block-size must be at least 1 \(got 0\)"):
        PruneConfig(method="sparsegpt", sparsity=0.5, block_size=0)
    with pytest.raises(ConfigError, match=r"--block-size must be at least 1 \(got True\)"):
        PruneConfig(method="sparsegpt", sparsity=0.5, block_size=True)  # a YAML "yes" is not a width
    edge = PruneConfig(method="sparsegpt", sparsity=0.5, block_size=1, max_damp_retries=0)  # the bounds themselves
    assert edge.method_options().get(BLOCK_SIZE) == 1
    with pytest.raises(ConfigError, match=r"--then-damp must be positive \(got -1"):
        PruneConfig(method="sparsegpt", sparsity=0.5, then="gptq", then_damp=-1.0, group_size=32)
    # through a run: the layer records show the damping the last stage (GPTQ) used
    ids = torch.randint(4, 100, (4, 24), generator=torch.Generator().manual_seed(0))
    for options, want in (({"damp": 0.05}, DAMP.default), ({"then_damp": 0.05}, 0.05)):
        report = oneshot.prune(tiny_model("llama"), method="sparsegpt", sparsity=0.5, then="gptq", group_size=32,
                               calibration=ids, quiet=True, **options)  # type: ignore[arg-type]  # fmt: skip
        assert {r.damp for r in report.layers} == {want}, options


def test_a_recipe_keeps_each_stage_s_knobs(tmp_path: Path) -> None:
    from oneshot.config import read_recipe

    config = PruneConfig(
        method="sparsegpt", sparsity=0.5, damp=0.02, then="gptq", then_damp=0.1, then_block_size=64, group_size=32
    )
    recipe = config.to_recipe()
    assert recipe["stages"][0] == {"method": "sparsegpt", "sparsity": 0.5, "damp": 0.02}
    second = recipe["stages"][1]
    assert second["method"] == "gptq" and second["damp"] == 0.1 and second["block_size"] == 64
    assert second["bits"] == 4 and second["group_size"] == 32 and "max_damp_retries" not in second
    path = tmp_path / "r.json"
    path.write_text(json.dumps(recipe))
    assert PruneConfig(**read_recipe(path)) == config
    assert set(recipe) == {"stages", "calibration"}  # every knob in its stage, nothing else set
    only = PruneConfig(method="gptq", damp=0.05, group_size=32).to_recipe()
    assert only["stages"] == [{"method": "gptq", "damp": 0.05, "bits": 4, "group_size": 32, "symmetric": True,
                               "act_order": False, "observer": "minmax"}]  # no sparsity for a quantizer  # fmt: skip


def test_every_knob_is_declared_once_and_reaches_the_config_and_the_cli() -> None:
    """Each knob a method lists is a run option with the knob's own default, range and help, and a CLI flag;
    the solvers' keyword defaults are the knobs' (no second literal anywhere)."""
    import dataclasses
    import inspect

    from oneshot.cli import prune as prune_command
    from oneshot.methods import gptq, linalg, obs, sparsegpt
    from oneshot.methods.registry import METHODS

    fields = {f.name: f for f in dataclasses.fields(PruneConfig)}
    flags = {opt for param in prune_command.params for opt in param.opts}
    for spec in METHODS.values():
        for declared in spec.knobs:
            f = fields[declared.name]
            assert f.metadata["knob"] is declared and f.default == declared.default, declared.name
            assert declared.flag in flags and f.metadata["help"] == declared.help
    for solver in (sparsegpt.sparsegpt, gptq.gptq, obs.obs):
        params = inspect.signature(solver).parameters
        for declared in (linalg.BLOCK_SIZE, linalg.DAMP, linalg.MAX_DAMP_RETRIES):
            if declared.name in params:
                assert params[declared.name].default == declared.default, (solver.__name__, declared.name)
    assert {"--then-damp", "--then-block-size", "--then-max-damp-retries"} <= flags
    assert "--digest" not in flags  # recorded by a run, read from a recipe: not typed
    assert fields["then_damp"].metadata["help"] == "The --then quantizer's r" + linalg.DAMP.help[1:]
    defaults = PruneConfig(method="wanda", sparsity=0.5, owl=True)
    assert (defaults.batch_size, defaults.owl_lambda, defaults.owl_m) == (8, 0.08, 5.0)  # the documented defaults


def test_every_knob_a_pruning_method_shares_with_a_quantizer_has_its_then_option() -> None:
    """After a pruning method, a knob both stages read is the quantizer's own as --then-X: each needs that field."""
    import dataclasses

    from oneshot.methods.registry import METHODS

    fields = {f.name: f for f in dataclasses.fields(PruneConfig)}
    quantizers = [spec for spec in METHODS.values() if spec.quantizes]
    pruners = [spec for spec in METHODS.values() if not spec.quantizes and not spec.structured]
    shared = {k for q in quantizers for p in pruners for k in q.knobs if k in p.knobs}
    assert shared and all(fields["then_" + k.name].metadata["knob"] is k for k in shared), shared
