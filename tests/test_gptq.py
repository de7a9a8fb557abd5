"""GPTQ: the grid by hand, RTN under an identity Hessian, an unblocked reference, the joint sparse solve."""

from __future__ import annotations

import pytest
import torch

from oneshot.errors import ConfigError
from oneshot.methods.gptq import gptq, grid, quantize, rtn
from oneshot.methods.linalg import inverse_cholesky_upper
from oneshot.methods.quantspec import QuantSpec


def test_grid_hand_computed() -> None:
    x = torch.tensor([[-1.0, 0.5, 2.0]])
    asym = QuantSpec(bits=2, group_size=None, symmetric=False)  # range [−1, 2]: scale 1, zero 1
    scale, zero = grid(x, asym)
    assert (scale.item(), zero.item()) == (1.0, 1.0)
    assert quantize(x, scale, zero, asym.maxq).tolist() == [[-1.0, 0.0, 2.0]]  # 0.5 rounds half to even
    sym = QuantSpec(bits=2, group_size=None)  # ±2: scale 4/3, zero 2; 2/scale = 1.5 -> 2 -> code 4, clamped to 3
    scale, zero = grid(x, sym)
    assert scale.item() == pytest.approx(4 / 3) and zero.item() == 2.0
    torch.testing.assert_close(quantize(x, scale, zero, sym.maxq), torch.tensor([[-4 / 3, 0.0, 4 / 3]]))
    # a positive-only row still contains 0; an all-zero row gets [−1, 1]
    scale, zero = grid(torch.tensor([[1.0, 3.0], [0.0, 0.0]]), QuantSpec(bits=2, group_size=None, symmetric=False))
    assert scale[:, 0].tolist() == pytest.approx([1.0, 2 / 3]) and zero[:, 0].tolist() == [0.0, 2.0]
    with pytest.raises(ConfigError, match="--bits must be"):
        QuantSpec(bits=5)
    with pytest.raises(ConfigError, match="--group-size must be positive"):
        QuantSpec(group_size=0)
    assert QuantSpec() == QuantSpec(bits=4, group_size=128, symmetric=True, act_order=False)
    assert QuantSpec(bits=8).maxq == 255 and QuantSpec(group_size=1).group_size == 1
    # symmetric: the larger side sets the range, negative or positive, and a row without negatives is ±max too
    scale, zero = grid(torch.tensor([[-3.0, 1.0], [1.0, 3.0]]), QuantSpec(bits=2, group_size=None))
    assert scale[:, 0].tolist() == [2.0, 2.0] and zero[:, 0].tolist() == [2.0, 2.0]


def _mse_reference(x: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The GPTQ reference quantizer's ``find_params(mse=True)``, row by row, written plainly."""
    maxq = 2**bits - 1
    scales, zeros = [], []
    for row in x:
        lo, hi = min(float(row.min()), 0.0), max(float(row.max()), 0.0)
        if symmetric:
            hi = max(abs(lo), hi)
            lo = -hi
        if lo == hi == 0:
            lo, hi = -1.0, 1.0
        best, choice = float("inf"), (0.0, 0.0)
        for i in range(80):  # maxshrink 0.8, grid 100
            p = 1 - i / 100
            scale = torch.tensor((p * hi - p * lo) / maxq, dtype=torch.float32)
            zero = torch.tensor((maxq + 1) / 2) if symmetric else torch.round(-p * lo / scale)
            q = scale * (torch.clamp(torch.round(row / scale) + zero, 0, maxq) - zero)
            err = float((q - row).abs().pow(2.4).sum())
            if err < best:
                best, choice = err, (float(scale), float(zero))
        scales.append(choice[0])
        zeros.append(choice[1])
    return torch.tensor(scales).unsqueeze(1), torch.tensor(zeros).unsqueeze(1)


@pytest.mark.parametrize(("bits", "symmetric"), [(4, True), (3, False), (2, True)])
def test_mse_observer_equals_the_reference_search(bits: int, symmetric: bool) -> None:
    gen = torch.Generator().manual_seed(bits)
    x = torch.randn(16, 64, generator=gen) * torch.rand(16, 1, generator=gen)
    x[0, 3] = 9.0  # an outlier
    x[1] = 0.0  # an all-zero row
    spec = QuantSpec(bits=bits, group_size=None, symmetric=symmetric, observer="mse")
    scale, zero = grid(x, spec)
    want_scale, want_zero = _mse_reference(x, bits, symmetric)
    torch.testing.assert_close(scale, want_scale, rtol=1e-6, atol=0)
    assert torch.equal(zero, want_zero)
    minmax = QuantSpec(bits=bits, group_size=None, symmetric=symmetric)
    s0, z0 = grid(x, minmax)
    assert bool((scale <= s0).all()) and int((scale < s0).sum()) >= 8  # never wider, most rows narrower
    err = (quantize(x, scale, zero, spec.maxq) - x).abs().pow(2.4).sum(dim=1)
    err0 = (quantize(x, s0, z0, spec.maxq) - x).abs().pow(2.4).sum(dim=1)
    assert bool((err <= err0).all()) and float(err.sum()) < float(err0.sum())
    assert bool((quantize(torch.zeros(16, 1), scale, zero, spec.maxq) == 0).all())  # 0 stays exactly 0
    with pytest.raises(ConfigError, match="--observer must be"):
        QuantSpec(observer="percentile")


def test_mse_observer_in_rtn_and_gptq() -> None:
    w, h = _problem(rows=24, cols=64)
    minmax, mse = QuantSpec(bits=3, group_size=32), QuantSpec(bits=3, group_size=32, observer="mse")
    a, b = rtn(w, minmax), rtn(w, mse)
    assert not torch.equal(a.scales, b.scales) and bool((b.scales <= a.scales).all())
    assert float((b.weight - w).square().sum()) < float((a.weight - w).square().sum())  # finer steps, few clipped
    a, b = gptq(w.clone(), h, minmax), gptq(w.clone(), h, mse)
    # the first group's grid is set from the original weights (later ones from the updated weights)
    assert bool((b.scales[:, 0] <= a.scales[:, 0]).all()) and not torch.equal(a.scales[:, 0], b.scales[:, 0])
    assert b.loss < a.loss  # on this problem the searched grids also cost GPTQ less output error
    scale, zero = b.expand()  # every weight on its (searched) grid
    torch.testing.assert_close(b.weight, quantize(b.weight, scale, zero, mse.maxq))


def _problem(rows: int = 12, cols: int = 48, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen)
    x = torch.randn(256, cols, generator=gen) @ (torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=gen))
    return w, x.T @ x / 256


@pytest.mark.parametrize("group", [None, 16])
def test_identity_hessian_is_round_to_nearest(group: int | None) -> None:
    w, _ = _problem()
    spec = QuantSpec(bits=3, group_size=group, symmetric=False)
    got, want = gptq(w, torch.eye(w.shape[1]), spec, block_size=16), rtn(w, spec)
    torch.testing.assert_close(got.weight, want.weight)
    assert torch.equal(got.codes(), want.codes())
    # the OBS loss Σ err²/2 with err = (w − q)/U_jj, U_jj = 1/√(1 + 0.01) under the damped identity
    assert got.loss == pytest.approx(float((w - got.weight).square().sum()) * 1.01 / 2, rel=1e-4)
    groups = 1 if group is None else 3  # 48 columns
    assert got.scales.shape == want.scales.shape == got.zeros.shape == (12, groups)


def _unblocked(
    w: torch.Tensor,
    h: torch.Tensor,
    spec: QuantSpec,
    keep: torch.Tensor,
    order: torch.Tensor | None = None,
    scales: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """GPTQ written out column by column, every update applied at once (no lazy blocks).

    With ``order`` (act-order) the columns are visited in that order and each group's grid is
    taken from the weights before any update (static groups).
    """
    w = w.double().clone()
    size = spec.group_size or w.shape[1]
    grids = {}
    if order is not None:
        for c0 in range(0, w.shape[1], size):
            grids[c0 // size] = grid(w[:, c0 : c0 + size] * keep[:, c0 : c0 + size], spec)
        h = h[order][:, order]
    visit = order if order is not None else torch.arange(w.shape[1])
    upper, _ = inverse_cholesky_upper(h.double(), 0.01, 0)
    for j, c in enumerate(visit.tolist()):
        if order is None and c % size == 0:
            grids[c // size] = grid((w[:, c : c + size] * keep[:, c : c + size]), spec)
            if scales is not None:
                scales.append(grids[c // size][0][:, 0].float())
        scale, zero = grids[c // size]
        q = quantize(w[:, c : c + 1] * keep[:, c : c + 1], scale, zero, spec.maxq)[:, 0]
        err = (w[:, c] - q) / upper[j, j]
        w[:, visit[j:]] -= err.unsqueeze(1) * upper[j, j:].unsqueeze(0)
        w[:, c] = q
    return w.float()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_group_straddling_two_blocks_sees_the_updates_of_the_first(seed: int) -> None:
    """Groups of 12 columns on lazy blocks of 8: the group at column 12 starts inside a block and ends
    in the next, whose columns have not yet received the block's updates; its grid must still come
    from the updated weights (the unblocked reference's, in float64)."""
    w, h = _problem()
    keep = torch.rand(w.shape, generator=torch.Generator().manual_seed(seed)) > 0.5
    spec = QuantSpec(bits=4, group_size=12)
    want: list[torch.Tensor] = []
    _unblocked(w, h, spec, keep, scales=want)
    got = gptq(w, h, spec, block_size=8, mask=keep).scales  # [out, groups]
    same = ((got - torch.stack(want, dim=1)).abs() / got).lt(1e-4).float()
    assert float(same.mean()) >= 0.95, same.mean(dim=0)  # stale columns: ~15% of the grids would match


@pytest.mark.parametrize(
    ("group", "symmetric", "pruned"),
    [(None, True, False), (16, False, False), (16, True, True), (4, False, False)],
)  # groups wider than the block (16) and inside one (4)
def test_gptq_equals_the_unblocked_reference(group: int | None, symmetric: bool, pruned: bool) -> None:
    w, h = _problem()
    spec = QuantSpec(bits=4, group_size=group, symmetric=symmetric)
    keep = (
        torch.rand(w.shape, generator=torch.Generator().manual_seed(3)) > 0.5 if pruned else torch.ones_like(w).bool()
    )
    got = gptq(w, h, spec, block_size=8, mask=keep if pruned else None)
    want = _unblocked(w, h, spec, keep)
    agree = float((got.weight - want).abs().lt(1e-4).float().mean())
    assert agree >= 0.99, agree  # blocked and unblocked round the same, bar float-order ties

    # better than rounding in the Hessian norm tr((W−Q) H (W−Q)ᵀ)
    def loss(q: torch.Tensor) -> float:
        d = w - q
        return float((d @ h * d).sum())

    if not pruned:
        assert loss(got.weight) < 0.8 * loss(rtn(w, spec).weight)


def test_joint_sparse_quantized_solve() -> None:
    w, h = _problem(seed=1)
    keep = torch.rand(w.shape, generator=torch.Generator().manual_seed(2)) > 0.5
    spec = QuantSpec(bits=4, group_size=16, symmetric=False)
    got = gptq(w, h, spec, mask=keep, block_size=16)
    assert torch.equal(got.weight[~keep], torch.zeros(int((~keep).sum())))  # pruned: exactly zero
    codes = got.codes()
    assert int(codes.min()) >= 0 and int(codes.max()) <= spec.maxq
    scale, zero = got.expand()
    torch.testing.assert_close(got.weight, scale * (codes - zero))  # every kept weight on its grid
    assert torch.equal(got.mask, keep)


@pytest.mark.parametrize("pruned", [False, True])
def test_act_order_visits_by_hessian_diagonal_with_static_groups(pruned: bool) -> None:
    """act_order = the unblocked reference visiting columns by decreasing H_jj, groups fixed up front."""
    w, h = _problem(seed=4)
    spec = QuantSpec(bits=4, group_size=16, act_order=True)
    keep = torch.rand(w.shape, generator=torch.Generator().manual_seed(6)) > 0.4
    keep = keep if pruned else torch.ones_like(keep)
    got = gptq(w, h, spec, block_size=8, mask=keep)
    order = torch.argsort(torch.diagonal(h), descending=True, stable=True)
    assert not torch.equal(order, torch.arange(48))  # the order really differs
    want = _unblocked(w, h, spec, keep, order)
    agree = float((got.weight - want).abs().lt(1e-4).float().mean())
    assert agree >= 0.99, agree
    # the groups are the layer's consecutive columns, each grid from the weights before any update
    for g in range(3):
        scale, zero = grid(w[:, 16 * g : 16 * g + 16] * keep[:, 16 * g : 16 * g + 16], spec)
        assert torch.equal(got.scales[:, g], scale[:, 0]) and torch.equal(got.zeros[:, g], zero[:, 0])
    scale, zero = got.expand()
    torch.testing.assert_close(got.weight, scale * (got.codes() - zero))
    assert torch.equal(got.weight[~keep], torch.zeros(int((~keep).sum())))
    plain = gptq(w, h, QuantSpec(bits=4, group_size=16), block_size=8, mask=keep)
    assert not torch.allclose(plain.weight, got.weight)


def test_scales_are_exact_in_their_saved_dtype() -> None:
    """With ``scale_dtype=bfloat16`` every scale is a bf16 number and the weights sit on that grid."""
    w, h = _problem(seed=7)
    spec = QuantSpec(bits=4, group_size=16, scale_dtype=torch.bfloat16)
    for got in (gptq(w, h, spec, block_size=16), rtn(w, spec)):
        assert torch.equal(got.scales, got.scales.to(torch.bfloat16).float())
        scale, zero = got.expand()
        assert torch.equal(got.weight, scale * (got.codes() - zero).float())
    fine = gptq(w, h, QuantSpec(bits=4, group_size=16), block_size=16)
    assert not torch.equal(fine.scales, fine.scales.to(torch.bfloat16).float())  # float32 scales are not rounded
    tiny = grid(torch.full((1, 4), 1e-9), QuantSpec(bits=4, group_size=None, scale_dtype=torch.float16))[0]
    assert tiny.item() == torch.finfo(torch.float16).tiny  # never rounded to a zero scale


def test_dead_inputs_and_the_callers_mask() -> None:
    """A column never activated (H_jj = 0) is zeroed and marked pruned; the caller's mask is left alone."""
    w, h = _problem(seed=5)
    h[:, 3] = 0.0
    h[3, :] = 0.0
    keep = torch.ones_like(w, dtype=torch.bool)
    got = gptq(w, h, QuantSpec(bits=4, group_size=16), mask=keep, block_size=16)
    assert keep.all()  # not written through
    assert not got.mask[:, 3].any() and torch.equal(got.weight[:, 3], torch.zeros(w.shape[0]))
    import inspect

    from oneshot.methods.sparsegpt import sparsegpt

    defaults = {k: v.default for k, v in inspect.signature(gptq).parameters.items()}
    same = inspect.signature(sparsegpt).parameters
    assert all(defaults[k] == same[k].default for k in ("block_size", "damp", "max_damp_retries"))


def test_rtn_with_a_mask_sets_the_grid_from_the_kept_weights() -> None:
    """Pruned weights stay exactly zero and do not widen the grid; the caller's mask is kept, not aliased."""
    w = torch.tensor([[10.0, 1.0, -2.0, 0.5]])
    keep = torch.tensor([[False, True, True, True]])
    spec = QuantSpec(bits=2, group_size=None, symmetric=False)  # kept range [−2, 1]: scale 1, zero 2
    got = rtn(w, spec, mask=keep)
    assert got.weight.tolist() == [[0.0, 1.0, -2.0, 0.0]]  # 0.5 rounds half to even
    assert (got.scales.item(), got.zeros.item()) == (1.0, 2.0)
    assert torch.equal(got.mask, keep) and got.mask is not keep
    assert torch.equal(rtn(w, spec).mask, torch.ones_like(keep))


@pytest.mark.parametrize(("group", "act_order"), [(None, False), (12, False), (12, True)])
def test_sub_blocked_loop_equals_the_plain_column_loop(
    monkeypatch: pytest.MonkeyPatch, group: int | None, act_order: bool
) -> None:
    """Deferring updates to sub-blocks (which start on every group's first column) changes only rounding."""
    import oneshot.methods.linalg as linalg

    w, h = _problem(seed=4)
    spec = QuantSpec(bits=4, group_size=group, symmetric=False, act_order=act_order)
    monkeypatch.setattr(linalg, "INNER_COLUMNS", 10**6)  # every column updates the whole rest of its block
    plain = gptq(w, h, spec, block_size=24)
    monkeypatch.setattr(linalg, "INNER_COLUMNS", 8)  # 8 does not divide the groups of 12: sub-blocks of 4
    sub = gptq(w, h, spec, block_size=24)
    assert torch.equal(plain.codes(), sub.codes())
    torch.testing.assert_close(sub.scales, plain.scales, rtol=0, atol=1e-6)
    torch.testing.assert_close(sub.weight, plain.weight, rtol=0, atol=1e-5)
