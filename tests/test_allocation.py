"""OWL allocation and sparsity maps: oracles on the math, then through the driver and the CLI."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import oneshot
from oneshot.cli import main
from oneshot.errors import ConfigError
from oneshot.methods.allocation import apply_sparsity_map, outlier_ratio, owl_sparsities, parse_sparsity_map


def test_outlier_ratio() -> None:
    scores = torch.tensor([1.0] * 98 + [100.0, 100.0])  # mean 2.98
    assert outlier_ratio(scores, 5.0) == pytest.approx(0.02)
    assert outlier_ratio(torch.ones(10), 5.0) == 0.0
    assert outlier_ratio(torch.tensor([2.0]), 0.5) == 1.0  # the share is over every score, even one
    assert outlier_ratio(torch.tensor([0.0, 0.0, 3.0]), 3.0) == 0.0  # strictly above M × mean
    assert parse_sparsity_map({"*": 0.0}) == (("*", 0.0),)  # 0 is a sparsity (prune nothing), not an error
    with pytest.raises(ValueError, match="one outlier ratio"):
        owl_sparsities([0.1, 0.2], [10], 0.5, 0.1)
    assert outlier_ratio(torch.tensor([1.0, 1.0, 7.0]), 2.0) == pytest.approx(1 / 3)  # > M × mean (3), not sum


@pytest.mark.parametrize("seed", range(5))
def test_owl_weighted_mean_band_and_order(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    ratios = (torch.rand(12, generator=gen) * 0.05).tolist()
    params = (torch.randint(1, 10, (12,), generator=gen) * 1000).tolist()  # unequal blocks
    target, lam = 0.7, 0.08
    s = owl_sparsities(ratios, params, target, lam)
    weighted = sum(si * p for si, p in zip(s, params, strict=True)) / sum(params)
    assert weighted == pytest.approx(target, abs=1e-12)
    assert max(s) - min(s) == pytest.approx(2 * lam, abs=1e-12)  # the published span, whatever the profile
    assert s[ratios.index(max(ratios))] == min(s) and s[ratios.index(min(ratios))] == max(s)
    order = sorted(range(12), key=lambda i: ratios[i])
    assert all(s[a] >= s[b] for a, b in zip(order, order[1:], strict=False))  # more outliers -> less sparsity
    # linear in D: equal steps of D give equal steps of sparsity
    slope = (max(s) - min(s)) / (max(ratios) - min(ratios))
    assert all(
        si == pytest.approx(max(s) - slope * (d - min(ratios)), abs=1e-12) for si, d in zip(s, ratios, strict=True)
    )


@pytest.mark.parametrize("ratios", [[0.01, 0.02, 0.04, 0.03], [0.0, 0.0, 0.0, 0.05], [0.01, 0.05, 0.05, 0.05]])
def test_owl_equal_blocks_match_published_formula(ratios: list[float]) -> None:
    """``luuyin/OWL`` lib/prune_all.py: keep = (D − min) / (max − min) · 2λ, minus its mean, plus 1 − S."""
    s = owl_sparsities(ratios, [1, 1, 1, 1], 0.5, 0.08)
    d = torch.tensor(ratios, dtype=torch.float64)
    keep = (d - d.min()) * (1 / (d.max() - d.min()) * 0.08 * 2)
    published = 1 - (keep - keep.mean() + (1 - 0.5))
    assert s == pytest.approx(published.tolist(), abs=1e-12)
    assert sum(s) / 4 == pytest.approx(0.5, abs=1e-12) and max(s) - min(s) == pytest.approx(0.16, abs=1e-12)


def test_owl_refuses_a_span_outside_the_unit_interval() -> None:
    with pytest.raises(ConfigError, match="smaller --owl-lambda"):
        owl_sparsities([0.0, 0.05, 0.05, 0.05], [1, 1, 1, 1], 0.85, 0.1)  # block 0 at 0.85 + 1.5λ = 1.0
    with pytest.raises(ConfigError, match="smaller --owl-lambda"):
        owl_sparsities([0.05, 0.0, 0.0, 0.0], [1, 1, 1, 1], 0.1, 0.09)  # block 0 at 0.1 − 1.5λ < 0
    assert min(owl_sparsities([0.05, 0.0, 0.0, 0.0], [1, 1, 1, 1], 0.1, 0.06)) == pytest.approx(0.01)
    assert owl_sparsities([0.0, 0.1], [1, 1], 0.25, 0.25) == [0.5, 0.0]  # exactly 0 is a sparsity: allowed


def test_owl_uniform_when_no_spread() -> None:
    assert owl_sparsities([0.02, 0.02], [5, 9], 0.6, 0.1) == [0.6, 0.6]


def test_sparsity_map_overrides_and_errors() -> None:
    names = ["m.layers.0.q", "m.layers.0.down", "m.layers.1.q", "m.layers.1.down"]
    base = dict.fromkeys(names, 0.5)
    out = apply_sparsity_map(base, parse_sparsity_map({"*.down": 0.3, "m.layers.1.*": "skip"}))
    assert out == {"m.layers.0.q": 0.5, "m.layers.0.down": 0.3, "m.layers.1.q": None, "m.layers.1.down": None}
    with pytest.raises(ConfigError, match="matches no prunable layer"):
        apply_sparsity_map(base, (("*.gate", 0.1),))
    with pytest.raises(ConfigError, match=r"in \[0, 1\)"):
        parse_sparsity_map({"*": 1.5})


def test_owl_through_driver(tiny_model: Callable[[str], nn.Module]) -> None:
    model = tiny_model("llama")
    with torch.no_grad():  # make block 1 outlier-heavy so OWL has something to see
        for lin in model.model.layers[1].modules():  # equal |W|: almost no outliers in block 1
            if isinstance(lin, nn.Linear):
                lin.weight.copy_(lin.weight.sign() * 0.02)
    ids = torch.randint(4, 100, (8, 32), generator=torch.Generator().manual_seed(0))
    report = oneshot.prune(
        model, method="wanda", sparsity=0.6, owl=True, owl_m=3.0, owl_lambda=0.1, calibration=ids, quiet=True
    )
    blocks = report.extra["owl"]["blocks"]
    assert len(blocks) == 3
    by_block = {b["block"]: b for b in blocks}
    assert by_block[1]["outlier_ratio"] == min(b["outlier_ratio"] for b in blocks)
    assert by_block[1]["sparsity"] == max(b["sparsity"] for b in blocks)
    ranked = sorted(blocks, key=lambda b: b["outlier_ratio"])
    assert all(x["sparsity"] >= y["sparsity"] for x, y in zip(ranked, ranked[1:], strict=False))
    weighted = sum(b["sparsity"] * b["parameters"] for b in blocks) / sum(b["parameters"] for b in blocks)
    assert weighted == pytest.approx(0.6, abs=1e-9)
    for r in report.layers:
        assert r.target_sparsity == pytest.approx(by_block[r.block]["sparsity"])
        assert abs(r.achieved_sparsity - r.target_sparsity) < 1 / 64  # per-row rounding only
    assert report.achieved_sparsity == pytest.approx(0.6, abs=0.01)


def test_sparsity_map_api_skip(tiny_model: Callable[[str], nn.Module]) -> None:
    model = tiny_model("opt")
    dense = model.model.decoder.layers[2].fc1.weight.clone()
    ids = torch.randint(4, 100, (4, 16))
    report = oneshot.prune(
        model,
        method="magnitude",
        sparsity=0.5,
        calibration=ids,
        quiet=True,
        sparsity_map={"*.fc1": 0.25, "model.decoder.layers.2.*": "skip"},
    )
    assert torch.equal(model.model.decoder.layers[2].fc1.weight, dense)
    fc1 = [r for r in report.layers if r.name.endswith("fc1")]
    assert fc1 and all(r.target_sparsity == 0.25 for r in fc1)
    assert len(report.extra["skipped_layers"]) == 6


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--sparsity", "0.5", "--owl", "--owl-lambda", "0.5"], "--owl-lambda must be in [0, sparsity)"),
        (["--sparsity", "0.5", "--owl", "--owl-m", "0"], "--owl-m must be positive"),
        (["--nm", "2:4", "--owl"], "cannot be combined with --nm"),
        (["--sparsity", "0.5", "--sparsity-map", "MAP"], "matches no prunable layer"),
    ],
)
def test_cli_owl_and_map_errors(
    extra: list[str], message: str, tiny_checkpoint: Callable[[str], Path], tmp_path: Path
) -> None:
    src = tiny_checkpoint("llama")
    bad_map = tmp_path / "map.json"
    bad_map.write_text(json.dumps({"*.no_such_layer": 0.2}))
    extra = [str(bad_map) if e == "MAP" else e for e in extra]
    res = CliRunner().invoke(
        main, ["prune", str(src), "--out", str(tmp_path / "o"), "--seqlen", "32", "--nsamples", "2", "--quiet", *extra]
    )
    assert res.exit_code != 0
    assert message in res.output and len(res.output.strip().splitlines()) == 1, res.output
    assert not (tmp_path / "o").exists()


def test_cli_obs_owl_and_yaml_map(tiny_checkpoint: Callable[[str], Path], tmp_path: Path, text_file: Path) -> None:
    src = tiny_checkpoint("gpt2")
    ymap = tmp_path / "map.yaml"
    ymap.write_text("'transformer.h.0.*': skip\n")
    out = tmp_path / "o"
    res = CliRunner().invoke(
        main,
        [
            "prune",
            str(src),
            "--method",
            "obs",
            "--sparsity",
            "0.5",
            "--owl",
            "--owl-m",
            "2",
            "--sparsity-map",
            str(ymap),
            "--calib",
            str(text_file),
            "--seqlen",
            "32",
            "--nsamples",
            "4",
            "--out",
            str(out),
            "--quiet",
        ],
    )
    assert res.exit_code == 0, res.output
    report = json.loads((out / "oneshot_report.json").read_text())
    assert report["method"] == "obs" and len(report["owl"]["blocks"]) == 3
    assert all(name.startswith("transformer.h.0.") for name in report["skipped_layers"])
    assert not any(r["name"].startswith("transformer.h.0.") for r in report["layers"])


def test_owl_ratios_equal_a_reference(tiny_model: Callable[[str], nn.Module]) -> None:
    """Each block's D_l is the share of |W_ij|·‖X_j‖₂ over all its linear layers above M × their mean."""
    from oneshot.calibration.data import CalibrationSet
    from oneshot.config import PruneConfig
    from oneshot.layers import find_blocks, find_linears
    from oneshot.passes.owl import owl_allocation

    model = tiny_model("llama")
    ids = torch.randint(4, 100, (6, 24), generator=torch.Generator().manual_seed(2))
    config = PruneConfig(method="wanda", sparsity=0.5, owl=True, owl_m=2.0, quiet=True)
    got = owl_allocation(model, CalibrationSet(ids), config, single_pass=True)
    sq: dict[str, torch.Tensor] = {}
    blocks = find_blocks(model)[1]
    handles = [
        m.register_forward_pre_hook(
            lambda mod, inp, n=f"{i}.{n}": sq.__setitem__(n, inp[0].double().square().sum((0, 1)))
        )
        for i, block in enumerate(blocks)
        for n, m in find_linears(block).items()
    ]
    with torch.no_grad():
        model(input_ids=ids)  # OWL's sweep prunes nothing, so the dense forward is the reference
    for h in handles:
        h.remove()
    for i, block in enumerate(blocks):
        scores = torch.cat(
            [(m.weight.double().abs() * sq[f"{i}.{n}"].sqrt()).flatten() for n, m in find_linears(block).items()]
        )
        assert got.blocks[i]["outlier_ratio"] == pytest.approx(float((scores > 2.0 * scores.mean()).double().mean()))
