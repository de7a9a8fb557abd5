"""How much does a solver's result depend on the order its statistics were summed in? (issue #10)

Two ranks sum each Hessian as (rank 0's share) + (rank 1's share); one process sums it batch after
batch. To see what that alone does, this prunes SmolLM2-135M twice in ONE process, changing only
the calibration batch size (the same tokens, the same two-pass sweep, so only the order of the
Hessian's sums differs), and compares the masks block by block and the WikiText-2 perplexity.

    .venv/bin/python -m benchmarks.diag_float_order --method sparsegpt
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

import oneshot
from benchmarks.common import eval_text, machine, machine_line, shared_file, smollm2_gguf, write_results
from oneshot.calibration.data import build_calibration
from oneshot.config import CalibrationConfig


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="sparsegpt")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--batch-sizes", default="8,4")
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--name", default="diag_float_order")
    args = parser.parse_args(argv)

    model, tokenizer = oneshot.load_model(smollm2_gguf())
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    source = str(shared_file("austen", "emma.txt"))
    calib = build_calibration(tokenizer, CalibrationConfig(source=source, nsamples=args.nsamples, seqlen=512), 512)
    text, label = eval_text("wikitext2")
    states: list[dict[str, torch.Tensor]] = []
    ppl: list[float] = []
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    for size in sizes:
        model.load_state_dict(dense)
        oneshot.prune(
            model,
            calibration=calib,
            method=args.method,
            sparsity=args.sparsity,
            batch_size=size,
            passes="two",
            quiet=True,
        )
        states.append({k: v.clone() for k, v in model.state_dict().items()})
        ppl.append(oneshot.evaluate_perplexity(model, tokenizer, text=text, max_windows=args.eval_windows, quiet=True))
    a, b = states[0], states[1]
    rows: list[dict[str, Any]] = []
    blocks = sorted({int(k.split(".layers.")[1].split(".")[0]) for k in a if ".layers." in k})
    for block in blocks:
        keys = [k for k in a if f".layers.{block}." in k and a[k].dim() == 2]
        same = sum(int(((a[k] == 0) == (b[k] == 0)).sum()) for k in keys)
        total = sum(a[k].numel() for k in keys)
        worst = max(float((a[k] - b[k]).abs().max()) for k in keys)
        rows.append({"block": block, "mask_agreement": same / total, "max_abs_diff": worst})
    lines = [
        f"# {args.method} {args.sparsity:.0%} on SmolLM2-135M: batch size {sizes[0]} vs {sizes[1]} in one process",
        "",
        f"Command: `python -m benchmarks.diag_float_order --method {args.method} --nsamples {args.nsamples} "
        f"--batch-sizes {args.batch_sizes} --eval-windows {args.eval_windows}`  ",
        f"Calibration: {args.nsamples} x 512 Emma tokens, two passes; only the order of the statistics' sums "
        f"differs. Perplexity: {label}, first {args.eval_windows} windows. {machine_line()}",
        "",
        f"Perplexity: batch {sizes[0]} **{ppl[0]:.3f}**, batch {sizes[1]} **{ppl[1]:.3f}**.",
        "",
        "| block | same mask | max abs weight difference |",
        "|---|---|---|",
        *[f"| {r['block']} | {r['mask_agreement']:.5%} | {r['max_abs_diff']:.2e} |" for r in rows],
    ]
    payload = {"machine": machine(), "args": vars(args), "perplexity": ppl, "blocks": rows}
    write_results(args.name, payload, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
