"""A streamed backward's per-sample step with and without :func:`oneshot.memory.heap_reused`, in one process.

The step the streamed Fisher backward takes for every sample of every block: the block's forward
recomputed from its input with gradients, ``autograd.grad`` of its weights and its input, the
squared weight gradients summed (:func:`oneshot.gradients.add_square`). Run in a process tuned
footprint first (:func:`oneshot.memory.tune_allocator`, as every streamed run is), alternately
inside and outside ``heap_reused``, ``--rounds`` times each; a no-graph forward of the same samples
is timed in every round too. Reports page faults per sample and the step's seconds over the
forward's (the medians of the rounds): a ratio measured in the same run, robust to the machine's
drift. One float32 LLaMA block (random weights), ``--nsamples`` inputs of ``--seqlen`` tokens.

    python -m benchmarks.backward_heap
    python -m benchmarks.backward_heap --seqlen 512 --name backward_heap_512
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.common import command_line, machine, machine_line, write_results
from benchmarks.synthetic import llama_config
from oneshot.gradients import add_square, gradients_only_for
from oneshot.memory import heap_reused, tune_allocator


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def measure(hidden: int, nsamples: int, seqlen: int, rounds: int, seed: int = 0) -> dict[str, Any]:
    """Seconds and page faults per sample of the backward step, with and without the heap reused."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    setting = tune_allocator(footprint=True)
    torch.manual_seed(seed)
    config = llama_config(hidden, 1)  # the synthetic checkpoints' shape: intermediate ≈ 2.75 × hidden, 16 / 4 heads
    config._attn_implementation = "sdpa"
    block = LlamaDecoderLayer(config, 0)
    positions = torch.arange(seqlen)[None]
    embeddings = LlamaRotaryEmbedding(config)(torch.zeros(1, seqlen, hidden), positions)
    inputs = [torch.randn(1, seqlen, hidden) for _ in range(nsamples)]
    grads = [torch.randn(1, seqlen, hidden) for _ in range(nsamples)]
    leaves = [p for p in block.parameters() if p.dim() == 2]
    acc = [torch.zeros_like(p) for p in leaves]

    def run(x: torch.Tensor) -> torch.Tensor:
        out = block(x, position_embeddings=embeddings, position_ids=positions)
        return out[0] if isinstance(out, tuple) else out

    def forward() -> None:
        with torch.no_grad():
            for x in inputs:
                run(x)

    def backward() -> None:
        with gradients_only_for(block, leaves):
            for x, g in zip(inputs, grads, strict=True):
                leaf = x.clone().requires_grad_(True)
                with torch.enable_grad():
                    found = torch.autograd.grad(run(leaf), [*leaves, leaf], grad_outputs=g)
                for a, grad in zip(acc, found, strict=False):
                    add_square(a, grad)

    def reused() -> None:
        with heap_reused():
            backward()

    def timed(step: Callable[[], None]) -> tuple[float, int]:
        faults, t0 = _faults(), time.perf_counter()
        step()
        return time.perf_counter() - t0, _faults() - faults

    forward()
    backward()  # warm-up
    seconds: dict[str, list[float]] = {"forward": [], "footprint": [], "heap reused": []}
    faults: dict[str, list[int]] = {"footprint": [], "heap reused": []}
    for _ in range(rounds):
        for name, step in (("forward", forward), ("footprint", backward), ("heap reused", reused)):
            s, f = timed(step)
            seconds[name].append(s)
            if name in faults:
                faults[name].append(f)
    ratio = {name: [s / f for s, f in zip(seconds[name], seconds["forward"], strict=True)] for name in faults}
    return {
        "allocator": setting,
        "hidden": hidden,
        "nsamples": nsamples,
        "seqlen": seqlen,
        "rounds": rounds,
        "seconds": seconds,
        "faults": faults,
        "step_over_forward": {name: statistics.median(r) for name, r in ratio.items()},
        "faults_per_sample": {name: statistics.median(f) / nsamples for name, f in faults.items()},
        "ratio_range": {name: (min(r), max(r)) for name, r in ratio.items()},
    }


def table(row: dict[str, Any]) -> str:
    """The markdown results table."""
    lines = [
        "| allocator during the step | page faults / sample | step / forward (median) | range over rounds |",
        "|---|---|---|---|",
    ]
    for name in ("footprint", "heap reused"):
        low, high = row["ratio_range"][name]
        lines.append(
            f"| {name} | {row['faults_per_sample'][name]:.0f} | {row['step_over_forward'][name]:.2f} "
            f"| {low:.2f}-{high:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--name", default="backward_heap")
    args = parser.parse_args(argv)
    row = measure(args.hidden, args.nsamples, args.seqlen, args.rounds)
    if row["allocator"] is None:
        raise SystemExit("the allocator could not be tuned footprint first here (not glibc, or MALLOC_* set)")
    text = (
        "# The streamed backward's per-sample step, footprint-first allocator, with and without the heap reused\n\n"
        f"Command: `{command_line('benchmarks.backward_heap', argv if argv is not None else sys.argv[1:])}`\n\n"
        f"Machine: {machine_line()}\n\n"
        f"One float32 LLaMA block of width {args.hidden}, {args.nsamples} samples of {args.seqlen} tokens, "
        f"{args.rounds} rounds (forward, step, step with the heap reused, in turn).\n\n" + table(row)
    )
    print(text)
    write_results(args.name, {"machine": machine(), **row}, text)


if __name__ == "__main__":
    main()
