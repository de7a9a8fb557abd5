"""Methods against oracles on random matrices."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from oneshot.errors import ConfigError, NumericalError
from oneshot.methods.magnitude import magnitude
from oneshot.methods.masks import nm_mask, unstructured_mask
from oneshot.methods.sparsegpt import sparsegpt
from oneshot.methods.wanda import wanda

Layer = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def recon_error(w: torch.Tensor, w2: torch.Tensor, x: torch.Tensor) -> float:
    return float(((w - w2) @ x.T).square().sum())


def assert_nm(weight: torch.Tensor, n: int, m: int) -> None:
    groups = (weight != 0).reshape(weight.shape[0], -1, m).sum(-1)
    assert int(groups.max()) <= n
    # random dense weights have no zeros, so each group keeps exactly n
    assert bool((groups == n).all())


def test_unstructured_mask_exact_counts() -> None:
    scores = torch.rand(7, 30)
    for s in (0.0, 0.3, 0.5, 0.9):
        row = unstructured_mask(scores, s, per_row=True)
        assert (row.sum(1) == 30 - round(30 * s)).all()
        layer = unstructured_mask(scores, s, per_row=False)
        assert int(layer.sum()) == 210 - round(210 * s)
        # removed entries are the lowest: every removed score <= every kept score (per layer)
        if s > 0:
            assert float(scores[~layer].max()) <= float(scores[layer].min())


def test_masks_break_ties_deterministically() -> None:
    scores = torch.ones(4, 8)
    keep = unstructured_mask(scores, 0.5, per_row=True)
    assert keep[:, :4].logical_not().all() and keep[:, 4:].all()


def test_nm_mask_pattern() -> None:
    scores = torch.rand(5, 16)
    keep = nm_mask(scores, 2, 4)
    grouped = keep.reshape(5, 4, 4)
    assert (grouped.sum(-1) == 2).all()
    kept_min = torch.where(grouped, scores.reshape(5, 4, 4), torch.inf).amin(-1)
    dropped_max = torch.where(~grouped, scores.reshape(5, 4, 4), -torch.inf).amax(-1)
    assert (dropped_max <= kept_min).all()
    with pytest.raises(ConfigError, match="multiple of M"):
        nm_mask(torch.rand(2, 6), 2, 4)


@pytest.mark.parametrize("nm", [None, (2, 4), (4, 8)])
def test_every_method_hits_exact_sparsity(random_layer: Layer, nm: tuple[int, int] | None) -> None:
    w, x, h = random_layer(24, 64)
    col = x.square().sum(0)
    for result in (magnitude(w, 0.5, nm=nm), wanda(w, col, 0.5, nm=nm), sparsegpt(w, h, 0.5, nm=nm, block_size=16)):
        zeros = int((result.weight == 0).sum())
        assert zeros == w.numel() // 2
        assert torch.equal(result.weight != 0, result.mask)
        if nm is not None:
            assert_nm(result.weight, *nm)
    per_row = wanda(w, col, 0.25)
    assert ((per_row.weight == 0).sum(1) == 16).all()


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_sparsegpt_beats_wanda_and_magnitude(random_layer: Layer, nm: tuple[int, int] | None) -> None:
    for seed in range(3):
        w, x, h = random_layer(32, 96, tokens=1024, seed=seed)
        col = x.square().sum(0)
        e_mag = recon_error(w, magnitude(w, 0.5, nm=nm).weight, x)
        e_wanda = recon_error(w, wanda(w, col, 0.5, nm=nm).weight, x)
        e_sgpt = recon_error(w, sparsegpt(w, h, 0.5, nm=nm, block_size=32).weight, x)
        assert e_sgpt < e_wanda
        assert e_sgpt < e_mag


def test_wanda_equals_magnitude_when_column_norms_equal(random_layer: Layer) -> None:
    w, _, _ = random_layer(16, 40)
    equal = torch.full((40,), 3.7)
    for nm in (None, (2, 4)):
        a = wanda(w, equal, 0.5, nm=nm)
        b = magnitude(w, 0.5, nm=nm, per_row=True)
        assert torch.equal(a.mask, b.mask)
        assert torch.equal(a.weight, b.weight)


def test_wanda_hand_computed() -> None:
    """Score |W_ij|·‖X_j‖₂ (Sun et al. 2023, eq. 1): the activation norm enters with power 1, not 2 or -1."""
    w = torch.tensor([[1.0, -3.0, 2.0, 0.5], [4.0, 1.0, -1.0, 2.0]])
    col_sq = torch.tensor([4.0, 1.0, 9.0, 64.0])  # ‖X_j‖ = 2, 1, 3, 8
    # scores row 0: 2, 3, 6, 4 -> drop cols 0, 1; row 1: 8, 1, 3, 16 -> drop cols 1, 2
    # (with 1/‖X‖ instead, row 0 would drop cols 3 and 0)
    got = wanda(w, col_sq, 0.5)
    assert got.mask.tolist() == [[False, False, True, True], [True, False, False, True]]
    assert torch.equal(got.weight, w * got.mask)
    # a case where the square of the norm ranks differently: |w|·‖x‖ = 3·1 = 3 vs 1·2 = 2, |w|·‖x‖² = 3 vs 4
    got = wanda(torch.tensor([[3.0, 1.0]]), torch.tensor([1.0, 4.0]), 0.5)
    assert got.mask.tolist() == [[True, False]]


def _obs_reference(
    w: torch.Tensor,
    h: torch.Tensor,
    sparsity: float,
    keep: torch.Tensor | None = None,
    nm: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Unblocked OBS with explicit inverses, float64: freeze columns left to right.

    For column j, F = {j, ..., n-1}; a pruned weight w_j is removed with the OBS update
    δw_F = -w_j / [H_F⁻¹]_00 · [H_F⁻¹]_{0,:}, at a loss of w_j² / (2 [H_F⁻¹]_00) (Hassibi & Stork).
    The mask (if not given) is chosen once, per layer, from w² / [H_F⁻¹]_00 as SparseGPT does
    within a single block; with ``nm``, at the start of every group of M columns from the *updated*
    weights (SparseGPT §3.4). Returns the weights, the mask and the total OBS loss.
    """
    w = w.double().clone()
    h = h.double()
    n = h.shape[0]
    h = h + 0.01 * torch.diagonal(h).mean() * torch.eye(n, dtype=torch.float64)
    inv_rows = [torch.linalg.inv(h[j:, j:])[0] for j in range(n)]  # row 0 of H_F⁻¹ for each j
    diag = torch.stack([r[0] for r in inv_rows])  # [n]
    if keep is None and nm is None:
        scores = w.square() / diag.unsqueeze(0)
        k = round(w.numel() * sparsity)
        order = torch.sort(scores.flatten(), stable=True).indices[:k]
        keep = torch.ones(w.numel(), dtype=torch.bool)
        keep[order] = False
        keep = keep.reshape(w.shape)
    keep = torch.ones_like(w, dtype=torch.bool) if keep is None else keep.clone()
    loss = 0.0
    for j in range(n):
        if nm is not None and j % nm[1] == 0:
            group = slice(j, j + nm[1])
            scores = w[:, group].square() / diag[group].unsqueeze(0)  # [out, m]
            drop = torch.sort(scores, dim=1, stable=True).indices[:, : nm[1] - nm[0]]
            keep[:, group] = torch.ones_like(scores, dtype=torch.bool).scatter(1, drop, False)
        pruned = ~keep[:, j]
        loss += float((w[pruned, j].square() / (2 * inv_rows[j][0])).sum())
        err = w[pruned, j] / inv_rows[j][0]  # [rows pruned]
        w[pruned, j:] -= err.unsqueeze(1) * inv_rows[j].unsqueeze(0)
    return w, keep, loss


def test_sparsegpt_equals_unblocked_obs_reference(random_layer: Layer) -> None:
    w, _, h = random_layer(12, 48, tokens=400, seed=3)
    ref_w, ref_keep, ref_loss = _obs_reference(w, h, 0.5)
    one_block = sparsegpt(w, h, 0.5, block_size=48)  # one block: mask chosen like the reference
    assert torch.equal(one_block.mask, ref_keep)
    torch.testing.assert_close(one_block.weight.double(), ref_w, atol=1e-4, rtol=1e-4)
    assert one_block.loss == pytest.approx(ref_loss, rel=1e-3)  # Σ err² / 2 over the pruned weights
    # lazy blocked updates give the same weights for the same mask, and leave the given mask alone
    given = ref_keep.clone()
    for bs in (1, 7, 16):
        blocked = sparsegpt(w, h, 0.5, block_size=bs, mask=given)
        torch.testing.assert_close(blocked.weight.double(), ref_w, atol=1e-4, rtol=1e-4)
        assert blocked.loss == pytest.approx(ref_loss, rel=1e-3)
    assert torch.equal(given, ref_keep)
    # the defaults are the paper's: 128-column blocks, damping 0.01 (a layer wider than one block)
    wide, _, wide_h = random_layer(6, 200, tokens=400, seed=4)
    default = sparsegpt(wide, wide_h, 0.5)
    assert torch.equal(default.weight, sparsegpt(wide, wide_h, 0.5, block_size=128, damp=0.01).weight)
    assert not torch.equal(default.mask, sparsegpt(wide, wide_h, 0.5, block_size=129).mask)


def test_sparsegpt_nm_mask_is_chosen_from_the_updated_weights(random_layer: Layer) -> None:
    """SparseGPT §3.4: each group of M columns is masked by w² / [U]_jj² of the weights *after* the updates."""
    w, _, h = random_layer(10, 32, tokens=400, seed=5)
    ref_w, ref_keep, ref_loss = _obs_reference(w, h, 0.5, nm=(2, 4))
    for bs in (4, 12, 32):
        got = sparsegpt(w, h, 0.5, nm=(2, 4), block_size=bs)
        assert torch.equal(got.mask, ref_keep), bs
        torch.testing.assert_close(got.weight.double(), ref_w, atol=1e-4, rtol=1e-4)
        assert got.loss == pytest.approx(ref_loss, rel=1e-3)


def test_sparsegpt_dead_inputs_are_zeroed(random_layer: Layer) -> None:
    w, x, _ = random_layer(8, 32)
    x[:, 5] = 0.0
    h = x.T @ x / x.shape[0]
    out = sparsegpt(w, h, 0.5)
    assert (out.weight[:, 5] == 0).all() and not out.mask[:, 5].any()  # zeroed and marked pruned
    assert torch.isfinite(out.weight).all()
    given = torch.ones_like(w, dtype=torch.bool)
    assert not sparsegpt(w, h, 0.5, mask=given).mask[:, 5].any()
    assert given.all()  # the caller's mask is not written into


def test_sparsegpt_raises_damping_then_fails_loudly() -> None:
    w = torch.randn(3, 2)
    h = torch.tensor([[1.0, 2.5], [2.5, 1.0]])  # indefinite: eigenvalues -1.5 and 3.5
    out = sparsegpt(w, h, 0.5, damp=0.01, max_damp_retries=4)
    assert out.info["damp"] > 1.5  # needed λ > 1.5 · mean(diag H)
    with pytest.raises(NumericalError, match="larger --damp"):
        sparsegpt(w, h, 0.5, damp=0.01, max_damp_retries=1)


def test_row_chunked_sort_gives_the_same_masks(monkeypatch: pytest.MonkeyPatch) -> None:
    import oneshot.methods.masks as masks

    gen = torch.Generator().manual_seed(3)
    scores = torch.randint(0, 5, (37, 24), generator=gen).float()  # many ties: the stable order matters
    whole = masks.unstructured_mask(scores, 0.5), masks.nm_mask(scores, 2, 4)
    monkeypatch.setattr(masks, "SORT_CHUNK", 50)  # two rows (or eight 4-groups) at a time
    chunked = masks.unstructured_mask(scores, 0.5), masks.nm_mask(scores, 2, 4)
    for a, b in zip(whole, chunked, strict=True):
        assert torch.equal(a, b)


def test_selection_gives_the_stable_sorts_masks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The k-th-value selection clears exactly what the stable sort does: ties by position, NaN last."""
    import oneshot.methods.masks as masks

    gen = torch.Generator().manual_seed(11)
    cases = []
    for seed in range(40):
        rows, cols = 1 + seed % 7, 1 + (seed * 13) % 97
        scores = torch.randint(0, 1 + seed % 5, (rows, cols), generator=gen).float()  # ties, often all equal
        if seed % 4 == 1:
            scores[0, seed % cols] = torch.inf
            scores[-1, (seed * 3) % cols] = -torch.inf
        if seed % 4 == 2:
            scores[0, (seed * 5) % cols] = torch.nan  # the sort places NaN last
        cases.append(scores)
    sparsities = (0.0, 0.01, 0.3, 0.5, 0.77, 0.999, 1.0)

    def masks_of(scores: torch.Tensor) -> list[torch.Tensor]:
        out = [masks.unstructured_mask(scores, s, per_row=p) for s in sparsities for p in (True, False)]
        return out + [masks.nm_mask(scores[:, : scores.shape[1] // 4 * 4], 2, 4)] if scores.shape[1] >= 4 else out

    monkeypatch.setattr(masks, "SELECT_FROM", 10**9)
    sorted_masks = [masks_of(s) for s in cases]
    monkeypatch.setattr(masks, "SELECT_FROM", 1)
    selected = [masks_of(s) for s in cases]
    for a, b in zip(sorted_masks, selected, strict=True):
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y)


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_selection_counts_ties_across_chunks(monkeypatch: pytest.MonkeyPatch, chunk: int) -> None:
    """The ties' running count is carried from chunk to chunk: a layer-wide row split into pieces of
    ``chunk`` columns removes the same (first by position) ties as the stable sort of the whole layer."""
    import oneshot.methods.masks as masks

    gen = torch.Generator().manual_seed(5)
    scores = torch.randint(0, 3, (9, 31), generator=gen).float()  # a third of each value: ties everywhere
    monkeypatch.setattr(masks, "SELECT_FROM", 10**9)
    expected = [masks.unstructured_mask(scores, s, per_row=p) for s in (0.2, 0.5, 0.9) for p in (True, False)]
    monkeypatch.setattr(masks, "SELECT_FROM", 1)
    monkeypatch.setattr(masks, "SORT_CHUNK", chunk)
    got = [masks.unstructured_mask(scores, s, per_row=p) for s in (0.2, 0.5, 0.9) for p in (True, False)]
    for a, b in zip(expected, got, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("select_chunk", [1, 7, 1000])
def test_a_layer_wide_selection_in_chunks_is_the_stable_sorts(
    monkeypatch: pytest.MonkeyPatch, select_chunk: int
) -> None:
    """The radix selection over chunks (a whole layer's scores, longer than SORT_CHUNK) removes exactly what
    the stable sort of the layer removes: negative values, ±0, ±inf and ties by position; NaN falls back."""
    import oneshot.methods.masks as masks

    gen = torch.Generator().manual_seed(8)
    cases = [
        torch.randint(-3, 4, (9, 31), generator=gen).float() * 0.5,  # ties everywhere, negatives, zeros
        torch.randn(7, 40, generator=gen) * 1e-30,  # tiny magnitudes: the keys' low halves decide
        torch.randn(5, 33, generator=gen).abs(),
    ]
    cases[0][0, 0], cases[0][1, 1], cases[0][2, 2] = -0.0, torch.inf, -torch.inf
    nan = torch.randn(4, 20, generator=gen)
    nan[1, 3] = torch.nan
    cases.append(nan)
    sparsities = (0.01, 0.3, 0.5, 0.77, 0.999)
    monkeypatch.setattr(masks, "SELECT_FROM", 10**9)
    want = [masks.unstructured_mask(c, s, per_row=False) for c in cases for s in sparsities]
    monkeypatch.setattr(masks, "SELECT_FROM", 1)
    monkeypatch.setattr(masks, "SORT_CHUNK", 16)  # every case is one row longer than this: the wide path
    monkeypatch.setattr(masks, "SELECT_CHUNK", select_chunk)
    got = [masks.unstructured_mask(c, s, per_row=False) for c in cases for s in sparsities]
    for a, b in zip(want, got, strict=True):
        assert torch.equal(a, b)
    row = cases[1].flatten()
    for k in (1, 17, row.numel()):
        assert masks._kth_smallest(row, k) == row.kthvalue(k).values
    close = 1.0 + torch.arange(40, dtype=torch.float32) * 1e-7  # one high-half bucket; the first is the least
    for k in (1, 2, 40):
        assert masks._kth_smallest(close, k) == close.kthvalue(k).values


@pytest.mark.parametrize("nm", [None, (2, 4), (1, 3), (2, 5), (4, 8)])
def test_sub_blocked_loop_equals_the_plain_column_loop(
    random_layer: Layer, monkeypatch: pytest.MonkeyPatch, nm: tuple[int, int] | None
) -> None:
    """Deferring updates to sub-blocks (sized to whole N:M groups) changes only the float rounding."""
    import oneshot.methods.linalg as linalg
    import oneshot.methods.sparsegpt as sgpt

    w, _, h = random_layer(out=24, inp=120, seed=9)
    monkeypatch.setattr(linalg, "INNER_COLUMNS", 10**6)  # every column updates the whole rest of its block
    plain = sgpt.sparsegpt(w, h, 0.6, nm=nm, block_size=40)
    monkeypatch.setattr(linalg, "INNER_COLUMNS", 7)  # ragged sub-blocks; N:M rounds them to whole groups
    sub = sgpt.sparsegpt(w, h, 0.6, nm=nm, block_size=40)
    assert torch.equal(plain.mask, sub.mask)
    torch.testing.assert_close(sub.weight, plain.weight, rtol=0, atol=1e-5)  # the solve runs in float32
    assert sub.loss == pytest.approx(plain.loss, rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_vectorised_block_equals_the_column_loop(random_layer: Layer, dtype: torch.dtype) -> None:
    from oneshot.methods.linalg import inverse_cholesky_upper
    from oneshot.methods.sparsegpt import loop_block, solve_block

    w, _, h = random_layer(out=24, inp=40, seed=5)
    upper, _ = inverse_cholesky_upper(h.to(dtype), 0.01, 0)
    gen = torch.Generator().manual_seed(2)
    keep = torch.rand(24, 40, generator=gen) > 0.55  # a different pattern in every row
    keep[0] = True  # a row with nothing pruned
    keep[1] = False  # and one with everything pruned
    q_loop, e_loop = loop_block(w.to(dtype), upper, keep.clone())
    q_vec, e_vec = solve_block(w.to(dtype), upper, keep)
    tol = {"atol": 1e-10, "rtol": 1e-10} if dtype == torch.float64 else {"atol": 2e-4, "rtol": 2e-4}
    torch.testing.assert_close(e_vec, e_loop, **tol)
    torch.testing.assert_close(q_vec, q_loop, **tol)
    assert torch.equal(q_vec == 0, ~keep | (w.to(dtype) == 0))
    assert torch.equal(e_vec[keep], torch.zeros_like(e_vec[keep]))


def test_vectorised_block_in_row_chunks(random_layer: Layer, monkeypatch: pytest.MonkeyPatch) -> None:
    import oneshot.methods.sparsegpt as sg

    w, _, h = random_layer(out=20, inp=32, seed=6)
    looped = sg.sparsegpt(w, h, 0.5, block_size=16)
    whole = sg.sparsegpt(w, h, 0.5, block_size=16, vectorised=True)
    monkeypatch.setattr(sg, "SOLVE_ROWS_ELEMENTS", 3 * 16 * 16)  # three rows at a time
    chunked = sg.sparsegpt(w, h, 0.5, block_size=16, vectorised=True)
    for result in (whole, chunked):
        torch.testing.assert_close(result.weight, looped.weight, atol=1e-5, rtol=1e-5)
        assert torch.equal(result.mask, looped.mask) and result.loss == pytest.approx(looped.loss, rel=1e-4)


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_stacked_sparsegpt_equals_each_layer_alone(random_layer: Layer, nm: tuple[int, int] | None) -> None:
    """q/k/v-like layers sharing one Hessian: one stacked solve, each layer's mask and weights as if alone."""
    from oneshot.methods.sparsegpt import sparsegpt_stacked

    _, _, h = random_layer(8, 64)
    weights = [random_layer(rows, 64, seed=s)[0] for rows, s in ((24, 1), (8, 2), (40, 3))]
    sparsities = [0.5, 0.3, 0.7] if nm is None else [0.5, 0.5, 0.5]
    stacked = sparsegpt_stacked(weights, h, sparsities, nm=nm, block_size=32)
    for w, s, got in zip(weights, sparsities, stacked, strict=True):
        alone = sparsegpt(w, h, s, nm=nm, block_size=32)
        assert torch.equal(got.mask, alone.mask)
        torch.testing.assert_close(got.weight, alone.weight, atol=1e-5, rtol=1e-4)
        assert int((~got.mask).sum()) == int((~alone.mask).sum())  # each layer's own exact sparsity
        assert got.info["damp"] == alone.info["damp"]


def test_stacked_obs_equals_each_layer_alone(random_layer: Layer) -> None:
    from oneshot.methods.base import LayerStats, MethodOptions
    from oneshot.methods.obs import SPEC as OBS

    _, _, h = random_layer(8, 24)
    weights = [random_layer(rows, 24, seed=s)[0] for rows, s in ((6, 1), (4, 2))]
    assert OBS.run is not None and OBS.run_stacked is not None
    for sparsities in ([0.5, 0.5], [0.5, 0.25]):
        stacked = OBS.run_stacked(weights, LayerStats(hessian=h), sparsities, MethodOptions())
        for w, s, got in zip(weights, sparsities, stacked, strict=True):
            alone = OBS.run(w, LayerStats(hessian=h), s, MethodOptions())
            assert torch.equal(got.mask, alone.mask)
            torch.testing.assert_close(got.weight, alone.weight, atol=1e-5, rtol=1e-4)


def test_all_finite_finds_any_nan_or_inf() -> None:
    from oneshot.methods.linalg import all_finite

    assert all_finite(torch.empty(0)) and all_finite(torch.zeros(3, 4)) and all_finite(torch.tensor([2.5]))
    for bad in (float("nan"), float("inf"), float("-inf")):
        assert not all_finite(torch.tensor([bad]))  # a single element too
        for where in (0, 5, 11):
            x = torch.arange(12, dtype=torch.float32).reshape(3, 4)
            x.view(-1)[where] = bad  # only the minimum or only the maximum is non-finite
            assert not all_finite(x) and not all_finite(x.bfloat16())


def test_a_failed_second_factorisation_raises_the_damping(monkeypatch: pytest.MonkeyPatch) -> None:
    """H⁻¹'s upper Cholesky reporting failure (info ≠ 0) is a failure even when its output is finite."""
    from oneshot.methods.linalg import inverse_cholesky_upper

    real = torch.linalg.cholesky_ex
    calls: list[bool] = []

    def flaky(a: torch.Tensor, *, upper: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        factor, info = real(a, upper=upper)
        calls.append(upper)
        if upper and calls.count(True) == 1:  # the first upper factorisation "fails", its output finite
            return factor, torch.ones_like(info)
        return factor, info

    monkeypatch.setattr(torch.linalg, "cholesky_ex", flaky)
    _, rel = inverse_cholesky_upper(torch.eye(6) * 2.0, 0.01, 2)
    assert rel == pytest.approx(0.1) and calls == [False, True, False, True]
