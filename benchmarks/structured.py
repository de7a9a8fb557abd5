"""Structured pruning of SmolLM2-135M: perplexity, size and CPU throughput vs the dense model.

For each ratio of MLP neurons removed, each score (fluctuation / variance / magnitude) and with or
without bias compensation: WikiText-2 test perplexity, parameter count, saved file size, and
tokens/s of the pruned model as a ratio to the dense model's, timed in the same process.

    .venv/bin/python -m benchmarks.structured --max-windows 64
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import oneshot
from benchmarks.common import command_line, eval_text, machine, machine_line, shared_file, smollm2_gguf, write_results
from oneshot.calibration.data import build_calibration
from oneshot.config import CalibrationConfig
from oneshot.evaluation import bos_protocol
from oneshot.surgery import param_count


def tokens_per_second(model: torch.nn.Module, ids: torch.Tensor, repeats: int = 3) -> float:
    """Best-of-``repeats`` forward throughput on ``ids``."""
    best = float("inf")
    with torch.no_grad():
        model(input_ids=ids[:1])
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(input_ids=ids, use_cache=False)
            best = min(best, time.perf_counter() - t0)
    return ids.numel() / best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", default="0.1,0.2,0.3")
    parser.add_argument("--scores", default="fluctuation,variance,magnitude")
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--max-windows", type=int, default=None)
    parser.add_argument("--eval", default="wikitext2", help="wikitext2, ptb, persuasion, or a text file to score")
    parser.add_argument("--repeats", type=int, default=5, help="timed forwards per throughput measurement (best)")
    parser.add_argument("--name", default="structured_smollm2")
    parser.add_argument("--model", default=None, help="model folder, hub name or .gguf [the packaged SmolLM2]")
    args = parser.parse_args(argv)

    model, tokenizer = oneshot.load_model(args.model or smollm2_gguf())
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    dense_config = model.config.to_dict()
    cfg = CalibrationConfig(source=str(shared_file("austen", "emma.txt")), nsamples=args.nsamples, seqlen=args.seqlen)
    calib = build_calibration(tokenizer, cfg, args.seqlen)
    text, eval_name = eval_text(args.eval)
    probe = calib.input_ids[:4]

    def ppl(m: torch.nn.Module) -> float:
        return oneshot.evaluate_perplexity(
            m, tokenizer, text=text, seqlen=args.seqlen, max_windows=args.max_windows, quiet=True
        )

    def fresh() -> torch.nn.Module:
        from transformers import AutoModelForCausalLM, LlamaConfig

        m = AutoModelForCausalLM.from_config(LlamaConfig.from_dict(dense_config))
        m.load_state_dict(dense_state)
        return m.eval()

    dense = fresh()
    dense_ppl = ppl(dense)
    dense_params = param_count(dense)
    rows: list[dict[str, Any]] = []
    for ratio in (float(r) for r in args.ratios.split(",")):
        for score in args.scores.split(","):
            for comp in (True, False):
                m = fresh()
                with tempfile.TemporaryDirectory() as tmp:
                    report = oneshot.prune(
                        m,
                        tokenizer,
                        method="structured",
                        ratio=ratio,
                        score=score,
                        bias_compensation=comp,
                        calibration=calib,
                        out=Path(tmp) / "m",
                        quiet=True,
                    )
                    size = sum(f.stat().st_size for f in (Path(tmp) / "m").glob("*.safetensors"))
                speed = tokens_per_second(m, probe, args.repeats) / tokens_per_second(dense, probe, args.repeats)
                rows.append(
                    {
                        "ratio": ratio,
                        "score": score,
                        "compensation": comp,
                        "perplexity": ppl(m),
                        "params": param_count(m),
                        "file_bytes": size,
                        "throughput_ratio": speed,
                        "seconds": report.seconds,
                    }
                )
                print(rows[-1], flush=True)

    command = command_line("benchmarks.structured", argv)
    windows = "all" if args.max_windows is None else f"first {args.max_windows}"
    lines = [
        "# Structured pruning of SmolLM2-135M (MLP neurons removed in every block)",
        "",
        f"Command: `{command.strip()}`  ",
        f"Calibration {args.nsamples} x {args.seqlen} tokens of Emma; {eval_name} perplexity ({windows} "
        f"{args.seqlen}-token windows, BOS {bos_protocol(model)}); dense perplexity {dense_ppl:.2f}, "
        f"{dense_params:,} parameters. Throughput is "
        f"tokens/s of the pruned model over the dense one on a 4 x {args.seqlen} batch, same process. Machine: "
        f"{machine_line()}.",
        "",
        "| MLP removed | score | bias compensation | perplexity | parameters | safetensors MB | throughput vs dense |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['ratio']:.0%} | {r['score']} | {'yes' if r['compensation'] else 'no'} | "
            f"{r['perplexity']:.2f} | {r['params']:,} | {r['file_bytes'] / 1e6:.1f} | "
            f"{r['throughput_ratio']:.2f}x |"
        )
    payload = {
        "command": command.strip(),
        "machine": machine(),
        "bos": bos_protocol(model),
        "dense_perplexity": dense_ppl,
        "dense_params": dense_params,
        "rows": rows,
    }
    write_results(args.name, payload, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
