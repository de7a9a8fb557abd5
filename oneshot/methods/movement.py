"""Movement: prune the weights that shrank most while fine-tuning, ``S = |W_fine| − |W_base|``.

From a base / fine-tuned pair (the project's seeds; the zeroth-order form of Sanh et al.'s movement
pruning, 2020): a weight whose magnitude fell during fine-tuning is taken to matter least for the
fine-tuned task, one that grew to matter most. Scores are compared over the whole layer; N:M groups
within rows. Needs no calibration data, only the base checkpoint (``--base``).
"""

from __future__ import annotations

import torch

from oneshot.methods.base import LayerStats, MethodOptions, MethodSpec, PruneResult
from oneshot.methods.masks import select_mask
from oneshot.options import Knob


def movement(
    weight: torch.Tensor, base: torch.Tensor, sparsity: float, *, nm: tuple[int, int] | None = None
) -> PruneResult:
    """Prune fine-tuned ``weight`` ``[out, in]`` by ``|W| − |W_base|`` (``base`` ``[out, in]``)."""
    scores = weight.abs() - base.abs()
    mask = select_mask(scores, sparsity, nm, per_row=False)
    return PruneResult(weight=weight * mask, mask=mask)


def _run(w: torch.Tensor, stats: LayerStats, sparsity: float, opt: MethodOptions) -> PruneResult:
    if stats.reference is None:
        raise RuntimeError("movement needs the base model's weight of the layer but was not given one")
    return movement(w, stats.reference, sparsity, nm=opt.nm)


BASE = Knob(
    "base",
    None,
    "Movement: the base checkpoint folder the model was fine-tuned from (safetensors); score |W| − |W_base|.",
    type=str,
)

SPEC = MethodSpec(
    "movement",
    _run,
    (),
    "|W| − |W_base|: drop what shrank while fine-tuning (needs --base)",
    reference=True,
    knobs=(BASE,),
)
