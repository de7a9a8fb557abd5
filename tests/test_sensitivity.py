"""Sensitivity allocation: measured block errors at probe sparsities -> least summed error at the target."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import VOCAB
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

import oneshot
from oneshot.calibration.data import CalibrationSet
from oneshot.errors import ConfigError
from oneshot.gradients import block_output_gradients
from oneshot.layers import as_matrix, find_blocks, find_linears
from oneshot.methods.allocation import probe_sparsities, sensitivity_sparsities
from oneshot.methods.wanda import wanda
from oneshot.passes import sensitivity


def test_probes_and_a_hand_case() -> None:
    assert probe_sparsities(0.7, 0.1) == pytest.approx([0.6, 0.65, 0.7, 0.75, 0.8])
    assert probe_sparsities(0.95, 0.1, 3) == pytest.approx([0.85, 0.92, 0.99])
    # equal blocks; A's error grows 1 per 0.1, B's 5: A takes all it can (0.6), B the rest (0.4)
    got = sensitivity_sparsities([[0.0, 0.1, 0.2], [0.0, 0.5, 1.0]], [0.4, 0.5, 0.6], [10, 10], 0.5)
    assert got == pytest.approx([0.6, 0.4])
    # B three times larger: B's error per pruned parameter is 5/3 < 1·3? no: per parameter A costs 1/10, B 5/30
    got = sensitivity_sparsities([[0.0, 0.1, 0.2], [0.0, 0.5, 1.0]], [0.4, 0.5, 0.6], [10, 30], 0.5)
    assert got[0] == pytest.approx(0.6) and 10 * got[0] + 30 * got[1] == pytest.approx(20.0)
    with pytest.raises(ValueError, match="outside the probed range"):
        sensitivity_sparsities([[0.0, 1.0]], [0.4, 0.6], [1], 0.7)


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.lists(st.floats(0.0, 1.0), min_size=2, max_size=2), min_size=2, max_size=3),
    st.lists(st.integers(1, 4), min_size=3, max_size=3),
    st.floats(0.45, 0.55),
)
def test_greedy_matches_brute_force_on_convex_curves(
    slopes: list[list[float]], sizes: list[int], target: float
) -> None:
    """Convex piecewise-linear curves: the greedy sum is the best any grid allocation at the target reaches."""
    probes = [0.4, 0.5, 0.6]
    curves = [[0.0, a * 0.1, a * 0.1 + (a + b) * 0.1] for a, b in slopes]  # slopes a, a + b: convex
    params = sizes[: len(curves)]
    got = sensitivity_sparsities(curves, probes, params, target, step=0.001)
    assert sum(n * s for n, s in zip(params, got, strict=True)) == pytest.approx(target * sum(params), abs=1e-9)
    assert all(0.4 - 1e-12 <= s <= 0.6 + 1e-12 for s in got)

    def total(alloc: tuple[float, ...]) -> float:
        out = 0.0
        for curve, s in zip(curves, alloc, strict=True):
            k = 1 if s <= 0.5 else 2
            t = (s - probes[k - 1]) / 0.1
            out += curve[k - 1] + t * (curve[k] - curve[k - 1])
        return out

    grid = [0.4 + 0.005 * k for k in range(41)]
    best = float("inf")
    for head in itertools.product(grid, repeat=len(curves) - 1):
        last = (target * sum(params) - sum(n * s for n, s in zip(params, head, strict=False))) / params[-1]
        if 0.4 <= last <= 0.6:
            best = min(best, total((*head, last)))
    assert total(tuple(got)) <= best + 1e-6


def test_engine_allocates_from_measured_errors(tiny_model: Callable[[str], nn.Module]) -> None:
    model, reference = tiny_model("llama"), tiny_model("llama")
    ids = torch.randint(4, VOCAB, (6, 20), generator=torch.Generator().manual_seed(6))
    calib = CalibrationSet(ids)
    report = oneshot.prune(
        model, method="wanda", sparsity=0.6, allocate="sensitivity", calibration=calib, quiet=True, batch_size=3
    )
    found = report.extra["sensitivity"]
    assert found["probes"] == pytest.approx([0.5, 0.55, 0.6, 0.65, 0.7])
    blocks = found["blocks"]
    assert all(b["errors"] == sorted(b["errors"]) for b in blocks)  # more sparsity, more error
    params = [b["parameters"] for b in blocks]
    chosen = [b["sparsity"] for b in blocks]
    assert sum(n * s for n, s in zip(params, chosen, strict=True)) == pytest.approx(0.6 * sum(params))
    assert len({round(s, 6) for s in chosen}) > 1 and found["cost_vs_dense_forward"] > 0
    assert report.achieved_sparsity == pytest.approx(0.6, abs=0.01)
    for record in report.layers:  # each layer pruned at its block's sparsity
        assert record.target_sparsity == pytest.approx(chosen[record.block])

    # block 0's probe at 0.7, measured independently: Wanda at 70% on dense inputs, relative output error
    block = find_blocks(reference)[1][0]
    seen: dict[str, torch.Tensor] = {}

    def keep_input(name: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...]], None]:
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            seen.setdefault(name, args[0].reshape(-1, args[0].shape[-1]))

        return hook

    hooks = [m.register_forward_pre_hook(keep_input(n)) for n, m in find_linears(block).items()]
    outs: list[torch.Tensor] = []
    hooks.append(block.register_forward_hook(lambda m, a, o: outs.append(o[0] if isinstance(o, tuple) else o)))
    with torch.no_grad():
        reference(input_ids=ids)
        for h in hooks:
            h.remove()
        dense_out = outs[0].clone()
        for name, module in find_linears(block).items():
            module.weight.copy_(wanda(as_matrix(module), seen[name].double().square().sum(0).float(), 0.7).weight)
        outs.clear()
        hooks = [block.register_forward_hook(lambda m, a, o: outs.append(o[0] if isinstance(o, tuple) else o))]
        reference(input_ids=ids)
        hooks[0].remove()
    error = float((outs[0] - dense_out).square().sum() / dense_out.square().sum())
    assert blocks[0]["errors"][-1] == pytest.approx(error, rel=1e-3)


def test_allocate_options() -> None:
    with pytest.raises(ConfigError, match="pick one"):
        oneshot.PruneConfig(method="wanda", sparsity=0.6, allocate="sensitivity", owl=True)
    with pytest.raises(ConfigError, match="cannot be combined with --nm"):
        oneshot.PruneConfig(method="wanda", nm="2:4", allocate="sensitivity")
    with pytest.raises(ConfigError, match="--allocate-lambda must be in"):
        oneshot.PruneConfig(method="wanda", sparsity=0.6, allocate="sensitivity", allocate_lambda=0.45)
    with pytest.raises(ConfigError, match="--allocate-lambda only matters with --allocate sensitivity"):
        oneshot.PruneConfig(method="wanda", sparsity=0.6, allocate_lambda=0.2)
    with pytest.raises(ConfigError, match="use --owl or a --sparsity-map"):
        oneshot.PruneConfig(method="fisher", sparsity=0.6, allocate="sensitivity")
    assert oneshot.PruneConfig(method="magnitude", sparsity=0.6, allocate="sensitivity").uses_data


def test_block_output_gradients_are_the_mean_squared_gradient_at_each_block(
    tiny_model: Callable[[str], nn.Module],
) -> None:
    """Oracle: transformers' own next-token loss, the gradient w.r.t. every layer's output hidden state."""
    model = tiny_model("llama")
    ids = torch.randint(4, VOCAB, (3, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    blocks = find_blocks(model)[1]
    trainable: list[bool] = []
    spy = blocks[0].register_forward_hook(lambda *a: trainable.append(any(p.requires_grad for p in model.parameters())))
    got = block_output_gradients(model, CalibrationSet(ids, mask), blocks)
    spy.remove()
    assert trainable == [False] * 3  # no weight needs a gradient while it runs
    assert all(p.requires_grad for p in model.parameters())  # and every flag is back
    want = torch.zeros(len(blocks), dtype=torch.float64)
    tokens = 0
    for s in range(3):
        outs: list[torch.Tensor] = []

        def keep(module: nn.Module, args: object, out: object, outs: list[torch.Tensor] = outs) -> None:
            outs.append(out[0] if isinstance(out, tuple) else out)  # type: ignore[arg-type]

        hooks = [b.register_forward_hook(keep) for b in blocks]
        embeds = model.get_input_embeddings()(ids[s : s + 1]).detach().requires_grad_(True)
        labels = ids[s : s + 1].masked_fill(mask[s : s + 1] == 0, -100)
        loss = model(inputs_embeds=embeds, attention_mask=mask[s : s + 1], labels=labels).loss
        for h in hooks:
            h.remove()
        real = mask[s].bool()
        for i, g in enumerate(torch.autograd.grad(loss, outs)):
            want[i] += float(g[0][real].double().square().sum())
        tokens += int(real.sum())
    assert got == pytest.approx((want / tokens).tolist(), rel=1e-4)
    assert got[0] > 0 and len(set(got)) == len(got)
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())  # no weight gradients kept


def test_fisher_error_weights_each_block_by_energy_and_gradient(
    tiny_model: Callable[[str], nn.Module], monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = torch.randint(4, VOCAB, (6, 20), generator=torch.Generator().manual_seed(6))
    calib = CalibrationSet(ids)
    options = {"method": "wanda", "sparsity": 0.6, "allocate": "sensitivity", "calibration": calib, "quiet": True}
    report = oneshot.prune(tiny_model("llama"), allocate_error="fisher", **options)
    found = report.extra["sensitivity"]
    blocks = found["blocks"]
    assert found["error"] == "fisher" and 0 < found["gradient_seconds"] < found["seconds"]
    costs = [[e * b["output_energy"] * b["gradient_weight"] for e in b["errors"]] for b in blocks]
    want = sensitivity_sparsities(costs, found["probes"], [b["parameters"] for b in blocks], 0.6)
    assert [b["sparsity"] for b in blocks] == pytest.approx(want)
    relative = oneshot.prune(tiny_model("llama"), **options).extra["sensitivity"]
    flat = [e for b in blocks for e in b["errors"]]
    assert [e for b in relative["blocks"] for e in b["errors"]] == pytest.approx(flat)  # the same probes
    assert "gradient_weight" not in relative["blocks"][0]

    # a block whose errors cost a million times more at the output is pruned least, whatever its curve
    first = [1e6] + [1.0] * (len(blocks) - 1)
    monkeypatch.setattr(sensitivity, "block_output_gradients", lambda *a, **k: list(first))
    found = oneshot.prune(tiny_model("llama"), allocate_error="fisher", **options).extra["sensitivity"]
    assert found["blocks"][0]["sparsity"] == pytest.approx(0.5)
    monkeypatch.setattr(sensitivity, "block_output_gradients", lambda *a, **k: list(reversed(first)))
    found = oneshot.prune(tiny_model("llama"), allocate_error="fisher", **options).extra["sensitivity"]
    assert found["blocks"][-1]["sparsity"] == pytest.approx(0.5)


def test_fisher_error_streamed_equals_in_memory(tiny_checkpoint: Callable[[str], Path], tmp_path: Path) -> None:
    """--allocate-error fisher --stream: the block-output gradients from a backward streamed block by
    block give the in-memory run's allocation and folder."""
    from conftest import saved_tensors

    folder = tiny_checkpoint("llama")
    calib = CalibrationSet(torch.randint(4, VOCAB, (4, 16), generator=torch.Generator().manual_seed(7)))
    found = {}
    for stream in (True, False):
        report = oneshot.prune(str(folder), method="wanda", sparsity=0.6, allocate="sensitivity",
                               allocate_error="fisher", stream=stream, out=tmp_path / str(stream), quiet=True,
                               calibration=calib)  # fmt: skip
        found[stream] = report.extra["sensitivity"]
    weights = {s: [b["gradient_weight"] for b in found[s]["blocks"]] for s in found}
    assert weights[True] == pytest.approx(weights[False], rel=1e-5) and weights[True][0] > 0
    assert [b["sparsity"] for b in found[True]["blocks"]] == pytest.approx(
        [b["sparsity"] for b in found[False]["blocks"]]
    )
    streamed, in_memory = saved_tensors(tmp_path / "True"), saved_tensors(tmp_path / "False")
    assert all(torch.equal(streamed[k], t) for k, t in in_memory.items())
    with pytest.raises(ConfigError, match="--allocate-error only matters with --allocate sensitivity"):
        oneshot.PruneConfig(method="wanda", sparsity=0.6, allocate_error="fisher")


def test_probe_cost_is_probing_over_one_dense_forward(tiny_model: Callable[[str], nn.Module]) -> None:
    ids = torch.randint(4, VOCAB, (4, 16), generator=torch.Generator().manual_seed(3))
    config = oneshot.PruneConfig(method="wanda", sparsity=0.5, allocate="sensitivity")
    found = sensitivity.sensitivity_allocation(tiny_model("llama"), CalibrationSet(ids), config)
    assert found.times.refit > 0 and found.times.propagate > 0
    assert found.cost_vs_forward == pytest.approx(found.times.refit / found.times.propagate)


def test_block_output_gradients_of_an_encoder_whose_blocks_return_tuples() -> None:
    """A BERT token classifier: own predictions as targets, block outputs inside tuples."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_labels=5)  # fmt: skip
    model = tf.BertForTokenClassification(cfg).eval()
    ids = torch.randint(4, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))
    blocks = find_blocks(model)[1]
    got = block_output_gradients(model, CalibrationSet(ids), blocks)
    want = [0.0, 0.0]
    for s in range(2):
        outs = model(input_ids=ids[s : s + 1], output_hidden_states=True)
        hidden = outs.hidden_states[1:]  # each layer's output (BERT has no final norm after the last)
        logits = outs.logits[0]
        loss = F.cross_entropy(logits, logits.argmax(-1).detach())
        for i, g in enumerate(torch.autograd.grad(loss, hidden)):
            want[i] += float(g.double().square().sum()) / 20
    assert got == pytest.approx(want, rel=1e-4)
