"""OBS vs SparseGPT layer by layer on all-MiniLM-L6-v2: reconstruction error and seconds per layer.

Each encoder linear layer's Hessian is gathered in one dense sweep of the driver over calibration
sentences (CoNLL-2003 train, else the bundled text); then both solvers prune the same layer from
the same Hessian. Error is ‖(W − W′)X‖² / ‖WX‖² computed exactly from H.

    .venv/bin/python -m benchmarks.obs_vs_sparsegpt
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from typing import Any

import torch
from torch import nn

from benchmarks.common import SHARED, command_line, machine, machine_line, minilm_dir, write_results
from oneshot.calibration.data import CalibrationSet
from oneshot.calibration.stats import Accumulator
from oneshot.config import PruneConfig
from oneshot.engine import layer_stats, resolve_device, sweep
from oneshot.layers import as_matrix
from oneshot.methods.base import STAT_HESSIAN
from oneshot.methods.obs import obs
from oneshot.methods.sparsegpt import sparsegpt


def conll_sentences(limit: int) -> list[str]:
    """First ``limit`` sentences of CoNLL-2003 train as plain strings."""
    words: list[str] = []
    out: list[str] = []
    for line in (SHARED / "conll2003" / "train.txt").read_text().splitlines():
        if line.startswith("-DOCSTART-"):
            continue
        if not line.strip():
            if words:
                out.append(" ".join(words))
                words = []
            if len(out) >= limit:
                break
            continue
        words.append(line.split()[0])
    return out


def rel_error(w: torch.Tensor, w2: torch.Tensor, h: torch.Tensor) -> float:
    d = w - w2
    return float(torch.einsum("oi,ij,oj->", d, h, d) / torch.einsum("oi,ij,oj->", w, h, w))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sentences", type=int, default=512)
    parser.add_argument("--sparsities", default="0.5,0.7")
    parser.add_argument("--name", default="obs_vs_sparsegpt_minilm")
    parser.add_argument("--model", default=None, help="BERT folder [the packaged all-MiniLM-L6-v2]")
    parser.add_argument("--device", default="auto", help="where both solvers run (auto: CUDA if available)")
    parser.add_argument("--obs-memory-mb", type=int, default=1024, help="OBS row-batch memory budget")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    model_dir = args.model or minilm_dir()
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    enc = tok(conll_sentences(args.sentences), padding=True, truncation=True, max_length=128, return_tensors="pt")
    calib = CalibrationSet(enc["input_ids"], enc["attention_mask"])
    hessians: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def keep(full: str, block: int, module: nn.Module, accs: dict[str, Accumulator]) -> None:
        h = layer_stats(accs).hessian
        assert h is not None
        hessians[full] = (as_matrix(module).to(device), h.to(device))

    config = PruneConfig(method="sparsegpt", sparsity=0.5, quiet=True, device=str(device))
    sweep(model, calib, config, (STAT_HESSIAN,), keep)

    def timed(fn: Any, *fn_args: Any, **fn_kwargs: Any) -> tuple[Any, float]:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        out = fn(*fn_args, **fn_kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out, time.perf_counter() - t0

    budget = args.obs_memory_mb << 20
    rows: list[dict[str, Any]] = []
    for s in (float(x) for x in args.sparsities.split(",")):
        for name, (w, h) in hessians.items():
            sg, t_sg = timed(sparsegpt, w, h, s)
            ob, t_obs = timed(obs, w, h, s, memory_budget=budget)
            rows.append(
                {
                    "layer": name,
                    "kind": name.split(".", 3)[-1],
                    "shape": list(w.shape),
                    "sparsity": s,
                    "sparsegpt_error": rel_error(w, sg.weight, h),
                    "obs_error": rel_error(w, ob.weight, h),
                    "sparsegpt_seconds": t_sg,
                    "obs_seconds": t_obs,
                }
            )
            print(rows[-1], flush=True)

    command = command_line("benchmarks.obs_vs_sparsegpt", argv)
    grouped: dict[tuple[float, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        grouped[(r["sparsity"], r["kind"])].append(r)
    lines = [
        "# OBS vs SparseGPT per layer, all-MiniLM-L6-v2 (6 blocks)",
        "",
        f"Command: `{command.strip()}`  ",
        f"Calibration: {args.sentences} CoNLL-2003 train sentences ({int(enc['attention_mask'].sum())} tokens, padding "
        f"excluded). Machine: {machine_line()}, solvers on {device}. Errors are "
        "‖(W−W′)X‖²/‖WX‖² averaged over the 6 blocks; seconds are per layer.",
        "",
        "| sparsity | layer | shape | SparseGPT error | OBS error | OBS / SparseGPT error | SparseGPT s | OBS s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (s, kind), rs in grouped.items():
        e_sg = sum(r["sparsegpt_error"] for r in rs) / len(rs)
        e_ob = sum(r["obs_error"] for r in rs) / len(rs)
        t_sg = sum(r["sparsegpt_seconds"] for r in rs) / len(rs)
        t_ob = sum(r["obs_seconds"] for r in rs) / len(rs)
        shape = "x".join(str(v) for v in rs[0]["shape"])
        lines.append(
            f"| {s:.0%} | {kind} | {shape} | {e_sg:.4f} | {e_ob:.4f} | {e_ob / e_sg:.3f} | {t_sg:.2f} | {t_ob:.2f} |"
        )
    payload = {"command": command, "machine": machine(), "rows": rows}
    write_results(args.name, payload, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
