"""Gradients of a checkpoint that is never whole in memory: a backward pass streamed block by block.

The empirical Fisher (``E[g²]`` of each weight, one sample's loss at a time) and the block-output
gradients of ``--allocate-error fisher`` need a backward through the whole model. Streamed:

1. **Forward.** Every block's call arguments are captured (one sample per batch); each block is
   loaded in turn, its input on every sample saved to the scratch folder, its output computed
   (no graph) and the block freed.
2. **Loss.** The output head is loaded; the model runs on each sample with every block replaced by
   a pass-through that returns the last block's saved output (with ``requires_grad``), so the
   model's own head and loss (:func:`oneshot.gradients.own_loss`) give ``∂L/∂y`` of the last block.
3. **Backward.** From the last block down, each block is loaded again and, per sample, its forward
   recomputed from the saved input with gradients: ``autograd.grad`` gives its weights' gradient
   (squared and summed over samples) and its input's, which is the next block down's ``∂L/∂y``.
   Each block's ``E[g²]`` goes to a file; its saved inputs are deleted.

Memory: one block, its activations and their gradients (one block's worth each), as in the forward
sweep; disk: every block's inputs (``samples x tokens x hidden x blocks`` in the model's dtype) at
the peak, freed block by block on the way down. The chain rule per sample is the in-memory
backward's: the results equal :func:`oneshot.gradients.empirical_fisher`'s up to float rounding.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from oneshot.activations import DiskStore
from oneshot.calibration.data import CalibrationSet
from oneshot.capture import CapturedInputs
from oneshot.config import PruneConfig
from oneshot.distributed import Ranks
from oneshot.engine import SweepIO, blocks_home, capture_calls, move_outside, resolve_device
from oneshot.errors import ModelError
from oneshot.gradients import add_square, gradients_only_for, layer_means, own_loss
from oneshot.layers import find_blocks, weight_leaves
from oneshot.memory import heap_reused
from oneshot.passes.reconstruct import in_float32

log = logging.getLogger(__name__)

#: The half-precision dtypes a CPU computes in float32 (:func:`backward_dtype`).
HALF = (torch.bfloat16, torch.float16)


@runtime_checkable
class HeadSource(Protocol):
    """A block source that can also materialise the model's output head (a streamed checkpoint)."""

    def load(self, index: int, block: nn.Module) -> None:
        """Make block ``index``'s weights real."""

    def unload(self, index: int, block: nn.Module) -> None:
        """Free block ``index``'s weights."""

    def load_head(self, model: nn.Module) -> None:
        """Make the output head's weights real."""

    def unload_head(self, model: nn.Module) -> None:
        """Free the output head's weights."""


class BlockFiles(Mapping[str, torch.Tensor]):
    """``E[g²]`` by layer name, read from one file per block when a layer of that block is asked for.

    Only the last block read is kept in memory (the sweep asks for the layers block by block).
    """

    def __init__(self, folder: Path, blocks_name: str, names: list[str]) -> None:
        self.folder = folder
        self.prefix = f"{blocks_name}."
        self.names = names
        self._block: int | None = None
        self._tensors: dict[str, torch.Tensor] = {}

    def path(self, index: int) -> Path:
        """The file of block ``index``'s layers."""
        return self.folder / f"grad_sq-{index}.safetensors"

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.names:
            raise KeyError(name)
        index = int(name.removeprefix(self.prefix).split(".", 1)[0])
        if index != self._block:
            self._tensors, self._block = load_file(str(self.path(index))), index
        return self._tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


@dataclass
class StreamedGradients:
    """What a streamed backward measured."""

    grad_sq: BlockFiles  # each layer's E[g²], float32 [out, in]
    block_output_sq: list[float]  # per block, the mean over real tokens of ‖∂L/∂y‖² (y: the block's output)
    forward_seconds: float = 0.0  # the first forward (every block's inputs saved); the rest is the backward
    head_seconds: float = 0.0  # of the backward, the loss head's (∂L/∂y of the last block, per sample)


def streamed_gradients(
    model: nn.Module,
    calib: CalibrationSet,
    config: PruneConfig,
    layers: Mapping[str, nn.Module],
    io: SweepIO | None,
    *,
    ranks: Ranks | None = None,
) -> StreamedGradients | None:
    """:func:`streamed_backward` for a streamed model (in ``io.scratch / "backward"``); None for a model in memory."""
    if not any(p.device.type == "meta" for p in model.parameters()):
        return None
    if io is None or io.scratch is None or not isinstance(io.source, HeadSource):
        raise RuntimeError("a streamed model's gradients need its streaming source and a scratch folder")
    return streamed_backward(model, calib, config, layers, io.source, io.scratch / "backward", ranks=ranks)


def streamed_backward(
    model: nn.Module,
    calib: CalibrationSet,
    config: PruneConfig,
    layers: Mapping[str, nn.Module],
    source: HeadSource,
    folder: Path,
    *,
    ranks: Ranks | None = None,
) -> StreamedGradients:
    """The empirical Fisher of ``layers`` and the block-output gradients, streaming ``model``'s blocks.

    ``source`` loads the blocks and the head; ``folder`` (made anew) keeps the saved activations
    and the per-block results (read back through :attr:`StreamedGradients.grad_sq`). With ``ranks``
    ``calib`` is this rank's share: the sums and counts are all-reduced.
    """
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    device = resolve_device(config.device)
    blocks_name, blocks = find_blocks(model)
    home = blocks_home(blocks)
    dtype = next(p.dtype for p in blocks[0].parameters() if p.is_floating_point())
    compute = backward_dtype(dtype, device)
    io = SweepIO(source=source, store=DiskStore(folder, dtype))
    t0 = time.perf_counter()
    try:
        captured, store = capture_calls(model, blocks, calib, config, io, 1)  # block 0 stays loaded
        hidden = {b: store.get(b) for b in range(len(store))}
        for i in tqdm(range(len(blocks)), desc="fisher forward", unit="block", disable=config.quiet or None):
            with computed_in(blocks[i], compute):  # the weights read in the computing dtype, freed in it
                if i:
                    source.load(i, blocks[i])
                block = blocks[i].to(device)
                save_file({str(b): h.contiguous() for b, h in hidden.items()}, str(_inputs(folder, i)))
                with torch.no_grad(), heap_reused():
                    hidden = {
                        b: captured.calls[b][i].run(block, h, device, compute).to("cpu", dtype)
                        for b, h in hidden.items()
                    }
                block.to(home)
                source.unload(i, block)
        forward = time.perf_counter() - t0
        samples = calib.batches(1)  # as the capture ran them: each sample's padding cut off
        t1 = time.perf_counter()
        grads = _head_gradients(model, blocks, samples, captured, hidden, source, (device, compute))
        head = time.perf_counter() - t1
        files = BlockFiles(folder, blocks_name, list(layers))
        sums = _backward(
            blocks, blocks_name, layers, captured, grads, samples, files, source, (device, compute), home, config, ranks
        )
    finally:
        move_outside(model, blocks, home)
    return StreamedGradients(files, sums, forward, head)


def backward_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype | None:
    """What the streamed forward and backward compute a block in: float32 for a half-precision block
    on the CPU, else (None) the block's own dtype.

    CPUs without native bf16 / fp16 matrix instructions run those products through slow paths, the
    backward's products above all: on the project's 2-core CPU one LLaMA block of width 1024 on 128
    tokens ran its forward 4x and its forward and backward 42x slower in bf16 than in float32, and a
    32000-token output head's backward as slowly. Each block, and the head for the loss, is cast for
    the computation and back (bf16 / fp16 values are exact in float32); what is held for every sample
    (the saved inputs, the gradients handed down) stays in the block's dtype, so the CPU holds no more
    than a GPU run would. A GPU computes in the block's dtype.
    """
    return torch.float32 if device.type == "cpu" and dtype in HALF else None


def computed_in(block: nn.Module, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[None]:
    """``block`` held in float32 inside the ``with`` when ``dtype`` says so (:func:`backward_dtype`).

    Entered while the block is on the meta device and left after it is freed again, the casts cost
    nothing: the shards' tensors are read into float32 parameters (one conversion, as a cast would
    be) and nothing is cast back.
    """
    return in_float32(block) if dtype == torch.float32 else contextlib.nullcontext()


def _inputs(folder: Path, index: int) -> Path:
    return folder / f"inputs-{index}.safetensors"


def _head_gradients(
    model: nn.Module,
    blocks: nn.ModuleList,
    samples: list[tuple[torch.Tensor, torch.Tensor | None]],
    captured: CapturedInputs,
    final: dict[int, torch.Tensor],
    source: HeadSource,
    where: tuple[torch.device, torch.dtype | None],
) -> dict[int, torch.Tensor]:
    """Per sample, ``∂L/∂y`` of the last block's output ``y`` (the model's own head and loss), the head
    computed in ``where``'s dtype (:func:`backward_dtype`)."""
    device, compute = where
    source.load_head(model)
    head: Any = getattr(model, "get_output_embeddings", lambda: None)()
    if isinstance(head, nn.Module) and any(p.device.type == "meta" for p in head.parameters()):
        source.unload_head(model)
        raise ModelError(f"the checkpoint has no weights for {type(model).__name__}'s output head: no loss to take")
    move_outside(model, blocks, device)
    grads: dict[int, torch.Tensor] = {}
    try:
        with _head_in(model, blocks, compute):
            for b, y in final.items():
                leaf = y.to(device, compute).requires_grad_(True)
                ids, mask = (None if t is None else t.to(device) for t in samples[b])
                assert ids is not None
                with _blocks_replaced(blocks, captured, leaf), torch.enable_grad():
                    (grads[b],) = torch.autograd.grad(own_loss(model, ids, mask), [leaf])
                grads[b] = grads[b].detach().to("cpu", y.dtype)  # held for every sample: the model's dtype
    finally:
        source.unload_head(model)
    return grads


@contextlib.contextmanager
def _head_in(model: nn.Module, blocks: nn.ModuleList, dtype: torch.dtype | None) -> Iterator[None]:
    """The real half-precision parameters outside ``blocks`` (the output head, the final norm) held in
    ``dtype`` inside the ``with``; not the input embeddings' unless they are the head's (tied): the
    loss is not differentiated through them. None: nothing is cast."""
    if dtype is None:
        yield
        return
    skip = {id(p) for p in blocks.parameters()}
    stem, head = (getattr(model, f"get_{end}_embeddings", lambda: None)() for end in ("input", "output"))
    if isinstance(stem, nn.Module):
        skip |= {id(p) for p in stem.parameters()}
    if isinstance(head, nn.Module):
        skip -= {id(p) for p in head.parameters()}
    cast = [
        (p, p.dtype) for p in model.parameters() if id(p) not in skip and p.device.type != "meta" and p.dtype in HALF
    ]
    for p, _ in cast:
        p.data = p.data.to(dtype)
    try:
        yield
    finally:
        for p, was in cast:
            p.data = p.data.to(was)


@contextlib.contextmanager
def _blocks_replaced(blocks: nn.ModuleList, captured: CapturedInputs, last: torch.Tensor) -> Iterator[None]:
    """Every block a pass-through, the last returning ``last``: the model runs its stem and head only."""
    count = len(blocks)

    def passing(index: int) -> Any:
        def forward(*args: Any, **kwargs: Any) -> Any:
            hidden = last if index == count - 1 else (args[0] if args else kwargs["hidden_states"])
            return captured.block_output(hidden)

        return forward

    try:
        for i, block in enumerate(blocks):
            block.forward = passing(i)
        yield
    finally:
        for block in blocks:
            if "forward" in block.__dict__:
                del block.forward


def _backward(
    blocks: nn.ModuleList,
    blocks_name: str,
    layers: Mapping[str, nn.Module],
    captured: CapturedInputs,
    grads: dict[int, torch.Tensor],
    samples: list[tuple[torch.Tensor, torch.Tensor | None]],
    files: BlockFiles,
    source: HeadSource,
    where: tuple[torch.device, torch.dtype | None],
    home: torch.device,
    config: PruneConfig,
    ranks: Ranks | None,
) -> list[float]:
    """From the last block down: each block's weights' summed squared gradients to its file; returns
    the block-output gradient norms, each the mean over real tokens. ``where``: the device and the
    dtype (:func:`backward_dtype`) each block is computed in."""
    device, compute = where
    sums = torch.zeros(len(blocks), dtype=torch.float64)
    real_tokens = sum(int(ids.numel() if mask is None else mask.bool().sum()) for ids, mask in samples)
    nsamples = len(grads)
    if ranks is not None:
        counts = torch.tensor([float(real_tokens), float(nsamples)], dtype=torch.float64)
        ranks.all_reduce(counts)
        real_tokens, nsamples = int(counts[0]), int(counts[1])
    desc = "fisher backward"
    for i in tqdm(
        reversed(range(len(blocks))), total=len(blocks), desc=desc, unit="block", disable=config.quiet or None
    ):
        with computed_in(blocks[i], compute):  # the weights read in the computing dtype, freed in it
            source.load(i, blocks[i])
            block = blocks[i].to(device)
            prefix = f"{blocks_name}.{i}."
            mine = {name: module for name, module in layers.items() if name.startswith(prefix)}
            leaves = [leaf for leaf, _ in weight_leaves(mine)]
            acc = [torch.zeros(leaf.shape, dtype=torch.float32, device=device) for leaf in leaves]
            inputs = load_file(str(_inputs(files.folder, i)))
            with gradients_only_for(block, leaves), heap_reused():  # each sample's weight gradients: the last's buffers
                for b in sorted(grads):
                    g = grads[b].to(device, compute)
                    mask = samples[b][1]
                    real = g if mask is None else g[mask.bool().to(device)]
                    sums[i] += float(real.double().square().sum())
                    if not leaves and not i:
                        continue
                    x = inputs[str(b)].to(device, compute).requires_grad_(i > 0)
                    with torch.enable_grad():
                        y = captured.calls[b][i].run(block, x, device, compute)
                        found = torch.autograd.grad(y, leaves + ([x] if i else []), grad_outputs=g)
                    for a, grad in zip(acc, found, strict=False):
                        add_square(a, grad)
                    if i:
                        grads[b] = found[-1].detach().to("cpu", inputs[str(b)].dtype)  # as the head's
            if ranks is not None:
                for a in acc:
                    ranks.all_reduce(a)
            results = {name: mean.contiguous().cpu() for name, mean in layer_means(mine, leaves, acc, nsamples).items()}
            save_file(results, str(files.path(i)))
            _inputs(files.folder, i).unlink()
            block.to(home)
            source.unload(i, block)
    if ranks is not None:
        ranks.all_reduce(sums)
    return [float(v) / max(real_tokens, 1) for v in sums]
