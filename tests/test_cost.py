"""The cost model behind ``--passes auto`` on several ranks: its formulas, what it counts, what it times."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from oneshot.config import PruneConfig
from oneshot.layers import find_blocks, find_linears, input_width, output_width
from oneshot.methods.registry import METHODS
from oneshot.passes import cost
from oneshot.passes.cost import BlockCosts, measure_block_costs


@pytest.mark.parametrize(
    ("forward", "solves", "world", "single", "two", "best"),
    [
        (1.0, 4.0, 2, 5.0, 4.0, "two"),  # 2 + 2 < 1 + 4
        (1.0, 2.0, 2, 3.0, 3.0, "single"),  # a tie: the one forward
        (1.0, 1.9, 2, 2.9, 2.95, "single"),
        (1.0, 1.5, 4, 2.5, 2.375, "two"),  # more ranks spread the solves thinner
        (2.0, 0.1, 8, 2.1, 4.0125, "single"),  # Wanda-like: the forward dominates
    ],
)
def test_block_costs_compare_one_forward_with_every_solve_against_two_forwards_with_a_share(
    forward: float, solves: float, world: int, single: float, two: float, best: str
) -> None:
    costs = BlockCosts(forward, solves, world)
    assert costs.single == pytest.approx(single) and costs.two == pytest.approx(two)
    assert costs.best() == best
    record = costs.as_dict()
    assert record["chosen"] == best and record["world_size"] == world
    assert record["single_seconds_per_block"] == pytest.approx(single, abs=1e-4)
    assert record["two_seconds_per_block"] == pytest.approx(two, abs=1e-4)
    assert f"{world} ranks" in costs.reason() and costs.reason().endswith(best)


def test_the_first_blocks_layers_are_counted_by_shape(
    tiny_model: Callable[[str], nn.Module], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Forward: 2 x (every layer's out x in, plus each distinct input's in² for the Hessians) x tokens at
    the measured rate; solves: each layer's timed solve of its shape, once per layer of that shape."""
    model = tiny_model("llama")
    timed: list[tuple[int, int]] = []

    def fake_solve(spec: Any, config: PruneConfig, shape: tuple[int, int], *args: Any) -> float:
        timed.append(shape)
        return shape[0] * shape[1] * 1e-6

    rates: list[tuple[tuple[int, int], int]] = []

    def fake_rate(shape: tuple[int, int], rows: int, *args: Any) -> float:
        rates.append((shape, rows))
        return 1e6

    monkeypatch.setattr(cost, "solve_seconds", fake_solve)
    monkeypatch.setattr(cost, "matmul_rate", fake_rate)
    layers = list(find_linears(find_blocks(model)[1][0]).values())
    shapes = [(output_width(m), input_width(m)) for m in layers]
    widths = {input_width(m) for m in layers}
    tokens = 100
    for method, hessian in (("sparsegpt", True), ("wanda", False)):
        timed.clear()
        config = PruneConfig(method=method, sparsity=0.5)
        got = measure_block_costs(model, config, METHODS[method], tokens, 3, torch.device("cpu"))
        madds = sum(o * i for o, i in shapes) + (sum(w * w for w in widths) if hessian else 0)
        assert got.forward == pytest.approx(2 * madds * tokens / 1e6)
        assert got.solves == pytest.approx(sum(o * i for o, i in shapes) * 1e-6)
        assert sorted(timed) == sorted(set(shapes))  # each shape timed once
        assert got.world == 3
    assert rates[-1] == (max(shapes, key=lambda s: s[0] * s[1]), tokens)


def test_a_block_without_layers_costs_nothing(tiny_model: Callable[[str], nn.Module]) -> None:
    config = PruneConfig(method="sparsegpt", sparsity=0.5, skip_layers=("*",))
    got = measure_block_costs(tiny_model("llama"), config, METHODS["sparsegpt"], 64, 2, torch.device("cpu"))
    assert (got.forward, got.solves) == (0.0, 0.0) and got.best() == "single"


def test_the_timed_pieces_run_the_real_kernels() -> None:
    """A product's rate is positive; a solve runs the method (and a --then quantizer) on the shape."""
    assert cost.matmul_rate((64, 32), 16, torch.float32, torch.device("cpu")) > 0
    calls: list[tuple[tuple[int, ...], float]] = []
    spec = METHODS["sparsegpt"]
    original = spec.run
    assert original is not None

    def counting(weight: torch.Tensor, stats: Any, target: float, options: Any) -> Any:
        calls.append((tuple(weight.shape), target))
        assert stats.hessian is not None and stats.hessian.shape == (weight.shape[1], weight.shape[1])
        assert bool(torch.linalg.eigvalsh(stats.hessian).min() > 0)
        return original(weight, stats, target, options)

    config = PruneConfig(method="sparsegpt", sparsity=0.6, then="gptq", bits=4, group_size=16)
    quantized: list[str] = []
    with pytest.MonkeyPatch.context() as m:
        m.setattr(cost, "quantize_stage", lambda p, s, o, method: quantized.append(method) or p)
        probe = dataclasses.replace(spec, run=counting)
        seconds = cost.solve_seconds(probe, config, (48, 32), 128, torch.float32, torch.device("cpu"))
    assert seconds > 0 and calls == [((48, 32), 0.6)] and quantized == ["gptq"]


class _Clock:
    """A clock that moves 0.1 s each time it is read."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 0.1
        return self.now


def test_the_product_rate_and_a_solve_are_timed_between_two_clock_readings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Three products at least (the clock is read again only after them): 2·rows·in·out·3 flops over the
    0.2 s between the readings; a solve's seconds are the difference of its two readings."""
    monkeypatch.setattr(cost.time, "perf_counter", _Clock())
    assert cost.matmul_rate((48, 32), 16, torch.float32, torch.device("cpu")) == pytest.approx(
        2 * 16 * 32 * 48 * 3 / 0.2
    )
    seconds = cost.solve_seconds(
        METHODS["wanda"], PruneConfig(method="wanda", sparsity=0.5), (8, 16), 32, torch.float32, torch.device("cpu")
    )
    assert seconds == pytest.approx(0.1)


def test_the_rate_is_measured_on_at_most_rate_rows_tokens(
    tiny_model: Callable[[str], nn.Module], monkeypatch: pytest.MonkeyPatch
) -> None:
    rows: list[int] = []
    monkeypatch.setattr(cost, "matmul_rate", lambda shape, n, *a: rows.append(n) or 1e9)
    monkeypatch.setattr(cost, "solve_seconds", lambda *a: 0.0)
    config = PruneConfig(method="wanda", sparsity=0.5)
    for tokens in (cost.RATE_ROWS - 1, cost.RATE_ROWS, 10 * cost.RATE_ROWS):
        measure_block_costs(tiny_model("llama"), config, METHODS["wanda"], tokens, 2, torch.device("cpu"))
    assert rows == [cost.RATE_ROWS - 1, cost.RATE_ROWS, cost.RATE_ROWS] and cost.RATE_ROWS == 2048


def test_the_report_rounds_to_a_tenth_of_a_millisecond() -> None:
    record = BlockCosts(1.23456789, 0.00012345, 2).as_dict()
    assert record["forward_seconds"] == 1.2346 and record["solve_seconds"] == 0.0001
    assert record["single_seconds_per_block"] == 1.2347 and record["two_seconds_per_block"] == 2.4692


@pytest.mark.parametrize("method", ["fisher", "movement", "wanda", "ria"])
def test_a_solve_is_timed_with_the_statistics_its_method_reads(method: str, tmp_path: Any) -> None:
    """Gradient and base-weight methods get their ``[out, in]`` statistics; the others are not given them."""
    spec = METHODS[method]
    assert spec.run is not None
    seen: list[Any] = []
    run = spec.run

    def recording(weight: torch.Tensor, stats: Any, target: float, options: Any) -> Any:
        seen.append(stats)
        return run(weight, stats, target, options)

    extra = {"base": str(tmp_path)} if spec.reference else {}
    config = PruneConfig(method=method, sparsity=0.5, **extra)
    probe = dataclasses.replace(spec, run=recording)
    assert cost.solve_seconds(probe, config, (24, 16), 64, torch.float32, torch.device("cpu")) > 0
    (stats,) = seen
    assert (stats.grad_sq is not None) == spec.gradients and (stats.reference is not None) == spec.reference


def test_the_probe_draws_its_tensors_on_the_device_in_the_layer_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    """No weight-sized tensor is drawn in float32 on the host and then moved: for a 7B model's
    largest layer that would be a gigabyte of host memory at the run's start."""
    draws: list[tuple[tuple[int, ...], Any, Any]] = []
    real_randn, real_rand = torch.randn, torch.rand

    def recording(real: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def draw(*size: int, **kwargs: Any) -> torch.Tensor:
            draws.append((size, kwargs.get("device"), kwargs.get("dtype")))
            return real(*size, **kwargs)

        return draw

    monkeypatch.setattr(cost.torch, "randn", recording(real_randn))
    monkeypatch.setattr(cost.torch, "rand", recording(real_rand))
    device = torch.device("cpu")
    cost.matmul_rate((48, 32), 16, torch.bfloat16, device)
    config = PruneConfig(method="fisher", sparsity=0.5)
    cost.solve_seconds(METHODS["fisher"], config, (48, 32), 64, torch.bfloat16, device)
    assert all(d == device for _, d, _ in draws), draws
    weights = [dtype for size, _, dtype in draws if size in {(16, 32), (48, 32)}]
    assert weights[:3] == [torch.bfloat16] * 3  # the rate's two operands, the solve's weight
