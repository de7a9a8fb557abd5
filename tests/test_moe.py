"""Mixtures of experts: every expert's projection pruned as a layer of its own, in every MoE family.

Tiny random Mixtral, Qwen3-MoE, GPT-OSS (experts transposed, gate/up interleaved, biases) and
DeepSeek-V3 (MLA attention, a shared expert, a first dense layer) models keep their experts as
fused 3-D parameters behind transformers' ExpertsInterface.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import MOE_FAMILIES, VOCAB, char_tokenizer, saved_tensors
from torch import nn

import oneshot
from oneshot.calibration.hooks import collect
from oneshot.calibration.stats import ColumnSqNorm, Hessian
from oneshot.errors import ConfigError
from oneshot.experts import ExpertProjection, Routed, experts_modules, projections, routed_through_layers
from oneshot.layers import find_blocks, find_linears, find_routers, from_matrix, parameter_roles
from oneshot.methods.sparsegpt import sparsegpt

IDS = torch.randint(4, VOCAB, (8, 32), generator=torch.Generator().manual_seed(0))


def expert_slices(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every expert projection's ``[out, in]`` weight, by qualified name."""
    blocks_name, blocks = find_blocks(model)
    return {
        f"{blocks_name}.{i}.{name}": layer.weight.detach()
        for i, block in enumerate(blocks)
        for name, layer in find_linears(block).items()
        if isinstance(layer, ExpertProjection)
    }


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_the_routed_forward_equals_the_familys_own(tiny_model: Callable[[str], nn.Module], family: str) -> None:
    """Each expert's projections called on its routed tokens give the model's own output (its
    gate/up layout, transposition, biases and gating rebuilt from the views)."""
    model = tiny_model(family)
    with torch.no_grad():
        stock = model(IDS).logits
        with routed_through_layers(model):
            routed = model(IDS).logits
        after = model(IDS).logits
    torch.testing.assert_close(routed, stock, rtol=0, atol=1e-5)
    assert torch.equal(after, stock)  # the implementation is given back
    assert experts_modules(model)


def test_an_experts_module_is_known_by_its_interface_and_fused_weights() -> None:
    from oneshot.experts import is_experts

    plain = nn.Module()
    plain.down_proj = nn.Parameter(torch.zeros(4, 8, 16))  # 3-D, but not behind the ExpertsInterface
    assert not is_experts(plain)
    plain.has_gate, plain.is_transposed, plain.num_experts = True, False, 4
    assert is_experts(plain)
    plain.down_proj = nn.Parameter(torch.zeros(8, 16))  # the interface's attributes on a 2-D weight
    assert not is_experts(plain)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_a_projection_is_a_view_that_writes_through(tiny_model: Callable[[str], nn.Module], family: str) -> None:
    model = tiny_model(family)
    experts = next(iter(experts_modules(model).values()))
    fused = {name: p.detach().clone() for name, p in experts.named_parameters()}
    layers = projections(experts)
    gate, down = layers["2.gate_proj"], layers["2.down_proj"]
    hidden, inter = model.config.hidden_size, int(gate.weight.shape[0])
    assert tuple(gate.weight.shape) == (inter, hidden) and tuple(down.weight.shape) == (hidden, inter)
    from_matrix(gate, torch.zeros(inter, hidden))
    changed = {name: int((p.detach() != fused[name]).sum()) for name, p in experts.named_parameters()}
    assert changed["gate_up_proj"] == int((fused["gate_up_proj"][2] != 0).sum()) // 2  # the gate half of expert 2
    assert changed["down_proj"] == 0 and not gate.weight.any()
    assert bool(layers["2.up_proj"].weight.ne(0).all()) and bool(layers["1.gate_proj"].weight.ne(0).all())


@pytest.mark.parametrize("family", MOE_FAMILIES)
@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "2:4"])
def test_every_expert_is_pruned_and_stock_transformers_reloads_it(
    tiny_model: Callable[[str], nn.Module], tmp_path: Path, family: str, method: str
) -> None:
    from transformers import AutoModelForCausalLM

    model = tiny_model(family)
    routers = {name: m.weight.detach().clone() for name, m in _routers(model).items()}
    shape = {"nm": "2:4"} if method == "2:4" else {"sparsity": 0.5}
    name = "sparsegpt" if method == "2:4" else method
    report = oneshot.prune(
        model, char_tokenizer(), method=name, calibration=IDS, out=tmp_path / "o", quiet=True, **shape
    )
    slices = expert_slices(model)
    assert slices and report.achieved_sparsity == pytest.approx(0.5)
    for key, weight in slices.items():
        if method == "2:4":
            assert bool((weight.reshape(weight.shape[0], -1, 4) == 0).sum(-1).ge(2).all()), key
        else:
            assert float((weight == 0).float().mean()) == pytest.approx(0.5), key
    assert {r.name for r in report.layers} >= set(slices)  # every expert a recorded layer
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "o")
    for key, weight in expert_slices(reloaded).items():
        assert torch.equal(weight, slices[key]), key
    for key, weight in _routers(reloaded).items():
        assert torch.equal(weight.weight, routers[key]), key  # routers stay dense
    assert set(saved_tensors(tmp_path / "o")) == set(_checkpoint_names(model))


def _routers(model: nn.Module) -> dict[str, nn.Module]:
    blocks_name, blocks = find_blocks(model)
    return {f"{blocks_name}.{i}.{n}": m for i, b in enumerate(blocks) for n, m in find_routers(b).items()}


def _checkpoint_names(model: nn.Module) -> list[str]:
    from transformers.core_model_loading import revert_weight_conversion

    return list(revert_weight_conversion(model, model.state_dict()))  # type: ignore[arg-type]


def test_mixtral_is_saved_under_its_checkpoint_names(tiny_model: Callable[[str], nn.Module], tmp_path: Path) -> None:
    oneshot.prune(tiny_model("mixtral"), char_tokenizer(), method="wanda", sparsity=0.5, calibration=IDS,
                  out=tmp_path / "o", quiet=True)  # fmt: skip
    names = set(saved_tensors(tmp_path / "o"))
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in names
    assert not any("gate_up_proj" in n for n in names)


def _mixtral_reference(model: nn.Module, e: int) -> dict[str, torch.Tensor]:
    """SparseGPT at 50% on expert ``e`` of block 0 from the inputs the router's top-k sends it,
    gathered independently of oneshot: a hook on the MoE block's input, the top-k redone here."""
    moe = model.model.layers[0].mlp
    seen: list[torch.Tensor] = []
    handle = moe.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    with torch.no_grad():
        model(IDS)
    handle.remove()
    x = seen[0].reshape(-1, model.config.hidden_size)  # [tokens, H]
    chosen = F.linear(x, moe.gate.weight).topk(model.config.num_experts_per_tok, dim=-1).indices  # [tokens, k]
    rows = x[(chosen == e).any(-1)]  # [n, H]
    inter = model.config.intermediate_size
    gate_up = moe.experts.gate_up_proj[e].detach()  # [2I, H]
    down = moe.experts.down_proj[e].detach()  # [H, I]
    hidden = F.silu(rows @ gate_up[:inter].T) * (rows @ gate_up[inter:].T)  # [n, I]: the down projection's input
    hessian = rows.T @ rows / len(rows)
    return {
        "gate_proj": sparsegpt(gate_up[:inter], hessian, 0.5).weight,
        "up_proj": sparsegpt(gate_up[inter:], hessian, 0.5).weight,
        "down_proj": sparsegpt(down, hidden.T @ hidden / len(rows), 0.5).weight,
        "tokens": torch.tensor(len(rows)),
    }


def test_one_experts_sparsegpt_equals_sparsegpt_on_the_tokens_routed_to_it(
    tiny_model: Callable[[str], nn.Module],
) -> None:
    model = tiny_model("mixtral")
    want = {e: _mixtral_reference(model, e) for e in range(4)}
    report = oneshot.prune(model, method="sparsegpt", sparsity=0.5, calibration=IDS, passes="two", quiet=True)
    layers = projections(model.model.layers[0].mlp.experts)
    records = {r.name: r for r in report.layers}
    for e, ref in want.items():
        assert int(ref["tokens"]) >= PruneDefaults.min_tokens  # routed statistics, not the fallback
        for part in ("gate_proj", "up_proj", "down_proj"):
            got = layers[f"{e}.{part}"].weight
            assert torch.equal(got == 0, ref[part] == 0), (e, part)
            torch.testing.assert_close(got, ref[part], rtol=1e-4, atol=1e-5)
            record = records[f"model.layers.0.mlp.experts.{e}.{part}"]
            assert record.routed_tokens == record.tokens == int(ref["tokens"])


class PruneDefaults:
    min_tokens = oneshot.PruneConfig.expert_min_tokens


@pytest.mark.parametrize("passes", ["single", "two"])
def test_rare_experts_are_calibrated_on_every_token(tiny_model: Callable[[str], nn.Module], passes: str) -> None:
    """Below --expert-min-tokens an expert's statistics come from every token: with a bound no expert
    reaches, the run equals --expert-calibration all tensor for tensor; with 8 tokens some experts see none."""
    runs = {}
    for name, options in {"rescued": {"expert_min_tokens": 10**9}, "all": {"expert_calibration": "all"}}.items():
        model = tiny_model("qwen3_moe")
        report = oneshot.prune(model, method="sparsegpt", sparsity=0.5, calibration=IDS, passes=passes, quiet=True,
                               **options)  # fmt: skip
        runs[name] = model.state_dict()
        experts = [r for r in report.layers if r.routed_tokens is not None]
        assert experts and all(r.tokens == IDS.numel() for r in experts)
    for key, tensor in runs["all"].items():
        assert torch.equal(runs["rescued"][key], tensor), key
    short = IDS[:1, :8]
    report = oneshot.prune(tiny_model("qwen3_moe"), method="wanda", sparsity=0.5, calibration=short, passes=passes,
                           quiet=True, expert_min_tokens=1)  # fmt: skip
    unrouted = [r for r in report.layers if r.routed_tokens == 0]
    assert unrouted and all(r.tokens == short.numel() and r.achieved_sparsity == 0.5 for r in unrouted)
    routed = [r for r in report.layers if r.routed_tokens]
    assert routed and all(r.tokens == r.routed_tokens for r in routed)


def test_routed_tokens_add_up_to_tokens_times_top_k(tiny_model: Callable[[str], nn.Module]) -> None:
    model = tiny_model("deepseek_v3")
    report = oneshot.prune(model, method="wanda", sparsity=0.5, calibration=IDS, quiet=True)
    for block in (1, 2):
        gates = [
            r for r in report.layers if r.block == block and r.name.endswith("gate_proj") and ".experts." in r.name
        ]
        assert len(gates) == 8
        assert sum(r.routed_tokens or 0 for r in gates) == IDS.numel() * model.config.num_experts_per_tok
    dense = {r.name for r in report.layers if r.block == 0}
    assert "model.layers.0.mlp.down_proj" in dense  # the first dense layer
    assert "model.layers.1.mlp.shared_experts.down_proj" in {r.name for r in report.layers}


def test_an_experts_statistics_see_its_real_tokens_weighted_as_asked() -> None:
    """Rows of an expert are masked by the padding of the tokens they are, and a routing weight w
    counts a row as w·x xᵀ."""
    gen = torch.Generator().manual_seed(0)
    layer = nn.Linear(6, 3)
    x = torch.randn(5, 6, generator=gen)  # the 5 rows routed to this expert
    rows = torch.tensor([0, 2, 3, 6, 7])  # their positions among the batch's 2 x 4 tokens
    weights = torch.rand(5, generator=gen)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]])  # tokens 3 and 7 are padding
    factories = {"h": lambda d, dev: Hessian(d, dev), "c": lambda d, dev: ColumnSqNorm(d, dev)}
    with collect({"e": layer}, factories) as collector:
        collector.next_batch(mask)
        layer.routed = Routed(rows, weights)  # type: ignore[assignment]
        layer(x)
    real = torch.tensor([True, True, False, True, False])
    xs, ws = x[real], weights[real]
    accs = collector.stats("e")
    assert accs["h"].count == 3
    torch.testing.assert_close(accs["h"].finalize(), (xs * ws[:, None]).T @ xs / 3)
    torch.testing.assert_close(accs["c"].finalize(), (ws[:, None] * xs.square()).sum(0))


def test_the_weighted_rule_changes_the_statistics_only(tiny_model: Callable[[str], nn.Module]) -> None:
    base = tiny_model("mixtral")
    plain, weighted = copy.deepcopy(base), copy.deepcopy(base)
    a = oneshot.prune(plain, method="sparsegpt", sparsity=0.5, calibration=IDS, quiet=True)
    b = oneshot.prune(weighted, method="sparsegpt", sparsity=0.5, calibration=IDS, quiet=True,
                      expert_calibration="weighted")  # fmt: skip
    attention = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(plain.state_dict()[attention], weighted.state_dict()[attention])
    assert not torch.equal(expert_slices(plain)["model.layers.0.mlp.experts.0.up_proj"],
                           expert_slices(weighted)["model.layers.0.mlp.experts.0.up_proj"])  # fmt: skip
    first = [r.routed_tokens for r in a.layers if r.block == 0]  # block 0 sees the same inputs
    assert first == [r.routed_tokens for r in b.layers if r.block == 0] and any(first)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_every_block_parameter_has_a_role(tiny_model: Callable[[str], nn.Module], family: str) -> None:
    """Experts and linear weights are layers, routers stay dense, norms / biases / sinks are vectors:
    nothing in these families is left unexplained."""
    _, blocks = find_blocks(tiny_model(family))
    roles = {name: role for block in blocks for name, role in parameter_roles(block).items()}
    assert "other" not in roles.values()
    assert any(role == "router" for role in roles.values())
    assert all(role == "layer" for name, role in roles.items() if "experts" in name and "bias" not in name)


def test_each_projection_has_its_own_checkpoint_key(tiny_model: Callable[[str], nn.Module]) -> None:
    """Mixtral's checkpoint names an expert's gate w1, its down w2 and its up w3; GPT-OSS keeps them fused."""
    from oneshot.checkpoint import expert_checkpoint_keys

    model = tiny_model("mixtral")
    (name, experts), *_ = experts_modules(model).items()
    keys = expert_checkpoint_keys(model, name, experts)
    assert len(keys) == 3 * model.config.num_local_experts
    moe = name.replace(".mlp.experts", ".block_sparse_moe.experts")
    for e in range(model.config.num_local_experts):
        for part, w in (("gate", "w1"), ("down", "w2"), ("up", "w3")):
            assert keys[f"{name}.{e}.{part}_proj"] == f"{moe}.{e}.{w}.weight"
    oss = tiny_model("gpt_oss")
    (name, experts), *_ = experts_modules(oss).items()
    assert expert_checkpoint_keys(oss, name, experts) == {}


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "deepseek_v3"])
def test_quantized_experts_are_saved_per_expert_and_reload_with_stock_transformers(
    tiny_model: Callable[[str], nn.Module], tmp_path: Path, family: str
) -> None:
    """SparseGPT 50% + GPTQ 4-bit on every expert: each expert projection saved as packed codes under
    its own checkpoint key; stock transformers reloads the model with every weight bit for bit."""
    import transformers as tf

    from oneshot.checkpoint import expert_weight_keys

    model = tiny_model(family)
    out = tmp_path / "w4"
    report = oneshot.prune(model, char_tokenizer(), method="sparsegpt", sparsity=0.5, then="gptq", group_size=16,
                           calibration=IDS, out=out, quiet=True)  # fmt: skip
    slices = expert_slices(model)
    assert set(slices) <= set(report.quantized)
    saved = saved_tensors(out)
    keys = expert_weight_keys(model, slices)
    for name, weight in slices.items():
        key = keys[name].removesuffix("weight")
        assert f"{key}weight" not in saved and saved[f"{key}weight_packed"].shape == (
            weight.shape[0],
            weight.shape[1] // 8,
        )
        assert saved[f"{key}weight_scale"].shape == (weight.shape[0], weight.shape[1] // 16)
        assert all(row.unique().numel() <= 17 for row in weight[:, :16])  # 16 levels and the pruned zeros
    routers = find_routers(model)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    moe = ".block_sparse_moe." if family == "mixtral" else ".mlp."  # the checkpoint's (and vLLM's) module names
    assert routers and {r.replace(".mlp.", moe) for r in routers} <= set(config["ignore"])  # served dense
    reloaded = tf.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        reloaded(IDS[:1])  # the loader decompresses the quantized linear layers on the first forward
    state = reloaded.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(state[name], tensor), name


def test_quantizing_experts_that_cannot_be_saved_is_refused_with_the_way_out(
    tiny_model: Callable[[str], nn.Module],
) -> None:
    """GPT-OSS's checkpoint has no per-expert weight to pack; a half-quantized experts layer cannot be
    served. Both refused before any work, with the --skip that leaves the experts dense."""
    with pytest.raises(ConfigError, match=r"fused 3-D tensors.*--skip '\*\.experts\.\*'"):
        oneshot.prune(tiny_model("gpt_oss"), method="gptq", calibration=IDS, quiet=True, group_size=16)
    with pytest.raises(ConfigError, match=r"quantize all of them or none"):
        oneshot.prune(tiny_model("mixtral"), method="rtn", calibration=IDS, quiet=True, group_size=16,
                      skip_layers=("*.experts.0.*",))  # fmt: skip
    model = tiny_model("gpt_oss")
    before = expert_slices(model)
    report = oneshot.prune(model, method="gptq", calibration=IDS, quiet=True, group_size=16,
                           skip_layers=("*.experts.*",))  # fmt: skip
    assert report.quantized and all(".experts." not in name for name in report.quantized)
    assert all(torch.equal(w, before[k]) for k, w in expert_slices(model).items())


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_streaming_quantized_experts_equals_quantizing_in_memory(
    tiny_checkpoint: Callable[[str], Path], tmp_path: Path, family: str
) -> None:
    folder = tiny_checkpoint(family)
    for stream in (True, False):
        oneshot.prune(folder, method="rtn", group_size=16, calibration=IDS, stream=stream,
                      out=tmp_path / str(stream), quiet=True)  # fmt: skip
    streamed, in_memory = saved_tensors(tmp_path / "True"), saved_tensors(tmp_path / "False")
    assert streamed.keys() == in_memory.keys()
    assert any(".experts.1." in key and key.endswith("weight_packed") for key in in_memory)
    for key, tensor in in_memory.items():
        assert torch.equal(streamed[key], tensor), key


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_streaming_a_moe_checkpoint_equals_pruning_it_in_memory(
    tiny_checkpoint: Callable[[str], Path], tmp_path: Path, family: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Per-expert checkpoint tensors are fused block by block as from_pretrained fuses them (each read
    into its projection's view of the fused parameter, never through the conversion's stacked
    copies), and written back under the checkpoint's names: the streamed folder equals the
    in-memory one."""
    import oneshot.streaming

    convert = oneshot.streaming.from_checkpoint_names

    def renamed_only(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        assert not any(".experts." in key for key in tensors), "experts went through the conversion's copies"
        return convert(model, tensors)  # a renamed router (Mixtral's block_sparse_moe.gate)

    monkeypatch.setattr(oneshot.streaming, "from_checkpoint_names", renamed_only)
    revert = oneshot.streaming.checkpoint_names

    def no_copies(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        assert not any(".experts." in key for key in state), "experts written through the reverse conversion's copies"
        return revert(model, state)

    monkeypatch.setattr(oneshot.streaming, "checkpoint_names", no_copies)
    folder = tiny_checkpoint(family)
    for stream in (True, False):
        oneshot.prune(folder, method="sparsegpt", sparsity=0.5, calibration=IDS, stream=stream,
                      out=tmp_path / str(stream), quiet=True)  # fmt: skip
    streamed, in_memory = saved_tensors(tmp_path / "True"), saved_tensors(tmp_path / "False")
    assert streamed.keys() == in_memory.keys() == saved_tensors(folder).keys()
    for key, tensor in in_memory.items():
        assert torch.equal(streamed[key], tensor), key


def test_streaming_fuses_through_the_conversion_mapping_where_a_tensor_is_not_a_projection(
    tiny_checkpoint: Callable[[str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the per-expert keys cannot be matched to projections, transformers' own conversion builds
    the fused parameters: the same folder."""
    import oneshot.streaming

    folder = tiny_checkpoint("qwen3_moe")
    oneshot.prune(
        folder, method="wanda", sparsity=0.5, calibration=IDS, out=tmp_path / "direct", stream=True, quiet=True
    )
    monkeypatch.setattr(oneshot.streaming, "expert_checkpoint_keys", lambda *args: {})
    oneshot.prune(
        folder, method="wanda", sparsity=0.5, calibration=IDS, out=tmp_path / "mapped", stream=True, quiet=True
    )
    direct, mapped = saved_tensors(tmp_path / "direct"), saved_tensors(tmp_path / "mapped")
    assert direct.keys() == mapped.keys()
    assert all(torch.equal(direct[key], tensor) for key, tensor in mapped.items())


def _mixtral_saliency(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Block 0's REAP saliency and routed-token count per expert, computed here from the router's top-k."""
    moe = model.model.layers[0].mlp
    seen: list[torch.Tensor] = []
    handle = moe.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    with torch.no_grad():
        model(IDS)
    handle.remove()
    x = seen[0].reshape(-1, model.config.hidden_size)  # [tokens, H]
    probs = F.linear(x, moe.gate.weight).softmax(-1)
    top, chosen = probs.topk(model.config.num_experts_per_tok, dim=-1)
    top = top / top.sum(-1, keepdim=True)  # Mixtral renormalises the top-k weights
    inter = model.config.intermediate_size
    saliency, counts = torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    with torch.no_grad():
        for e in range(4):
            rows, slot = torch.where(chosen == e)
            gate_up, down = moe.experts.gate_up_proj[e], moe.experts.down_proj[e]
            h = F.silu(x[rows] @ gate_up[:inter].T) * (x[rows] @ gate_up[inter:].T)
            saliency[e] = (top[rows, slot] * (h @ down.T).norm(dim=-1)).sum()
            counts[e] = len(rows)
    return saliency / counts.clamp(min=1), counts


@pytest.mark.parametrize("score", ["reap", "frequency"])
def test_expert_removal_drops_the_lowest_scored_experts_and_reloads_smaller(
    tiny_model: Callable[[str], nn.Module], tmp_path: Path, score: str
) -> None:
    from transformers import AutoModelForCausalLM

    model = tiny_model("mixtral")
    saliency, counts = _mixtral_saliency(model)
    want = sorted(torch.sort(saliency if score == "reap" else counts, stable=True).indices[:2].tolist())
    kept = [e for e in range(4) if e not in want]
    before = model.model.layers[0].mlp.experts.down_proj.detach()[kept].clone()
    router = model.model.layers[0].mlp.gate.weight.detach()[kept].clone()
    report = oneshot.prune(model, char_tokenizer(), method="structured", target="experts", ratio=0.5, score=score,
                           calibration=IDS, out=tmp_path / "o", quiet=True)  # fmt: skip
    first = report.to_dict()["structured"]["blocks"][0]
    assert (first["block"], first["target"], first["before"], first["after"]) == (0, "experts", 4, 2)
    assert first["removed"] == want
    assert report.extra["structured"]["score"] == score and report.extra["structured"]["removed_units"]["experts"] == 4
    assert torch.equal(model.model.layers[0].mlp.experts.down_proj, before)
    assert torch.equal(model.model.layers[0].mlp.gate.weight, router)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "o")
    assert reloaded.config.num_local_experts == 2
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS).logits, model(IDS).logits, rtol=0, atol=0)


def test_expert_removal_is_refused_where_it_cannot_be_expressed(tiny_model: Callable[[str], nn.Module]) -> None:
    with pytest.raises(ConfigError, match="top-2 must remain"):
        oneshot.prune(tiny_model("mixtral"), method="structured", target="experts", ratio=0.75, calibration=IDS,
                      quiet=True)  # fmt: skip
    with pytest.raises(ConfigError, match="not a multiple of 2"):
        oneshot.prune(tiny_model("deepseek_v3"), method="structured", target="experts", ratio=0.125, calibration=IDS,
                      quiet=True)  # fmt: skip
    with pytest.raises(ConfigError, match="has no experts module"):
        oneshot.prune(tiny_model("llama"), method="structured", target="experts", ratio=0.5, calibration=IDS,
                      quiet=True)  # fmt: skip
    with pytest.raises(ConfigError, match="use it with --target experts"):
        oneshot.PruneConfig(method="structured", ratio=0.5, score="reap")


OPTIONS = {
    "fisher": {"method": "fisher"},
    "obs": {"method": "obs"},
    "ria": {"method": "ria"},
    "magnitude": {"method": "magnitude"},
    "dsnot": {"method": "wanda", "refine": "dsnot"},
    "refine-block": {"method": "sparsegpt", "refine": "block", "batch_size": 4},
    "owl": {"method": "wanda", "owl": True},
    "sensitivity-fisher": {"method": "wanda", "allocate": "sensitivity", "allocate_error": "fisher"},
}


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_every_method_and_option_prunes_the_experts(
    tiny_model: Callable[[str], nn.Module], family: str, option: str
) -> None:
    """Gradient scores reach the fused parameters' slices, the block refit steps them and keeps every
    expert's mask (an expert left out by --skip untouched), allocations give experts their own targets."""
    model = tiny_model(family)
    before = expert_slices(model)
    skip = ("*.experts.1.*",)
    report = oneshot.prune(model, method=OPTIONS[option]["method"], sparsity=0.5, calibration=IDS, quiet=True,
                           skip_layers=skip, **{k: v for k, v in OPTIONS[option].items() if k != "method"})  # fmt: skip
    assert report.achieved_sparsity == pytest.approx(0.5, abs=0.01)
    for key, weight in expert_slices(model).items():
        if ".experts.1." in key:
            assert torch.equal(weight, before[key]), key
        elif option in ("owl", "sensitivity-fisher"):
            assert 0.3 < float((weight == 0).float().mean()) < 0.7, key
        else:
            assert float((weight == 0).float().mean()) == pytest.approx(0.5), key
    if option == "refine-block":  # the refit moved the experts' kept weights, and lowered each block's error
        plain = tiny_model(family)
        oneshot.prune(plain, method="sparsegpt", sparsity=0.5, calibration=IDS, quiet=True, skip_layers=skip)
        first = "model.layers.0.mlp.experts.0.down_proj"
        assert not torch.equal(expert_slices(plain)[first], expert_slices(model)[first])
        refits = report.extra["block_refit"]
        assert refits and all(r["errors"][-1] < r["errors"][0] for r in refits)


def test_a_router_is_pruned_only_when_a_sparsity_map_names_it(tiny_model: Callable[[str], nn.Module]) -> None:
    model = tiny_model("mixtral")
    report = oneshot.prune(model, method="wanda", sparsity=0.5, calibration=IDS, quiet=True)
    assert not any(r.name.endswith("mlp.gate") for r in report.layers)
    assert bool(model.model.layers[0].mlp.gate.weight.ne(0).all())
    dense = report.extra["block_parameters"]["dense"]
    assert dense["router"] == 2 * 4 * 64 and dense["skipped"] == 0 and dense["other"] == 0
    model = tiny_model("mixtral")
    report = oneshot.prune(model, method="wanda", sparsity=0.5, calibration=IDS, quiet=True,
                           sparsity_map={"*.0.mlp.gate": 0.5})  # fmt: skip
    assert [r.name for r in report.layers if r.name.endswith("mlp.gate")] == ["model.layers.0.mlp.gate"]
    assert float((model.model.layers[0].mlp.gate.weight == 0).float().mean()) == 0.5
    params = report.extra["block_parameters"]
    assert params["dense"]["router"] == 4 * 64  # block 1's router
    assert params["pruned_layers"] + sum(params["dense"].values()) == params["total"]


def test_the_report_accounts_for_every_block_parameter(tiny_model: Callable[[str], nn.Module]) -> None:
    model = tiny_model("gpt_oss")
    report = oneshot.prune(model, method="wanda", sparsity=0.5, calibration=IDS, quiet=True,
                           skip_layers=("*.experts.0.*",))  # fmt: skip
    params = report.extra["block_parameters"]
    _, blocks = find_blocks(model)
    assert params["total"] == sum(p.numel() for b in blocks for p in b.parameters())
    assert params["pruned_layers"] + sum(params["dense"].values()) == params["total"]
    expert = 3 * 32 * 64  # one expert's gate, up and down
    assert params["dense"]["skipped"] == 2 * expert
    assert params["block_sparsity"] == pytest.approx(0.5 * params["pruned_layers"] / params["total"])
    assert "block parameters" in report.summary() and "experts: routed calibration tokens" in report.summary()
