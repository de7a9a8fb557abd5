"""Streaming at scale: synthetic LLaMA checkpoints from 0.5 GB to larger than RAM, block by block.

Each run is ``oneshot prune --stream`` in a child process; its peak resident memory is the
child's ``ru_maxrss`` (``RUSAGE_CHILDREN`` of a fresh parent). Rows: checkpoint size, depth,
method, calibration tokens, wall seconds, seconds per block (median), peak RSS, bytes written.
Checkpoints are cached in ``--workdir`` between runs; each output is deleted after it is measured.

    .venv/bin/python -m benchmarks.scale                                  # the default grid
    .venv/bin/python -m benchmarks.scale --shapes 2048x5,2048x10 --methods wanda --name scale_quick
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import RESULTS, machine, machine_line, shared_file, write_results
from benchmarks.synthetic import checkpoint_bytes, llama_config, qwen3_moe_config, write_checkpoint, write_tokenizer

PEAK = (
    "import resource, subprocess, sys\n"
    "code = subprocess.run(sys.argv[1:]).returncode\n"
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)\n"
    "sys.exit(code)\n"
)
DEFAULT_SHAPES = "2048x5,2048x10,2048x22,2048x44,2048x88,5120x48"


def parse_shape(text: str) -> tuple[int, int, int]:
    """``"2048x44"`` -> (hidden 2048, 44 blocks, 0 experts); ``"2048x8x64"`` -> a Qwen3-MoE with 64 experts."""
    hidden, layers, *experts = text.split("x")
    return int(hidden), int(layers), int(experts[0]) if experts else 0


def shape_config(hidden: int, layers: int, experts: int = 0) -> Any:
    """A LLaMA (or, with ``experts``, Qwen3-MoE) config: head_dim 128, 4 query heads per KV head, vocab 32k."""
    heads = hidden // 128
    if experts:
        return qwen3_moe_config(hidden, layers, experts, heads=heads, kv_heads=max(1, heads // 4), vocab=32000)
    return llama_config(hidden, layers, heads=heads, kv_heads=max(1, heads // 4), vocab=32000)


def ensure_checkpoint(workdir: Path, hidden: int, layers: int, dtype: torch.dtype, experts: int = 0) -> Path:
    """The cached synthetic checkpoint of this shape (written once, with a tokenizer)."""
    family = f"qwen3moe{experts}e" if experts else "llama"
    folder = workdir / f"{family}-{hidden}x{layers}-{str(dtype).removeprefix('torch.')}"
    config = shape_config(hidden, layers, experts)
    if not (folder / "config.json").exists():
        shutil.rmtree(folder, ignore_errors=True)
        print(f"writing {folder.name} ({checkpoint_bytes(config, dtype) / 1e9:.1f} GB)")
        write_checkpoint(folder, config, dtype)
        write_tokenizer(folder)
    return folder


def folder_bytes(folder: Path) -> int:
    """Bytes of all files in a folder."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def run_one(
    folder: Path, method: str, nsamples: int, seqlen: int, workdir: Path, calib: Path, device: str = "auto"
) -> dict[str, Any]:
    """Prune ``folder`` once in a child process on ``device``; return the measured row."""
    out = workdir / "out"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        sys.executable, "-m", "oneshot", "prune", str(folder), "--method", method, "--sparsity", "0.5",
        "--calib", str(calib), "--nsamples", str(nsamples), "--seqlen", str(seqlen), "--stream", "--quiet",
        "--out", str(out), "--device", device,
    ]  # fmt: skip
    res = subprocess.run([sys.executable, "-c", PEAK, *cmd], capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    report = json.loads((out / "oneshot_report.json").read_text())
    written = folder_bytes(out)
    shutil.rmtree(out)
    per_block = report["seconds_per_block"]
    return {
        "checkpoint": folder.name,
        "checkpoint_bytes": folder_bytes(folder),
        "blocks": len(per_block),
        "method": method,
        "tokens": nsamples * seqlen,
        "seconds": report["seconds"],
        "seconds_per_block": statistics.median(per_block),
        "phase_seconds": report["phase_seconds"],
        "peak_rss_bytes": int(res.stdout.split()[-1]),
        "peak_device_memory_bytes": report.get("peak_device_memory_bytes"),
        "passes": report.get("passes"),
        "written_bytes": written,
        "command": " ".join(cmd[1:]),
    }


def table(rows: list[dict[str, Any]]) -> str:
    """The markdown results table."""
    gpu = any(r.get("peak_device_memory_bytes") for r in rows)  # a GPU run: its peak GPU memory too
    extra = " GPU peak GB |" if gpu else ""
    grads = any(r["phase_seconds"].get("gradients_forward") for r in rows)  # a streamed backward ran
    extra += " backward / forward | blocks' backward / forward |" if grads else ""
    lines = [
        "| checkpoint | GB | blocks | method | tokens | wall s | s / block | peak RSS GB | RSS / size | GB written |"
        + extra,
        "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if gpu else "") + ("---|---|" if grads else ""),
    ]
    for r in rows:
        gb = r["checkpoint_bytes"] / 1e9
        cell = f" {(r.get('peak_device_memory_bytes') or 0) / 1e9:.2f} |" if gpu else ""
        if grads:
            streamed = r["phase_seconds"].get("gradients_forward")
            cell += (
                f" {backward_over_forward(r):.2f} | {backward_over_forward(r, blocks=True):.2f} |"
                if streamed
                else " | |"
            )
        lines.append(
            f"| {r['checkpoint']} | {gb:.2f} | {r['blocks']} | {r['method']} | {r['tokens']} | {r['seconds']:.0f} | "
            f"{r['seconds_per_block']:.2f} | {r['peak_rss_bytes'] / 1e9:.2f} | {r['peak_rss_bytes'] / 1e9 / gb:.3f} | "
            f"{r['written_bytes'] / 1e9:.2f} |{cell}"
        )
    return "\n".join(lines) + "\n"


def backward_over_forward(row: dict[str, Any], blocks: bool = False) -> float:
    """A streamed backward's cost as a multiple of its first forward (which saves every block's inputs);
    with ``blocks``, the blocks' part of it (the loss head's backward, ``gradients_head``, left out)."""
    phases = row["phase_seconds"]
    backward = (
        phases["gradients"] - phases["gradients_forward"] - (phases.get("gradients_head", 0.0) if blocks else 0.0)
    )
    return float(backward) / float(phases["gradients_forward"])


def backward_summary(rows: list[dict[str, Any]]) -> str:
    """The streamed backwards' cost over repeated runs of one configuration (checkpoint, method, tokens):
    the median and the range of each run's ratio, and of its seconds per block forward and backward."""
    runs: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for r in rows:
        if r["phase_seconds"].get("gradients_forward"):
            runs.setdefault((r["checkpoint"], r["method"], r["tokens"]), []).append(r)
    if not runs:
        return ""

    def spread(values: list[float]) -> str:
        return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"

    lines = [
        "| checkpoint | method | tokens | runs | blocks' backward / forward | backward / forward "
        "| forward s / block | blocks' backward s / block | peak RSS GB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (checkpoint, method, tokens), mine in runs.items():
        forward = [r["phase_seconds"]["gradients_forward"] / r["blocks"] for r in mine]
        blocks = [backward_over_forward(r, blocks=True) for r in mine]
        lines.append(
            f"| {checkpoint} | {method} | {tokens} | {len(mine)} | {spread(blocks)} "
            f"| {spread([backward_over_forward(r) for r in mine])} | {spread(forward)} "
            f"| {spread([f * b for f, b in zip(forward, blocks, strict=True)])} "
            f"| {spread([r['peak_rss_bytes'] / 1e9 for r in mine])} |"
        )
    return "\n".join(lines) + "\n"


PHASES = ("load", "forward", "statistics", "solve", "report", "propagate", "activations", "write")


def phase_table(rows: list[dict[str, Any]]) -> str:
    """Where a block's time goes: each phase's seconds per block (the report's ``phase_seconds`` / blocks).

    ``activations`` is reading and writing the activation files (streaming keeps them on disk for
    ``--resume``); ``write`` is handing the block to the output shards (flushed, progress recorded).
    """
    lines = [
        "| checkpoint | method | tokens | " + " | ".join(PHASES) + " | other |",
        "|---|---|---|" + "---|" * (len(PHASES) + 1),
    ]
    for r in rows:
        phases, blocks = r["phase_seconds"], r["blocks"]
        cells = [phases.get(p, 0.0) / blocks for p in PHASES]
        other = r["seconds_per_block"] - sum(cells)
        lines.append(
            f"| {r['checkpoint']} | {r['method']} | {r['tokens']} | "
            + " | ".join(f"{c:.2f}" for c in cells)
            + f" | {other:.2f} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Peak RSS and seconds per block against checkpoint size, per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for method in sorted({r["method"] for r in rows}):
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["checkpoint_bytes"])
        sizes = [r["checkpoint_bytes"] / 1e9 for r in mine]
        ax1.plot(sizes, [r["peak_rss_bytes"] / 1e9 for r in mine], "o-", label=method)
        ax2.plot(sizes, [r["seconds_per_block"] for r in mine], "o-", label=method)
    top = max(r["checkpoint_bytes"] / 1e9 for r in rows)
    ax1.plot([0.4, top], [0.4, top], ":", color="grey", label="checkpoint size")
    ax1.axhline(24, color="red", linestyle="--", label="this machine's RAM")
    ax1.set(xscale="log", yscale="log", xlabel="checkpoint GB (bf16)", ylabel="peak RSS GB", title="Peak memory")
    ax2.set(
        xscale="log", yscale="log", xlabel="checkpoint GB (bf16)", ylabel="seconds per block", title="Cost per block"
    )
    for ax in (ax1, ax2):
        ax.legend()
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--shapes", default=DEFAULT_SHAPES, help="hidden x blocks (x experts: a Qwen3-MoE), comma-separated"
    )
    parser.add_argument("--methods", default="wanda,sparsegpt")
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--tokens-sweep", default="", help="extra NSAMPLES for the first shape (cost per token)")
    parser.add_argument("--skip", default="", help="method@shape pairs to leave out, e.g. sparsegpt@5120x48")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/oneshot-scale"))
    parser.add_argument("--keep-checkpoints", action="store_true")
    parser.add_argument("--name", default="scale_streaming")
    parser.add_argument("--include", type=Path, default=None, help="a results JSON whose rows come first")
    parser.add_argument("--device", default="auto", help="the runs' --device (auto: CUDA when present)")
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs of each configuration (a row each; streamed backwards summarised)"
    )
    args = parser.parse_args(argv)

    calib = shared_file("austen", "emma.txt")
    args.workdir.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    rows: list[dict[str, Any]] = []
    if args.include is not None:  # rows measured by an earlier invocation (see its own command)
        data = json.loads(args.include.read_text())
        rows = list(data["rows"] if isinstance(data, dict) else data)
    shapes = [parse_shape(s) for s in args.shapes.split(",")]
    for n, (hidden, layers, experts) in enumerate(shapes):
        folder = ensure_checkpoint(args.workdir, hidden, layers, torch.bfloat16, experts)
        for method in args.methods.split(","):
            if f"{method}@{args.shapes.split(',')[n]}" in skip:
                continue
            counts = [args.nsamples] + ([int(t) for t in args.tokens_sweep.split(",") if t] if n == 0 else [])
            for nsamples in counts:
                for _ in range(args.repeat):
                    rows.append(run_one(folder, method, nsamples, args.seqlen, args.workdir, calib, args.device))
                    print(table(rows[-1:]).splitlines()[-1], flush=True)
                    (RESULTS / f"{args.name}.partial.json").write_text(json.dumps(rows, indent=2))
        if not args.keep_checkpoints and n < len(shapes) - 1:
            shutil.rmtree(folder)
    text = (
        f"# Streaming at scale (synthetic LLaMA / Qwen3-MoE, bf16, 50% unstructured)\n\n"
        f"Command: `python -m benchmarks.scale {' '.join(argv if argv is not None else sys.argv[1:])}`\n\n"
        f"Machine: {machine_line()}\n\n" + table(rows) + "\nSeconds per block by phase (`other`: the median "
        "block's wall time minus the phases' means; phases absent from older rows count as 0):\n\n" + phase_table(rows)
    )
    summary = backward_summary(rows)
    if summary:
        text += "\nStreamed backwards over their runs (median, min-max):\n\n" + summary
    write_results(args.name, {"machine": machine(), "rows": rows}, text)
    plot(rows, RESULTS / f"{args.name}.png")
    (RESULTS / f"{args.name}.partial.json").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
