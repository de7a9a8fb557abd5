"""Does pruning on a GPU give the CPU's result? In-memory and streamed, Wanda and SparseGPT.

A synthetic LLaMA checkpoint (random weights) is pruned three ways per method: in memory on the
CPU (the reference), in memory on ``--device`` and streamed on ``--device`` (only the current block
on the device). Each output is compared with the reference tensor by tensor: the share of weights
whose kept / pruned state differs, and the largest relative difference ‖W − W_ref‖ / ‖W_ref‖ of any
tensor. The streamed and in-memory runs on the same device should agree exactly; CPU and GPU
differ by float rounding (other matmul kernels, TF32 off), which can flip a few near-tied mask
choices. ``--cpu-threads 1`` adds a CPU run with another thread count (another summation order in
the same kernels): how far rounding alone moves a method's result.

    .venv/bin/python -m benchmarks.device_agreement --device cuda
"""

from __future__ import annotations

import argparse
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

import oneshot
from benchmarks.common import command_line, machine, machine_line, shared_file, write_results
from benchmarks.synthetic import llama_config, write_checkpoint, write_tokenizer
from oneshot.checkpoint import Checkpoint
from oneshot.config import CalibrationConfig


def compare(out: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Mask disagreement (share of weights) and the largest relative tensor difference against ``ref``."""
    flipped = total = 0
    worst = 0.0
    exact = True
    per_tensor: dict[str, float] = {}
    for key, want in ref.items():
        got = out[key]
        exact = exact and torch.equal(got, want)
        if want.ndim == 2:
            flips = int(((got == 0) != (want == 0)).sum())
            flipped += flips
            total += want.numel()
            per_tensor[key] = flips / want.numel()
        diff = (got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)
        worst = max(worst, float(diff))
    first = next((k for k, v in per_tensor.items() if v > 0), None)  # in the checkpoint's (block) order
    blocks: dict[int, list[float]] = {}
    for key, share in per_tensor.items():
        match = re.search(r"\.(\d+)\.", key)
        if match:
            blocks.setdefault(int(match.group(1)), []).append(share)
    return {
        "mask_disagreement": flipped / max(total, 1),
        "max_relative_difference": worst,
        "identical": exact,
        "first_differing_tensor": first,
        "per_tensor_mask_disagreement": per_tensor,
        "per_block_mask_disagreement": [sum(v) / len(v) for _, v in sorted(blocks.items())],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--methods", default="wanda,sparsegpt")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument(
        "--cpu-threads",
        type=int,
        default=0,
        help="also run on the CPU with this many threads (another summation order)",
    )
    parser.add_argument("--name", default="device_agreement")
    args = parser.parse_args(argv)

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="oneshot-agree-") as tmp:
        folder = Path(tmp) / "ckpt"
        write_checkpoint(folder, llama_config(args.hidden, args.layers, heads=8, kv_heads=2), torch.float32)
        write_tokenizer(folder)
        calib = CalibrationConfig(
            source=str(shared_file("austen", "emma.txt")), nsamples=args.nsamples, seqlen=args.seqlen, seed=0
        )
        for method in args.methods.split(","):
            outputs: dict[str, dict[str, torch.Tensor]] = {}
            runs = [
                ("cpu, in memory", "cpu", False, 0),
                (f"{args.device}, in memory", args.device, False, 0),
                (f"{args.device}, streamed", args.device, True, 0),
            ]
            if args.cpu_threads:
                runs.append((f"cpu, {args.cpu_threads} thread(s), in memory", "cpu", False, args.cpu_threads))
            for n, (label, device, stream, threads) in enumerate(runs):
                out = Path(tmp) / f"{method}-{n}"
                before = torch.get_num_threads()
                torch.set_num_threads(threads or before)
                try:
                    report = oneshot.prune(
                        str(folder), method=method, sparsity=0.5, calibration=calib, out=out,
                        device=device, stream=stream, quiet=True,
                    )  # fmt: skip
                finally:
                    torch.set_num_threads(before)
                saved = Checkpoint(out)
                outputs[label] = saved.read(saved.tensors)
                row = {
                    "method": method,
                    "run": label,
                    "mode": report.extra.get("mode"),
                    "seconds": report.seconds,
                    "mean_relative_error": report.mean_relative_error,
                }
                row.update(compare(outputs[label], outputs["cpu, in memory"]))
                if stream:  # the streamed run against the in-memory run on the same device
                    same = compare(outputs[label], outputs[f"{args.device}, in memory"])
                    row["identical_to_in_memory_same_device"] = same["identical"]
                    row["max_relative_difference_to_in_memory_same_device"] = same["max_relative_difference"]
                rows.append(row)
                print({k: v for k, v in row.items() if k != "per_tensor_mask_disagreement"}, flush=True)

    command = command_line("benchmarks.device_agreement", argv)
    lines = [
        "# Pruning on a device vs on the CPU (synthetic LLaMA, float32, 50% unstructured)",
        "",
        f"Command: `{command.strip()}`  ",
        f"Checkpoint: hidden {args.hidden}, {args.layers} blocks, random weights; calibration "
        f"{args.nsamples} x {args.seqlen} characters of Emma. Machine: {machine_line()}.",
        "",
        "| method | run | mode | mean rel. layer error | mask disagreement vs CPU | max rel. difference vs CPU | "
        "identical to CPU | "
        "streamed = in memory (same device) | mask disagreement per block |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        same = r.get("identical_to_in_memory_same_device")
        lines.append(
            f"| {r['method']} | {r['run']} | {r['mode']} | {r['mean_relative_error']:.6f} | "
            f"{r['mask_disagreement']:.2e} | "
            f"{r['max_relative_difference']:.2e} | {r['identical']} | {'-' if same is None else same} | "
            f"{', '.join(f'{x:.1e}' for x in r['per_block_mask_disagreement'])} |"
        )
    write_results(args.name, {"command": command, "machine": machine(), "rows": rows}, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
