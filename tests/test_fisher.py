"""Fisher (bitter7): |W|·(E[g²]+ε)^¼ with E[g²] the empirical Fisher or a saved optimizer state."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers as tf
from conftest import VOCAB
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F

import oneshot
from oneshot.calibration.data import CalibrationSet
from oneshot.errors import ConfigError, ModelError
from oneshot.gradients import empirical_fisher, load_optimizer_state
from oneshot.layers import as_matrix, find_blocks, find_linears
from oneshot.methods.fisher import fisher, fisher_scores


def test_fisher_score_hand_computed() -> None:
    weight = torch.tensor([[2.0, -1.0, 3.0]])
    grad_sq = torch.tensor([[16.0, 0.0625, 0.0]])
    assert fisher_scores(weight, grad_sq, eps=0.0).tolist() == [[4.0, 0.5, 0.0]]
    assert fisher_scores(weight, grad_sq)[0, 2] == pytest.approx(3.0 * 1e-4)  # ε = 1e-16: (1e-16)^¼
    result = fisher(torch.tensor([[2.0, -1.0, 3.0, 0.5]]), torch.tensor([[16.0, 0.0625, 0.0, 1.0]]), 0.5)
    assert result.mask.tolist() == [[True, False, False, True]]  # scores 4, .5, 3e-4, .5: ties by position
    rows = fisher(torch.ones(2, 2), torch.tensor([[1.0, 16.0], [81.0, 0.0]]), 0.5, per_row=True)
    assert rows.mask.tolist() == [[False, True], [True, False]]


def _ids(n: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(4, VOCAB, (n, 12), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    return ids, mask


def _linears(model: nn.Module) -> dict[str, nn.Module]:
    name, blocks = find_blocks(model)
    return {f"{name}.{i}.{n}": m for i, b in enumerate(blocks) for n, m in find_linears(b).items()}


def test_empirical_fisher_is_the_mean_of_per_sample_squared_gradients(tiny_model: Callable[[str], nn.Module]) -> None:
    model = tiny_model("llama")
    ids, mask = _ids()
    got = empirical_fisher(model, CalibrationSet(ids, mask), _linears(model))
    want = {name: torch.zeros(as_matrix(m).shape) for name, m in _linears(model).items()}
    for s in range(3):  # transformers' own next-token loss, padding labelled -100, one sample at a time
        labels = ids[s : s + 1].masked_fill(mask[s : s + 1] == 0, -100)
        model.zero_grad()
        model(input_ids=ids[s : s + 1], attention_mask=mask[s : s + 1], labels=labels).loss.backward()
        for name, m in _linears(model).items():
            want[name] += m.weight.grad.square() / 3
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-12, msg=name)
    # the squared mean gradient of the whole batch is something else
    assert all(p.grad is None or p.requires_grad for p in model.parameters())


def test_encoder_fisher_uses_its_own_predictions() -> None:
    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=4, num_labels=5)  # fmt: skip
    model = tf.BertForTokenClassification(cfg).eval()
    ids, mask = _ids(2)
    got = empirical_fisher(model, CalibrationSet(ids, mask), _linears(model))
    name, layer = next(iter(_linears(model).items()))
    want = torch.zeros_like(layer.weight)
    for s in range(2):
        model.zero_grad()
        logits = model(input_ids=ids[s : s + 1], attention_mask=mask[s : s + 1]).logits[0]
        real = mask[s].bool()
        F.cross_entropy(logits[real], logits[real].argmax(-1).detach()).backward()
        want += layer.weight.grad.square() / 2
    torch.testing.assert_close(got[name], want, rtol=1e-4, atol=1e-12)


def test_engine_prunes_by_fisher(tiny_model: Callable[[str], nn.Module]) -> None:
    model = tiny_model("llama")
    ids, mask = _ids(4)
    grad_sq = empirical_fisher(model, CalibrationSet(ids, mask), _linears(model))
    dense = {name: as_matrix(m) for name, m in _linears(model).items()}
    report = oneshot.prune(model, method="fisher", sparsity=0.5, calibration=CalibrationSet(ids, mask), quiet=True)
    assert report.achieved_sparsity == pytest.approx(0.5)
    for name, module in _linears(model).items():
        assert torch.equal(as_matrix(module) != 0, fisher(dense[name], grad_sq[name], 0.5).mask), name


def _adam_state(model: nn.Module) -> dict[str, object]:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    ids, _ = _ids(2, seed=5)
    for _ in range(2):
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    return optimizer.state_dict()


def test_optimizer_state_files(tiny_model: Callable[[str], nn.Module], tmp_path: Path) -> None:
    model = tiny_model("llama")
    state = _adam_state(model)
    torch.save(state, tmp_path / "optimizer.pt")
    by_name = load_optimizer_state(tmp_path / "optimizer.pt", model)
    q = "model.layers.0.self_attn.q_proj.weight"
    index = [n for n, _ in model.named_parameters()].index(q)
    assert torch.equal(by_name[q], state["state"][index]["exp_avg_sq"])  # type: ignore[index]
    save_file({k: v.contiguous() for k, v in by_name.items()}, str(tmp_path / "sq.safetensors"))

    dense = {name: as_matrix(m) for name, m in _linears(model).items()}
    for file in ("optimizer.pt", "sq.safetensors"):
        pruned = tiny_model("llama")
        pruned.load_state_dict(model.state_dict())
        oneshot.prune(pruned, method="fisher", sparsity=0.6, optimizer_state=str(tmp_path / file), quiet=True)
        for name, module in _linears(pruned).items():
            want = fisher(dense[name], by_name[f"{name}.weight"], 0.6).mask
            assert torch.equal(as_matrix(module) != 0, want), (file, name)


def test_optimizer_state_refusals(tiny_model: Callable[[str], nn.Module], tmp_path: Path) -> None:
    model = tiny_model("llama")
    torch.save({"state": {}, "param_groups": [{"params": [0]}, {"params": [1]}]}, tmp_path / "two.pt")
    with pytest.raises(ModelError, match="2 parameter groups"):
        load_optimizer_state(tmp_path / "two.pt", model)
    torch.save({"anything": Path("x")}, tmp_path / "pickled.pt")  # needs full unpickling
    with pytest.raises(ModelError, match="never unpickles"):
        load_optimizer_state(tmp_path / "pickled.pt", model)
    save_file({"model.layers.0.self_attn.q_proj.weight": torch.ones(2, 2)}, str(tmp_path / "short.safetensors"))
    with pytest.raises(ModelError, match="is \\(2, 2\\), the model's weight"):
        oneshot.prune(model, method="fisher", sparsity=0.5, optimizer_state=str(tmp_path / "short.safetensors"))
    with pytest.raises(ConfigError, match="--optimizer-state does not apply to --method wanda"):
        oneshot.PruneConfig(method="wanda", sparsity=0.5, optimizer_state="x.pt")
    assert oneshot.PruneConfig(method="fisher", sparsity=0.5).uses_data
    assert not oneshot.PruneConfig(method="fisher", sparsity=0.5, optimizer_state="x.pt").uses_data


def _streamed(
    folder: Path,
    dtype: torch.dtype,
    ids: torch.Tensor,
    mask: torch.Tensor,
    scratch: Path,
    keep: list[nn.Module] | None = None,
    only: str = "",
) -> Any:
    """The streamed backward of the checkpoint at ``folder``, its every prunable layer (the skeleton into ``keep``;
    with ``only``, the layers whose names contain it)."""
    from oneshot.checkpoint import Checkpoint, build_skeleton
    from oneshot.engine import prunable_modules
    from oneshot.passes.backward import streamed_backward
    from oneshot.streaming import StreamingSource

    skeleton = build_skeleton(folder, dtype)
    source = StreamingSource(Checkpoint(folder), skeleton)
    source.load_stem(skeleton)
    config = oneshot.PruneConfig(method="fisher", sparsity=0.5)
    layers = {name: m for name, m in prunable_modules(skeleton, config).items() if only in name}
    calib = CalibrationSet(ids, mask)
    if keep is not None:
        keep.append(skeleton)
    return streamed_backward(skeleton, calib, config, layers, source, scratch)


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen3_moe"])
def test_a_streamed_backward_equals_the_whole_models(
    tiny_model: Callable[[str], nn.Module], tmp_path: Path, family: str
) -> None:
    """Block by block from saved inputs, the chain rule per sample: every weight's E[g²] and every
    block's mean ‖∂L/∂y‖² equal the in-memory backward's (float64, padded samples, an untied head
    for LLaMA, GPT-2's tuple outputs and learned positions, Qwen3-MoE's fused experts)."""
    from oneshot.engine import prunable_modules
    from oneshot.gradients import block_output_gradients

    dtype = torch.float32 if family == "qwen3_moe" else torch.float64  # grouped_mm experts: no float64 kernel
    model = tiny_model(family).to(dtype)
    if family == "llama":
        model.config.tie_word_embeddings = False
        model.lm_head.weight = nn.Parameter(torch.randn_like(model.lm_head.weight) * 0.05)
    model.save_pretrained(tmp_path / "ckpt")
    ids, mask = _ids(3)
    config = oneshot.PruneConfig(method="fisher", sparsity=0.5)
    layers = prunable_modules(model, config)
    want = empirical_fisher(model, CalibrationSet(ids, mask), layers)
    _, blocks = find_blocks(model)
    outputs = block_output_gradients(model, CalibrationSet(ids, mask), blocks)
    found = _streamed(tmp_path / "ckpt", dtype, ids, mask, tmp_path / "scratch")
    assert set(found.grad_sq) == set(want) and len(want) > 0
    rtol = 1e-6 if dtype == torch.float64 else 1e-3
    for name, tensor in want.items():
        scale = float(tensor.abs().max())
        assert torch.allclose(found.grad_sq[name].double(), tensor.double(), rtol=rtol, atol=rtol * scale * 1e-3), name
    assert found.block_output_sq == pytest.approx(outputs, rel=1e-6 if dtype == torch.float64 else 1e-4)
    assert not list((tmp_path / "scratch").glob("inputs-*"))  # each block's saved inputs freed on the way down


def test_block_output_gradients_equal_transformers_own(tiny_model: Callable[[str], nn.Module], tmp_path: Path) -> None:
    """The streamed ‖∂L/∂y‖² of each block against autograd through the stock model's hidden states."""
    model = tiny_model("llama").to(torch.float64)
    model.save_pretrained(tmp_path / "ckpt")
    ids, mask = _ids(2)
    sums = torch.zeros(len(model.model.layers), dtype=torch.float64)
    for b in range(2):
        out = model(input_ids=ids[b : b + 1], attention_mask=mask[b : b + 1], output_hidden_states=True)
        logits, real = out.logits[0, :-1], (mask[b, 1:] & mask[b, :-1]).bool()
        loss = F.cross_entropy(logits[real], ids[b, 1:][real])
        hidden = out.hidden_states[1:]  # each block's output (the last one after the final norm: not a block's)
        grads = torch.autograd.grad(loss, hidden[:-1] + (out.hidden_states[-1],), allow_unused=True)
        for i, g in enumerate(grads[:-1]):
            sums[i] += g[0][mask[b].bool()].square().sum()
    found = _streamed(tmp_path / "ckpt", torch.float64, ids, mask, tmp_path / "scratch")
    tokens = int(mask.sum())
    assert found.block_output_sq[:-1] == pytest.approx((sums[:-1] / tokens).tolist(), rel=1e-6)  # the loss: float32


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_fisher_streamed_prunes_as_in_memory(
    tiny_checkpoint: Callable[[str], Path], tmp_path: Path, family: str
) -> None:
    """--method fisher --stream: the streamed backward's scores give the in-memory run's masks and folder."""
    from conftest import saved_tensors

    folder = tiny_checkpoint(family)
    calib = CalibrationSet(_ids(4)[0])
    phases = {}
    for stream in (True, False):
        report = oneshot.prune(str(folder), method="fisher", sparsity=0.5, stream=stream, out=tmp_path / str(stream),
                               quiet=True, calibration=calib)  # fmt: skip
        phases[stream] = report.phase_seconds()
    assert 0 < phases[True]["gradients_forward"] < phases[True]["gradients"]  # the backward after its forward
    assert 0 < phases[True]["gradients_head"] < phases[True]["gradients"] - phases[True]["gradients_forward"]
    assert phases[False]["gradients"] > 0 and "gradients_forward" not in phases[False]
    assert "gradients_head" not in phases[False]
    streamed, in_memory = saved_tensors(tmp_path / "True"), saved_tensors(tmp_path / "False")
    assert streamed.keys() == in_memory.keys()
    for key, tensor in in_memory.items():
        assert torch.equal(streamed[key] == 0, tensor == 0), key
        assert torch.equal(streamed[key], tensor), key
    assert not [p for p in (tmp_path / "True").iterdir() if p.is_dir()]  # the backward's scratch is gone


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_a_bf16_checkpoint_is_streamed_backward_in_float32_on_the_cpu(
    tiny_model: Callable[[str], nn.Module], tmp_path: Path, family: str
) -> None:
    """bf16 products on a CPU without native bf16 instructions are many times slower (the backward's
    above all): a half-precision block is computed in float32 there, its saved inputs kept in bf16.
    The E[g²] is then the float32 backward's of the same bf16 weights, up to the inputs' rounding;
    computed in bf16 it is off by twice as much."""
    from oneshot.engine import prunable_modules
    from oneshot.passes import backward

    assert backward.backward_dtype(torch.bfloat16, torch.device("cpu")) == torch.float32
    assert backward.backward_dtype(torch.float16, torch.device("cpu")) == torch.float32
    assert backward.backward_dtype(torch.float32, torch.device("cpu")) is None
    assert backward.backward_dtype(torch.float64, torch.device("cpu")) is None
    assert backward.backward_dtype(torch.bfloat16, torch.device("cuda")) is None

    model = tiny_model(family).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "ckpt")
    ids, mask = _ids(3)
    layers = prunable_modules(model.float(), oneshot.PruneConfig(method="fisher", sparsity=0.5))
    want = empirical_fisher(model, CalibrationSet(ids, mask), layers)  # float32, the bf16 values
    kept: list[nn.Module] = []
    handed: list[set[torch.dtype]] = []  # the gradients held for every sample: from the head, after the sweep
    real_backward = backward._backward

    def recording(*args: Any) -> Any:
        handed.append({g.dtype for g in args[4].values()})
        result = real_backward(*args)
        handed.append({g.dtype for g in args[4].values()})
        return result

    with pytest.MonkeyPatch.context() as m:
        m.setattr(backward, "_backward", recording)
        found = _streamed(tmp_path / "ckpt", torch.bfloat16, ids, mask, tmp_path / "scratch", kept)
    assert handed == [{torch.bfloat16}] * 2  # held in the model's dtype, not float32
    _, blocks = find_blocks(kept[0])
    assert {(p.dtype, p.device.type) for p in blocks.parameters()} == {(torch.bfloat16, "meta")}  # freed, as read
    errors = [float((found.grad_sq[n] - w).norm() / w.norm()) for n, w in want.items()]
    assert max(errors) < 0.009, max(errors)  # 0.0057 / 0.0074; in bf16: 0.014 / 0.018


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_the_loss_head_is_cast_for_the_backward_and_back(tiny_model: Callable[[str], nn.Module], family: str) -> None:
    """The output head and the final norm in float32 inside, the input embeddings (unless tied to the
    head: GPT-2) and the blocks not; every parameter back in bf16, bit for bit, after."""
    from oneshot.passes.backward import _head_in

    model = tiny_model(family).to(torch.bfloat16)
    if family == "llama":
        model.config.tie_word_embeddings = False
        model.lm_head.weight = nn.Parameter(torch.randn_like(model.lm_head.weight))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _, blocks = find_blocks(model)
    head, stem = model.get_output_embeddings(), model.get_input_embeddings()
    with _head_in(model, blocks, torch.float32):
        assert head.weight.dtype == torch.float32
        assert stem.weight.dtype == (torch.float32 if family == "gpt2" else torch.bfloat16)
        assert all(p.dtype == torch.bfloat16 for p in blocks.parameters())
        norms = [m for n, m in model.named_modules() if n in ("model.norm", "transformer.ln_f")]
        assert len(norms) == 1 and norms[0].weight.dtype == torch.float32
    with _head_in(model, blocks, None):
        assert head.weight.dtype == torch.bfloat16
    after = dict(model.named_parameters())
    assert all(after[n].dtype == torch.bfloat16 and torch.equal(after[n], t) for n, t in before.items())


def test_the_scale_table_gives_the_backward_with_and_without_the_loss_head() -> None:
    """``benchmarks.scale``: (gradients - first forward) / first forward, and the same without the head."""
    from benchmarks.scale import backward_over_forward, table

    phases = {"gradients": 10.0, "gradients_forward": 2.0, "gradients_head": 1.0}
    row = {"checkpoint": "c", "checkpoint_bytes": 1e9, "blocks": 8, "method": "fisher", "tokens": 64, "seconds": 20.0,
           "seconds_per_block": 1.0, "peak_rss_bytes": 5e8, "written_bytes": 1e9, "phase_seconds": phases}  # fmt: skip
    assert backward_over_forward(row) == 4.0 and backward_over_forward(row, blocks=True) == 3.5
    header, rule, line = table([row]).splitlines()
    assert header.endswith("| backward / forward | blocks' backward / forward |") and line.endswith("| 4.00 | 3.50 |")
    assert header.count("|") == rule.count("|") == line.count("|")
    plain = {**row, "phase_seconds": {"gradients": 0.0}}
    assert "backward" not in table([plain]).splitlines()[0]


def test_a_block_without_measured_layers_still_passes_the_gradient_down(
    tiny_model: Callable[[str], nn.Module], tmp_path: Path
) -> None:
    """Only block 0's layers measured: every later block has no weights to square but its input's
    gradient still goes down, so block 0's E[g²] and every block's ‖∂L/∂y‖² are the full run's."""
    model = tiny_model("llama").to(torch.float64)
    model.save_pretrained(tmp_path / "ckpt")
    ids, mask = _ids(2)
    full = _streamed(tmp_path / "ckpt", torch.float64, ids, mask, tmp_path / "a")
    first = _streamed(tmp_path / "ckpt", torch.float64, ids, mask, tmp_path / "b", only="layers.0.")
    assert 0 < len(first.grad_sq) < len(full.grad_sq) and all(".layers.0." in n for n in first.grad_sq)
    for name in first.grad_sq:
        assert torch.equal(first.grad_sq[name], full.grad_sq[name]), name
    assert first.block_output_sq == full.block_output_sq


def test_each_samples_gradients_are_summed_with_the_heap_reused(
    tiny_model: Callable[[str], nn.Module], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The per-sample loops (every block's forward and backward) run inside
    :func:`oneshot.memory.heap_reused`: a streamed run's footprint-first allocator would otherwise map and
    fault in every sample's weight-sized gradients afresh."""
    from oneshot.passes import backward

    model = tiny_model("llama").to(torch.float64)
    model.save_pretrained(tmp_path / "ckpt")
    depth, entered, squares = 0, 0, []

    @contextlib.contextmanager
    def spy() -> Iterator[None]:
        nonlocal depth, entered
        depth, entered = depth + 1, entered + 1
        try:
            yield
        finally:
            depth -= 1

    def add_square(acc: torch.Tensor, grad: torch.Tensor) -> None:
        squares.append(depth)
        acc.addcmul_(grad.float(), grad.float())

    monkeypatch.setattr(backward, "heap_reused", spy)
    monkeypatch.setattr(backward, "add_square", add_square)
    ids, mask = _ids(2)
    _streamed(tmp_path / "ckpt", torch.float64, ids, mask, tmp_path / "scratch")
    blocks = model.config.num_hidden_layers
    assert entered == 2 * blocks  # not the loss head: its logits (samples x tokens x vocabulary) stay footprint first
    assert squares and set(squares) == {1}


def test_the_scale_summary_gives_the_median_and_range_of_repeated_runs() -> None:
    """``benchmarks.scale --repeat``: per configuration the median and range of the runs' ratios and seconds."""
    from benchmarks.scale import backward_summary

    def row(forward: float, gradients: float, rss: float, tokens: int = 64) -> dict[str, object]:
        phases = {"gradients": gradients, "gradients_forward": forward, "gradients_head": 1.0}
        return {"checkpoint": "c", "blocks": 2, "method": "fisher", "tokens": tokens, "peak_rss_bytes": rss * 1e9,
                "phase_seconds": phases}  # fmt: skip

    rows = [row(2.0, 9.0, 0.5), row(2.0, 11.0, 0.7), row(4.0, 13.0, 0.6), row(1.0, 5.0, 0.4, tokens=32)]
    lines = backward_summary(rows).splitlines()
    assert len(lines) == 4 and all(line.count("|") == lines[0].count("|") for line in lines)
    # blocks' ratios 3.0, 4.0, 2.0; with the head 3.5, 4.5, 2.25; forward 1, 1, 2 s per block; backward 3, 4, 4
    assert lines[2] == "| c | fisher | 64 | 3 | 3.00 (2.00-4.00) | 3.50 (2.25-4.50) | 1.00 (1.00-2.00) " \
        "| 4.00 (3.00-4.00) | 0.60 (0.50-0.70) |"  # fmt: skip
    assert lines[3].startswith("| c | fisher | 32 | 1 | 3.00 (3.00-3.00) |")
    assert backward_summary([{**rows[0], "phase_seconds": {"gradients": 0.0}}]) == ""


@pytest.mark.parametrize("repeat", [None, 2])
def test_the_scale_benchmark_runs_each_configuration_repeat_times(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, repeat: int | None
) -> None:
    """``benchmarks.scale`` (its runs stubbed): a row per run, one run each by default, the summary in the table."""
    import json

    import benchmarks.common
    from benchmarks import scale

    calls: list[int] = []

    def run_one(folder: Path, method: str, nsamples: int, *rest: Any) -> dict[str, object]:
        calls.append(nsamples)
        phases = {"gradients": 9.0, "gradients_forward": 2.0, "gradients_head": 1.0}
        return {"checkpoint": folder.name, "checkpoint_bytes": 1e9, "blocks": 2, "method": method, "tokens": nsamples,
                "seconds": 12.0, "seconds_per_block": 5.0, "phase_seconds": phases, "peak_rss_bytes": 5e8,
                "written_bytes": 1e9}  # fmt: skip

    monkeypatch.setattr(scale, "RESULTS", tmp_path)
    monkeypatch.setattr(benchmarks.common, "RESULTS", tmp_path)
    monkeypatch.setattr(scale, "run_one", run_one)

    def ensure_checkpoint(workdir: Path, hidden: int, layers: int, *rest: Any) -> Path:
        (workdir / f"c{layers}").mkdir(exist_ok=True)
        return workdir / f"c{layers}"

    monkeypatch.setattr(scale, "ensure_checkpoint", ensure_checkpoint)
    monkeypatch.setattr(scale, "plot", lambda rows, path: None)
    argv = [
        "--shapes",
        "64x2,64x3",
        "--methods",
        "fisher",
        "--nsamples",
        "4",
        "--workdir",
        str(tmp_path),
        "--name",
        "t",
    ]
    scale.main(argv + ([] if repeat is None else ["--repeat", str(repeat)]))
    runs = repeat or 1
    assert calls == [4] * 2 * runs
    rows = json.loads((tmp_path / "t.json").read_text())["rows"]
    assert [r["checkpoint"] for r in rows] == ["c2"] * runs + ["c3"] * runs
    text = (tmp_path / "t.md").read_text()
    assert f"| c2 | fisher | 4 | {runs} | 3.00 (3.00-3.00) |" in text and not (tmp_path / "t.partial.json").exists()
