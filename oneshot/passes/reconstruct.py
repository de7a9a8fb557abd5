"""Block-output reconstruction (``--refine block``): refit a pruned block's kept weights to the dense block.

After a block's masks are chosen (by any unstructured method), its kept linear weights are trained
with Adam so the pruned block's outputs match the dense block's outputs on the same calibration
inputs: the loss is ``Σ ‖f_pruned(x) − f_dense(x)‖² / Σ ‖f_dense(x)‖²`` over the real (unpadded)
tokens, in the spirit of the local block reconstruction of ALPS (Meng et al. 2024) and of
BRECQ-style block fitting. Masks are fixed: a pruned weight stays exactly zero. The block is
refit in float32 (a bf16 block is cast for the refit and cast back), one Adam step per calibration
batch, ``epochs`` passes. After every pass the whole calibration error is measured again; a pass
that does not lower it is undone and the learning rate halved, so the recorded errors never rise.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from oneshot.engine import RefitBatches
from oneshot.gradients import gradients_only_for


@dataclass(frozen=True)
class RefitRecord:
    """One block's refit: relative output error before it, then after each accepted pass."""

    block: int
    errors: list[float]
    seconds: float


@contextlib.contextmanager
def in_float32(block: nn.Module) -> Iterator[None]:
    """Hold ``block`` in float32 inside the ``with`` (what :class:`RefitBatches` runs in), then cast it back.

    bf16 / fp16 values are exact in float32, so a block whose weights are not changed comes back
    bit for bit.
    """
    dtype = next(block.parameters()).dtype
    block.float()
    try:
        yield
    finally:
        block.to(dtype)


def _squared(diff: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Sum of squares of ``diff`` ``[B, T, d]`` over the real tokens (``mask`` ``[B, T]``, None = all)."""
    if mask is not None and diff.dim() == 3 and mask.shape == diff.shape[:2]:
        diff = diff[mask.to(diff.device).bool()]
    return diff.float().square().sum()


def output_error(batches: RefitBatches) -> float:
    """The block's relative output error ``Σ‖f(x) − target‖² / Σ‖target‖²`` over every batch."""
    num, den = output_error_sums(batches)
    return num / max(den, 1e-30)


def output_error_sums(batches: RefitBatches) -> tuple[float, float]:
    """``(Σ‖f(x) − target‖², Σ‖target‖²)`` over the real tokens of every batch."""
    num = den = 0.0
    with torch.no_grad():
        for b, target in enumerate(batches.targets):
            out = batches.run(b)
            target = target.to(out.device, torch.float32)
            num += float(_squared(out - target, batches.token_masks[b]))
            den += float(_squared(target, batches.token_masks[b]))
    return num, den


def refit_block(
    block: nn.Module, linears: dict[str, nn.Module], batches: RefitBatches, *, epochs: int, lr: float
) -> list[float]:
    """Refit the kept weights of ``linears`` (masks = their nonzeros now) in place; returns the errors.

    ``errors[0]`` is the error before the refit, then one entry per accepted pass (each lower than
    the one before). Other parameters of the block (norms, biases) are left as they are.
    """
    weights: list[torch.Tensor] = [module.weight for module in linears.values()]  # type: ignore[misc]
    keep = [w.detach() != 0 for w in weights]
    with in_float32(block), gradients_only_for(block, weights, clear=True):
        denominator = sum(
            float(_squared(t.float(), m)) for t, m in zip(batches.targets, batches.token_masks, strict=True)
        )
        optimizer = torch.optim.Adam(weights, lr=lr)
        errors = [output_error(batches)]
        best = [w.detach().clone() for w in weights]
        for _ in range(epochs):
            for b, target in enumerate(batches.targets):
                optimizer.zero_grad(set_to_none=True)
                out = batches.run(b)
                loss = _squared(out - target.to(out.device, torch.float32), batches.token_masks[b]) / denominator
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    for w, k in zip(weights, keep, strict=True):
                        w.mul_(k)
            error = output_error(batches)
            if error < errors[-1]:
                errors.append(error)
                best = [w.detach().clone() for w in weights]
            else:  # undo the pass, take smaller steps
                with torch.no_grad():
                    for w, saved in zip(weights, best, strict=True):
                        w.copy_(saved)
                for group in optimizer.param_groups:
                    group["lr"] /= 2
        return errors


@dataclass
class BlockRefitter:
    """The sweep's ``refit`` callback for ``--refine block``; collects one record per block."""

    epochs: int
    lr: float
    records: list[RefitRecord]

    def __call__(self, i: int, block: nn.Module, linears: dict[str, nn.Module], batches: RefitBatches) -> None:
        """Refit block ``i`` and record its errors."""
        t0 = time.perf_counter()
        errors = refit_block(block, linears, batches, epochs=self.epochs, lr=self.lr)
        self.records.append(RefitRecord(i, errors, time.perf_counter() - t0))
