"""Block reconstruction (``--refine block``) of one LLaMA-shaped block: its peak memory against
:func:`oneshot.passes.reconstruct.refit_bytes`, and its time per epoch against the block's forward.

One decoder layer with random weights (N(0, 0.02²)) in ``--dtype``, pruned to ``--sparsity`` by
magnitude within each output row, is refit by :func:`oneshot.passes.reconstruct.refit_block` on
``--nsamples`` random inputs of ``--seqlen`` tokens (N(0, 1), one sample per Adam step, as a run
with ``--batch-size 1`` takes them), the inputs and the dense block's outputs held on the host as
the engine holds them. Peak memory: on CUDA the allocator's peak during the refit (only the block
lives on the device); on a CPU the block's bytes plus the rise of the process's peak resident size
over the refit (``VmHWM``, reset through ``/proc/self/clear_refs``; the allocator tuned footprint first,
so that buffers of a layer's size leave the resident size when freed). Time: the refit's seconds per
epoch over one forward of the block on every sample in ``--dtype`` without a graph (the engine's
statistics forward), both measured in this process.

    python -m benchmarks.refit_block --device cuda       # LLaMA-2-7B's block, 128 x 2048 tokens
    python -m benchmarks.refit_block --hidden 1024 --intermediate 2816 --heads 16 --kv-heads 4 \\
        --nsamples 16 --seqlen 512 --name refit_block_cpu
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import command_line, machine, machine_line, write_results
from benchmarks.synthetic import llama_config
from oneshot.engine import RefitBatches
from oneshot.memory import tune_allocator
from oneshot.passes.reconstruct import refit_block, refit_bytes

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _status(key: str) -> int:
    """A ``/proc/self/status`` size in bytes."""
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith(key)).split()[1]) * 1024


def measure(
    hidden: int, intermediate: int, heads: int, kv_heads: int, nsamples: int, seqlen: int, *,
    dtype: torch.dtype = torch.bfloat16, device: str = "cpu", sparsity: float = 0.5, epochs: int = 1,
    lr: float = 1e-3, seed: int = 0,
) -> dict[str, Any]:  # fmt: skip
    """Refit one LLaMA block of the given shape; its peak memory, the estimate and the seconds per epoch."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    where = torch.device(device)
    # on a CPU, footprint first (as a streamed run): buffers of a layer's size are mapped and unmapped,
    # so the resident size follows what is allocated
    allocator = tune_allocator(footprint=True) if where.type == "cpu" else None
    torch.manual_seed(seed)
    config = llama_config(hidden, 1, intermediate=intermediate, heads=heads, kv_heads=kv_heads)
    config._attn_implementation = "sdpa"
    block = LlamaDecoderLayer(config, 0).to(dtype)
    with torch.no_grad():
        for p in block.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.02)
                cut = p.abs().float().kthvalue(max(1, int(p.shape[1] * sparsity)), dim=1, keepdim=True).values
                p.mul_(p.abs().float() > cut)
    block.requires_grad_(False).to(where)
    linears: dict[str, torch.nn.Module] = {n: m for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    positions = torch.arange(seqlen, device=where)[None]
    rotary = LlamaRotaryEmbedding(config).to(where)

    def forward(hidden_states: torch.Tensor, compute: torch.dtype) -> torch.Tensor:
        h = hidden_states.to(where, compute)
        cos, sin = rotary(h, positions)
        out = block(h, position_embeddings=(cos.to(compute), sin.to(compute)), position_ids=positions)
        return out[0] if isinstance(out, tuple) else out

    inputs = [torch.randn(1, seqlen, hidden, dtype=dtype) for _ in range(nsamples)]
    sync = torch.cuda.synchronize if where.type == "cuda" else (lambda: None)
    with torch.no_grad():
        forward(inputs[0], dtype)  # warm-up
        sync()
        t0 = time.perf_counter()
        targets = [forward(x, dtype).to("cpu") for x in inputs]
        sync()
        forward_seconds = time.perf_counter() - t0
    batches = RefitBatches(lambda b: forward(inputs[b], torch.float32), targets, [None] * nsamples)
    block_bytes = sum(p.numel() * p.element_size() for p in block.parameters())
    if where.type == "cuda":
        torch.cuda.reset_peak_memory_stats(where)
    else:
        before = _status("VmRSS:")
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM back to the resident size now
    t0 = time.perf_counter()
    errors = refit_block(block, linears, batches, epochs=epochs, lr=lr)
    sync()
    refit_seconds = time.perf_counter() - t0
    if where.type == "cuda":
        peak = int(torch.cuda.max_memory_allocated(where))
    else:
        peak = block_bytes + _status("VmHWM:") - before
    weights = sum(p.numel() for m in linears.values() for p in m.parameters() if p.dim() == 2)
    return {
        "shape": f"{hidden}x{intermediate} heads {heads}/{kv_heads}",
        "dtype": str(dtype).removeprefix("torch."),
        "device": where.type,
        "tokens": nsamples * seqlen,
        "epochs": epochs,
        "host_allocator": allocator,
        "weights": weights,
        "block_bytes": block_bytes,
        "peak_bytes": peak,
        "estimate_bytes": refit_bytes(block, linears, seqlen),
        "seconds_per_epoch": refit_seconds / epochs,
        "forward_seconds": forward_seconds,
        "errors": errors,
    }


def table(rows: list[dict[str, Any]]) -> str:
    """The markdown results table."""
    lines = [
        "| block | dtype | device | tokens | refitted weights (M) | block GB | peak GB | estimate GB | peak / estimate "
        "| s / epoch | epoch / forward | error before | after |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['dtype']} | {r['device']} | {r['tokens']} | {r['weights'] / 1e6:.1f} "
            f"| {r['block_bytes'] / 1e9:.3f} | {r['peak_bytes'] / 1e9:.3f} | {r['estimate_bytes'] / 1e9:.3f} "
            f"| {r['peak_bytes'] / r['estimate_bytes']:.2f} | {r['seconds_per_epoch']:.2f} "
            f"| {r['seconds_per_epoch'] / r['forward_seconds']:.2f} | {r['errors'][0]:.3g} | {r['errors'][-1]:.3g} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=32)
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--epochs", type=int, default=1, help="refit passes measured (a run's default is 4)")
    parser.add_argument("--name", default="refit_block")
    args = parser.parse_args(argv)
    row = measure(
        args.hidden, args.intermediate, args.heads, args.kv_heads, args.nsamples, args.seqlen,
        dtype=DTYPES[args.dtype], device=args.device, sparsity=args.sparsity, epochs=args.epochs,
    )  # fmt: skip
    text = (
        "# Block reconstruction of one LLaMA-shaped block: peak memory and time per epoch\n\n"
        f"Command: `{command_line('benchmarks.refit_block', argv if argv is not None else sys.argv[1:])}`\n\n"
        f"Machine: {machine_line()}\n\n" + table([row])
    )
    print(text)
    write_results(args.name, {"machine": machine(), "rows": [row]}, text)


if __name__ == "__main__":
    main()
