"""Streaming statistics equal their batch formulas; padding never enters them."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from oneshot.calibration.hooks import collect, flatten_tokens
from oneshot.calibration.stats import (
    ColumnSqNorm,
    Hessian,
    MeanVar,
    TokenSample,
    hessian_relative_error,
    relative_error,
)


def _split(x: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    return list(torch.split(x, sizes))


def test_streaming_equals_batch() -> None:
    x = torch.randn(300, 12, dtype=torch.float64) * 3 + 5
    h, c, mv = Hessian(12), ColumnSqNorm(12), MeanVar(12)
    for part in _split(x, [1, 50, 7, 142, 100]):
        for acc in (h, c, mv):
            acc.update(part.float())
    xf = x.float()
    torch.testing.assert_close(h.finalize(), xf.T @ xf / 300, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(c.finalize(), xf.square().sum(0), rtol=1e-5, atol=1e-3)
    mean, var = mv.finalize()
    torch.testing.assert_close(mean, x.mean(0).float(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(var, x.var(0, unbiased=False).float(), rtol=1e-5, atol=1e-5)
    assert h.count == c.count == mv.count == 300
    one = Hessian(3)
    one.update(torch.tensor([[1.0, 2.0, 3.0]]))
    assert one.finalize().tolist() == [[1.0, 2.0, 3.0], [2.0, 4.0, 6.0], [3.0, 6.0, 9.0]]  # the mean over 1 token


def test_token_sample_stride_is_global() -> None:
    x = torch.arange(100, dtype=torch.float32).unsqueeze(1)
    s = TokenSample(1, stride=8, max_rows=10)
    for part in _split(x, [3, 30, 67]):
        s.update(part)
    assert s.finalize().squeeze(1).tolist() == [float(i) for i in range(0, 80, 8)]
    assert s.count == 100


def test_token_sample_defaults_take_every_32nd_of_the_first_8192_tokens() -> None:
    x = torch.arange(10_000, dtype=torch.float32).unsqueeze(1)
    s = TokenSample(1)
    for part in _split(x, [512] * 19 + [10_000 - 512 * 19]):
        s.update(part)
    assert s.finalize().squeeze(1).tolist() == [float(i) for i in range(0, 8192, 32)]  # 256 rows


def test_relative_error() -> None:
    w = torch.randn(4, 6)
    x = torch.randn(20, 6)
    assert relative_error(w, w, x) == 0.0
    assert abs(relative_error(w, torch.zeros_like(w), x) - 1.0) < 1e-6


def test_padding_is_excluded_and_shared_inputs_counted_once() -> None:
    x = torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    rows = flatten_tokens(x, mask)
    assert rows.shape == (8, 4)
    a, b = nn.Linear(4, 3), nn.Linear(4, 2)

    class Two(nn.Module):
        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return torch.cat([a(t), b(t)], -1)

    with collect({"a": a, "b": b}, {"h": lambda d, dev: Hessian(d, dev)}) as col:
        col.next_batch(mask)
        Two()(x)
        col.next_batch(mask)
        Two()(x)
    ha, hb = col.stats("a")["h"], col.stats("b")["h"]
    assert ha is hb  # same input tensor -> one accumulator
    assert ha.count == 16
    torch.testing.assert_close(ha.finalize(), rows.T @ rows / 8)


def test_calibration_batches_trim_trailing_padding() -> None:
    from oneshot.calibration.data import CalibrationSet

    ids = torch.arange(24).reshape(4, 6)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]])
    batches = CalibrationSet(ids, mask).batches(2)
    assert [tuple(b[0].shape) for b in batches] == [(2, 4), (2, 3)]
    assert torch.equal(batches[1][1], mask[2:, :3])


def test_meanvar_keeps_float64_precision_and_edge_cases() -> None:
    """Variance of activations with a large common offset: float32 accumulation would lose it entirely."""
    gen = torch.Generator().manual_seed(0)
    x = 1e4 + 1e-3 * torch.randn(400, 3, generator=gen, dtype=torch.float64)
    mv = MeanVar(3)
    for part in _split(x, [100, 300]):
        mv.update(part)
    _, var = mv.finalize()
    torch.testing.assert_close(var.double(), x.var(0, unbiased=False), rtol=1e-3, atol=0.0)


def test_token_sample_and_relative_error_edges() -> None:
    sample = TokenSample(4, stride=1, max_rows=4)
    sample.update(torch.randn(3, 4, dtype=torch.bfloat16))
    sample.update(torch.randn(4, 4, dtype=torch.bfloat16))  # room for exactly one more row
    kept = sample.finalize()
    assert kept.shape == (4, 4) and kept.dtype == torch.float32 and sample.count == 7
    assert TokenSample(4).finalize().shape == (0, 4)
    x = torch.randn(6, 4)
    assert relative_error(torch.zeros(2, 4), torch.zeros(2, 4), x) == 0.0  # no signal: no error, no crash
    w = torch.full((2, 4), 1e-3)  # ‖WX‖² far below 1: still the exact ratio
    assert abs(relative_error(w, torch.zeros_like(w), x) - 1.0) < 1e-6


def test_hessian_panels_give_the_full_symmetric_product() -> None:
    """The lower-triangle panels (ragged last panel included) add up to ``XᵀX``, mirrored exactly."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(200, 13, dtype=torch.float64, generator=gen) * torch.linspace(0.5, 4.0, 13, dtype=torch.float64)
    for panel in (1, 5, 13, 256):
        h = Hessian(13)
        h.PANEL = panel
        for part in x.split(64):
            h.update(part.float())
        got = h.finalize()
        assert torch.equal(got, got.T)
        xf = x.float()
        torch.testing.assert_close(got, xf.T @ xf / 200, rtol=1e-5, atol=1e-4)


def test_hessian_relative_error_equals_the_error_over_every_token() -> None:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(300, 9, generator=gen, dtype=torch.float64) * torch.linspace(0.2, 3.0, 9, dtype=torch.float64)
    w = torch.randn(4, 9, generator=gen, dtype=torch.float64)
    pruned = w * (torch.rand(4, 9, generator=gen) > 0.5) + 0.01 * torch.randn(4, 9, generator=gen, dtype=torch.float64)
    h = Hessian(9)
    for part in x.split(77):
        h.update(part.float())
    w, pruned = w.float(), pruned.float()
    want = relative_error(w, pruned, x)  # over all 300 tokens
    assert hessian_relative_error(w, pruned, h.finalize()) == pytest.approx(want, rel=1e-4)
    assert hessian_relative_error(w, w, h.finalize()) == 0.0
    tiny = hessian_relative_error(w * 1e-3, pruned * 1e-3, h.finalize())  # a ratio: any scale, even ‖W X‖² < 1
    assert tiny == pytest.approx(want, rel=1e-4)
    assert hessian_relative_error(torch.zeros(2, 9), torch.ones(2, 9), h.finalize()) == 0.0  # no signal: 0, no crash


def test_a_bf16_models_hessian_is_summed_in_float32(tiny_model: Callable[[str], nn.Module]) -> None:
    """The sweep's X Xᵀ of a bf16 model equals the float64 product of the layer's bf16 inputs to float32
    precision: summed in bf16 (the model's dtype) it would be off by ~1e-2 relative."""
    from oneshot.calibration.data import CalibrationSet
    from oneshot.config import PruneConfig
    from oneshot.engine import layer_stats, sweep

    model = tiny_model("llama").to(torch.bfloat16)
    ids = torch.randint(4, 100, (6, 48), generator=torch.Generator().manual_seed(1))
    seen: list[torch.Tensor] = []
    layer = model.model.layers[0].mlp.down_proj  # its input (the MLP's product) has no norm in front of it
    handle = layer.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().reshape(-1, 96)))
    with torch.no_grad():
        for b in range(0, 6, 2):
            model(input_ids=ids[b : b + 2])
    handle.remove()
    x = torch.cat(seen).double()  # [tokens, 96], the bf16 values exactly
    want = x.T @ x / x.shape[0]
    got: dict[str, torch.Tensor] = {}

    def visit(full: str, block: int, module: nn.Module, accs: dict) -> None:  # type: ignore[type-arg]
        if full == "model.layers.0.mlp.down_proj":
            got["h"] = layer_stats(accs).hessian

    config = PruneConfig(method="sparsegpt", sparsity=0.5, batch_size=2, quiet=True)
    sweep(model, CalibrationSet(ids, None), config, ("hessian",), visit)
    assert got["h"].dtype == torch.float32
    error = float((got["h"].double() - want).norm() / want.norm())
    assert error < 1e-5, error
