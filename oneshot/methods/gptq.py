"""GPTQ: one-shot weight quantization with the same inverse-Hessian column updates as SparseGPT.

Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers"
(ICLR 2023), Algorithm 1. Columns are quantized left to right (or in decreasing ``diag(H)`` order:
``act_order``); quantizing column j moves the columns after it by ``-err_j · U[j, j:]``, with ``U``
the upper Cholesky factor of the damped ``H⁻¹`` and ``err_j = (w_j − q(w_j)) / U_jj``, applied
lazily per block of 128 columns. The grid is asymmetric or symmetric min-max per output row, per
channel or per group of ``group_size`` consecutive input columns; a group's scale and zero point are
set from the *updated* weights when the loop reaches its first column (the reference's behaviour).
With ``act_order`` the columns are visited in decreasing ``diag(H)`` order but the groups stay the
consecutive columns of the layer, their grids set from the weights before any update (the
reference's ``--act-order --static-groups``, llm-compressor's ``actorder: weight``): the layout
every serving format stores, with no per-column group index. Scales are rounded to the dtype
they are saved in (``scale_dtype``) before any weight is put on the grid, so the saved
``scale · (code − zero)`` is exactly the weight the solve produced. With a
``mask`` (a pruned layer) the pruned weights stay exactly zero and the kept ones land on the grid:
SparseGPT's joint prune-and-quantize solve (its grid is set from the kept weights only, where the
reference includes the ones about to be pruned, so the range is not spent on them).
Round-to-nearest (:func:`rtn`) is the baseline.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from oneshot.methods import linalg
from oneshot.methods.base import STAT_HESSIAN, LayerStats, MethodOptions, MethodSpec, PruneResult, require
from oneshot.methods.linalg import BLOCK_SIZE, DAMP, MAX_DAMP_RETRIES, inverse_cholesky_upper, prepare_hessian
from oneshot.methods.quantspec import (
    ACT_ORDER,
    BITS,
    GROUP_SIZE,
    MSE_GRID,
    MSE_MAX_SHRINK,
    MSE_NORM,
    OBSERVER,
    SYMMETRIC,
    QuantResult,
    QuantSpec,
)


def grid(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point per row of ``x`` ``[out, g]``, both ``[out, 1]`` (GPTQ's quantizer).

    ``minmax``: the row's range. The range always contains 0 (so a zero weight stays exactly
    zero); symmetric grids use ``±max|x|`` and the middle code as zero point, for every row (the
    GPTQ reference leaves a row without negative weights at ``[0, max]``, where the middle zero
    point clamps its upper half); an all-zero row gets the range ``[−1, 1]``. ``mse``: that range
    times the shrink factor ``p = 1 − i/100`` (i = 0 … 79) with the least ``Σ |x − q(x)|^2.4`` over
    the row, the first such ``p`` on ties (so never worse than min-max on that measure).
    """
    xmin = x.min(dim=1).values.clamp(max=0)
    xmax = x.max(dim=1).values.clamp(min=0)
    if spec.symmetric:  # ±max|x| (the reference keeps [0, max] for a row with no negative weight)
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)
    xmin, xmax = torch.where(empty, -1.0, xmin), torch.where(empty, 1.0, xmax)
    scale, zero = _scale_zero(xmin, xmax, spec, x.dtype)
    if spec.observer == "mse":
        best = _rounding_error(x, scale, zero, spec)
        for i in range(1, int(MSE_MAX_SHRINK * MSE_GRID)):
            shrink = 1 - i / MSE_GRID
            s1, z1 = _scale_zero(shrink * xmin, shrink * xmax, spec, x.dtype)
            err = _rounding_error(x, s1, z1, spec)
            better = err < best
            best = torch.where(better, err, best)
            scale, zero = torch.where(better, s1, scale), torch.where(better, z1, zero)
    return scale.unsqueeze(1), zero.unsqueeze(1)


def _scale_zero(
    xmin: torch.Tensor, xmax: torch.Tensor, spec: QuantSpec, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid of the range ``[xmin, xmax]`` per row (``[out]`` each): scale in ``spec.scale_dtype``'s values."""
    tiny = torch.finfo(spec.scale_dtype).tiny  # a scale that rounds to 0 in its saved dtype would divide by 0
    scale = ((xmax - xmin) / spec.maxq).clamp(min=tiny).to(spec.scale_dtype).to(dtype)
    zero = torch.full_like(scale, (spec.maxq + 1) / 2) if spec.symmetric else torch.round(-xmin / scale)
    return scale, zero


def _rounding_error(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``Σ |x − q(x)|^MSE_NORM`` per row of ``x`` on the grid ``scale``, ``zero`` (``[out]`` each)."""
    q = quantize(x, scale.unsqueeze(1), zero.unsqueeze(1), spec.maxq)
    return (q - x).abs().pow(MSE_NORM).sum(dim=1)


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Round ``x`` onto the grid and back: ``scale · (clamp(round(x/scale) + zero, 0, maxq) − zero)``."""
    codes = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
    return scale * (codes - zero)


def _groups(cols: int, spec: QuantSpec) -> int:
    return 1 if spec.group_size is None else -(-cols // spec.group_size)


def rtn(
    weight: torch.Tensor, spec: QuantSpec, *, mask: torch.Tensor | None = None, keep_latent: bool = False
) -> QuantResult:
    """Round-to-nearest on the same grid (the baseline): each group's min-max from the original weights.

    ``mask`` (True = keep) zeroes the pruned weights first, so the grid is set from the kept ones;
    ``keep_latent``: the result's ``latent`` is that masked weight.
    """
    keep = torch.ones_like(weight, dtype=torch.bool) if mask is None else mask.to(torch.bool)
    w = weight.to(torch.float32) * keep
    rows, cols = w.shape
    size = cols if spec.group_size is None else spec.group_size
    scales = torch.empty(rows, _groups(cols, spec), device=w.device)
    zeros = torch.empty_like(scales)
    out = torch.empty_like(w)
    for g, c0 in enumerate(range(0, cols, size)):
        scale, zero = grid(w[:, c0 : c0 + size], spec)
        out[:, c0 : c0 + size] = quantize(w[:, c0 : c0 + size], scale, zero, spec.maxq)
        scales[:, g], zeros[:, g] = scale[:, 0], zero[:, 0]
    return QuantResult(out, scales, zeros, keep.clone(), spec, latent=w if keep_latent else None)


def gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    spec: QuantSpec,
    *,
    mask: torch.Tensor | None = None,
    block_size: int = BLOCK_SIZE.default,
    damp: float = DAMP.default,
    max_damp_retries: int = MAX_DAMP_RETRIES.default,
    keep_latent: bool = False,
) -> QuantResult:
    """Quantize ``weight`` ``[out, in]`` with ``hessian`` ``[in, in]`` (see the module docstring).

    ``mask`` (True = keep) holds pruned weights at exactly zero while the kept ones are quantized
    and the error is propagated (SparseGPT's joint solve; the mask is not chosen here).
    ``keep_latent``: also return each weight as updated just before it was rounded (one more
    ``[out, in]`` float32 tensor).
    """
    h, w, dead = prepare_hessian(hessian, weight)  # [in, in], [out, in]
    rows, cols = w.shape
    keep = torch.ones_like(w, dtype=torch.bool) if mask is None else mask.to(torch.bool).clone()
    size = cols if spec.group_size is None else spec.group_size
    scales = torch.empty(_groups(cols, spec), rows, device=w.device)  # [groups, out] while the loop runs
    zeros = torch.empty_like(scales)
    group = spec.group_of(cols, w.device)  # [in]: each column's group, in the loop's order below
    order = torch.argsort(torch.diagonal(h), descending=True, stable=True) if spec.act_order else None
    if order is not None:  # static groups: every grid from the weights before any update
        for g, c0 in enumerate(range(0, cols, size)):
            scale, zero = grid(w[:, c0 : c0 + size] * keep[:, c0 : c0 + size], spec)
            scales[g], zeros[g] = scale[:, 0], zero[:, 0]
        h, w, keep, group = h[order][:, order], w[:, order], keep[:, order], group[order]
    upper, damp_used = inverse_cholesky_upper(h, damp, max_damp_retries)  # [in, in]
    groups = group.tolist()
    losses = torch.zeros(rows, device=w.device)
    latent = torch.zeros_like(w) if keep_latent else None
    # Sub-blocks start on every group's first column, so a group's grid sees all earlier updates.
    # The loop runs on the transposed block (column j = contiguous row j), as SparseGPT's loop_block.
    inner = math.gcd(linalg.INNER_COLUMNS, block_size, size) if order is None else linalg.INNER_COLUMNS
    loop = _Grids(spec, scales, zeros, groups, size, static=order is not None)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        wt, qt, errt, kept = loop.round_block(w, keep, upper, (i1, i2), inner)
        losses += errt.square().sum(dim=0) / 2
        if latent is not None:  # each column's row of wt is final once rounded: later updates reach later columns
            latent[:, i1:i2] = (wt * kept).t()
        w[:, i1:i2] = qt.t()
        w[:, i2:] -= errt.t() @ upper[i1:i2, i2:]
    scales, zeros = scales.t().contiguous(), zeros.t().contiguous()  # [out, groups]
    if order is not None:
        inverse = torch.argsort(order)
        w, keep = w[:, inverse], keep[:, inverse]
        latent = None if latent is None else latent[:, inverse]
    keep[:, dead] = False
    if latent is not None:
        latent[:, dead] = 0
    return QuantResult(w, scales, zeros, keep, spec, float(losses.sum()), {"damp": damp_used}, latent)


@dataclass
class _Grids:
    """The layer's grids while GPTQ's column loop runs: ``[groups, out]`` scales and zero points,
    each column's group (in the loop's order), the group width; ``static``: act-order, every grid
    set before the loop (else each is set when the loop reaches its first column)."""

    spec: QuantSpec
    scales: torch.Tensor
    zeros: torch.Tensor
    groups: list[int]
    size: int
    static: bool

    def round_block(
        self, w: torch.Tensor, keep: torch.Tensor, upper: torch.Tensor, span: tuple[int, int], inner: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Round the columns ``span`` of ``w`` ``[out, in]`` in turn, each error moved onto the block's later
        columns (in sub-blocks of ``inner``); returns the block transposed as updated (``[b, out]``), its
        rounded values, its scaled errors and its keep-mask, for the caller's update of the columns after it."""
        i1, i2 = span
        spec, size = self.spec, self.size
        wt = w[:, i1:i2].t().clone(memory_format=torch.contiguous_format)  # [b, out]
        kept = keep[:, i1:i2].t().to(w.dtype)  # [b, out]
        qt = torch.zeros_like(wt)
        errt = torch.zeros_like(wt)
        d1 = torch.diagonal(upper)[i1:i2]
        u1 = upper[i1:i2, i1:i2]
        for s in range(0, i2 - i1, inner):
            e = min(s + inner, i2 - i1)
            for j in range(s, e):
                col = i1 + j
                if not self.static and col % size == 0:  # a new group: its grid from the kept weights as updated
                    ahead = _group_columns(wt, w, errt, upper, span, col, size)
                    scale, zero = grid(ahead * keep[:, col : col + size], spec)
                    self.scales[col // size], self.zeros[col // size] = scale[:, 0], zero[:, 0]
                g = self.groups[col]
                q = qt[j]  # [out]
                q.copy_(quantize(wt[j] * kept[j], self.scales[g], self.zeros[g], spec.maxq))
                err = errt[j]  # [out]
                torch.sub(wt[j], q, out=err)
                err.div_(d1[j])
                wt[j + 1 : e].addr_(u1[j, j + 1 : e], err, alpha=-1)  # [e - j - 1, out] (empty for the last)
            if e < i2 - i1:
                wt[e:].addmm_(u1[s:e, e:].t(), errt[s:e], alpha=-1)  # the sub-block's updates at once
        return wt, qt, errt, kept


def _group_columns(
    wt: torch.Tensor,
    w: torch.Tensor,
    errt: torch.Tensor,
    upper: torch.Tensor,
    span: tuple[int, int],
    col: int,
    size: int,
) -> torch.Tensor:
    """The group starting at column ``col`` as updated so far ``[out, ≤ size]``; only its own columns are copied.

    Its first columns come from the running block (``wt``, transposed, row ``col − i1`` = column
    ``col``); where the group reaches past the block's end ``i2`` (a group wider than the block, or
    one straddling two), the rest comes from ``w`` with the block's updates so far applied (they
    reach ``w`` only when the block ends): ``− errtᵀ[:, :j] · U[i1:col, i2:end]``.
    """
    i1, i2 = span
    j, end = col - i1, col + size
    inside = wt[j : j + size].t()  # [out, min(size, i2 - col)]
    if end <= i2:
        return inside
    beyond = w[:, i2:end] - errt[:j].t() @ upper[i1:col, i2:end]  # [out, end - i2]
    return torch.cat([inside, beyond], dim=1)


def quantize_stage(pruned: PruneResult, stats: LayerStats, options: MethodOptions, method: str) -> PruneResult:
    """Put a layer's (pruned) weights on ``options.quant``'s grid with ``method`` (``gptq`` or ``rtn``).

    The pruned weights stay exactly zero; GPTQ moves the kept ones to compensate (the joint solve).
    The result carries the grid in ``quant``, and the mask and bias of ``pruned``.
    """
    spec = options.quant
    if spec is None:
        raise RuntimeError("a quantization stage needs options.quant (the run's --bits / --group-size)")
    if method == "gptq":
        hessian = require(stats.hessian, STAT_HESSIAN, "gptq")
        q = gptq(
            pruned.weight,
            hessian,
            spec,
            mask=pruned.mask,
            block_size=options.get(BLOCK_SIZE),
            keep_latent=options.keep_latent,
            **options.damping(),
        )
    else:
        q = rtn(pruned.weight, spec, mask=pruned.mask, keep_latent=options.keep_latent)
    info = {**pruned.info, **q.info}
    return PruneResult(q.weight, q.mask, pruned.bias, q.loss, info, quant=q)


def quantize_stacked(
    results: list[PruneResult], stats: LayerStats, options: MethodOptions, method: str
) -> list[PruneResult]:
    """:func:`quantize_stage` on layers that read the same input (q/k/v, gate/up), as one matrix with stacked rows.

    GPTQ's grids and updates are per row, so this equals quantizing each layer alone (up to float
    rounding) with one damping, one Cholesky and one column loop.
    """
    rows = [int(r.weight.shape[0]) for r in results]
    stacked = PruneResult(torch.cat([r.weight for r in results]), torch.cat([r.mask for r in results]))
    done = quantize_stage(stacked, stats, options, method)
    assert done.quant is not None
    out, r0 = [], 0
    for result, n in zip(results, rows, strict=True):
        part = slice(r0, r0 + n)
        q = done.quant
        latent = None if q.latent is None else q.latent[part]
        layer = QuantResult(
            q.weight[part], q.scales[part], q.zeros[part], q.mask[part], q.spec, 0.0, dict(q.info), latent
        )
        out.append(PruneResult(layer.weight, layer.mask, result.bias, None, {**result.info, **q.info}, quant=layer))
        r0 += n
    return out


def _quantize_only(method: str) -> Callable[[torch.Tensor, LayerStats, float, MethodOptions], PruneResult]:
    def run(w: torch.Tensor, stats: LayerStats, sparsity: float, opt: MethodOptions) -> PruneResult:
        return quantize_stage(PruneResult(w, torch.ones_like(w, dtype=torch.bool)), stats, opt, method)

    return run


def _gptq_stacked(
    ws: list[torch.Tensor], stats: LayerStats, sparsities: list[float], opt: MethodOptions
) -> list[PruneResult]:
    return quantize_stacked([PruneResult(w, torch.ones_like(w, dtype=torch.bool)) for w in ws], stats, opt, "gptq")


SPEC = MethodSpec(
    "gptq",
    _quantize_only("gptq"),
    (STAT_HESSIAN,),
    "GPTQ weight quantization (Frantar et al. 2023): columns rounded in turn, each error moved onto the rest",
    updates_weights=True,
    quantizes=True,
    run_stacked=_gptq_stacked,
    knobs=(BLOCK_SIZE, DAMP, MAX_DAMP_RETRIES, BITS, GROUP_SIZE, SYMMETRIC, ACT_ORDER, OBSERVER),
)

RTN_SPEC = MethodSpec(
    "rtn",
    _quantize_only("rtn"),
    (),
    "round-to-nearest weight quantization on the same grid as GPTQ (the baseline; no data)",
    quantizes=True,
    knobs=(BITS, GROUP_SIZE, SYMMETRIC, OBSERVER),
)
