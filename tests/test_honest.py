"""What a run reports is what it did: sparsity from the masks, every second in a phase, errors on one line."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import oneshot
from oneshot.calibration.data import CalibrationSet
from oneshot.config import TOKENS, CalibrationConfig
from oneshot.errors import ConfigError, ModelError
from oneshot.layers import find_linears
from oneshot.writer import REPORT_FILE

IDS = torch.randint(4, 100, (4, 24), generator=torch.Generator().manual_seed(0))


def test_sparsity_is_the_masks_and_rounded_zeros_are_reported_apart(tiny_model: Callable[[str], nn.Module]) -> None:
    """A quantize-only run prunes nothing (0, not the weights its grid rounded to zero); a pruned and
    quantized run reports its masks' share, and the zeros as written separately."""
    model = tiny_model("llama")
    only = oneshot.prune(model, method="rtn", group_size=32, bits=2, quiet=True)
    weights = {n: m.weight for n, m in find_linears(model).items() if not n.endswith("lm_head")}
    zeros = sum(int((w == 0).sum()) for w in weights.values()) / sum(w.numel() for w in weights.values())
    assert only.achieved_sparsity == 0.0 and all(r.achieved_sparsity == 0.0 for r in only.layers)
    assert only.zero_fraction == pytest.approx(zeros) and zeros > 0.05  # 2 bits: many weights round to 0
    assert only.to_dict()["zero_fraction"] == only.zero_fraction and "zeros after rounding" in only.summary()

    both = oneshot.prune(tiny_model("llama"), method="wanda", sparsity=0.5, then="rtn", group_size=32, bits=2,
                         calibration=IDS, quiet=True)  # fmt: skip
    assert both.achieved_sparsity == pytest.approx(0.5) and all(r.achieved_sparsity == 0.5 for r in both.layers)
    assert both.zero_fraction > 0.5
    plain = oneshot.prune(tiny_model("llama"), method="wanda", sparsity=0.5, calibration=IDS, quiet=True)
    assert plain.zero_fraction == pytest.approx(plain.achieved_sparsity)


def test_every_second_of_a_run_is_in_a_phase(tiny_model: Callable[[str], nn.Module], tmp_path: Path) -> None:
    """The block refit and the save are phases; the phases add up to the run's seconds, and the saved
    report's seconds and peak memory are taken after the save and its check."""
    out = tmp_path / "o"
    t0 = time.perf_counter()
    report = oneshot.prune(tiny_model("llama"), method="wanda", sparsity=0.5, refine="block", owl=True,
                           calibration=IDS, out=out, quiet=True, batch_size=2)  # fmt: skip
    phases = report.phase_seconds()
    assert phases["refit"] > 0 and phases["save"] > 0 and phases["allocation"] > 0
    assert phases["save"] == report.extra["write_seconds"]
    assert phases["allocation"] == report.extra["owl"]["seconds"]
    assert sum(phases.values()) == pytest.approx(report.seconds, rel=1e-9)
    assert 0 < report.seconds <= time.perf_counter() - t0
    assert "refit" in report.summary() and "save" in report.summary()
    saved = json.loads((out / REPORT_FILE).read_text())
    assert saved["seconds"] == report.seconds and saved["write_seconds"] == report.extra["write_seconds"]
    assert saved["phase_seconds"] == phases and saved["peak_rss_bytes"] == report.extra["peak_rss_bytes"]
    assert saved["verified_bytes"] > 0  # what only the save knew is kept


@pytest.mark.parametrize("passes", ["single", "two"])
def test_a_layer_that_gets_no_input_is_a_one_line_error(tiny_model: Callable[[str], nn.Module], passes: str) -> None:
    model = tiny_model("llama")
    model.model.layers[1].unused = nn.Linear(64, 64)  # a linear its block's forward never calls
    with pytest.raises(
        ModelError, match=r"model\.layers\.1\.unused received no input.*--skip 'model\.layers\.1\.unused'"
    ):
        oneshot.prune(model, method="sparsegpt", sparsity=0.5, calibration=IDS, passes=passes, quiet=True)
    report = oneshot.prune(model, method="sparsegpt", sparsity=0.5, calibration=IDS, passes=passes, quiet=True,
                           skip_layers=("*.unused",))  # fmt: skip
    assert report.achieved_sparsity == pytest.approx(0.5)


def test_an_allocation_above_the_probed_range_is_refused() -> None:
    with pytest.raises(ConfigError, match="sparsities up to 0.99; --sparsity 0.995"):
        oneshot.PruneConfig(method="wanda", sparsity=0.995, allocate="sensitivity", allocate_lambda=0.004)
    oneshot.PruneConfig(method="wanda", sparsity=0.99, allocate="sensitivity", allocate_lambda=0.005)  # the bound


def test_the_recorded_config_is_what_the_run_used(tiny_model: Callable[[str], nn.Module]) -> None:
    """Token ids passed in are recorded as such (size and digest), and device, dtype, streaming and
    passes as the run resolved them, not ``auto``."""
    report = oneshot.prune(tiny_model("llama"), method="sparsegpt", sparsity=0.5, calibration=IDS, quiet=True)
    recorded = report.config
    assert recorded.calibration == CalibrationConfig(
        source=TOKENS, nsamples=4, seqlen=24, digest=CalibrationSet(IDS).digest()
    )
    assert (recorded.device, recorded.dtype, recorded.stream) == ("cpu", "float32", False)
    assert recorded.passes == report.extra["passes"] and recorded.passes in ("single", "two")
    assert report.to_dict()["passes"] == recorded.passes
    config = oneshot.PruneConfig(method="wanda", sparsity=0.5, batch_size=2, quiet=True)
    again = oneshot.prune(tiny_model("llama"), config=config, calibration=CalibrationSet(IDS[:2]))
    assert again.config.calibration.nsamples == 2 and again.config.calibration.source == TOKENS
    assert again.config.batch_size == 2
    data_free = oneshot.prune(tiny_model("llama"), method="magnitude", sparsity=0.5, quiet=True)
    assert data_free.config.calibration == CalibrationConfig() and data_free.config.passes == "auto"
    with pytest.raises(ConfigError, match="calibrated on token ids"):
        oneshot.prune(tiny_model("llama"), config=recorded)
    with pytest.raises(ConfigError, match="digest mismatch"):
        oneshot.prune(tiny_model("llama"), config=recorded, calibration=IDS[:, :20])
    same = oneshot.prune(tiny_model("llama"), config=recorded, calibration=IDS)
    assert same.config == recorded


def test_a_saved_recipe_re_makes_the_run(
    tiny_checkpoint: Callable[[str], Path], tmp_path: Path, text_file: Path
) -> None:
    from test_streaming import assert_same_tensors

    src = tiny_checkpoint("llama")
    first = tmp_path / "first"
    oneshot.prune(
        src, method="sparsegpt", sparsity=0.5, calibration=CalibrationConfig(str(text_file), nsamples=3, seed=4),
        out=first, quiet=True,
    )  # fmt: skip
    saved = json.loads((first / "oneshot_config.json").read_text())
    assert saved["calibration"]["source"] == str(text_file) and saved["calibration"]["nsamples"] == 3
    assert saved["calibration"]["digest"] and saved["calibration"]["seqlen"] > 0 and saved["device"] == "cpu"
    second = tmp_path / "second"
    oneshot.prune(src, recipe=first / "recipe.yaml", out=second, quiet=True)
    assert_same_tensors(first, second)
    other = tmp_path / "other.txt"
    other.write_text(text_file.read_text()[::-1])
    with pytest.raises(ConfigError, match="digest mismatch"):
        oneshot.prune(src, recipe=first / "recipe.yaml", calibration=str(other), out=tmp_path / "x", quiet=True)


def test_options_a_run_would_ignore_are_refused_or_honoured(tiny_model: Callable[[str], nn.Module]) -> None:
    with pytest.raises(ConfigError, match="--passes does not apply to --method magnitude"):
        oneshot.PruneConfig(method="magnitude", sparsity=0.5, passes="two")
    with pytest.raises(ConfigError, match="--passes does not apply to --method structured"):
        oneshot.PruneConfig(method="structured", ratio=0.2, passes="two")
    oneshot.PruneConfig(method="magnitude", sparsity=0.5, owl=True, passes="two")  # OWL sweeps data: it applies
    with pytest.raises(ConfigError, match="--passes single forwards all calibration samples as one batch"):
        oneshot.PruneConfig(method="wanda", sparsity=0.5, passes="single", batch_size=2)
    batched = oneshot.prune(
        tiny_model("llama"), method="wanda", sparsity=0.5, calibration=IDS, batch_size=2, quiet=True
    )
    assert batched.extra["passes"] == "two" and "--batch-size 2" in batched.extra["passes_reason"]
    plain = oneshot.prune(tiny_model("llama"), method="wanda", sparsity=0.5, calibration=IDS, quiet=True)
    assert plain.extra["passes"] == "single"  # everything fits: the one forward
    two = oneshot.prune(tiny_model("llama"), method="wanda", sparsity=0.5, calibration=IDS, quiet=True, passes="two",
                        batch_size=2)  # fmt: skip
    assert two.extra["passes"] == "two" and "passes_reason" not in two.extra  # asked for: no reason to give
    with pytest.raises(ConfigError, match="sparsities= names 'model.layers.0.no_such'"):
        oneshot.prune(tiny_model("llama"), method="wanda", sparsity=0.5, calibration=IDS, quiet=True,
                      sparsities={"model.layers.0.mlp.up_proj": 0.3, "model.layers.0.no_such": 0.2})  # fmt: skip
    report = oneshot.prune(tiny_model("llama"), method="wanda", sparsity=0.5, calibration=IDS, quiet=True,
                           sparsities={"model.layers.0.mlp.up_proj": 0.25})  # fmt: skip
    assert {r.name: r.achieved_sparsity for r in report.layers}["model.layers.0.mlp.up_proj"] == 0.25


@pytest.mark.parametrize("options", [{"method": "fisher", "sparsity": 0.5},
                                     {"method": "wanda", "sparsity": 0.5, "allocate": "sensitivity",
                                      "allocate_error": "fisher", "allocate_lambda": 0.1}])  # fmt: skip
def test_the_gradient_passes_run_on_the_chosen_device(
    tiny_model: Callable[[str], nn.Module], monkeypatch: pytest.MonkeyPatch, options: dict[str, object]
) -> None:
    """``--device`` reaches the backward through the whole model (it ran where the model sat)."""
    import oneshot.gradients as gradients

    asked: list[torch.device] = []
    real = gradients.computed_on

    def spy(model: nn.Module, device: torch.device):  # type: ignore[no-untyped-def]
        asked.append(device)
        return real(model, device)

    monkeypatch.setattr(gradients, "computed_on", spy)
    oneshot.prune(tiny_model("llama"), calibration=IDS, device="cpu", quiet=True, **options)  # type: ignore[arg-type]
    assert asked and all(d == torch.device("cpu") for d in asked)


def test_the_phase_line_names_the_phases_that_took_time() -> None:
    from oneshot.api import phase_line

    line = phase_line({"capture": 0.05, "forward": 0.049, "report": 2.0, "refit": 0.0})
    assert line == "capture 0.1, error report 2.0"  # 0.05 s shows (as 0.1), 0.049 s and 0 do not
