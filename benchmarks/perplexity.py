"""Perplexity of SmolLM2-135M pruned with each method: dense vs magnitude / Wanda / SparseGPT.

Protocol (issue #2): calibrate on 64 x 512 tokens of Austen's *Emma* (WikiText-2 train is not
available here), evaluate on WikiText-2 raw test at 512-token windows.

    .venv/bin/python benchmarks/perplexity.py                      # the full table
    .venv/bin/python benchmarks/perplexity.py --max-windows 32     # a quick look
"""

from __future__ import annotations

import argparse
import logging
import time
from typing import Any

import torch

import oneshot
from benchmarks.common import (
    calibration_tokens,
    command_line,
    eval_text,
    machine,
    machine_line,
    parse_method,
    parse_prune_options,
    smollm2_gguf,
    write_results,
)
from oneshot.evaluation import bos_protocol


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--methods",
        default="magnitude,wanda,sparsegpt",
        help="comma-separated; a method may carry its own options: wanda/refine=dsnot, ria/compare=row",
    )
    parser.add_argument("--patterns", default="0.5,2:4", help="comma-separated sparsities or N:M patterns")
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    parser.add_argument(
        "--calib", default=None, help="calibration text file or a name as for --eval [default: shared austen/emma.txt]"
    )
    parser.add_argument("--name", default="perplexity_smollm2", help="results file stem")
    parser.add_argument("--eval", default="wikitext2", help="wikitext2, ptb, persuasion, or a text file to score")
    parser.add_argument("--allocations", default="uniform", help="uniform and/or owl (OWL: M=5, λ=0.08)")
    parser.add_argument(
        "--prune-option", action="append", default=[], help="extra oneshot.prune KEY=VALUE (e.g. sparsity_map={...})"
    )
    parser.add_argument("--model", default=None, help="model folder, hub name or .gguf [the packaged SmolLM2]")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)

    model, tokenizer = oneshot.load_model(args.model or smollm2_gguf())
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    calib, calib_path = calibration_tokens(tokenizer, args.calib, args.nsamples, args.seqlen)
    text, eval_name = eval_text(args.eval)
    bos = bos_protocol(model)  # the papers' protocol ("once") unless the family needs BOS per window

    def ppl() -> float:
        return oneshot.evaluate_perplexity(
            model, tokenizer, text=text, seqlen=args.seqlen, max_windows=args.max_windows, quiet=True
        )

    extra = parse_prune_options(args.prune_option)
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    rows.append({"method": "dense", "pattern": "-", "perplexity": ppl(), "sparsity": 0.0, "prune_seconds": 0.0})
    print(f"dense: {rows[-1]['perplexity']:.3f} ({time.perf_counter() - t0:.0f}s)", flush=True)
    for pattern in args.patterns.split(","):
        nm = pattern if ":" in pattern else None
        sparsity = None if nm else float(pattern)
        for allocation in args.allocations.split(","):
            for method in args.methods.split(","):
                model.load_state_dict(dense_state)
                owl: dict[str, Any] = {"owl": True} if allocation == "owl" else {}
                name, own = parse_method(method)
                report = oneshot.prune(
                    model,
                    tokenizer,
                    method=name,
                    sparsity=sparsity,
                    nm=nm,
                    calibration=calib,
                    quiet=True,
                    **{**extra, **own},
                    **owl,
                )
                value = ppl()
                rows.append(
                    {
                        "method": method if allocation == "uniform" else f"{method} + OWL",
                        "pattern": pattern,
                        "perplexity": value,
                        "sparsity": report.achieved_sparsity,
                        "prune_seconds": report.seconds,
                        "mean_relative_error": report.mean_relative_error,
                        "owl_blocks": report.extra.get("owl", {}).get("blocks"),
                    }
                )
                print(
                    f"{rows[-1]['method']} {pattern}: {value:.3f} sparsity {report.achieved_sparsity:.4%}", flush=True
                )

    command = command_line("benchmarks.perplexity", argv)
    windows = "all" if args.max_windows is None else f"first {args.max_windows}"
    calib_label = calib_path.split("shared/")[-1]
    lines = [
        f"# SmolLM2-135M-Instruct: {eval_name} perplexity after one-shot pruning",
        "",
        f"Command: `{command.strip()}`  ",
        f"Calibration: {args.nsamples} x {args.seqlen} tokens of `{calib_label}`, seed 0. "
        f"Evaluation: {eval_name} ({windows} non-overlapping {args.seqlen}-token windows; WikiText-2 rows joined "
        "with blank lines as in the SparseGPT/Wanda code). All linear layers of the 30 blocks pruned; embeddings "
        f"and the tied head dense. Dense baseline = the dequantised Q4_1 GGUF weights. BOS protocol: {bos}.  ",
        f"Machine: {machine_line()}.",
        *([f"Extra prune options: `{' '.join(args.prune_option)}`.", ""] if args.prune_option else [""]),
        "| method | pattern | perplexity | achieved sparsity | mean rel. layer error | prune time (s) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        err = f"{r['mean_relative_error']:.4f}" if r.get("mean_relative_error") is not None else "-"
        cells = [r["method"], r["pattern"], f"{r['perplexity']:.2f}", f"{r['sparsity']:.4%}", err]
        lines.append("| " + " | ".join([*cells, f"{r['prune_seconds']:.0f}"]) + " |")
    payload = {"command": command, "machine": machine(), "args": vars(args), "bos": bos, "rows": rows}
    write_results(args.name, payload, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
