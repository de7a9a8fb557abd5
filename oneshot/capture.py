"""Capture what every transformer block is called with, for each calibration batch.

One pass of the model per batch, with each block's ``forward`` temporarily replaced by a recorder:
the recorder stores the block's positional and keyword arguments (attention mask, position
embeddings, cache position, ...), passes its input hidden states through unchanged, and the last
block raises :class:`StopForward` so the head never runs. Blocks therefore cost nothing here, yet
each block keeps its *own* kwargs: Gemma 3 alternates sliding-window and global masks and position
embeddings, GPT-2 and BERT pass arguments positionally. Block 0's hidden-state input is kept as the
start of the layer-by-layer sweep. Patches are undone in ``finally``.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from oneshot.calibration.data import CalibrationSet
from oneshot.errors import ModelError


class StopForward(Exception):
    """Raised by the last block's recorder to end the capture forward pass early."""


@dataclass
class BlockCall:
    """How one block is called: positional args after the hidden states, and kwargs."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    hidden_kw: str | None = None  # the kwarg name of the hidden states if not passed positionally

    def run(
        self, block: nn.Module, hidden: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """Call ``block`` on ``hidden`` with these arguments (moved to ``device``, floating ones cast to
        ``dtype`` if given: a block cast to float32 for a refit); return hidden states."""
        args = to_device(self.args, device, dtype)
        kwargs = to_device(self.kwargs, device, dtype)
        hidden = hidden.to(device, dtype)
        out = block(*args, **{self.hidden_kw: hidden}, **kwargs) if self.hidden_kw else block(hidden, *args, **kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out


@dataclass
class CapturedInputs:
    """Per calibration batch: the token mask and every block's call (block 0's inputs go to a sink)."""

    token_masks: list[torch.Tensor | None] = field(default_factory=list)  # per batch [B, T]
    calls: list[list[BlockCall]] = field(default_factory=list)  # [batch][block]
    kind: tuple[str, int] | None = None  # what a block returns: ("tensor", 1) or ("tuple", length)

    def block_output(self, hidden: torch.Tensor) -> Any:
        """``hidden`` as a block of this model returns it (a tensor, or a tuple led by it)."""
        kind, length = self.kind or ("tensor", 1)
        return (hidden,) + (None,) * (length - 1) if kind == "tuple" else hidden


def to_device(
    obj: Any,
    device: torch.device,
    dtype: torch.dtype | None = None,
    memo: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> Any:
    """Move every tensor inside nested tuples / lists / dicts to ``device`` (others unchanged).

    With ``dtype``, floating-point tensors are cast to it as well (integer ones keep theirs).
    With ``memo`` (``id(tensor) -> (tensor, its copy)``) a tensor met before is not copied again:
    its first copy is returned (the memo holds the source, so its id is not reused meanwhile).
    """
    if isinstance(obj, torch.Tensor):
        if memo is not None and id(obj) in memo:
            return memo[id(obj)][1]
        moved = obj.to(device, dtype) if dtype is not None and obj.is_floating_point() else obj.to(device)
        if memo is not None:
            memo[id(obj)] = (obj, moved)
        return moved
    if isinstance(obj, tuple):
        return tuple(to_device(o, device, dtype, memo) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device, dtype, memo) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device, dtype, memo) for k, v in obj.items()}
    return obj


def model_call_kwargs(model: nn.Module) -> dict[str, Any]:
    """Keyword arguments that switch off caches / extra outputs, where the model's forward takes them."""
    params = inspect.signature(model.forward).parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    wanted = {"use_cache": False, "output_attentions": False, "output_hidden_states": False}
    return {k: v for k, v in wanted.items() if k in params or (accepts_any and k == "use_cache")}


@dataclass
class _Recorder:
    """Replaces each block's forward during capture: records its call, passes hidden states through."""

    captured: CapturedInputs
    sink: Callable[[int, torch.Tensor], None]
    storage: torch.device
    last: int
    kind: tuple[str, int] | None = None  # how the block family returns its output, learnt once
    # This batch's tensors already stored, by the id of the model's own: the attention mask and the
    # position embeddings every block receives are stored once, shared by all blocks' calls (a 4-D
    # [B, 1, T, T] mask per block would be ~0.5 GB at 128 x 2048, tens of GB over a deep model).
    stored: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def wrap(self, index: int, original: Callable[..., Any]) -> Callable[..., Any]:
        """The recording forward of block ``index`` (``original`` runs once, on block 0, to learn ``kind``)."""

        def forward(*args: Any, **kwargs: Any) -> Any:
            hidden_kw = None
            if args:
                hidden, rest = args[0], tuple(args[1:])
            else:
                hidden_kw = "hidden_states"
                hidden, rest = kwargs.pop(hidden_kw), ()
            if index == 0:  # a new batch: the model's tensors of the last one are gone
                self.stored.clear()
            call = BlockCall(
                to_device(rest, self.storage, memo=self.stored),
                to_device(kwargs, self.storage, memo=self.stored),
                hidden_kw,
            )
            self.captured.calls[-1].append(call)
            if index == 0:
                self.sink(len(self.captured.calls) - 1, hidden.detach())
                if self.kind is None:
                    out = original(*args, **({hidden_kw: hidden} if hidden_kw else {}), **kwargs)
                    self.kind = ("tuple", len(out)) if isinstance(out, (tuple, list)) else ("tensor", 1)
            if index == self.last:
                raise StopForward
            assert self.kind is not None
            kind, length = self.kind
            return (hidden,) + (None,) * (length - 1) if kind == "tuple" else hidden

        return forward


def capture_inputs(
    model: nn.Module,
    blocks: nn.ModuleList,
    calib: CalibrationSet,
    batch_size: int,
    device: torch.device,
    sink: Callable[[int, torch.Tensor], None],
    storage: torch.device | None = None,
) -> CapturedInputs:
    """Run the model's stem on each calibration batch and record every block's call arguments.

    ``storage`` is where captured tensors are kept (default: CPU, so only one block's activations
    need to sit on the compute device). Block 0's input of batch ``b`` goes to ``sink(b, hidden)``
    (an activation store, in memory or on disk).
    """
    storage = storage or torch.device("cpu")
    captured = CapturedInputs()
    kind = None
    if min(batch_size, calib.nsamples) > 1:  # learn how blocks return on one sample, not on a big batch
        one = CalibrationSet(calib.input_ids[:1], None if calib.attention_mask is None else calib.attention_mask[:1])
        probe = _Recorder(CapturedInputs(), lambda b, h: None, storage, len(blocks) - 1)
        _record_calls(model, blocks, one, 1, device, probe)
        kind = probe.kind
    recorder = _Recorder(captured, sink, storage, len(blocks) - 1, kind)
    _record_calls(model, blocks, calib, batch_size, device, recorder)
    captured.kind = recorder.kind
    return captured


def _record_calls(
    model: nn.Module,
    blocks: nn.ModuleList,
    calib: CalibrationSet,
    batch_size: int,
    device: torch.device,
    recorder: _Recorder,
) -> None:
    """Run the model on each batch with every block's forward replaced by ``recorder``'s."""
    captured = recorder.captured
    call_kwargs = model_call_kwargs(model)
    patched: list[nn.Module] = []
    try:
        for i, block in enumerate(blocks):
            block.forward = recorder.wrap(i, block.forward)
            patched.append(block)
        with torch.no_grad():
            for ids, mask in calib.batches(batch_size):
                captured.calls.append([])
                captured.token_masks.append(mask)
                with contextlib.suppress(StopForward):
                    model(
                        input_ids=ids.to(device),
                        attention_mask=None if mask is None else mask.to(device),
                        **call_kwargs,
                    )
                if len(captured.calls[-1]) != len(blocks):
                    raise ModelError(
                        f"the model called {len(captured.calls[-1])} of its {len(blocks)} blocks during "
                        "capture; blocks skipped at inference (layer drop, early exit) are not supported"
                    )
    finally:
        for block in patched:
            del block.forward
