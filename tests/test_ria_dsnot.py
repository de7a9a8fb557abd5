"""RIA and DSnoT: hand-computed cases, a loop reference, exact counts, and the engine's use of them."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from conftest import VOCAB
from torch import nn

import oneshot
from oneshot.calibration.data import CalibrationSet
from oneshot.errors import ConfigError
from oneshot.methods.dsnot import dsnot, expected_shift
from oneshot.methods.masks import nm_mask, unstructured_mask
from oneshot.methods.ria import ria, ria_scores

# |W| rows sum to 4, 4, 8 and every column to 4
W = torch.tensor([[1.0, -2.0, 0.0, 1.0], [2.0, 0.0, -2.0, 0.0], [-1.0, 2.0, 2.0, -3.0]])
COL_SQ = torch.tensor([4.0, 9.0, 16.0, 1.0])  # ‖X_j‖ = 2, 3, 4, 1


def test_ria_score_hand_computed() -> None:
    """RI = |W|/row sum + |W|/column sum (Zhang et al. 2024, eq. 4), times ‖X_j‖^a."""
    relative = torch.tensor([[0.5, 1.0, 0.0, 0.5], [1.0, 0.0, 1.0, 0.0], [0.375, 0.75, 0.75, 1.125]])
    assert torch.equal(ria_scores(W, COL_SQ, alpha=1.0), relative * torch.tensor([2.0, 3.0, 4.0, 1.0]))
    root = torch.tensor([2.0, 3.0, 4.0, 1.0]).sqrt()
    torch.testing.assert_close(ria_scores(W, COL_SQ), relative * root)  # a = 0.5 by default
    # scores at a = 1: [[1, 3, 0, .5], [2, 0, 4, 0], [.75, 2.25, 3, 1.125]]; the 6 lowest of the layer go
    layer = ria(W, COL_SQ, 0.5, alpha=1.0)
    assert layer.mask.tolist() == [[False, True, False, False], [True, False, True, False], [False, True, True, True]]
    assert torch.equal(layer.weight, W * layer.mask)
    row = ria(W, COL_SQ, 0.5, alpha=1.0, per_row=True)  # two of each row go
    assert row.mask.tolist() == [[True, True, False, False], [True, False, True, False], [False, True, True, False]]
    # 2:4 within rows; a zero column or row scores 0, never NaN
    assert ria(W, COL_SQ, 0.5, nm=(2, 4), alpha=1.0).mask.tolist() == row.mask.tolist()
    zeros = ria_scores(torch.zeros(2, 3), torch.ones(3))
    assert torch.equal(zeros, torch.zeros(2, 3))


def _data(out: int = 24, inp: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A random layer and inputs with a clear per-feature mean (where DSnoT has something to fix)."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out, inp, generator=gen)
    x = torch.randn(512, inp, generator=gen) * torch.rand(inp, generator=gen) + torch.randn(inp, generator=gen)
    return weight, x.double()


def _stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return x.mean(0).float(), x.var(0, unbiased=False).float(), x.square().sum(0).float()


def _loop_reference(
    weight: torch.Tensor, keep: torch.Tensor, x: torch.Tensor, nm: tuple[int, int] | None, cycles: int, thr: float
) -> torch.Tensor:
    """DSnoT row by row with plain Python loops (the rules of the module docstring, written out)."""
    mean, var, col = (t.double() for t in _stats(x))
    w = weight.double()
    keep = keep.clone()
    for i in range(w.shape[0]):
        c = [float(w[i, j] * mean[j]) for j in range(w.shape[1])]
        score = [abs(float(w[i, j])) * float(col[j].sqrt()) for j in range(w.shape[1])]
        e = sum(c[j] for j in range(w.shape[1]) if not keep[i, j])
        touched: set[int] = set()
        for _ in range(cycles):
            if abs(e) <= thr:
                break
            pruned = [j for j in range(w.shape[1]) if not keep[i, j] and j not in touched]
            if not pruned:
                break
            key = {j: c[j] / float(var[j]) for j in pruned}
            grow = max(pruned, key=lambda j: (key[j], -j)) if e > 0 else min(pruned, key=lambda j: (key[j], j))
            if nm is None:
                kept = [
                    j
                    for j in range(w.shape[1])
                    if keep[i, j] and j not in touched and (c[j] < 0 if e > 0 else c[j] > 0)
                ]
            else:
                g = grow // nm[1]
                kept = [j for j in range(g * nm[1], (g + 1) * nm[1]) if keep[i, j] and j not in touched]
            if not kept:
                break
            prune = min(kept, key=lambda j: (score[j], j))
            after = e + c[prune] - c[grow]
            if not abs(after) < abs(e):
                break
            keep[i, grow], keep[i, prune] = True, False
            touched |= {grow, prune}
            e = after
    return keep


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_dsnot_equals_a_loop_reference_and_keeps_counts(nm: tuple[int, int] | None) -> None:
    weight, x = _data()
    mean, var, col = _stats(x)
    wanda_score = weight.abs() * col.sqrt()
    keep = nm_mask(wanda_score, *nm) if nm else unstructured_mask(wanda_score, 0.6, per_row=True)
    got = dsnot(weight, keep, mean, var, col, nm=nm, max_cycles=20, threshold=1e-3)
    want = _loop_reference(weight, keep, x, nm, 20, 1e-3)
    assert torch.equal(got.mask, want)
    assert got.info["dsnot_swaps"] > 0 and not torch.equal(got.mask, keep)
    assert torch.equal(got.mask.sum(1), keep.sum(1))  # every row keeps its count
    if nm:
        assert (got.mask.reshape(weight.shape[0], -1, nm[1]).sum(-1) == nm[0]).all()
    assert torch.equal(got.weight, weight * got.mask)


def test_dsnot_never_raises_a_rows_error_and_lowers_the_output_error() -> None:
    for seed in range(5):
        weight, x = _data(seed=seed)
        mean, var, col = _stats(x)
        keep = unstructured_mask(weight.abs() * col.sqrt(), 0.7, per_row=True)
        got = dsnot(weight, keep, mean, var, col, threshold=0.0)
        w64 = weight.double()
        before = expected_shift(w64, keep, x.mean(0)).abs()
        after = expected_shift(w64, got.mask, x.mean(0)).abs()
        assert (after <= before + 1e-9).all(), seed
        assert after.sum() < 0.5 * before.sum()
        # the real squared output error over the tokens falls too (the mean shift dominates here)
        error = ((x @ (w64 * ~keep).T) ** 2).sum()
        refined = ((x @ (w64 * ~got.mask).T) ** 2).sum()
        assert refined < error, seed


def test_dsnot_hand_case() -> None:
    """One row: E[x] = 1 everywhere, var 1. Pruned {0: +3, 1: +1}; kept {2: −2, 3: +5}: e = 4.

    Growth revives the largest c/var (weight 0, c = 3); pruning removes the kept weight with a
    negative contribution (weight 2, c = −2): e = 4 − 3 − 2 = −1, |−1| < 4, so the swap is made.
    Next cycle e < 0: revive the smallest c/var of the untouched pruned (weight 1, +1): nothing
    negative is left to revive, and the only untouched kept weight (3, +5) would give −1 + 5 − 1 = 3,
    not smaller in size: the row stops.
    """
    weight = torch.tensor([[3.0, 1.0, -2.0, 5.0]])
    keep = torch.tensor([[False, False, True, True]])
    ones = torch.ones(4)
    got = dsnot(weight, keep, ones, ones, ones, threshold=0.0)
    assert got.mask.tolist() == [[True, False, False, True]]
    assert got.info == {"dsnot_swaps": 1.0, "dsnot_cycles": 2.0}
    stopped = dsnot(weight, keep, ones, ones, ones, threshold=4.0)  # |e| = 4 is not above the threshold
    assert torch.equal(stopped.mask, keep)
    assert dsnot(weight, keep, ones, ones, ones, threshold=0.0, max_cycles=1).info["dsnot_cycles"] == 1.0
    # after the swap |e| = 1: a threshold of exactly 1 stops the row there (one cycle, not two)
    assert dsnot(weight, keep, ones, ones, ones, threshold=1.0).info == {"dsnot_swaps": 1.0, "dsnot_cycles": 1.0}


def test_dsnot_growth_prefers_low_variance() -> None:
    """Two pruned weights with the same contribution: the one on the steadier input is revived."""
    weight = torch.tensor([[2.0, 2.0, -1.0, -1.0, 4.0]])
    keep = torch.tensor([[False, False, True, True, True]])
    mean = torch.ones(5)
    var = torch.tensor([4.0, 1.0, 1.0, 1.0, 1.0])
    col = torch.tensor([1.0, 1.0, 4.0, 1.0, 1.0])  # weight 3 has the lower Wanda score of the negative kept
    got = dsnot(weight, keep, mean, var, col, threshold=0.0, max_cycles=1)
    assert got.mask.tolist() == [[False, True, True, False, True]]


def test_engine_runs_ria_and_dsnot(tiny_model: Callable[[str], nn.Module]) -> None:
    ids = torch.randint(4, VOCAB, (8, 24), generator=torch.Generator().manual_seed(2))
    model = tiny_model("llama")
    q = model.model.layers[0].self_attn.q_proj
    seen: list[torch.Tensor] = []
    handle = q.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    dense = q.weight.detach().clone()
    oneshot.prune(model, method="ria", sparsity=0.5, calibration=CalibrationSet(ids), quiet=True)
    col = seen[0].double().square().sum(0).float()
    torch.testing.assert_close(q.weight.detach(), ria(dense, col, 0.5).weight)

    plain = tiny_model("llama")
    oneshot.prune(plain, method="wanda", sparsity=0.7, calibration=CalibrationSet(ids), quiet=True)
    for layers, refined_kinds in (("attention", {"self_attn"}), ("mlp", {"mlp"}), ("all", {"self_attn", "mlp"})):
        refined = tiny_model("llama")
        report = oneshot.prune(
            refined, method="wanda", sparsity=0.7, refine="dsnot", dsnot_layers=layers, calibration=CalibrationSet(ids)
        )
        changed: set[str] = set()
        for (name, a), b in zip(plain.named_parameters(), refined.parameters(), strict=True):
            if name.endswith("proj.weight"):
                assert int((a == 0).sum()) == int((b == 0).sum()), name
                if name.startswith("model.layers.0.") and not torch.equal(a == 0, b == 0):
                    changed.add(name.split(".")[3])
        # block 0: its attention reads the same input either way, so only refined kinds change there
        # (its MLP reads the refined attention's output, so an MLP mask may move without being refined)
        assert "self_attn" not in changed if layers == "mlp" else "self_attn" in changed, layers
        swapped = {r["name"].split(".")[3] for r in report.to_dict()["layers"] if r["dsnot_swaps"] is not None}
        assert swapped == refined_kinds, layers  # the reference's default leaves the MLP's masks alone


def test_refine_options_are_checked(tiny_model: Callable[[str], nn.Module]) -> None:
    with pytest.raises(
        ConfigError, match=r"\(magnitude, wanda, ria, fisher, movement\), not sparsegpt.*use --refine block"
    ):
        oneshot.PruneConfig(method="sparsegpt", sparsity=0.5, refine="dsnot")
    with pytest.raises(ConfigError, match="--dsnot-cycles only matters with --refine dsnot"):
        oneshot.PruneConfig(method="wanda", sparsity=0.5, dsnot_cycles=3)
    with pytest.raises(ConfigError, match="--dsnot-cycles only matters with --refine dsnot"):
        oneshot.PruneConfig(method="wanda", sparsity=0.5, refine="block", dsnot_cycles=3)
    with pytest.raises(ConfigError, match="--refine must be one of dsnot, block"):
        oneshot.PruneConfig(method="wanda", sparsity=0.5, refine="admm")
    with pytest.raises(ConfigError, match="--refine does not apply to --method structured"):
        oneshot.PruneConfig(method="structured", ratio=0.5, refine="block")
    with pytest.raises(ConfigError, match="--compare does not apply to --method wanda"):
        oneshot.PruneConfig(method="wanda", sparsity=0.5, compare="row")
    with pytest.raises(ConfigError, match="--dsnot-cycles must be at least 1"):
        oneshot.PruneConfig(method="wanda", sparsity=0.5, refine="dsnot", dsnot_cycles=0)
    # magnitude with a refinement reads data: the calibration is recorded and used
    config = oneshot.PruneConfig(method="magnitude", sparsity=0.5, refine="dsnot")
    assert config.uses_data and config.stat_needs() == ("meanvar", "col_sq_norm")
    assert not oneshot.PruneConfig(method="magnitude", sparsity=0.5).uses_data


def test_dsnot_removes_only_opposite_contributions() -> None:
    """e = 3 > 0: revive weight 0 (+3); of the kept, only a negative contribution may go (weight 2, −1),
    not the zero one (weight 1: W = 0, lowest score), although removing it would leave e = 0."""
    weight = torch.tensor([[3.0, 0.0, -1.0, 4.0]])
    keep = torch.tensor([[False, True, True, True]])
    ones = torch.ones(4)
    got = dsnot(weight, keep, ones, ones, ones, threshold=0.0, max_cycles=1)
    assert got.mask.tolist() == [[True, True, False, True]]
    # mirrored: e = −3 < 0 removes only a positive contribution
    got = dsnot(-weight, keep, ones, ones, ones, threshold=0.0, max_cycles=1)
    assert got.mask.tolist() == [[True, True, False, True]]


def test_dsnot_defaults_are_the_configs() -> None:
    """The function's defaults are the documented run defaults (50 cycles, threshold 5e-5)."""
    import inspect

    params = inspect.signature(dsnot).parameters
    config = oneshot.PruneConfig(method="wanda", sparsity=0.5)
    assert params["max_cycles"].default == config.dsnot_cycles == 50
    assert params["threshold"].default == config.dsnot_threshold == 5e-5


def test_dsnot_refuses_a_swap_that_does_not_lower_the_error() -> None:
    """e = 2: reviving weight 0 (+2) and removing weight 1 (−2) would leave e = −2, no smaller: refused."""
    weight = torch.tensor([[2.0, -2.0, 5.0]])
    keep = torch.tensor([[False, True, True]])
    ones = torch.ones(3)
    got = dsnot(weight, keep, ones, ones, ones, threshold=0.0)
    assert torch.equal(got.mask, keep) and got.info["dsnot_swaps"] == 0.0


def test_attention_layers_are_told_apart_by_name() -> None:
    from oneshot.layers import is_attention

    attention = ["model.layers.0.self_attn.q_proj", "encoder.layer.1.attention.output.dense", "h.0.attn.c_attn"]
    mlp = ["model.layers.0.mlp.down_proj", "encoder.layer.1.output.dense", "encoder.layer.1.intermediate.dense"]
    assert all(is_attention(n) for n in attention) and not any(is_attention(n) for n in mlp)
    assert not is_attention("model.decoder.layers.3.fc1")
