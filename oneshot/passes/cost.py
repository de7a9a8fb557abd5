"""The measured cost model behind ``--passes auto`` on several ranks.

A single pass forwards each block once and prunes every layer inside that forward, so with
several ranks every rank solves every layer (the solves cannot wait for an owner). Two passes
forward each block twice (statistics, then propagation) but spread the layer solves over the
ranks. Per block, with ``F`` one block's forward over a rank's share of the samples, ``S`` all
of the block's solves and ``W`` ranks::

    single ≈ F + S          two ≈ 2 F + S / W

so two passes pay once ``S (1 - 1/W) > F``: solve-heavy methods (SparseGPT, OBS, GPTQ) on
several ranks, not Wanda or magnitude. ``F`` and ``S`` are measured on the run's device before
the sweep: ``S`` by timing the method (and a ``--then`` quantizer) on one layer of each distinct
shape of the first block, with random weights and statistics of those shapes; ``F`` from the
block's linear multiply-adds (and its Hessians' ``X Xᵀ``) at the rate a matrix product of the
block's largest layer reaches on that device. Attention's own products and the communication of
the solved weights are left out: both favour the single pass slightly, and neither is large
next to the layers' products at the sequence lengths calibration uses.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from oneshot.config import PruneConfig
from oneshot.engine import STAT_HESSIAN, block_linears
from oneshot.layers import find_blocks, input_width, output_width, weight_dtype
from oneshot.methods.base import LayerStats, MethodSpec
from oneshot.methods.gptq import quantize_stage

#: Rows of the activation matrix the product rate is measured with (fewer when the run has fewer tokens).
RATE_ROWS = 2048


@dataclass(frozen=True)
class BlockCosts:
    """Seconds per block of the two sweep modes on ``world`` ranks, from a measured forward and solve."""

    forward: float  # one block's forward over one rank's share of the calibration tokens
    solves: float  # all of one block's layer solves, one after the other
    world: int

    @property
    def single(self) -> float:
        """One forward, every layer solved on every rank."""
        return self.forward + self.solves

    @property
    def two(self) -> float:
        """Two forwards, each layer solved by one owner rank (the solves spread evenly)."""
        return 2 * self.forward + self.solves / self.world

    def best(self) -> str:
        """``single`` or ``two``: the cheaper estimate (ties: single, the one forward)."""
        return "two" if self.two < self.single else "single"

    def as_dict(self) -> dict[str, float | int | str]:
        """The report's ``passes_cost``."""
        return {
            "world_size": self.world,
            "forward_seconds": round(self.forward, 4),
            "solve_seconds": round(self.solves, 4),
            "single_seconds_per_block": round(self.single, 4),
            "two_seconds_per_block": round(self.two, 4),
            "chosen": self.best(),
        }

    def reason(self) -> str:
        """One line for the log and the report's ``passes_reason``."""
        return (
            f"{self.world} ranks: a block's forward of each rank's samples ~{self.forward:.3g} s, its solves "
            f"~{self.solves:.3g} s (measured on this device): single pass ~{self.single:.3g} s per block, two "
            f"passes ~{self.two:.3g} s (solves spread over the ranks): {self.best()}"
        )


def measure_block_costs(
    model: nn.Module, config: PruneConfig, spec: MethodSpec, tokens: int, world: int, device: torch.device
) -> BlockCosts:
    """:class:`BlockCosts` of ``model``'s first block for ``tokens`` calibration tokens per rank.

    Shapes and dtype come from the block's layers (their weights may be on the meta device, as
    in a streaming run); the timed tensors are random, made on ``device``.
    """
    blocks_name, blocks = find_blocks(model)
    linears = block_linears(blocks_name, 0, blocks[0], config)
    if not linears:
        return BlockCosts(0.0, 0.0, world)
    dtype = weight_dtype(next(iter(linears.values())))
    shapes = Counter((output_width(m), input_width(m)) for m in linears.values())
    inputs = {input_width(m) for m in linears.values()}  # one Hessian per distinct input (a rough count)
    rate = matmul_rate(max(shapes, key=lambda s: s[0] * s[1]), min(tokens, RATE_ROWS), dtype, device)
    madds = sum(count * out * width for (out, width), count in shapes.items()) * tokens
    if STAT_HESSIAN in config.stat_needs():
        madds += sum(width * width for width in inputs) * tokens
    solves = sum(count * solve_seconds(spec, config, shape, tokens, dtype, device) for shape, count in shapes.items())
    return BlockCosts(forward=2 * madds / rate, solves=solves, world=world)


def matmul_rate(shape: tuple[int, int], rows: int, dtype: torch.dtype, device: torch.device) -> float:
    """Floating-point operations per second of ``[rows, in] @ [in, out]`` in ``dtype`` on ``device``."""
    out, width = shape
    gen = _generator(device)
    x = torch.randn(max(1, rows), width, generator=gen, device=device, dtype=dtype)
    w = torch.randn(out, width, generator=gen, device=device, dtype=dtype)
    x @ w.T  # warm-up: kernel selection, first-touch pages
    repeats, t0 = 0, time.perf_counter()
    while repeats < 3 or time.perf_counter() - t0 < 0.05:
        x @ w.T
        repeats += 1
    _sync(device)
    seconds = max(time.perf_counter() - t0, 1e-9)
    return 2.0 * x.shape[0] * width * out * repeats / seconds


def solve_seconds(
    spec: MethodSpec, config: PruneConfig, shape: tuple[int, int], tokens: int, dtype: torch.dtype, device: torch.device
) -> float:
    """Seconds of ``spec`` (then ``config.then``'s quantizer) on one random ``[out, in]`` layer."""
    assert spec.run is not None
    out, width = shape
    gen = _generator(device)
    weight = torch.randn(out, width, generator=gen, device=device, dtype=dtype)
    basis = torch.randn(width, 64, generator=gen, device=device)
    hessian = basis @ basis.T / 64 + torch.eye(width, device=device)  # positive definite, as X Xᵀ / n
    stats = LayerStats(
        hessian=hessian,
        col_sq_norm=torch.diagonal(hessian).clone() * tokens,
        count=tokens,
        mean=torch.zeros(width, device=device),
        var=torch.ones(width, device=device),
        reference=weight * 0.9 if spec.reference else None,  # [out, in] each: only for the methods that read them
        grad_sq=torch.rand(out, width, generator=gen, device=device) if spec.gradients else None,
    )
    target = float(config.sparsity or 0.0)
    _sync(device)
    t0 = time.perf_counter()
    pruned = spec.run(weight, stats, target, config.method_options())
    if config.then is not None:
        quantize_stage(pruned, stats, config.method_options("then"), config.then)
    _sync(device)
    return time.perf_counter() - t0


def _generator(device: torch.device) -> torch.Generator:
    """A seeded generator on ``device``: the probe's tensors are drawn where they are timed, in their
    own dtype (a 7B model's largest layer drawn in float32 on the host and then moved would add a
    gigabyte of host memory to the run's peak for a moment)."""
    return torch.Generator(device=device).manual_seed(0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
