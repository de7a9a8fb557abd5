"""Variance-based structured pruning with bias compensation: the pure tensor functions.

A unit (an MLP neuron, an attention head) feeds channels ``j`` of the next projection ``W_out``.
If unit j's activation barely varies over the calibration data, replacing it by its mean ``μ_j``
changes the output by ``W_out[:, j] (x_j − μ_j)``, whose expected squared norm is
``Var(x_j) · ‖W_out[:, j]‖²`` (the "fluctuation" score of FLAP: An et al., "Fluctuation-based
Adaptive Structured Pruning for LLMs", AAAI 2024, §3.1). Removing the unit and adding
``W_out[:, j] · μ_j`` to the next bias keeps the output's mean exactly (bias compensation).
"""

from __future__ import annotations

import torch

from oneshot.methods.base import STAT_MEANVAR, MethodSpec
from oneshot.options import Knob

SCORES = ("fluctuation", "variance", "magnitude")
#: How experts are scored for removal (``--target experts``): REAP (Lasby et al. 2025) or routing frequency.
EXPERT_SCORES = ("reap", "frequency")

RATIO = Knob("ratio", None, "Share of units to remove in every block.", type=float)
SCORE = Knob(
    "score",
    "fluctuation",
    "Unit score: fluctuation (Var(x)·‖W_out col‖², FLAP), variance, or magnitude (‖W_out col‖², data-free). "
    "With --target experts: reap (the default: the mean over the tokens routed to an expert of its routing "
    "weight times the norm of its output) or frequency (the tokens routed to it).",
    choices=SCORES + EXPERT_SCORES,
)
BIAS_COMPENSATION = Knob("bias_compensation", True, "Fold the removed units' mean into the next bias.")
TARGET = Knob(
    "target",
    "mlp",
    "Remove MLP neurons, attention heads (LLaMA-style configs), both, or the routed experts of every "
    "mixture-of-experts layer.",
    choices=("mlp", "attention", "both", "experts"),
)


def channel_scores(var: torch.Tensor, w_out: torch.Tensor, score: str) -> torch.Tensor:
    """Per input channel of ``w_out`` ``[out, d]``: how much removing it (mean-replaced) costs.

    ``fluctuation`` = Var(x_j)·‖W_:,j‖², ``variance`` = Var(x_j), ``magnitude`` = ‖W_:,j‖²
    (a data-free baseline). ``var`` is ``[d]``.
    """
    col_sq = w_out.float().square().sum(dim=0)  # [d]
    if score == "fluctuation":
        return var.float() * col_sq
    if score == "variance":
        return var.float().clone()
    if score == "magnitude":
        return col_sq
    raise ValueError(f"unknown structured score {score!r}; choose one of {', '.join(SCORES)}")


def expert_scores(counts: torch.Tensor, saliency: torch.Tensor, score: str) -> torch.Tensor:
    """Per expert: ``reap`` = ``Σ g·‖y‖ / n`` over its ``n`` routed tokens (0 for an expert never routed),
    ``frequency`` = ``n`` (``counts`` / ``saliency`` ``[E]``: tokens and summed ``g·‖y‖``)."""
    if score == "frequency":
        return counts.double()
    if score == "reap":
        return saliency.double() / counts.double().clamp(min=1)
    raise ValueError(f"unknown expert score {score!r}; choose one of {', '.join(EXPERT_SCORES)}")


def unit_scores(channel: torch.Tensor, width: int) -> torch.Tensor:
    """Sum channel scores over units of ``width`` consecutive channels (1 = neurons, head_dim = heads)."""
    return channel.reshape(-1, width).sum(dim=1)  # [units]


def lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Sorted indices of the ``count`` lowest scores (ties: lower index first)."""
    order = torch.sort(scores, stable=True).indices[:count]
    return torch.sort(order).values


def lowest_per_group(scores: torch.Tensor, groups: int, count: int) -> torch.Tensor:
    """Remove ``count`` lowest units inside each of ``groups`` equal consecutive groups (GQA heads)."""
    per = scores.numel() // groups
    picked = [lowest(scores[g * per : (g + 1) * per], count) + g * per for g in range(groups)]
    return torch.cat(picked)


def compensation(w_out: torch.Tensor, mean: torch.Tensor, removed_channels: torch.Tensor) -> torch.Tensor:
    """Bias change ``Σ_{j removed} W_out[:, j] μ_j`` (``[out]``) that keeps the output's mean."""
    if removed_channels.numel() == 0:
        return torch.zeros(w_out.shape[0], dtype=torch.float32, device=w_out.device)
    return w_out.float()[:, removed_channels] @ mean.float()[removed_channels]  # [out]


def channels_of(units: torch.Tensor, width: int) -> torch.Tensor:
    """Channel indices covered by ``units`` of ``width`` channels each."""
    return (units.unsqueeze(1) * width + torch.arange(width, device=units.device)).flatten()


def keep_index(total: int, removed: torch.Tensor) -> torch.Tensor:
    """Sorted indices in ``range(total)`` not in ``removed``."""
    keep = torch.ones(total, dtype=torch.bool)
    keep[removed.cpu()] = False
    return torch.nonzero(keep).flatten()


SPEC = MethodSpec(
    "structured",
    None,
    (STAT_MEANVAR,),
    "removes whole MLP neurons / attention heads by fluctuation, folds their mean into the bias",
    structured=True,
    knobs=(RATIO, SCORE, BIAS_COMPENSATION, TARGET),
)
