"""The layer-by-layer driver reproduces each family's own forward when nothing is pruned."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from conftest import FAMILIES, VOCAB
from torch import nn

from oneshot.calibration.data import CalibrationSet
from oneshot.config import PruneConfig
from oneshot.layers import find_blocks, find_linears
from oneshot.methods.base import MethodSpec, PruneResult
from oneshot.passes.unstructured import prune_sequential

NOOP = MethodSpec("noop", lambda w, s, sp, o: PruneResult(w, torch.ones_like(w, dtype=torch.bool)), (), "")


def _reference_block_outputs(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None) -> list[torch.Tensor]:
    _, blocks = find_blocks(model)
    outs: list[torch.Tensor] = []

    def hook(module: nn.Module, args: object, out: object) -> None:
        outs.append((out[0] if isinstance(out, tuple) else out).detach().clone())  # type: ignore[index]

    handles = [b.register_forward_hook(hook) for b in blocks]
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    finally:
        for h in handles:
            h.remove()
    return outs


@pytest.mark.parametrize("family", FAMILIES)
def test_noop_sweep_matches_model_forward(family: str, tiny_model: Callable[[str], nn.Module]) -> None:
    model = tiny_model(family)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(4, VOCAB, (6, 24), generator=gen)
    mask = None
    if family == "bert":  # padded batch: padding must not change real positions
        mask = torch.ones_like(ids)
        mask[0, 18:] = 0
        mask[3, 10:] = 0
    calib = CalibrationSet(ids, mask)
    seen: dict[int, torch.Tensor] = {}
    config = PruneConfig(method="wanda", sparsity=0.0, batch_size=4, quiet=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    prune_sequential(model, calib, config, method=NOOP, observer=lambda i, hs: seen.__setitem__(i, torch.cat(hs)))

    ref = _reference_block_outputs(model, ids, mask)
    assert len(seen) == len(ref) == len(find_blocks(model)[1])
    for i, expected in enumerate(ref):
        torch.testing.assert_close(seen[i], expected, atol=1e-5, rtol=1e-5, msg=f"{family} block {i}")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("family", FAMILIES)
def test_finds_blocks_and_linears(family: str, tiny_model: Callable[[str], nn.Module]) -> None:
    model = tiny_model(family)
    name, blocks = find_blocks(model)
    assert len(blocks) == model.config.num_hidden_layers
    linears = find_linears(blocks[0])
    assert len(linears) >= 4  # attention projections + MLP
    assert not any("embed" in n or "lm_head" in n for n in linears)
