"""Exact OBS against a brute-force greedy least-squares oracle, and against SparseGPT."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from oneshot.methods.obs import damped_inverse, obs, obs_rows, rows_per_batch
from oneshot.methods.sparsegpt import sparsegpt

Layer = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def _ls_fit(w: torch.Tensor, h: torch.Tensor, support: list[int]) -> tuple[torch.Tensor, float]:
    """Best row supported on ``support``: min (w - v)ᵀ H (w - v), solved directly."""
    v = torch.zeros_like(w)
    if support:
        s = torch.tensor(support)
        v[s] = torch.linalg.solve(h[s][:, s], h[s] @ w)
    d = w - v
    return v, float(d @ h @ d)


def _brute_force_greedy(w: torch.Tensor, h: torch.Tensor, k: int) -> tuple[list[int], torch.Tensor]:
    """Remove k weights one at a time, each time the one whose removal (re-solved exactly) costs least."""
    support = list(range(w.numel()))
    order = []
    for _ in range(k):
        losses = [_ls_fit(w, h, [j for j in support if j != q])[1] for q in support]
        q = support[min(range(len(support)), key=lambda i: losses[i])]
        order.append(q)
        support.remove(q)
    return order, _ls_fit(w, h, support)[0]


def test_obs_matches_brute_force_greedy(random_layer: Layer) -> None:
    w, _, h = random_layer(6, 10, tokens=200, seed=5)
    w, h = w.double(), h.double()
    hinv, _ = damped_inverse(h, 0.01, 0)
    damped = torch.linalg.inv(hinv)
    pruned, order = obs_rows(w, hinv, 6)
    for r in range(6):
        ref_order, ref_w = _brute_force_greedy(w[r], damped, 6)
        assert order[r].tolist() == ref_order, f"row {r}"
        torch.testing.assert_close(pruned[r], ref_w, atol=1e-8, rtol=1e-6)


def test_obs_nm_greedy_respects_groups(random_layer: Layer) -> None:
    w, _, h = random_layer(5, 16, seed=2)
    out = obs(w, h, 0.5, nm=(2, 4))
    assert ((out.weight != 0).reshape(5, 4, 4).sum(-1) == 2).all()
    assert torch.equal(out.mask, out.weight != 0)


def test_obs_exact_row_counts_and_batching(random_layer: Layer) -> None:
    w, _, h = random_layer(9, 20, seed=1)
    full = obs(w, h, 0.6)
    assert ((full.weight == 0).sum(1) == 12).all()
    tiny_budget = obs(w, h, 0.6, memory_budget=12 * 20 * 4 * 2)  # two rows per batch
    assert rows_per_batch(20, 12, 12 * 20 * 4 * 2) == 2
    torch.testing.assert_close(tiny_budget.weight, full.weight)


@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_obs_error_at_most_sparsegpt(random_layer: Layer, sparsity: float) -> None:
    gaps = []
    for seed in range(4):
        w, x, h = random_layer(16, 48, tokens=600, seed=seed)
        e_obs = float(((w - obs(w, h, sparsity).weight) @ x.T).square().sum())
        e_sgpt = float(((w - sparsegpt(w, h, sparsity, block_size=16).weight) @ x.T).square().sum())
        gaps.append(e_sgpt - e_obs)
    assert sum(gaps) / len(gaps) >= 0.0
