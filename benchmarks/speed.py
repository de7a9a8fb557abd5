"""Where the time goes when pruning SmolLM2-135M: load, forwards, statistics, solve, propagate, write.

The baseline is the model's own dense forward over the same calibration set, timed in the same
process; each method's whole run is reported as a ratio to it (absolute seconds on a shared
2-core machine are noisy, ratios much less so).

    .venv/bin/python -m benchmarks.speed                       # 64 x 512 tokens, wanda + sparsegpt
    .venv/bin/python -m benchmarks.speed --modes single,two,two-unstacked --eval-windows 64

Each mode is one way to sweep: ``single`` (each layer pruned inside the block's one forward),
``two`` (statistics forward, then propagation), ``*-unstacked`` (q/k/v and gate/up solved one by
one instead of stacked). With ``--eval-windows`` the pruned model's WikiText-2 perplexity is
measured too (first N 512-token windows).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import oneshot
from benchmarks.common import command_line, eval_text, machine, machine_line, shared_file, smollm2_gguf, write_results
from oneshot.calibration.data import build_calibration
from oneshot.capture import model_call_kwargs
from oneshot.config import CalibrationConfig
from oneshot.engine import resolve_device, synchronize
from oneshot.memory import tune_allocator


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="wanda,sparsegpt")
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--name", default="speed_smollm2")
    parser.add_argument("--modes", default="single,two", help="comma-separated: single, two, single-unstacked, ...")
    parser.add_argument("--eval-windows", type=int, default=0, help="WikiText-2 windows to score (0: none)")
    parser.add_argument("--model", default=None, help="a GGUF file or model folder (default: the packaged SmolLM2)")
    parser.add_argument(
        "--device",
        default="cpu",
        help="the runs' --device; on cuda the baseline is the whole model's forward on the GPU",
    )
    parser.add_argument(
        "--default-allocator",
        action="store_true",
        help="keep glibc's default malloc thresholds (oneshot.memory.tune_allocator not applied)",
    )
    args = parser.parse_args(argv)
    if args.default_allocator:
        os.environ["ONESHOT_TUNE_MALLOC"] = "0"
    allocator = tune_allocator() or "default"  # for the baseline forward too: one process, one allocator

    t0 = time.perf_counter()
    model, tokenizer = oneshot.load_model(args.model or smollm2_gguf())
    device = resolve_device(args.device)
    load_s = time.perf_counter() - t0
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = CalibrationConfig(source=str(shared_file("austen", "emma.txt")), nsamples=args.nsamples, seqlen=args.seqlen)
    calib = build_calibration(tokenizer, cfg, args.seqlen)

    def dense_forward() -> float:
        """Seconds of one dense forward over the calibration set, the whole model on ``device``."""
        model.to(device)
        batches = [ids.to(device) for ids, _ in calib.batches(args.batch_size)]
        synchronize(device)
        start = time.perf_counter()
        with torch.no_grad():
            for ids in batches:
                model(input_ids=ids, **model_call_kwargs(model))
        synchronize(device)
        seconds = time.perf_counter() - start
        model.to("cpu")  # oneshot moves one block at a time to the device itself
        return seconds

    baseline = dense_forward()
    rows: list[dict[str, Any]] = []
    text = eval_text("wikitext2")[0] if args.eval_windows else ""
    for method in args.methods.split(","):
        for mode in args.modes.split(","):
            passes, _, unstacked = mode.partition("-")
            options: dict[str, Any] = {"passes": passes}
            if unstacked and method in ("sparsegpt", "obs"):
                options["stack"] = False
            model.load_state_dict(dense)
            adjacent = dense_forward()  # the machine's speed drifts: each row's ratio uses the forward just before it
            with tempfile.TemporaryDirectory() as tmp:
                report = oneshot.prune(
                    model,
                    tokenizer,
                    method=method,
                    sparsity=0.5,
                    calibration=calib,
                    out=Path(tmp) / "m",
                    quiet=True,
                    device=args.device,
                    **options,
                    **({"batch_size": args.batch_size} if options.get("passes") == "two" else {}),
                )
            t = report.times
            row = {
                "method": method,
                "mode": mode,
                "passes": report.extra.get("passes"),
                "load": load_s,
                "capture": t.capture,
                "forwards": t.forward,
                "statistics": t.statistics,
                "solve": t.solve,
                "error_report": t.report,
                "propagate": t.propagate,
                "write": report.extra.get("write_seconds", 0.0),
                "total": report.seconds,
                "dense_forward_before": adjacent,
                "ratio_to_dense_forward": report.seconds / adjacent,
                "ratio_to_first_dense_forward": report.seconds / baseline,
                "peak_rss_bytes": report.extra.get("peak_rss_bytes"),
                "peak_device_memory_bytes": report.extra.get("peak_device_memory_bytes"),
            }
            if args.eval_windows:
                row["perplexity"] = oneshot.evaluate_perplexity(
                    model,
                    tokenizer,
                    text=text,
                    seqlen=512,
                    max_windows=args.eval_windows,
                    quiet=True,
                    device=args.device,
                )
            rows.append(row)
            print(row, flush=True)
    baseline_again = dense_forward()  # the machine's speed drifts: show it

    command = command_line("benchmarks.speed", argv)
    cols = ["load", "capture", "forwards", "statistics", "solve", "error_report", "propagate", "write", "total"]
    lines = [
        f"# Pruning time by phase, {Path(args.model).name if args.model else 'SmolLM2-135M'}, 50% unstructured",
        "",
        f"Command: `{command.strip()}`  ",
        f"Calibration: {args.nsamples} x {args.seqlen} tokens, batch {args.batch_size}. Machine: {machine_line()}. "
        f"Host allocator: {allocator}.  ",
        f"Baseline: one dense forward of the whole model over the calibration set, measured again just "
        f"before every row (`dense s`; {baseline:.1f}s at the start, {baseline_again:.1f}s after the runs): "
        "each row's ratio is to its own. `forwards` are the statistics-gathering block "
        "forwards without the hook time; `statistics` is the hook time; `error_report` estimates each layer's "
        "reconstruction error for the report on 256 sampled tokens; `total` is the whole `oneshot.prune` call "
        "including the write (the model is already loaded: `load` is listed once, outside `total`). Modes: "
        "`single` = each layer pruned inside the block's one forward over the whole calibration set (no "
        "propagation pass), `two` = statistics forward then propagation forward; `-unstacked` = q/k/v and "
        "gate/up solved one by one instead of as one stacked matrix. Perplexity: WikiText-2 test, first "
        f"{args.eval_windows} windows of 512 tokens (BOS once).",
        "",
        "| method | mode | " + " | ".join(cols) + " | dense s | total / dense forward | WikiText-2 ppl |",
        "|---|---|" + "---|" * (len(cols) + 3),
    ]
    for r in rows:
        ppl = f"{r['perplexity']:.2f}" if "perplexity" in r else "-"
        cells = " | ".join(f"{r[c]:.1f}" for c in cols)
        ratio = f"{r['dense_forward_before']:.1f} | {r['ratio_to_dense_forward']:.2f}x"
        lines.append(f"| {r['method']} | {r['mode']} | {cells} | {ratio} | {ppl} |")
    payload = {
        "command": command,
        "machine": machine(),
        "allocator": allocator,
        "baseline_seconds": [baseline, baseline_again],
        "rows": rows,
    }
    write_results(args.name, payload, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
