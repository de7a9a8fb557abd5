"""Single-pass sweeps: each layer pruned inside the block's one forward (true sequential order)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import VOCAB
from torch import nn

import oneshot
from oneshot.calibration.data import CalibrationSet
from oneshot.config import PruneConfig
from oneshot.layers import find_blocks, find_linears
from oneshot.methods.sparsegpt import sparsegpt
from oneshot.methods.wanda import wanda
from oneshot.passes.unstructured import prune_sequential


class ParallelBlock(nn.Module):
    """Two linear layers that read the same input and do not feed each other."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.a = nn.Linear(d, d)
        self.b = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.a(x) + torch.tanh(self.b(x))


class ParallelModel(nn.Module):
    """Embedding + a stack of :class:`ParallelBlock`."""

    def __init__(self, d: int = 32, depth: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.layers = nn.ModuleList([ParallelBlock(d) for _ in range(depth)])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x)
        return x


def _ids(n: int = 8, t: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_single_pass_equals_two_passes_when_layers_do_not_feed_each_other(method: str) -> None:
    torch.manual_seed(0)
    one, two = ParallelModel(), ParallelModel()
    two.load_state_dict(one.state_dict())
    calib = CalibrationSet(_ids())
    config = PruneConfig(method=method, sparsity=0.5, batch_size=2, quiet=True)
    prune_sequential(one, calib, config, single_pass=True)
    prune_sequential(two, calib, config, single_pass=False)
    for (key, a), b in zip(one.state_dict().items(), two.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=key)
        assert torch.equal(a == 0, b == 0), key


def _input_groups(model: nn.Module, block: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> list[list[str]]:
    """The block's linear layers in forward order, grouped by the input tensor they share."""
    order: list[tuple[str, torch.Tensor]] = []  # the inputs are held, so their ids stay unique
    handles = [
        m.register_forward_pre_hook(lambda mod, inp, n=n: order.append((n, inp[0])))
        for n, m in find_linears(block).items()
    ]
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    for h in handles:
        h.remove()
    groups: dict[int, list[str]] = {}
    for name, x in order:
        groups.setdefault(id(x), []).append(name)
    return list(groups.values())


def _step_by_step(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, prune: Callable[..., torch.Tensor]) -> None:
    """Prune one input group, re-run the model, prune the next: the true sequential order, by brute force."""
    real = mask.bool()
    for block in find_blocks(model)[1]:
        linears = find_linears(block)
        for group in _input_groups(model, block, ids, mask):
            seen: list[torch.Tensor] = []
            handle = linears[group[0]].register_forward_pre_hook(
                lambda mod, inp, seen=seen: seen.append(inp[0][real].double())
            )
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask)
            handle.remove()
            x = seen[0]  # [tokens, in]
            for name in group:
                module = linears[name]
                module.weight.data = prune(module.weight.data.float(), x).to(module.weight.dtype)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_single_pass_is_the_true_sequential_order(tiny_model: Callable[[str], nn.Module], method: str) -> None:
    model, reference = tiny_model("llama"), tiny_model("llama")
    ids = _ids(6, 20, seed=4)
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    mask[4, 5:] = 0

    def prune(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if method == "wanda":
            return wanda(w, x.square().sum(0).float(), 0.5).weight
        return sparsegpt(w, (x.T @ x / x.shape[0]).float(), 0.5).weight

    report = oneshot.prune(model, method=method, sparsity=0.5, calibration=CalibrationSet(ids, mask), quiet=True)
    assert report.extra["passes"] == "single"
    _step_by_step(reference, ids, mask, prune)
    for (key, a), b in zip(model.state_dict().items(), reference.state_dict().values(), strict=True):
        if key.endswith("proj.weight"):
            assert float(((a == 0) == (b == 0)).float().mean()) == 1.0, key
            torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-3, msg=key)


def test_auto_falls_back_to_two_passes_and_says_why(tiny_model: Callable[[str], nn.Module]) -> None:
    model = tiny_model("llama")
    report = oneshot.prune(model, method="wanda", sparsity=0.5, calibration=_ids(), max_memory="10KB", quiet=True)
    assert report.extra["passes"] == "two" and "budget" in report.extra["passes_reason"]
    assert report.times.propagate > 0
    single = oneshot.prune(tiny_model("llama"), method="wanda", sparsity=0.5, calibration=_ids(), quiet=True)
    assert single.extra["passes"] == "single" and single.times.propagate == 0.0
    assert "passes_reason" not in single.extra
    for run in (report, single):  # every phase is a real share of the run's wall time
        t = run.times
        phases = [t.capture, t.forward, t.statistics, t.solve, t.report, t.propagate, t.activations, t.load, t.write]
        assert all(p >= 0 for p in phases) and sum(phases) <= run.seconds
        assert t.statistics > 0 and t.solve > 0 and t.forward > 0 and t.capture > 0
        assert t.activations > 0 and t.load > 0 and t.write > 0
        assert len(t.per_block) == 3 and sum(t.per_block) <= run.seconds
        shapes = {r.name: r.shape for r in run.layers}
        assert shapes["model.layers.0.mlp.down_proj"] == (64, 96)  # [out, in]
        assert shapes["model.layers.2.self_attn.k_proj"] == (32, 64)


def test_owl_allocation_is_the_same_in_one_pass(tiny_model: Callable[[str], nn.Module]) -> None:
    results: dict[str, Any] = {}
    for passes in ("single", "two"):
        options: dict[str, Any] = {"owl": True, "owl_lambda": 0.1, "passes": passes, "quiet": True}
        report = oneshot.prune(tiny_model("llama"), method="wanda", sparsity=0.5, calibration=_ids(), **options)
        results[passes] = [round(b["sparsity"], 10) for b in report.extra["owl"]["blocks"]]
    assert results["single"] == results["two"]


@pytest.mark.parametrize("passes", ["single", "two"])
def test_stacked_solves_equal_layer_by_layer(tiny_model: Callable[[str], nn.Module], passes: str) -> None:
    """q/k/v and gate/up solved as one matrix each give the layer-by-layer result, with exact sparsity."""
    reports, states = {}, {}
    for stack in (True, False):
        model = tiny_model("llama")
        options: dict[str, Any] = {"passes": passes, "stack": stack, "quiet": True}
        reports[stack] = oneshot.prune(model, method="sparsegpt", sparsity=0.5, calibration=_ids(), **options)
        states[stack] = model.state_dict()
    for key, a in states[True].items():
        b = states[False][key]
        assert float(((a == 0) == (b == 0)).float().mean()) >= 0.999, key
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3, msg=key)
    assert [r.name for r in reports[True].layers] == [r.name for r in reports[False].layers]
    assert all(r.achieved_sparsity == 0.5 for r in reports[True].layers)


class _SlowStore:
    """A memory store whose every read and write takes at least ``delay`` seconds."""

    def __init__(self, delay: float) -> None:
        from oneshot.activations import MemoryStore

        self.inner, self.delay, self.calls = MemoryStore(), delay, 0

    def __len__(self) -> int:
        return len(self.inner)

    def get(self, batch: int) -> torch.Tensor:
        self.calls += 1
        time.sleep(self.delay)
        return self.inner.get(batch)

    def put(self, batch: int, hidden: torch.Tensor) -> None:
        self.calls += 1
        time.sleep(self.delay)
        self.inner.put(batch, hidden)

    def commit(self) -> None:
        self.inner.commit()


@pytest.mark.parametrize("single", [True, False])
def test_activation_io_is_its_own_phase(tiny_model: Callable[[str], nn.Module], single: bool) -> None:
    """Reading and writing the store is timed as ``activations`` and nowhere else."""
    from oneshot.engine import PhaseTimes, SweepIO, stat_factories, sweep

    delay = 0.1
    store = _SlowStore(delay)
    times = PhaseTimes()
    config = PruneConfig(method="wanda", sparsity=0.5, batch_size=2, quiet=True)
    start = time.perf_counter()
    sweep(
        tiny_model("llama"), CalibrationSet(_ids()), config, tuple(stat_factories(("col_sq_norm",))),
        lambda *args: None, times=times, io=SweepIO(store=store), single_pass=single,
    )  # fmt: skip
    wall = time.perf_counter() - start
    capture_calls = 1 if single else 4  # the capture's puts count as capture
    slept = (store.calls - capture_calls) * delay
    phases = [times.capture, times.forward, times.statistics, times.solve, times.report, times.propagate]
    phases += [times.activations, times.load, times.write]
    assert all(p >= 0 for p in phases) and sum(phases) <= wall
    assert slept <= times.activations < slept + 0.5 * len(times.per_block)
    assert times.forward + times.propagate < slept  # the sleeps are not counted there too
