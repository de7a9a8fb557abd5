"""Does GPTQ gain little over RTN on SmolLM2 because its weights already sit on a 4-bit grid? (issue #11)

The packaged SmolLM2-135M is a dequantised Q4_1 GGUF: each run of 32 weights along a row holds at
most 16 values ``min + k·d``. This diagnostic "dithers" it back to continuous weights: every
weight of the blocks' linear layers gets uniform noise in ``±d/2`` of its own Q4_1 group (seed 0),
so Q4_1 would round the dithered model back to the packaged one. Both models are then quantized
in memory with RTN and GPTQ (4-bit, symmetric, group 64), calibrated in-domain, and scored; the
table gives each model's perplexities and the share of RTN's added perplexity that GPTQ removes.
A second table gives RTN's mean squared weight error as a multiple of ``Δ²/12`` (Δ = the group's
g64 step), the error of rounding continuous weights: below 1 means the two grids line up and RTN
rounds many weights for free.

    .venv/bin/python -m benchmarks.diag_gptq_grid --max-windows 32
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

import torch
from torch import nn

import oneshot
from benchmarks.common import (
    calibration_tokens,
    command_line,
    eval_text,
    machine,
    machine_line,
    parse_method,
    smollm2_gguf,
    write_results,
)
from oneshot.methods.gptq import grid, quantize
from oneshot.methods.quantspec import QuantSpec

Q4_1_GROUP = 32


def block_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The linear layers inside the decoder blocks (the ones a run quantizes)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n}


def q4_1_steps(weight: torch.Tensor) -> torch.Tensor:
    """Each weight's Q4_1 step ``d = (max − min) / 15`` of its group of 32 along the row, ``[out, in]``."""
    groups = weight.reshape(weight.shape[0], -1, Q4_1_GROUP)  # [out, in/32, 32]
    step = (groups.amax(dim=2, keepdim=True) - groups.amin(dim=2, keepdim=True)) / 15
    return step.expand_as(groups).reshape(weight.shape)


def dither_(model: nn.Module, seed: int = 0) -> None:
    """Add uniform noise in ±d/2 of its Q4_1 group to every block linear weight, in place."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in block_linears(model).values():
            w = module.weight
            noise = torch.rand(w.shape, generator=generator, dtype=torch.float32) - 0.5
            w.add_((noise * q4_1_steps(w.float())).to(w.dtype))


def rtn_error_ratio(model: nn.Module, spec: QuantSpec) -> float:
    """RTN's mean squared weight error over all block linears, as a multiple of the mean ``Δ²/12``."""
    error = expected = 0.0
    size = spec.group_size or 1
    for module in block_linears(model).values():
        w = module.weight.detach().float()
        groups = w.reshape(w.shape[0], -1, size).transpose(0, 1)  # [groups, out, size]
        for g in groups:
            scale, zero = grid(g, spec)
            error += float((quantize(g, scale, zero, spec.maxq) - g).square().sum())
            expected += float((scale.square() / 12).sum()) * size
    return error / expected


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    parser.add_argument("--calib", default="wikitext2:head", help="calibration text (a file or a name as for --eval)")
    parser.add_argument("--eval", default="wikitext2:tail", help="text to score")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--quantizers", default="rtn,gptq", help="comma-separated rows, e.g. gptq/act_order=true")
    parser.add_argument("--models", default="packaged,dithered", help="packaged and/or dithered")
    parser.add_argument("--name", default="diag_gptq_grid")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    spec = QuantSpec(bits=4, group_size=args.group_size)
    model, tokenizer = oneshot.load_model(str(smollm2_gguf()), dtype="float32")
    calib, calib_path = calibration_tokens(tokenizer, args.calib, args.nsamples, args.seqlen)
    text, eval_name = eval_text(args.eval)
    packaged = {k: v.clone() for k, v in model.state_dict().items()}
    dither_(model)
    dithered = {k: v.clone() for k, v in model.state_dict().items()}

    def ppl() -> float:
        return oneshot.evaluate_perplexity(
            model, tokenizer, text=text, seqlen=args.seqlen, max_windows=args.max_windows, quiet=True
        )

    rows: list[dict[str, Any]] = []
    quantizers = args.quantizers.split(",")
    states = {"packaged": ("packaged (Q4_1 grid)", packaged), "dithered": ("dithered (continuous)", dithered)}
    for label, state in (states[m] for m in args.models.split(",")):
        model.load_state_dict(state)
        row: dict[str, Any] = {"model": label, "rtn_error_vs_uniform": rtn_error_ratio(model, spec)}
        row["dense"] = ppl()
        for entry in ["rtn", *(q for q in quantizers if q != "rtn")]:
            model.load_state_dict(state)
            name, own = parse_method(entry)
            options = {"bits": 4, "group_size": args.group_size, **own}
            oneshot.prune(model, tokenizer, method=name, calibration=calib, quiet=True, **options)
            row[entry] = ppl()
            row[f"{entry} share removed"] = (row["rtn"] - row[entry]) / (row["rtn"] - row["dense"])
        rows.append(row)
        print(row, flush=True)

    command = command_line("benchmarks.diag_gptq_grid", argv)
    windows = "all" if args.max_windows is None else f"first {args.max_windows}"
    lines = [
        "# GPTQ vs RTN on SmolLM2's packaged (Q4_1-grid) weights and on the same weights dithered back to continuous",
        "",
        f"Command: `{command.strip()}`  ",
        f"Calibration: {args.nsamples} x {args.seqlen} tokens of `{calib_path}`, seed 0. Evaluation: {eval_name}, "
        f"{windows} {args.seqlen}-token windows. 4-bit symmetric, group {args.group_size}, in memory, float32. "
        "Dithering: uniform noise in ±d/2 of each weight's Q4_1 group of 32 (seed 0), block linears only.  ",
        f"Machine: {machine_line()}.",
        "",
        "| model | dense | RTN | "
        + " | ".join(f"{q} | share of RTN's loss {q} removes" for q in quantizers if q != "rtn")
        + " | RTN weight error / (Δ²/12) |",
        "|---|---|---|" + "---|---|" * sum(q != "rtn" for q in quantizers) + "---|",
    ]
    for r in rows:
        cells = [f"{r[q]:.2f} | {r[f'{q} share removed']:.1%}" for q in quantizers if q != "rtn"]
        lines.append(
            f"| {r['model']} | {r['dense']:.2f} | {r['rtn']:.2f} | "
            + " | ".join(cells)
            + f" | {r['rtn_error_vs_uniform']:.3f} |"
        )
    payload = {"command": command, "machine": machine(), "args": vars(args), "rows": rows}
    write_results(args.name, payload, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
