"""Where SparseGPT 50% + GPTQ 4-bit loses, layer by layer, and what each remedy buys (issue #11).

For some blocks of SmolLM2-135M (dense model, inputs from in-domain calibration) every linear
layer is pruned by SparseGPT at 50% and then quantized in several ways. Each way's error is the
layer's output error over all calibration tokens, ``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)`` against the dense
weight, summed over the layers (``quant part`` is the same against the SparseGPT weight: what the
quantizer adds). Ways:

- ``two-stage``: GPTQ on the pruned weights with the mask held (oneshot's ``--then gptq``), for a
  list of grids (symmetric / asymmetric, group 64 / 32, act-order, MSE scale search);
- ``joint one-pass``: one GPTQ sweep from the *dense* weights with SparseGPT's mask (pruned columns
  set to zero as the sweep reaches them, SparseGPT's ``--wbits`` with the mask fixed);
- ``restricted``: per row, GPTQ over the kept columns only with ``H`` restricted to them (the
  compensation never lands on a pruned weight; a Cholesky per row, small models only);
- ``+ scale fit``: the two-stage codes kept, each row's group scales refit by least squares to the
  dense layer's outputs (a ``groups x groups`` solve per row).

The ``dense`` rows quantize the unpruned layer the same way (what quantization costs alone).

    .venv/bin/python -m benchmarks.diag_sparse_quant --blocks 2,15,27
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

import oneshot
from benchmarks.common import calibration_tokens, command_line, machine, machine_line, smollm2_gguf, write_results
from oneshot.capture import model_call_kwargs
from oneshot.layers import find_blocks, find_linears
from oneshot.methods.gptq import gptq, grid, quantize
from oneshot.methods.quantspec import QuantResult, QuantSpec
from oneshot.methods.sparsegpt import sparsegpt

GRIDS = {
    "sym g64, act-order + MSE (the #11 table's)": QuantSpec(4, 64, True, True, observer="mse"),
    "sym g64": QuantSpec(4, 64, True, False),
    "sym g64, act-order": QuantSpec(4, 64, True, True),
    "asym g64, act-order": QuantSpec(4, 64, False, True),
    "asym g64, act-order + MSE": QuantSpec(4, 64, False, True, observer="mse"),
    "sym g32, act-order": QuantSpec(4, 32, True, True),
    "asym g32, act-order": QuantSpec(4, 32, False, True),
}


def output_error(reference: torch.Tensor, weight: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr((R − W) H (R − W)ᵀ)``."""
    diff = reference - weight
    return float(((diff @ hessian) * diff).sum())


def restricted_gptq(pruned: torch.Tensor, mask: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Per row: GPTQ over the kept columns with ``H`` restricted to them (static groups, act-order)."""
    rows, cols = pruned.shape
    size = spec.group_size or cols
    scales = torch.empty(rows, cols // size)
    zeros = torch.empty_like(scales)
    for g in range(cols // size):
        part = slice(g * size, (g + 1) * size)
        s, z = grid(pruned[:, part] * mask[:, part], spec)
        scales[:, g], zeros[:, g] = s[:, 0], z[:, 0]
    damp = 0.01 * float(torch.diagonal(hessian).mean())
    order = torch.argsort(torch.diagonal(hessian), descending=True, stable=True)
    out = torch.zeros_like(pruned)
    for r in range(rows):
        kept = order[mask[r, order]]  # the row's kept columns, in act-order
        h = hessian[kept][:, kept].clone()
        h.diagonal().add_(damp)
        upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
        w = pruned[r, kept].clone()
        group = kept // size
        for i in range(len(kept)):
            q = quantize(w[i : i + 1], scales[r, group[i]].reshape(1), zeros[r, group[i]].reshape(1), spec.maxq)[0]
            err = (w[i] - q) / upper[i, i]
            w[i] = q
            w[i + 1 :] -= err * upper[i, i + 1 :]
        out[r, kept] = w
    return out


def scale_fit(target: torch.Tensor, quant: QuantResult, hessian: torch.Tensor) -> torch.Tensor:
    """``quant``'s codes with each row's group scales refit by least squares to ``target``'s outputs."""
    scale, _ = quant.expand()
    levels = torch.where(scale != 0, quant.weight / scale, torch.zeros_like(scale))  # code − zero point
    rows, cols = levels.shape
    groups = quant.scales.shape[1]
    size = cols // groups
    member = torch.nn.functional.one_hot(torch.arange(cols) // size, groups).T.float()  # [groups, cols]
    fitted = torch.empty_like(quant.scales)
    for r in range(rows):
        basis = member * levels[r]  # [groups, cols]: row r's levels, one group per row
        gram = (basis @ hessian @ basis.T).double()
        gram.diagonal().add_(1e-9 * float(gram.diagonal().mean()) + 1e-30)
        fitted[r] = torch.linalg.solve(gram, (basis @ hessian @ target[r]).double()).float()
    return fitted[:, torch.arange(cols) // size] * levels


def hessians(blocks: list[int], nsamples: int) -> tuple[Any, dict[tuple[int, str], torch.Tensor]]:
    """The dense SmolLM2 and ``X Xᵀ / n`` of every linear layer's input in ``blocks`` (in-domain tokens)."""
    model, tokenizer = oneshot.load_model(smollm2_gguf())
    model.float().eval()
    calib, _ = calibration_tokens(tokenizer, "wikitext2:head", nsamples, 512)
    sums: dict[tuple[int, str], torch.Tensor] = {}
    hooks = []
    layers = find_blocks(model)[1]
    for b in blocks:
        for name, module in find_linears(layers[b]).items():

            def hook(_: Any, inputs: tuple[torch.Tensor, ...], key: tuple[int, str] = (b, name)) -> None:
                x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
                sums[key] = sums.get(key, 0) + x.T @ x

            hooks.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        for ids, _ in calib.batches(4):
            model(input_ids=ids, **model_call_kwargs(model))
    for h in hooks:
        h.remove()
    tokens = nsamples * 512
    return model, {key: (s / tokens).float() for key, s in sums.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", default="2,15,27")
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--restricted-blocks", default="15", help="blocks for the slow per-row restricted GPTQ")
    parser.add_argument("--name", default="diag_sparse_quant")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    blocks = [int(b) for b in args.blocks.split(",")]
    slow = {int(b) for b in args.restricted_blocks.split(",") if b}
    model, hs = hessians(blocks, args.nsamples)
    layers = find_blocks(model)[1]
    sums: dict[str, list[float]] = {}  # way -> [error vs dense, quant part]
    slow_sums: dict[str, list[float]] = {}

    def add(table: dict[str, list[float]], way: str, errors: tuple[float, float]) -> None:
        row = table.setdefault(way, [0.0, 0.0])
        row[0] += errors[0]
        row[1] += errors[1]

    t0 = time.perf_counter()
    for (b, name), h in sorted(hs.items()):
        weight = find_linears(layers[b])[name].weight
        assert isinstance(weight, torch.Tensor)
        dense = weight.detach().float().clone()
        norm = output_error(dense, torch.zeros_like(dense), h)
        pruned = sparsegpt(dense, h, 0.5)
        ws, mask = pruned.weight, pruned.mask

        def errors(w: torch.Tensor, start: torch.Tensor) -> tuple[float, float]:
            """(error vs the dense weight, error vs ``start``: what the quantizer added), both relative."""
            return output_error(dense, w, h) / norm, output_error(start, w, h) / norm  # noqa: B023

        add(sums, "SparseGPT 50% alone", errors(ws, ws))
        for label, spec in GRIDS.items():
            add(sums, f"two-stage, {label}", errors(gptq(ws, h, spec, mask=mask).weight, ws))
            add(sums, f"dense, {label}", errors(gptq(dense, h, spec).weight, dense))
        first = next(iter(GRIDS.values()))
        q = gptq(ws, h, first, mask=mask)
        add(sums, "two-stage + scale fit to dense outputs", errors(scale_fit(dense, q, h), ws))
        add(sums, "joint one-pass (from dense, mask fixed)", errors(gptq(dense, h, first, mask=mask).weight, ws))
        if b in slow:
            plain = QuantSpec(4, 64, True, True)
            add(slow_sums, "two-stage, sym g64, act-order", errors(gptq(ws, h, plain, mask=mask).weight, ws))
            add(slow_sums, "restricted per row, sym g64, act-order", errors(restricted_gptq(ws, mask, h, plain), ws))
        print(f"block {b} {name} done ({time.perf_counter() - t0:.0f} s)", flush=True)

    def table(rows: dict[str, list[float]]) -> str:
        lines = ["| way | error vs dense (sum over layers) | quant part |", "|---|---|---|"]
        lines += [f"| {way} | {total:.4f} | {part:.4f} |" for way, (total, part) in rows.items()]
        return "\n".join(lines) + "\n"

    text = (
        "# SparseGPT 50% + 4-bit quantization on SmolLM2-135M, layer by layer\n\n"
        f"Command: `{command_line('benchmarks.diag_sparse_quant', argv)}`  \n"
        f"Blocks {args.blocks} (all 7 linear layers each), dense inputs from {args.nsamples} x 512 tokens of "
        "`wikitext2:head`. Errors: `tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)` per layer against the dense weight, summed; "
        "`quant part` against the SparseGPT weight (for `dense` rows: against the dense weight).  \n"
        f"Machine: {machine_line()}.\n\n" + table(sums)
    )
    if slow_sums:
        text += f"\nThe per-row restricted GPTQ, blocks {args.restricted_blocks} only:\n\n" + table(slow_sums)
    write_results(args.name, {"machine": machine(), "blocks": blocks, "sums": sums, "restricted": slow_sums}, text)


if __name__ == "__main__":
    main()
