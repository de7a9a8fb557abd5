"""Seconds of one layer's SparseGPT / GPTQ solve on SmolLM2's layer shapes, against another commit's code.

The solve is the part of a run that is the method's own arithmetic (the forwards and the Hessian
are shared by every method). Each shape is a random weight and the Hessian of random inputs;
``--compare REV`` loads ``oneshot/methods/sparsegpt.py`` and ``gptq.py`` as they were at ``REV``
(``git show``) next to the current ones, and times both alternately, ``--repeats`` times each,
keeping the fastest: on a busy machine that is the figure least disturbed by other work. The ratio
old / new is the speed-up; the table also gives the largest difference between the two weights.

    .venv/bin/python -m benchmarks.solve_speed --compare 8c2f896
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from benchmarks.common import command_line, machine, machine_line, write_results
from oneshot.methods import gptq, sparsegpt

#: SmolLM2-135M's solves per block: q/k/v stacked, o, gate/up stacked, down.
SHAPES = ((960, 576), (576, 576), (3072, 576), (576, 1536))


def module_at(rev: str, path: str, name: str, tmp: Path) -> ModuleType:
    """The module at ``path`` as committed at ``rev``, imported under ``name``."""
    source = subprocess.run(["git", "show", f"{rev}:{path}"], capture_output=True, text=True, check=True).stdout
    file = tmp / f"{name}.py"
    file.write_text(source)
    spec = importlib.util.spec_from_file_location(name, file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def fastest(calls: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """The fastest of ``repeats`` timings of every call, the calls taking turns."""
    best = dict.fromkeys(calls, float("inf"))
    for _ in range(repeats):
        for key, call in calls.items():
            t0 = time.perf_counter()
            call()
            best[key] = min(best[key], time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compare", required=True, help="git revision whose solve code is the baseline")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=4096, help="random input rows behind each Hessian")
    parser.add_argument("--name", default="solve_speed")
    args = parser.parse_args(argv)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        old_sgpt = module_at(args.compare, "oneshot/methods/sparsegpt.py", "old_sparsegpt", Path(tmp))
        old_gptq = module_at(args.compare, "oneshot/methods/gptq.py", "old_gptq", Path(tmp))
        gen = torch.Generator().manual_seed(0)
        for rows_, cols in SHAPES:
            w = torch.randn(rows_, cols, generator=gen)
            x = torch.randn(args.tokens, cols, generator=gen)
            h = x.T @ x / args.tokens
            spec, old_spec = gptq.QuantSpec(group_size=64), old_gptq.QuantSpec(group_size=64)
            calls = {
                "sparsegpt old": partial(old_sgpt.sparsegpt, w, h, 0.5),
                "sparsegpt new": partial(sparsegpt.sparsegpt, w, h, 0.5),
                "gptq old": partial(old_gptq.gptq, w, h, old_spec),
                "gptq new": partial(gptq.gptq, w, h, spec),
            }
            best = fastest(calls, args.repeats)
            for method, new, old in (
                ("sparsegpt", sparsegpt.sparsegpt(w, h, 0.5), old_sgpt.sparsegpt(w, h, 0.5)),
                ("gptq", gptq.gptq(w, h, spec), old_gptq.gptq(w, h, old_spec)),
            ):
                rows.append(
                    {
                        "shape": f"{rows_}x{cols}",
                        "method": method,
                        "old_seconds": best[f"{method} old"],
                        "new_seconds": best[f"{method} new"],
                        "speedup": best[f"{method} old"] / best[f"{method} new"],
                        "max_weight_difference": float((new.weight - old.weight).abs().max()),
                    }
                )
                print(rows[-1], flush=True)
    command = command_line("benchmarks.solve_speed", argv)
    lines = [
        "# One layer's SparseGPT (50%) / GPTQ (4-bit g64) solve, this commit vs another",
        "",
        f"Command: `{command.strip()}`  ",
        f"Random weights, Hessians of {args.tokens} random input rows; SmolLM2-135M's shapes (q/k/v and gate/up "
        f"stacked). Fastest of {args.repeats} alternating timings each.  ",
        f"Machine: {machine_line()}.",
        "",
        "| shape | method | baseline ms | this commit ms | speed-up | max weight difference |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['method']} | {r['old_seconds'] * 1e3:.1f} | {r['new_seconds'] * 1e3:.1f} | "
            f"{r['speedup']:.2f}x | {r['max_weight_difference']:.2e} |"
        )
    payload = {"command": command, "machine": machine(), "args": vars(args), "rows": rows}
    write_results(args.name, payload, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
