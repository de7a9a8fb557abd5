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


def _reference_wanda(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, sparsity: float) -> None:
    """Step by step, with the model's own forward: prune block i from inputs that ran through pruned blocks < i.

    Statistics are fp32 sums of squares over the real (unpadded) tokens only, Wanda's score is
    |W_ij| · ‖X_j‖₂ with ‖X_j‖₂ = sqrt(Σ_t x_tj²) (Sun et al. 2023, eq. 1), compared within each row.
    """
    _, blocks = find_blocks(model)
    real = mask.bool()
    for block in blocks:
        linears = find_linears(block)
        sq: dict[str, torch.Tensor] = {}

        def hook(name: str, sq: dict[str, torch.Tensor]) -> Callable[[nn.Module, tuple[torch.Tensor, ...]], None]:
            def gather(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
                rows = inputs[0][real].double()  # [tokens, d]
                sq[name] = sq.get(name, 0) + (rows * rows).sum(0)

            return gather

        handles = [m.register_forward_pre_hook(hook(n, sq)) for n, m in linears.items()]
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
        for h in handles:
            h.remove()
        for name, module in linears.items():
            w = module.weight.data
            score = w.abs().double() * sq[name].sqrt()  # [out, in]
            k = int(round(w.shape[1] * sparsity))
            drop = torch.sort(score, dim=1, stable=True).indices[:, :k]
            module.weight.data = w.scatter(1, drop, 0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_engine_equals_a_step_by_step_reference(tiny_model: Callable[[str], nn.Module], dtype: torch.dtype) -> None:
    """The engine calibrates each block on the pruned blocks' outputs, with each batch's own padding mask."""
    model = tiny_model("llama").to(dtype)
    reference = tiny_model("llama").to(dtype)
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(4, VOCAB, (6, 20), generator=gen)
    mask = torch.ones_like(ids)
    for row, length in enumerate([20, 12, 20, 7, 15, 20]):  # every batch of 2 padded differently
        mask[row, length:] = 0
    config = PruneConfig(method="wanda", sparsity=0.5, batch_size=2, quiet=True)
    prune_sequential(model, CalibrationSet(ids, mask), config)
    _reference_wanda(reference, ids, mask, 0.5)
    got, want = model.state_dict(), reference.state_dict()
    for key in want:
        if key.endswith("proj.weight"):
            agree = float(((got[key] == 0) == (want[key] == 0)).float().mean())
            assert agree >= (1.0 if dtype == torch.float32 else 0.99), (key, agree)
