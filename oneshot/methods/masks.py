"""Vectorised pruning masks from saliency scores (higher score = more important).

Every mask removes an exact count of weights. Ties are broken deterministically by position (a
stable sort), which matters for models dequantised from GGUF, whose weights sit on a coarse grid.
Masks are boolean with True = keep.
"""

from __future__ import annotations

import torch

from oneshot.errors import ConfigError
from oneshot.options import Knob

#: Whether a score-based method compares its scores over the whole layer or within each output row.
COMPARE = Knob(
    "compare",
    "layer",
    "RIA / Fisher: compare scores over the whole layer (RIA's code) or within each output row.",
    choices=("layer", "row"),
)


def prune_count(numel: int, sparsity: float) -> int:
    """How many of ``numel`` weights to remove at ``sparsity`` (rounded to nearest)."""
    return min(numel, int(round(numel * sparsity)))


#: Rows of a score matrix sorted at once: a stable sort holds values and int64 indices (12 bytes per
#: score), so a 28672 x 8192 layer sorted whole would need 2.8 GB of scratch; in chunks, ~200 MB.
SORT_CHUNK = 1 << 24


#: From this many scores per row on, the lowest ``k`` are found by selection instead of a sort.
SELECT_FROM = 64


def _lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask of the last dim of ``scores`` (at least 2-D) with its ``k`` lowest entries removed (stable).

    Rows (the leading dimension) are independent, so they are handled in chunks of about
    ``SORT_CHUNK`` scores to bound the scratch memory; the result is the same.
    """
    keep = torch.ones_like(scores, dtype=torch.bool)
    if k > 0:
        rows = max(1, SORT_CHUNK // max(1, scores[0].numel()))
        for start in range(0, scores.shape[0], rows):
            chunk = scores[start : start + rows]
            if chunk.shape[-1] >= SELECT_FROM and _select_lowest(chunk, k, keep[start : start + rows]):
                continue
            order = torch.sort(chunk, dim=-1, stable=True).indices[..., :k]
            keep[start : start + rows].scatter_(-1, order, False)
    return keep


def _select_lowest(scores: torch.Tensor, k: int, keep: torch.Tensor) -> bool:
    """Clear in ``keep`` exactly what a stable sort's ``k`` lowest would; False (nothing done) on NaNs.

    One float32 row longer than ``SORT_CHUNK`` (a mask chosen over a whole layer) goes through
    :func:`_select_lowest_wide`, whose scratch is one chunk's.

    The ``k``-th smallest value ``t`` of each row is found by selection (2-3x faster than the
    sort on CPU for rows of 576-1536 scores); every score below ``t`` goes, and of the scores
    equal to ``t`` the first ones by position, as many as ``k`` still needs: the stable order.
    """
    if scores.dim() == 2 and scores.shape[0] == 1 and scores.shape[1] > SORT_CHUNK and scores.dtype == torch.float32:
        return _select_lowest_wide(scores[0], k, keep[0])
    t = scores.kthvalue(k, dim=-1, keepdim=True).values
    if torch.isnan(t).any():
        return False
    below = scores < t
    tie = scores == t
    need = k - below.sum(dim=-1, keepdim=True)  # [rows, 1]: how many of the ties still go
    keep &= ~(below | _first(tie, need))
    return True


#: Radix selection: each float32's 32-bit key is split into a high and a low half of this many bits.
_HALF = 16
#: Scores per chunk of a selection over a whole layer (a chunk's int32 keys and masks are its scratch).
SELECT_CHUNK = 1 << 22


def _ordered_keys(x: torch.Tensor) -> torch.Tensor:
    """int32 keys of float32 ``x`` whose signed order is the floats' order (−0 just before +0)."""
    bits = x.contiguous().view(torch.int32).clone()
    bits[bits < 0] ^= 0x7FFFFFFF  # negative floats: larger magnitude, smaller key
    return bits


def _kth_smallest(row: torch.Tensor, k: int) -> torch.Tensor | None:
    """The ``k``-th smallest (1-based) of a float32 ``row`` ``[n]``, exactly, as a ``[1]`` tensor; None on NaN.

    Two passes of a radix selection over chunks of ``SELECT_CHUNK``: a histogram of the keys' high
    halves finds the bucket holding the ``k``-th key, a histogram of the low halves inside it the
    key itself. Scratch: a chunk's keys and two 65,536-bin histograms (``kthvalue`` on a whole
    layer copies it with int64 indices: 12 bytes per score).
    """
    bins, half = 1 << _HALF, 1 << (_HALF - 1)
    hist = torch.zeros(bins, dtype=torch.int64, device=row.device)
    for c0 in range(0, row.numel(), SELECT_CHUNK):
        part = row[c0 : c0 + SELECT_CHUNK]
        if torch.isnan(part).any():
            return None
        hist += torch.bincount((_ordered_keys(part) >> _HALF) + half, minlength=bins)
    cum = hist.cumsum(0)
    high = int(torch.searchsorted(cum, torch.tensor([k], device=row.device)))  # first bucket reaching k
    before = int(cum[high - 1]) if high else 0
    hist.zero_()
    for c0 in range(0, row.numel(), SELECT_CHUNK):
        keys = _ordered_keys(row[c0 : c0 + SELECT_CHUNK])
        hist += torch.bincount(keys[(keys >> _HALF) + half == high] & (bins - 1), minlength=bins)
    low = int(torch.searchsorted(hist.cumsum(0), torch.tensor([k - before], device=row.device)))
    bits = ((high - half) << _HALF) | low  # the signed key
    bits = bits ^ 0x7FFFFFFF if bits < 0 else bits
    return torch.tensor([bits], dtype=torch.int32).view(torch.float32).to(row.device)


def _select_lowest_wide(row: torch.Tensor, k: int, keep: torch.Tensor) -> bool:
    """:func:`_select_lowest` for one long float32 row ``[n]``, chunk by chunk (False, nothing done, on NaN)."""
    t = _kth_smallest(row, k)
    if t is None:
        return False
    chunks = range(0, row.numel(), SELECT_CHUNK)
    need = k - sum(int((row[c0 : c0 + SELECT_CHUNK] < t).sum()) for c0 in chunks)  # ties still to remove
    seen = 0
    for c0 in chunks:
        part = row[c0 : c0 + SELECT_CHUNK]
        tie = part == t
        running = tie.cumsum(0) + seen
        keep[c0 : c0 + SELECT_CHUNK] &= ~((part < t) | (tie & (running <= need)))
        seen = int(running[-1])
    return True


def _first(flags: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """The first ``count`` True entries of each row of ``flags`` (by position), as a bool mask.

    The running count is an int64 cumsum, taken ``SORT_CHUNK`` entries at a time with the
    carry between chunks: a layer-wide row of 28672 x 8192 scores needs ~130 MB of it, not 1.9 GB.
    """
    out = torch.empty_like(flags)
    width = max(1, SORT_CHUNK // max(1, flags[..., 0].numel()))  # columns per chunk
    seen = torch.zeros_like(count)
    for c0 in range(0, flags.shape[-1], width):
        part = flags[..., c0 : c0 + width]
        running = part.cumsum(dim=-1) + seen
        out[..., c0 : c0 + width] = part & (running <= count)
        seen = running[..., -1:]
    return out


def unstructured_mask(scores: torch.Tensor, sparsity: float, per_row: bool = True) -> torch.Tensor:
    """Remove the lowest-scoring ``sparsity`` share of weights, within each row or over the whole layer.

    ``scores`` is ``[out, in]``; returns a keep-mask of the same shape.
    """
    if per_row:
        return _lowest(scores, prune_count(scores.shape[1], sparsity))
    flat = _lowest(scores.reshape(1, -1), prune_count(scores.numel(), sparsity))
    return flat.reshape(scores.shape)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` highest scores in every group of ``m`` consecutive inputs of each row.

    ``scores`` is ``[out, in]`` with ``in`` divisible by ``m``.
    """
    rows, cols = scores.shape
    if cols % m != 0:
        raise ConfigError(f"N:M sparsity needs the input size ({cols}) to be a multiple of M={m}; choose another M")
    grouped = scores.reshape(rows, cols // m, m)  # [out, in/m, m]
    return _lowest(grouped, m - n).reshape(rows, cols)


def select_mask(scores: torch.Tensor, sparsity: float, nm: tuple[int, int] | None, *, per_row: bool) -> torch.Tensor:
    """N:M mask when ``nm`` is given, else an unstructured one (per row or per layer)."""
    if nm is not None:
        return nm_mask(scores, *nm)
    return unstructured_mask(scores, sparsity, per_row=per_row)
