"""One process vs two ranks (torchrun, Gloo) pruning SmolLM2-135M on this machine's 2 cores.

The honest comparison on 2 cores: one process with 2 threads against 2 ranks with 1 thread each
(same cores, same calibration set). Each run is a fresh ``oneshot prune`` command, timed from
outside; the second is launched with ``python -m torch.distributed.run --nproc-per-node 2``. The
table gives each run's wall seconds, the pruning seconds and phases from its report, rank 0's
communication (bytes per block, seconds, share of the run), and how far the 2-rank output is from
the 1-process output (identical tensors, mask agreement).

    .venv/bin/python -m benchmarks.distributed                          # wanda + sparsegpt, 64 x 512
    .venv/bin/python -m benchmarks.distributed --runs sparsegpt/passes=two --nsamples 32
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import oneshot
from benchmarks.common import machine, machine_line, parse_method, shared_file, smollm2_gguf, write_results
from oneshot.shards import saved_files


def saved(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a saved model folder."""
    from safetensors.torch import load_file

    found: dict[str, torch.Tensor] = {}
    for name in saved_files(folder):
        found.update(load_file(str(folder / name)))
    return found


def agreement(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
    """Share of identical tensors, of equal zero masks and the largest weight difference (pruned layers)."""
    same = sum(torch.equal(a[k], b[k]) for k in b)
    layers = [k for k, v in b.items() if v.dim() == 2 and ".layers." in k]
    masks = sum(int(((a[k] == 0) == (b[k] == 0)).sum()) for k in layers)
    total = sum(b[k].numel() for k in layers)
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in layers)
    return {"identical_tensors": same / len(b), "mask_agreement": masks / total, "max_abs_diff": worst}


def run_prune(
    folder: Path, out: Path, method: str, options: dict[str, Any], args: argparse.Namespace, ranks: int
) -> dict[str, Any]:
    """One ``oneshot prune`` command (under torch.distributed.run for several ranks); its report and wall time."""
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in options.items()]
    command = [
        str(folder), "--method", method, "--sparsity", str(args.sparsity), "--calib", str(args.calib),
        "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--out", str(out), "--quiet", *flags,
    ]  # fmt: skip
    launcher = [sys.executable, "-m", "oneshot", "prune"]
    if ranks > 1:
        launcher = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(ranks),
            "-m",
            "oneshot",
            "prune",
        ]
    threads = str(max(1, args.cores // ranks))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    t0 = time.perf_counter()
    done = subprocess.run(launcher + command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(launcher + command)} failed:\n{done.stderr[-3000:]}")
    report = json.loads((out / "oneshot_report.json").read_text())
    return {"ranks": ranks, "threads": int(threads), "wall_seconds": wall, "report": report}


def row(name: str, run: dict[str, Any], base: dict[str, Any], agree: dict[str, float] | None) -> str:
    report = run["report"]
    phases = report["phase_seconds"]
    facts = report.get("distributed", {})
    blocks = facts.get("bytes_per_block") or [0]
    comm = facts.get("communication_seconds", 0.0)
    agree_text = (
        "-"
        if agree is None
        else f"{agree['identical_tensors']:.1%} / {agree['mask_agreement']:.5%} / {agree['max_abs_diff']:.1e}"
    )
    return (
        f"| {name} | {run['ranks']} x {run['threads']} | {report.get('passes', '-')} | {run['wall_seconds']:.1f} | "
        f"{run['wall_seconds'] / base['wall_seconds']:.2f}x | {report['seconds']:.1f} | "
        f"{phases['forward'] + phases['statistics']:.1f} | {phases['solve']:.1f} | {phases['propagate']:.1f} | "
        f"{sum(blocks) / len(blocks) / 1e6:.1f} | {comm:.1f} ({comm / report['seconds']:.1%}) | {agree_text} |"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="wanda,sparsegpt,sparsegpt/passes=two", help="METHOD[/key=value...]")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--cores", type=int, default=2, help="threads of the 1-process run; split among ranks")
    parser.add_argument("--calib", type=Path, default=shared_file("austen", "emma.txt"))
    parser.add_argument("--name", default="distributed_smollm2")
    args = parser.parse_args(argv)

    rows, payload = [], {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}, "runs": []}
    with tempfile.TemporaryDirectory(prefix="oneshot-dist-") as tmp:
        folder = Path(tmp) / "smollm2"
        model, tokenizer = oneshot.load_model(smollm2_gguf())  # the GGUF dequantised once, saved as safetensors
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        del model
        for entry in args.runs.split(","):
            method, options = parse_method(entry)
            one = run_prune(folder, Path(tmp) / f"{entry}-1".replace("/", "_"), method, options, args, 1)
            two = run_prune(folder, Path(tmp) / f"{entry}-2".replace("/", "_"), method, options, args, 2)
            agree = agreement(saved(Path(two["report"]["out_dir"])), saved(Path(one["report"]["out_dir"])))
            rows += [row(entry, one, one, None), row(entry, two, one, agree)]
            payload["runs"].append({"entry": entry, "one": one, "two": two, "agreement": agree})
            print(rows[-2], rows[-1], sep="\n", flush=True)
    header = (
        f"SmolLM2-135M, {args.sparsity:.0%}, {args.nsamples} x {args.seqlen} Emma tokens; {machine_line()}\n\n"
        "| run | ranks x threads | passes | wall s | vs 1 process | prune s (report) | forward + stats s | solve s | "
        "propagate s | MB per block (rank 0) | communication s (share) | vs 1 process: identical tensors / same "
        "mask / max abs diff |\n|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    write_results(args.name, payload, header + "\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
