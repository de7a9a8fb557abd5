"""How the block tuning of a quantized run (``--refine block`` with ``--then gptq``) moves the block error (#11).

Runs the first ``--blocks`` decoder blocks of SmolLM2-135M (the rest cut off) through SparseGPT 50%
+ GPTQ 4-bit (asymmetric, act-order, MSE observer, group 64) and the block tuning, once per
``--settings`` entry (``lr:epochs[:batch]``), and tabulates each block's relative output error
against the dense block (``Σ‖f(x) − f_dense(x)‖² / Σ‖f_dense(x)‖²`` on the calibration tokens)
before the tuning (GPTQ's) and after it, next to SparseGPT 50% alone (no quantizer) and SparseGPT
50% with the float block refit (``--refine block`` without a quantizer, its default 1e-3).
Calibration in-domain (WikiText-2 test, first half). The blocks after the first see the tuned
outputs of the ones before, so only block 0 starts from the same error in every row.

    .venv/bin/python -m benchmarks.diag_quant_refit
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

import torch

import oneshot
from benchmarks.common import calibration_tokens, command_line, machine, machine_line, smollm2_gguf, write_results

QUANT = {"then": "gptq", "act_order": True, "observer": "mse", "symmetric": False, "bits": 4, "group_size": 64}


def _errors(source: str, tokenizer: Any, calib: Any, blocks: int, options: dict[str, Any]) -> list[list[float]]:
    """Each block's refit errors (before, then after each accepted pass) for one run of the cut model."""
    model, _ = oneshot.load_model(source, dtype="bfloat16")
    model.model.layers = model.model.layers[:blocks]
    model.config.num_hidden_layers = blocks
    report = oneshot.prune(model, tokenizer, method="sparsegpt", sparsity=0.5, calibration=calib, quiet=True, **options)
    return [list(r["errors"]) for r in report.extra["block_refit"]]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--settings", default="5e-3:8,2e-2:8,5e-2:8,2e-2:16,1e-2:8:2,5e-3:8:2")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--name", default="quant_refit_lr")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    torch.manual_seed(0)
    source = str(smollm2_gguf())
    _, tokenizer = oneshot.load_model(source, dtype="bfloat16")
    calib, _ = calibration_tokens(tokenizer, "wikitext2:head", args.nsamples, args.seqlen)
    rows: list[dict[str, Any]] = []
    float_refit = _errors(source, tokenizer, calib, args.blocks, {"refine": "block", "recon_epochs": 8})
    rows.append({"row": "SparseGPT 50% alone, then float refit (lr 1e-3, 8 passes, batch 8)", "errors": float_refit})
    for setting in args.settings.split(","):
        lr, epochs, *batch = setting.split(":")
        options = {**QUANT, "refine": "block", "recon_lr": float(lr), "recon_epochs": int(epochs)}
        if batch:
            options["batch_size"] = int(batch[0])
        label = f"+ GPTQ 4-bit, tuned: lr {lr}, {epochs} passes, batch {batch[0] if batch else 8}"
        rows.append({"row": label, "errors": _errors(source, tokenizer, calib, args.blocks, options)})
        print(label, [f"{e[0]:.5f} -> {e[-1]:.5f}" for e in rows[-1]["errors"]], flush=True)
    header = "| run | " + " | ".join(f"block {b}: before → after" for b in range(args.blocks)) + " |"
    lines = [
        f"# SmolLM2-135M, first {args.blocks} blocks: block output error of SparseGPT 50% + GPTQ 4-bit, tuned",
        "",
        f"Command: `{command_line('benchmarks.diag_quant_refit', argv).strip()}`  ",
        f"Calibration: {args.nsamples} x {args.seqlen} tokens of WikiText-2 test (first half), seed 0. GPTQ: "
        "asymmetric, act-order, MSE observer, group 64. Errors: relative block output error against the dense "
        "block on the calibration tokens; `before` is the untuned one (SparseGPT's alone in the first row).  ",
        f"Machine: {machine_line()}.",
        "",
        header,
        "|---|" + "---|" * args.blocks,
    ]
    for r in rows:
        cells = [f"{e[0]:.5f} → {e[-1]:.5f} ({len(e) - 1} passes kept)" for e in r["errors"]]
        lines.append(f"| {r['row']} | " + " | ".join(cells) + " |")
    payload = {"command": command_line("benchmarks.diag_quant_refit", argv), "machine": machine(), "rows": rows}
    write_results(args.name, payload, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
