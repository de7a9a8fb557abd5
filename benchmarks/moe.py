"""A real-weights mixture of experts: SmolLM2-135M upcycled into a Mixtral, pruned like the dense model.

The packaged SmolLM2-135M becomes a Mixtral-architecture model: attention, norms and embeddings
copied; each of ``--experts`` experts of a layer is that layer's MLP plus a little Gaussian noise
(``--noise`` times each weight matrix's standard deviation); a random router (normal, std
``--router-std``); top-2 routing. Built once and cached under ``~/.cache/oneshot/``.

Each row prunes the MoE and (for the ratio the targets compare) dense SmolLM2 with the same
method, calibration (Austen's *Emma*) and evaluation windows (WikiText-2 test); ``ratio`` is pruned
over dense perplexity. Rare-expert rules are compared with ``--rules``.

    .venv/bin/python benchmarks/moe.py --max-windows 40
    .venv/bin/python benchmarks/moe.py --rows moe:dense --max-windows 8      # a quick look
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import oneshot
from benchmarks.common import (
    calibration_tokens,
    command_line,
    eval_text,
    machine,
    machine_line,
    parse_method,
    smollm2_gguf,
    write_results,
)

DEFAULT_ROWS = (
    "dense:dense,moe:dense,"
    "dense:wanda@0.5,moe:wanda@0.5,dense:sparsegpt@0.5,moe:sparsegpt@0.5,"
    "dense:wanda@2:4,moe:wanda@2:4,dense:sparsegpt@2:4,moe:sparsegpt@2:4,"
    "dense:gptq/group_size=64,moe:gptq/group_size=64,"
    "dense:sparsegpt/then=gptq/group_size=64@0.5,moe:sparsegpt/then=gptq/group_size=64@0.5,"
    "moe:sparsegpt/expert_calibration=weighted@0.5,moe:sparsegpt/expert_calibration=all@0.5,"
    "moe:sparsegpt/expert_min_tokens=1@0.5,"
    "moe:structured/target=experts/ratio=0.25,moe:structured/target=experts/ratio=0.25/score=frequency,"
    "moe:structured/target=experts/ratio=0.5,moe:structured/target=experts/ratio=0.5/score=frequency"
)


def upcycle(dense: nn.Module, experts: int, noise: float, router_std: float, seed: int) -> nn.Module:
    """A Mixtral whose experts are each ``dense``'s MLP plus noise (attention, norms, embeddings copied)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    c = dense.config
    config = MixtralConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps, rope_parameters=dict(c.rope_parameters), tie_word_embeddings=c.tie_word_embeddings,
        num_local_experts=experts, num_experts_per_tok=2, sliding_window=None, bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id, head_dim=c.hidden_size // c.num_attention_heads,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    moe = MixtralForCausalLM(config).to(torch.float32).eval()
    state = {k: v for k, v in dense.state_dict().items() if ".mlp." not in k}
    missing = moe.load_state_dict(state, strict=False).missing_keys
    assert all(".mlp." in k for k in missing), missing
    with torch.no_grad():
        for src, dst in zip(dense.model.layers, moe.model.layers, strict=True):
            mlp = src.mlp
            fused = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])  # [2I, H]
            for e in range(experts):
                dst.mlp.experts.gate_up_proj[e] = _noisy(fused, noise, gen)
                dst.mlp.experts.down_proj[e] = _noisy(mlp.down_proj.weight, noise, gen)
            dst.mlp.gate.weight.copy_(torch.randn(dst.mlp.gate.weight.shape, generator=gen) * router_std)
    return moe


def _noisy(weight: torch.Tensor, noise: float, gen: torch.Generator) -> torch.Tensor:
    return weight + torch.randn(weight.shape, generator=gen) * weight.std() * noise


def testbed(experts: int, noise: float, router_std: float, seed: int) -> Path:
    """The cached upcycled model folder (built on first use)."""
    cache = Path(os.environ.get("ONESHOT_CACHE", Path.home() / ".cache" / "oneshot"))
    folder = cache / f"smollm2-135m-mixtral-{experts}x-noise{noise:g}-router{router_std:g}-seed{seed}"
    if not (folder / "config.json").is_file():
        dense, tokenizer = oneshot.load_model(smollm2_gguf())
        moe = upcycle(dense, experts, noise, router_std, seed)
        moe.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folder


def _row(spec: str) -> tuple[str, str, dict[str, Any], str]:
    """``model:method[/k=v...]@pattern`` -> (model, method, options, pattern)."""
    model, rest = spec.split(":", 1)
    entry, _, pattern = rest.partition("@")
    method, options = parse_method(entry)
    return model, method, options, pattern or "-"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default=DEFAULT_ROWS, help="comma-separated model:method[/k=v]@pattern")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--noise", type=float, default=0.01)
    parser.add_argument("--router-std", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--max-windows", type=int, default=None)
    parser.add_argument("--name", default="moe_smollm2_mixtral")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(os.cpu_count() or 1)

    folders = {"moe": testbed(args.experts, args.noise, args.router_std, args.seed)}
    models: dict[str, tuple[nn.Module, Any, dict[str, torch.Tensor]]] = {}
    for key, source in (("dense", smollm2_gguf()), ("moe", folders["moe"])):
        model, tokenizer = oneshot.load_model(source)
        model = model.to(torch.float32).eval()
        models[key] = (model, tokenizer, {k: v.clone() for k, v in model.state_dict().items()})
    tokenizer = models["dense"][1]
    calib, calib_path = calibration_tokens(tokenizer, None, args.nsamples, args.seqlen)
    text, eval_name = eval_text("wikitext2")
    rows: list[dict[str, Any]] = []
    dense_ppl: dict[str, float] = {}
    forward_seconds: dict[str, float] = {}
    for spec in args.rows.split(","):
        which, method, options, pattern = _row(spec)
        model, tok, state = models[which]
        model.load_state_dict(state)
        if method == "structured":  # removal makes the model physically smaller: prune a copy
            model = copy.deepcopy(model)
        if which not in forward_seconds:
            forward_seconds[which] = _calibration_forward(model, calib.input_ids)
        report = None
        t0 = time.perf_counter()
        if method != "dense":
            shape: dict[str, Any] = {}
            if pattern != "-":
                shape = {"nm": pattern} if ":" in pattern else {"sparsity": float(pattern)}
            report = oneshot.prune(model, tok, method=method, calibration=calib, quiet=True, **shape, **options)
        seconds = time.perf_counter() - t0
        ppl = oneshot.evaluate_perplexity(model, tok, text=text, seqlen=args.seqlen, max_windows=args.max_windows,
                                          quiet=True)  # fmt: skip
        if method == "dense":
            dense_ppl[which] = ppl
        rows.append(_record(spec, which, method, options, pattern, ppl, dense_ppl.get(which), seconds, report,
                            forward_seconds[which]))  # fmt: skip
        print(_line(rows[-1]), flush=True)
        _write(
            args, argv, rows, calib_path, eval_name, forward_seconds
        )  # after every row: a stopped run keeps its rows


def _calibration_forward(model: nn.Module, ids: torch.Tensor) -> float:
    """Seconds of one dense forward of the calibration set through the whole model (batches of 8)."""
    t0 = time.perf_counter()
    with torch.no_grad():
        for batch in ids.split(8):
            model(batch)
    return time.perf_counter() - t0


def _record(
    spec: str, which: str, method: str, options: dict[str, Any], pattern: str, ppl: float, dense: float | None,
    seconds: float, report: Any, forward: float,
) -> dict[str, Any]:  # fmt: skip
    row: dict[str, Any] = {
        "row": spec, "model": which, "method": method, "options": options, "pattern": pattern, "perplexity": ppl,
        "ratio": ppl / dense if dense else None, "prune_seconds": seconds,
        "prune_over_forward": seconds / forward if report is not None else None,
    }  # fmt: skip
    if report is not None:
        data = report.to_dict()
        row["achieved_sparsity"] = data["achieved_sparsity"]
        if data.get("structured"):
            row["parameter_reduction"] = data["structured"]["parameter_reduction"]
        row["block_parameters"] = data.get("block_parameters")
        counts = [r["routed_tokens"] for r in data["layers"] if r.get("routed_tokens") is not None
                  and r["name"].endswith("down_proj")]  # fmt: skip
        if counts:
            everything = [r for r in data["layers"] if r.get("routed_tokens") is not None and r["name"].endswith(
                "down_proj") and r["tokens"] != r["routed_tokens"]]  # fmt: skip
            row["expert_tokens"] = {"min": min(counts), "median": sorted(counts)[len(counts) // 2], "max": max(counts),
                                    "calibrated_on_every_token": len(everything), "experts": len(counts)}  # fmt: skip
            row["routed_tokens"] = counts
    return row


def _line(row: dict[str, Any]) -> str:
    ratio = "" if row["ratio"] is None else f" ratio {row['ratio']:.3f}"
    over = "" if row["prune_over_forward"] is None else f" ({row['prune_over_forward']:.1f}x a calibration forward)"
    return f"{row['row']}: ppl {row['perplexity']:.3f}{ratio} prune {row['prune_seconds']:.0f}s{over}"


def _write(
    args: argparse.Namespace, argv: list[str] | None, rows: list[dict[str, Any]], calib_path: str, eval_name: str,
    forward: dict[str, float],
) -> None:  # fmt: skip
    header = (
        "| row | perplexity | pruned / dense | prune s | x calibration forward | expert tokens min / median / max |"
    )
    lines = [header, "|---|---|---|---|---|---|"]
    for r in rows:
        tokens = r.get("expert_tokens")
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.3f}"
        over = "" if r["prune_over_forward"] is None else f"{r['prune_over_forward']:.1f}"
        counts = "" if not tokens else f"{tokens['min']} / {tokens['median']} / {tokens['max']}"
        lines.append(f"| {r['row']} | {r['perplexity']:.3f} | {ratio} | {r['prune_seconds']:.0f} | {over} | {counts} |")
    table = "\n".join(lines)
    payload = {
        "command": command_line("benchmarks.moe", argv),
        "machine": machine(),
        "testbed": {
            "experts": args.experts,
            "top_k": 2,
            "noise": args.noise,
            "router_std": args.router_std,
            "seed": args.seed,
        },  # fmt: skip
        "calibration": {"file": calib_path, "nsamples": args.nsamples, "seqlen": args.seqlen},
        "evaluation": {"text": eval_name, "seqlen": args.seqlen, "max_windows": args.max_windows},
        "calibration_forward_seconds": forward,
        "rows": rows,
    }
    write_results(args.name, payload, f"{machine_line()}\n\n{table}\n")


if __name__ == "__main__":
    main()
