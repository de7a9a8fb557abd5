"""One process vs two ranks (torchrun, Gloo) pruning SmolLM2-135M on this machine's 2 cores.

The honest comparison on 2 cores: one process with 2 threads against 2 ranks with 1 thread each
(same cores, same calibration set). Each run is a fresh ``oneshot prune`` command, timed from
outside; the second is launched with ``python -m torch.distributed.run --nproc-per-node 2``. The
table gives each run's wall seconds, the pruning seconds and phases from its report, rank 0's
communication (bytes per block, seconds, share of the run), and how far the 2-rank output is from
the 1-process output (identical tensors, mask agreement).

With ``--modes`` the same run is also streamed (``stream``: one process with ``--stream``;
``stream-ranks``: two ranks streaming) and, with ``--eval-windows``, each output's WikiText-2
perplexity is measured: the modes' quality side by side.

    .venv/bin/python -m benchmarks.distributed                          # wanda + sparsegpt, 64 x 512
    .venv/bin/python -m benchmarks.distributed --runs sparsegpt/passes=two --nsamples 32
    .venv/bin/python -m benchmarks.distributed --runs sparsegpt/refine=block --sparsity 0.7 \
        --modes memory,stream,ranks --eval-windows 40 --nsamples 32 --name modes_refine_block
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
from benchmarks.common import (
    machine,
    machine_line,
    parse_method,
    shared_file,
    smollm2_gguf,
    wikitext_test_text,
    write_results,
)
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


#: What each ``--modes`` entry runs: (ranks, extra flags).
MODES = {"memory": (1, ["--no-stream"]), "ranks": (2, ["--no-stream"]), "stream": (1, ["--stream"]),
         "stream-ranks": (2, ["--stream"])}  # fmt: skip


def run_prune(
    folder: Path,
    out: Path,
    method: str,
    options: dict[str, Any],
    args: argparse.Namespace,
    ranks: int,
    extra: list[str] | None = None,
) -> dict[str, Any]:
    """One ``oneshot prune`` command (under torch.distributed.run for several ranks); its report and wall time."""
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in options.items()] + (extra or [])
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
    found = {"ranks": ranks, "threads": int(threads), "wall_seconds": wall, "report": report}
    if args.eval_windows:
        model, tokenizer = oneshot.load_model(out)
        found["perplexity"] = oneshot.evaluate_perplexity(
            model, tokenizer, text=wikitext_test_text(), seqlen=args.seqlen, max_windows=args.eval_windows, quiet=True
        )
    return found


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
        + (f" {run['perplexity']:.3f} |" if "perplexity" in run else "")
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
    parser.add_argument("--modes", default="memory,ranks", help="comma-separated: " + ", ".join(MODES))
    parser.add_argument("--eval-windows", type=int, default=0, help="measure each output's perplexity (0: not)")
    args = parser.parse_args(argv)

    rows, payload = [], {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}, "runs": []}
    with tempfile.TemporaryDirectory(prefix="oneshot-dist-") as tmp:
        folder = Path(tmp) / "smollm2"
        model, tokenizer = oneshot.load_model(smollm2_gguf())  # the GGUF dequantised once, saved as safetensors
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        del model
        modes = args.modes.split(",")
        for entry in args.runs.split(","):
            method, options = parse_method(entry)
            found: dict[str, dict[str, Any]] = {}
            for mode in modes:
                ranks, extra = MODES[mode]
                out = Path(tmp) / f"{entry}-{mode}".replace("/", "_")
                found[mode] = run_prune(folder, out, method, options, args, ranks, extra)
                base = found[modes[0]]
                agree = None if mode == modes[0] else agreement(saved(out), saved(Path(base["report"]["out_dir"])))
                rows.append(row(f"{entry} ({mode})", found[mode], base, agree))
                payload["runs"].append({"entry": entry, "mode": mode, **found[mode], "agreement": agree})
                print(rows[-1], flush=True)
    header = (
        f"SmolLM2-135M, {args.sparsity:.0%}, {args.nsamples} x {args.seqlen} Emma tokens; {machine_line()}\n\n"
        f"| run | ranks x threads | passes | wall s | vs {modes[0]} | prune s (report) | forward + stats s | solve s | "
        f"propagate s | MB per block (rank 0) | communication s (share) | vs {modes[0]}: identical tensors / same "
        "mask / max abs diff |"
        + (f" WikiText-2 ppl ({args.eval_windows} windows) |" if args.eval_windows else "")
        + "\n|---|---|---|---|---|---|---|---|---|---|---|---|"
        + ("---|" if args.eval_windows else "")
    )
    write_results(args.name, payload, header + "\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
