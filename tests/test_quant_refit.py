"""--refine block in a quantized run: the quantizers' pre-rounding weights, the straight-through grid, the tuning."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import oneshot
from oneshot.config import QUANT_REFIT_LR, REFIT_LR, CalibrationConfig, PruneConfig
from oneshot.engine import RefitBatches
from oneshot.errors import ConfigError
from oneshot.methods.gptq import gptq, quantize, rtn
from oneshot.methods.quantspec import QuantResult, QuantSpec
from oneshot.passes.reconstruct import FakeQuant, output_error, refit_quantized_block
from oneshot.quantized import compress, decompress, weights_args
from tests.conftest import saved_tensors

ASYM = QuantSpec(bits=4, group_size=16, symmetric=False)


def _on_grid(q: QuantResult) -> None:
    """``q.weight`` is exactly ``scale · (code − zero)`` with codes in range, zero where pruned."""
    scale, zero = q.expand()
    codes = q.codes()
    assert int(codes.min()) >= 0 and int(codes.max()) <= q.spec.maxq
    assert torch.equal(q.weight, scale * (codes.float() - zero))
    assert bool((q.weight[~q.mask] == 0).all())


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_latent_is_each_weight_just_before_its_rounding(
    random_layer: Callable[..., tuple[torch.Tensor, ...]], act_order: bool
) -> None:
    w, _, h = random_layer(out=12, inp=48)
    mask = torch.rand(w.shape, generator=torch.Generator().manual_seed(1)) > 0.5
    spec = QuantSpec(bits=3, group_size=16, symmetric=False, act_order=act_order)
    plain = gptq(w, h, spec, mask=mask)
    kept = gptq(w, h, spec, mask=mask, keep_latent=True)
    assert plain.latent is None and kept.latent is not None
    assert torch.equal(plain.weight, kept.weight) and torch.equal(plain.scales, kept.scales)  # asking changes nothing
    scale, zero = kept.expand()
    assert torch.equal(quantize(kept.latent, scale, zero, spec.maxq) * mask, kept.weight)  # rounding it gives the codes
    assert bool((kept.latent[~mask] == 0).all())
    # the latent is not the weight before the solve: GPTQ's updates moved it (columns after the first)
    assert not torch.allclose(kept.latent[mask], (w * mask)[mask])
    # with an identity Hessian no column updates another: the latent is the (masked) weight itself
    identity = gptq(w, torch.eye(48), spec, mask=mask, keep_latent=True, damp=0.0)
    assert identity.latent is not None and torch.equal(identity.latent, w * mask)


def test_gptq_latent_zero_on_dead_inputs(random_layer: Callable[..., tuple[torch.Tensor, ...]]) -> None:
    w, _, h = random_layer(out=8, inp=32)
    h[3, :] = 0
    h[:, 3] = 0
    q = gptq(w, h, ASYM, keep_latent=True)
    assert q.latent is not None and bool((q.latent[:, 3] == 0).all()) and not bool(q.mask[:, 3].any())


def test_rtn_latent_is_the_masked_weight() -> None:
    w = torch.randn(6, 32, generator=torch.Generator().manual_seed(0))
    mask = w.abs() > 0.5
    q = rtn(w, ASYM, mask=mask, keep_latent=True)
    assert q.latent is not None and torch.equal(q.latent, w * mask)
    assert rtn(w, ASYM, mask=mask).latent is None


def _grid(dtype: torch.dtype = torch.float32, seed: int = 0) -> QuantResult:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(8, 32, generator=gen)
    mask = torch.rand(8, 32, generator=gen) > 0.4
    spec = QuantSpec(bits=4, group_size=16, symmetric=False, scale_dtype=dtype)
    return rtn(w, spec, mask=mask, keep_latent=True)


@pytest.mark.parametrize("transposed", [False, True])
def test_fake_quant_starts_at_the_grid_and_has_lsq_gradients(transposed: bool) -> None:
    grid = _grid(torch.bfloat16)
    fake = FakeQuant(grid, transposed)
    assert grid.latent is not None
    latent = fake.units(grid.latent).requires_grad_(True)
    q = fake(latent)
    assert q.shape == (grid.weight.t() if transposed else grid.weight).shape
    assert torch.equal(q.t() if transposed else q, grid.weight)  # the quantizer's own weights, exactly
    # straight-through gradients: dq/du = s0 (inside the code range, kept), dq/dlog s = s · (round(x) − x)
    q.sum().backward()
    assert latent.grad is not None and fake.log_scale.grad is not None
    scale, zero = grid.expand()
    u = latent.detach().t() if transposed else latent.detach()
    raw = torch.round(u) + zero
    inside = (raw >= 0) & (raw <= grid.spec.maxq) & grid.mask
    grad_u = latent.grad.t() if transposed else latent.grad
    assert torch.allclose(grad_u, torch.where(inside, scale, torch.zeros_like(scale)))
    clamped = torch.clamp(raw, 0, grid.spec.maxq)
    per_weight = torch.where(inside, scale * (torch.round(u) - u), scale * (clamped - zero)) * grid.mask
    want = torch.zeros_like(grid.scales).index_add_(1, grid.spec.group_of(32), per_weight)
    assert torch.allclose(fake.log_scale.grad, want, atol=1e-6)


def test_fake_quant_scales_stay_in_their_saved_dtype() -> None:
    grid = _grid(torch.bfloat16)
    fake = FakeQuant(grid)
    with torch.no_grad():
        fake.log_scale.fill_(0.001)  # below bf16's resolution: the scale does not move yet
        assert torch.equal(fake.scales(), grid.scales)
        fake.log_scale.fill_(0.05)
        s = fake.scales()
        assert torch.equal(s, s.to(torch.bfloat16).float()) and bool((s > grid.scales).all())
    assert grid.latent is not None
    result = fake.result(fake.units(grid.latent), grid)
    _on_grid(result)
    assert torch.equal(result.scales, s) and torch.equal(result.zeros, grid.zeros) and result.latent is None
    layer = compress(result, torch.bfloat16)
    assert torch.equal(decompress(layer.tensors, weights_args(result.spec)), result.weight.to(torch.bfloat16))


def _quantized_block(
    dtype: torch.dtype = torch.float32,
) -> tuple[nn.Module, dict[str, QuantResult], RefitBatches]:
    """A 2-layer MLP 'block' 50%-pruned and RTN-quantized (3-bit), batches whose targets are the dense outputs."""
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(16, 48), nn.GELU(), nn.Linear(48, 16))
    block = nn.Sequential(nn.Linear(16, 48), nn.GELU(), nn.Linear(48, 16))
    block.load_state_dict(dense.state_dict())
    spec = QuantSpec(bits=3, group_size=8, symmetric=False, scale_dtype=dtype)
    grids = {}
    for name in ("0", "2"):
        layer = block[int(name)]
        w = layer.weight.detach()
        grids[name] = rtn(w, spec, mask=w.abs() > w.abs().median(), keep_latent=True)
        with torch.no_grad():
            layer.weight.copy_(grids[name].weight)
    block.to(dtype)
    inputs = [torch.randn(4, 10, 16) for _ in range(3)]
    with torch.no_grad():
        targets = [dense(x) for x in inputs]
    return block, grids, RefitBatches(lambda b: block(inputs[b]), targets, [None, None, None])


def test_refit_quantized_block_lowers_the_error_on_the_grid() -> None:
    block, grids, batches = _quantized_block()
    before = {k: v.detach().clone() for k, v in block.state_dict().items()}
    start = output_error(batches)
    errors, tuned = refit_quantized_block(block, {"0": block[0], "2": block[2]}, grids, batches, epochs=6, lr=0.1)
    assert errors[0] == pytest.approx(start, rel=1e-6)  # the first error is the quantizer's
    assert len(errors) > 2 and all(b < a for a, b in zip(errors, errors[1:], strict=False))
    assert output_error(batches) == pytest.approx(errors[-1], rel=1e-5)  # the block holds the tuned weights
    for name in ("0", "2"):
        q = tuned[name]
        _on_grid(q)
        assert torch.equal(q.mask, grids[name].mask) and torch.equal(q.zeros, grids[name].zeros)
        assert torch.equal(block[int(name)].weight, q.weight)
        assert not torch.equal(q.weight, grids[name].weight)  # codes or scales moved
        assert torch.equal(block[int(name)].bias, before[f"{name}.bias"])  # only weights and scales are tuned
    assert not parametrize.is_parametrized(block[0]) and not parametrize.is_parametrized(block[2])
    assert all(p.grad is None and p.requires_grad for p in block.parameters())


def test_refit_quantized_block_in_bf16_and_without_a_latent() -> None:
    block, grids, batches = _quantized_block(torch.bfloat16)
    bare = {name: QuantResult(g.weight, g.scales, g.zeros, g.mask, g.spec) for name, g in grids.items()}
    errors, tuned = refit_quantized_block(block, {"0": block[0], "2": block[2]}, bare, batches, epochs=4, lr=0.3)
    assert errors[-1] < errors[0]
    assert all(p.dtype == torch.bfloat16 for p in block.parameters())
    for name, q in tuned.items():
        _on_grid(q)
        assert torch.equal(q.scales, q.scales.to(torch.bfloat16).float())
        assert torch.equal(block[int(name)].weight, q.weight.to(torch.bfloat16))


def test_refine_block_learning_rates_and_options() -> None:
    assert PruneConfig(method="sparsegpt", sparsity=0.5, refine="block").refit_lr() == REFIT_LR
    quantized = PruneConfig(method="sparsegpt", sparsity=0.5, refine="block", then="gptq", group_size=32)
    assert quantized.refit_lr() == QUANT_REFIT_LR and quantized.method_options().keep_latent
    assert not PruneConfig(method="sparsegpt", sparsity=0.5, then="gptq", group_size=32).method_options().keep_latent
    assert PruneConfig(method="gptq", refine="block", recon_lr=0.05).refit_lr() == 0.05
    assert PruneConfig(method="rtn", refine="block").uses_data  # the tuning reads calibration data
    with pytest.raises(ConfigError, match="--refine dsnot, --owl and --allocate"):
        PruneConfig(method="gptq", refine="dsnot")
    with pytest.raises(ConfigError, match="--recon-lr positive"):
        PruneConfig(method="gptq", refine="block", recon_lr=0.0)


def _calib() -> CalibrationConfig:
    return CalibrationConfig(nsamples=4, seqlen=32)


def test_quantized_run_tunes_every_block_and_saves_the_tuned_grid(
    tmp_path: Path, tiny_checkpoint: Callable[[str], Path]
) -> None:
    """SparseGPT + GPTQ with --refine block: lower block errors, zeros kept, the saved codes are the tuned ones."""
    folder = tiny_checkpoint("llama")
    options = {
        "method": "sparsegpt",
        "sparsity": 0.5,
        "then": "gptq",
        "group_size": 32,
        "calibration": _calib(),
        "batch_size": 1,
    }
    plain = oneshot.prune(str(folder), out=tmp_path / "plain", quiet=True, **options)  # type: ignore[arg-type]
    tuned = oneshot.prune(
        str(folder), out=tmp_path / "tuned", quiet=True, refine="block", recon_lr=0.1, **options,  # type: ignore[arg-type]
    )  # fmt: skip
    records = tuned.extra["block_refit"]
    assert len(records) == 3 and all(r["errors"][-1] < r["errors"][0] for r in records)
    assert tuned.achieved_sparsity >= 0.5 and plain.achieved_sparsity >= 0.5  # pruned weights stay zero
    a, b = saved_tensors(tmp_path / "plain"), saved_tensors(tmp_path / "tuned")
    assert a.keys() == b.keys()
    key = "model.layers.1.mlp.down_proj.weight_packed"
    assert not torch.equal(a[key], b[key])  # the tuning moved codes (the writer checked they restore the weights)
    recipe = (tmp_path / "tuned" / "recipe.yaml").read_text()
    assert "refine: block" in recipe


def test_quantize_only_runs_take_the_tuning(tmp_path: Path, tiny_checkpoint: Callable[[str], Path]) -> None:
    folder = tiny_checkpoint("llama")
    for method in ("gptq", "rtn"):
        report = oneshot.prune(
            str(folder), method=method, refine="block", recon_lr=0.1, group_size=32, calibration=_calib(), batch_size=1, quiet=True,
            out=tmp_path / method,
        )  # fmt: skip
        records = report.extra["block_refit"]
        assert len(records) == 3 and all(r["errors"] == sorted(r["errors"], reverse=True) for r in records)
        if method == "rtn":  # (GPTQ's 4-bit error on this tiny model's 128 tokens is already near its floor)
            assert all(r["errors"][-1] < r["errors"][0] for r in records)
        assert report.extra["quantization"]["layers"] == 21


def test_a_pass_that_changes_nothing_is_not_kept() -> None:
    """Steps too small to move a code or a bf16 scale leave the error exactly equal: no pass is recorded."""
    block, grids, batches = _quantized_block(torch.bfloat16)
    before = {k: v.clone() for k, v in block.state_dict().items()}
    errors, tuned = refit_quantized_block(block, {"0": block[0], "2": block[2]}, grids, batches, epochs=3, lr=1e-9)
    assert len(errors) == 1
    for name in ("0", "2"):
        assert torch.equal(tuned[name].weight, grids[name].weight) and torch.equal(
            tuned[name].scales, grids[name].scales
        )
    assert all(torch.equal(v, before[k]) for k, v in block.state_dict().items())


def test_a_rejected_pass_halves_the_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every step's learning rate is lr / 2^k, k the passes undone before it (wild steps get undone)."""
    seen: list[float] = []

    class Recording(torch.optim.Adam):
        def step(self, closure: None = None) -> None:  # type: ignore[override]
            seen.append(self.param_groups[0]["lr"])
            super().step()

    monkeypatch.setattr(torch.optim, "Adam", Recording)
    block, grids, batches = _quantized_block()
    errors, _ = refit_quantized_block(block, {"0": block[0], "2": block[2]}, grids, batches, epochs=5, lr=2.0)
    per_pass = seen[::3]  # three batches per pass, one rate per pass
    assert len(seen) == 15 and all(seen[i] == seen[i - i % 3] for i in range(15))
    undone = 0
    for k, lr in enumerate(per_pass):
        assert lr == 2.0 / 2**undone
        if k + 1 < len(per_pass) and per_pass[k + 1] != lr:
            undone += 1
    assert undone >= 1 and len(errors) >= 2  # some passes undone, some kept


def test_refit_defaults_and_the_quantize_only_refusals() -> None:
    """The documented defaults (1e-3 on weights, 2e-2 grid steps), one pass allowed, masks-only options refused."""
    assert PruneConfig(method="wanda", sparsity=0.5, refine="block").refit_lr() == 1e-3
    assert PruneConfig(method="gptq", refine="block").refit_lr() == 2e-2
    assert PruneConfig(method="gptq", refine="block", recon_epochs=1).recon_epochs == 1
    for options in ({"owl": True}, {"allocate": "sensitivity"}):
        with pytest.raises(ConfigError, match="act on pruning masks"):
            PruneConfig(method="gptq", **options)  # type: ignore[arg-type]
