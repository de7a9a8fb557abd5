"""Structured pruning: oracles for bias compensation, physical shrinking and stock reloading."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers as tf
from conftest import VOCAB
from torch import nn

import oneshot
from oneshot.calibration.data import CalibrationSet
from oneshot.errors import ConfigError
from oneshot.layers import find_blocks


def _one_block(family: str) -> nn.Module:
    torch.manual_seed(0)
    if family == "llama":
        cfg = tf.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=1,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=16,
            max_position_embeddings=128,
        )
        return tf.LlamaForCausalLM(cfg).eval()
    if family == "opt":
        cfg = tf.OPTConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            ffn_dim=96,
            num_hidden_layers=1,
            num_attention_heads=4,
            max_position_embeddings=128,
            word_embed_proj_dim=64,
        )
        return tf.OPTForCausalLM(cfg).eval()
    if family == "gpt2":
        return tf.GPT2LMHeadModel(
            tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=1, n_head=4, n_positions=128)
        ).eval()
    cfg = tf.BertConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=1,
        num_attention_heads=4,
        max_position_embeddings=128,
    )
    return tf.BertForMaskedLM(cfg).eval()


def _outputs(model: nn.Module, module_name: str, ids: torch.Tensor) -> torch.Tensor:
    """Output of a submodule (or of block 0 when module_name is empty) over all tokens, [tokens, d]."""
    _, blocks = find_blocks(model)
    target = blocks[0].get_submodule(module_name) if module_name else blocks[0]
    got: list[torch.Tensor] = []
    handle = target.register_forward_hook(lambda m, a, o: got.append((o[0] if isinstance(o, tuple) else o).detach()))
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    return got[0].reshape(-1, got[0].shape[-1])


CASES = [  # family, target, module whose output mean must be kept ("" = the whole block)
    ("llama", "mlp", ""),
    ("llama", "attention", "self_attn.o_proj"),
    ("opt", "mlp", ""),
    ("gpt2", "mlp", ""),
    ("bert", "mlp", "output.dense"),
]


@pytest.mark.parametrize(("family", "target", "where"), CASES)
def test_compensation_keeps_the_mean(family: str, target: str, where: str) -> None:
    model = _one_block(family)
    ids = torch.randint(4, VOCAB, (8, 24), generator=torch.Generator().manual_seed(1))
    before = _outputs(model, where, ids)
    report = oneshot.prune(model, method="structured", ratio=0.34, target=target, calibration=ids, quiet=True)
    after = _outputs(model, where, ids)
    torch.testing.assert_close(after.mean(0), before.mean(0), atol=2e-5, rtol=1e-4)
    assert not torch.allclose(after, before, atol=1e-3)  # something really was removed
    assert report.extra["structured"]["params_after"] < report.extra["structured"]["params_before"]
    # without compensation the mean moves
    plain = _one_block(family)
    oneshot.prune(
        plain, method="structured", ratio=0.34, target=target, calibration=ids, quiet=True, bias_compensation=False
    )
    drift = float((_outputs(plain, where, ids).mean(0) - before.mean(0)).abs().max())
    kept = float((after.mean(0) - before.mean(0)).abs().max())
    assert drift > 10 * kept + 1e-6


def test_constant_channel_removed_changes_nothing() -> None:
    model = _one_block("opt")
    fc1 = model.model.decoder.layers[0].fc1
    with torch.no_grad():
        fc1.weight[7].zero_()
        fc1.bias[7] = 2.0  # relu(2) = 2 for every token: zero variance
    ids = torch.randint(4, VOCAB, (4, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    report = oneshot.prune(model, method="structured", ratio=1 / 96, score="variance", calibration=ids, quiet=True)
    assert report.extra["structured"]["blocks"][0]["removed"] == [7]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("family", "target"), [("llama", "both"), ("opt", "mlp"), ("gpt2", "mlp"), ("bert", "mlp")])
def test_smaller_model_reloads_with_stock_transformers(
    family: str, target: str, tiny_model: Callable[[str], nn.Module], tmp_path: Path
) -> None:
    model = tiny_model(family)
    if family == "llama":  # GQA with 2 query heads per key/value head and an explicit head_dim
        model = tf.LlamaForCausalLM(
            tf.LlamaConfig(
                vocab_size=VOCAB,
                hidden_size=64,
                intermediate_size=96,
                num_hidden_layers=3,
                num_attention_heads=8,
                num_key_value_heads=4,
                head_dim=16,
                max_position_embeddings=128,
            )
        ).eval()
    ids = torch.randint(4, VOCAB, (6, 20), generator=torch.Generator().manual_seed(3))
    before = sum(p.numel() for p in model.parameters())
    report = oneshot.prune(
        model,
        method="structured",
        ratio=0.34,
        target=target,
        calibration=CalibrationSet(ids),
        out=tmp_path / "small",
        quiet=True,
    )
    reloaded = type(model).from_pretrained(tmp_path / "small").eval()
    with torch.no_grad():
        a = model(input_ids=ids).logits
        b = reloaded(input_ids=ids).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    cfg = reloaded.config
    mlp = next(u for u in report.extra["structured"]["blocks"] if u["target"] == "mlp")
    width = {"opt": "ffn_dim", "gpt2": "n_inner"}.get(family, "intermediate_size")
    assert getattr(cfg, width) == mlp["after"] == mlp["before"] - round(0.34 * mlp["before"])
    if family == "llama":
        assert cfg.num_attention_heads == 4 and cfg.num_key_value_heads == 4 and cfg.head_dim == 16
        assert cfg.mlp_bias and cfg.attention_bias
    assert sum(p.numel() for p in reloaded.parameters()) < before


def test_structured_errors(tiny_model: Callable[[str], nn.Module]) -> None:
    ids = torch.randint(4, VOCAB, (2, 8))
    with pytest.raises(ConfigError, match="use --target mlp"):
        oneshot.prune(
            tiny_model("gpt2"), method="structured", ratio=0.25, target="attention", calibration=ids, quiet=True
        )
    with pytest.raises(ConfigError, match="--no-bias-compensation"):
        oneshot.prune(tiny_model("gemma3"), method="structured", ratio=0.25, calibration=ids, quiet=True)
    with pytest.raises(ConfigError, match="needs --ratio"):
        oneshot.PruneConfig(method="structured")
    with pytest.raises(ConfigError, match="between"):
        oneshot.prune(
            tiny_model("llama"), method="structured", ratio=0.05, target="attention", calibration=ids, quiet=True
        )
    oneshot.prune(
        tiny_model("gemma3"), method="structured", ratio=0.25, calibration=ids, quiet=True, bias_compensation=False
    )
    with pytest.raises(ConfigError, match="removes 0 of 96 MLP neurons"):
        oneshot.prune(tiny_model("llama"), method="structured", ratio=0.001, calibration=ids, quiet=True)
    with pytest.raises(ConfigError, match="removes 96 of 96 MLP neurons"):
        oneshot.prune(tiny_model("llama"), method="structured", ratio=0.999, calibration=ids, quiet=True)
    with pytest.raises(ConfigError, match="removes 2 of the 2 query heads"):
        oneshot.prune(
            tiny_model("llama"), method="structured", ratio=0.99, target="attention", calibration=ids, quiet=True
        )
    # without compensation no bias appears, and the config does not claim one
    model = tiny_model("llama")
    oneshot.prune(model, method="structured", ratio=0.5, target="both", bias_compensation=False, calibration=ids)
    assert not model.config.mlp_bias and not model.config.attention_bias
    assert model.model.layers[0].mlp.down_proj.bias is None and model.model.layers[0].self_attn.o_proj.bias is None


def test_unit_score_formulas_hand_computed() -> None:
    """FLAP's fluctuation Var(x_j)·‖W_:,j‖₂² (An et al. 2024, §3.1), and its two ablations."""
    from oneshot.methods.structured import channel_scores, compensation, lowest, lowest_per_group, unit_scores

    var = torch.tensor([1.0, 4.0, 0.5])
    w_out = torch.tensor([[1.0, 2.0, 0.0], [1.0, 0.0, 3.0]])  # column norms² 2, 4, 9
    assert channel_scores(var, w_out, "fluctuation").tolist() == [2.0, 16.0, 4.5]
    assert channel_scores(var, w_out, "variance").tolist() == [1.0, 4.0, 0.5]
    assert channel_scores(var, w_out, "magnitude").tolist() == [2.0, 4.0, 9.0]
    assert unit_scores(torch.tensor([1.0, 2.0, 3.0, 4.0]), 2).tolist() == [3.0, 7.0]
    assert lowest(torch.zeros(2000), 3).tolist() == [0, 1, 2]  # ties: lower index first, at any size
    assert lowest(torch.tensor([3.0, 1.0, 2.0, 0.5]), 2).tolist() == [1, 3]
    # per group of GQA heads: indices are global
    assert lowest_per_group(torch.tensor([5.0, 1.0, 3.0, 0.0, 9.0, 2.0]), 2, 1).tolist() == [1, 3]
    empty = compensation(w_out, torch.ones(3), torch.tensor([], dtype=torch.long))
    assert empty.dtype == torch.float32 and empty.tolist() == [0.0, 0.0]
    assert compensation(w_out, torch.tensor([2.0, 3.0, 5.0]), torch.tensor([0, 2])).tolist() == [2.0, 17.0]


def _reference_flap_mlp(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, remove: int) -> list[list[int]]:
    """FLAP on the MLP, block after block, with the model's own forward (An et al. 2024, §3).

    Block i is scored on inputs that ran through the already shrunk blocks < i: fluctuation
    Var(x_j) · ‖W_down[:, j]‖² over real tokens (population variance), the ``remove`` lowest
    neurons go (ties: lower index), and W_down[:, removed] · mean(x)[removed] becomes down's bias.
    """
    _, blocks = find_blocks(model)
    real = mask.bool()
    removed_per_block: list[list[int]] = []
    for block in blocks:
        seen: list[torch.Tensor] = []
        handle = block.mlp.down_proj.register_forward_pre_hook(lambda m, a, seen=seen: seen.append(a[0][real].double()))
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
        handle.remove()
        x = seen[0]  # [real tokens, intermediate]
        mean, var = x.mean(0), x.var(0, unbiased=False)
        w = block.mlp.down_proj.weight.data
        score = var * w.double().square().sum(0)
        removed = torch.sort(score, stable=True).indices[:remove].sort().values
        keep = torch.tensor([j for j in range(w.shape[1]) if j not in set(removed.tolist())])
        bias = (w.double()[:, removed] @ mean[removed]).float()
        for name in ("gate_proj", "up_proj"):
            old = getattr(block.mlp, name)
            new = nn.Linear(old.in_features, len(keep), bias=True)
            new.weight.data, new.bias.data = old.weight.data[keep].clone(), torch.zeros(len(keep))
            setattr(block.mlp, name, new)
        down = nn.Linear(len(keep), w.shape[0], bias=True)
        down.weight.data, down.bias.data = w[:, keep].clone(), bias
        block.mlp.down_proj = down
        removed_per_block.append(removed.tolist())
    return removed_per_block


def test_structured_equals_a_step_by_step_reference(tiny_model: Callable[[str], nn.Module]) -> None:
    """Each block is scored on the shrunk blocks' outputs, padding left out, the mean folded into down's bias."""
    model, reference = tiny_model("llama"), tiny_model("llama")
    ids = torch.randint(4, VOCAB, (6, 20), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    for row, length in enumerate([20, 9, 20, 14, 6, 20]):
        mask[row, length:] = 0
    report = oneshot.prune(
        model, method="structured", ratio=0.25, target="mlp", calibration=CalibrationSet(ids, mask), batch_size=2
    )
    width = reference.config.intermediate_size
    want = _reference_flap_mlp(reference, ids, mask, round(0.25 * width))
    got = [u["removed"] for u in report.extra["structured"]["blocks"]]
    assert got == want
    assert len({tuple(r) for r in want}) > 1  # blocks differ: each is really scored on its own inputs
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, atol=2e-5, rtol=1e-4, msg=key)


def test_plan_counts_heads_and_biases(tiny_model: Callable[[str], nn.Module]) -> None:
    """The head count left (heads − kv · removed per group) is what the hidden-size check sees."""
    from oneshot.config import PruneConfig
    from oneshot.passes.structured import AttentionPlan, MlpPlan

    def llama(heads: int, kv: int) -> nn.Module:
        cfg = tf.LlamaConfig(
            vocab_size=VOCAB, hidden_size=96, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=heads, num_key_value_heads=kv, head_dim=96 // heads, max_position_embeddings=64,
        )  # fmt: skip
        return tf.LlamaForCausalLM(cfg)

    config = PruneConfig(method="structured", ratio=0.5, target="attention")
    model = llama(12, 2)  # 6 per group, 3 go from each: 12 − 2·3 = 6 heads divide 96
    plan = AttentionPlan.of(model, find_blocks(model)[1][0], config)
    assert (plan.remove_per_group, plan.heads_after) == (3, 6)
    model = llama(12, 3)  # 4 per group, 2 go: 6 heads divide 96
    assert AttentionPlan.of(model, find_blocks(model)[1][0], config).heads_after == 6
    model = llama(16, 4)  # 4 per group, 1 goes (ratio 0.25): 12 heads, 96 % 12 == 0
    quarter = PruneConfig(method="structured", ratio=0.25, target="attention")
    assert AttentionPlan.of(model, find_blocks(model)[1][0], quarter).heads_after == 12
    model = llama(12, 4)  # 3 per group, 1 goes (ratio 0.34): 8 heads divide 96
    third = PruneConfig(method="structured", ratio=0.34, target="attention")
    assert AttentionPlan.of(model, find_blocks(model)[1][0], third).heads_after == 8
    model = llama(6, 1)  # 6 per group, ratio 0.5 → 3 go: 3 heads, fine; ratio 0.34 → 2 go: 4 heads divide 96
    assert AttentionPlan.of(model, find_blocks(model)[1][0], third).heads_after == 4
    model = llama(12, 3)  # 4 per group, 1 goes (ratio 0.25): 9 heads do not divide 96
    with pytest.raises(ConfigError, match="leaves 9 heads"):
        AttentionPlan.of(model, find_blocks(model)[1][0], quarter)
    # an existing bias is used as it is: no new bias, the config flag untouched
    opt = tiny_model("opt")
    mlp = MlpPlan.of(opt, find_blocks(opt)[1][0], PruneConfig(method="structured", ratio=0.25))
    assert not mlp.new_bias and mlp.compensate
    llama_plan = MlpPlan.of(model, find_blocks(model)[1][0], PruneConfig(method="structured", ratio=0.25))
    assert llama_plan.new_bias


@pytest.mark.parametrize("compensate", [True, False])
def test_removal_error_is_the_sliced_projections_output_error(compensate: bool) -> None:
    """Oracle: the projection's output with the channels gone (and their mean in the bias) against the dense one."""
    from oneshot.calibration.stats import TokenSample
    from oneshot.engine import SAMPLE
    from oneshot.passes.structured import removal_error

    gen = torch.Generator().manual_seed(2)
    w = torch.randn(6, 10, generator=gen)
    x = torch.randn(40, 10, generator=gen) + torch.linspace(-2, 3, 10)  # channels with a mean of their own
    sample = TokenSample(10, stride=1, max_rows=40)
    sample.update(x)
    removed = torch.tensor([1, 4, 7])
    keep = torch.tensor([j for j in range(10) if j not in (1, 4, 7)])
    mu = x.mean(dim=0)
    sliced = x[:, keep] @ w[:, keep].T + (w[:, removed] @ mu[removed] if compensate else 0.0)
    want = float((x @ w.T - sliced).square().sum() / (x @ w.T).square().sum())
    got = removal_error(w, removed, {SAMPLE: sample}, mu if compensate else None)
    assert got == pytest.approx(want, rel=1e-5)
    assert removal_error(w, removed, {}, mu) is None
    assert removal_error(torch.zeros_like(w), removed, {SAMPLE: sample}, mu) == 0.0  # a dense output of 0: no error
    empty = TokenSample(10)
    assert removal_error(w, removed, {SAMPLE: empty}, mu) == 0.0  # no tokens sampled


def test_a_structured_report_says_what_was_removed(tiny_model: Callable[[str], nn.Module], tmp_path: Path) -> None:
    """No sparsity figures for a run that removes units: the units, the parameter reduction, each sliced
    projection's output error (lower with the bias compensation than without)."""
    ids = torch.randint(4, VOCAB, (4, 24), generator=torch.Generator().manual_seed(0))
    reports = {
        on: oneshot.prune(
            tiny_model("llama"),
            method="structured",
            ratio=0.5,
            target="both",
            bias_compensation=on,
            calibration=ids,
            quiet=True,
        )  # fmt: skip
        for on in (True, False)
    }
    report = reports[True].to_dict()
    assert report["target_sparsity"] is None and report["achieved_sparsity"] is None
    structured = report["structured"]
    assert structured["parameter_reduction"] == pytest.approx(
        1 - structured["params_after"] / structured["params_before"]
    )
    assert structured["parameter_reduction"] > 0.05
    assert all(u["after"] == u["before"] - len(u["removed"]) for u in structured["blocks"])
    assert structured["removed_units"] == {"mlp": 3 * 48, "attention": 3 * 2}  # of 96 neurons, 4 heads, 3 blocks
    names = [r["name"] for r in report["layers"]]
    assert names == [f"model.layers.{i}.{p}" for i in range(3) for p in ("mlp.down_proj", "self_attn.o_proj")]
    assert all(0 < r["relative_error"] < 1 for r in report["layers"])
    assert report["mean_relative_error"] == pytest.approx(sum(r["relative_error"] for r in report["layers"]) / 6)
    off = reports[False].to_dict()["layers"]
    assert sum(r["relative_error"] for r in report["layers"]) < sum(r["relative_error"] for r in off)
    assert "mean relative output error" in reports[True].summary()
