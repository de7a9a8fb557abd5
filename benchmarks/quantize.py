"""Size and perplexity of SmolLM2-135M quantized, pruned, and both (#11), each saved and reloaded.

Every row is a real round trip: the bf16 model is pruned / quantized by ``oneshot.prune`` into a
folder (compressed-tensors for quantized rows), the folder's safetensors bytes are its size, and
the perplexity is that of the folder **reloaded by stock transformers** (+ compressed-tensors),
its bf16 weights evaluated in float32. Rows are ``METHOD/key=value/...`` as in
``benchmarks.perplexity`` (``bf16`` = the dense model saved as is); ``--bits`` and
``--group-size`` apply to every quantizing row.

    .venv/bin/python -m benchmarks.quantize --max-windows 64
    .venv/bin/python -m benchmarks.quantize --calib wikitext2:head --eval wikitext2:tail --max-windows 64
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

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
from oneshot.methods.registry import METHODS

ROWS = (
    "bf16,rtn,gptq,sparsegpt/sparsity=0.5,sparsegpt/sparsity=0.5/then=gptq,sparsegpt/nm=2:4,sparsegpt/nm=2:4/then=gptq"
)


def folder_bytes(folder: Path) -> int:
    """Bytes of the weight files of a saved model folder."""
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def quantization_groups(folder: Path) -> dict[str, Any]:
    """The saved folder's compressed-tensors ``config_groups`` (empty for a dense folder)."""
    config = json.loads((folder / "config.json").read_text())
    return dict(config.get("quantization_config", {}).get("config_groups", {}))


def into_plain_float32(folder: Path, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A plain float32 model of the folder's architecture holding the dequantized ``state``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    wanted = plain.state_dict()
    state = {k: v.float() for k, v in state.items() if k in wanted}
    missing = set(wanted) - set(state) - {"lm_head.weight"}  # the tied head is re-tied
    if missing:
        raise RuntimeError(f"the reloaded model lacks {sorted(missing)[:3]}")
    plain.load_state_dict(state, strict=False)
    plain.tie_weights()
    return plain


def reload_by_decompressor(folder: Path) -> torch.nn.Module:
    """The saved folder as float32, each quantized layer dequantized by compressed-tensors' own decompressor.

    For asymmetric grids: stock transformers 5.23 + compressed-tensors 0.20 fail to load packed zero
    points (the module layout the loader builds on the meta device keeps them unpacked), though the
    decompressor reads them.
    """
    from oneshot.checkpoint import Checkpoint
    from oneshot.quantized import decompress

    weights = next(iter(quantization_groups(folder).values()))["weights"]
    checkpoint = Checkpoint(folder)
    saved = checkpoint.read(checkpoint.tensors)
    parts = ("_packed", "_scale", "_zero_point", "_shape")  # a quantized weight's tensors: "<layer>.weight" + part
    state: dict[str, torch.Tensor] = {}
    for key, tensor in saved.items():
        if key.endswith(".weight_packed"):
            weight = key.removesuffix("_packed")
            layer = {"weight" + part: saved[weight + part] for part in parts if weight + part in saved}
            state[weight] = decompress(layer, weights)
        elif not key.endswith(parts):
            state[key] = tensor
    return into_plain_float32(folder, state)


def reload_float32(folder: Path) -> torch.nn.Module:
    """The saved folder loaded by stock transformers in bf16, dequantized by its loader, copied into float32.

    (A quantized model refuses ``.float()``; its dequantized weights go into a plain float32 model.)
    Asymmetric grids go through :func:`reload_by_decompressor` instead.
    """
    from transformers import AutoModelForCausalLM

    if any(not group["weights"]["symmetric"] for group in quantization_groups(folder).values()):
        return reload_by_decompressor(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    with torch.no_grad():  # compressed-tensors decompresses on the first forward
        model(torch.ones(1, 2, dtype=torch.long))
    return into_plain_float32(folder, model.state_dict())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default=ROWS, help="comma-separated METHOD/key=value/... (bf16 = dense)")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=64, help="SmolLM2's width 576 is 9 x 64, not x 128")
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    parser.add_argument(
        "--calib", default=None, help="calibration text file or a name as for --eval [default: shared austen/emma.txt]"
    )
    parser.add_argument("--eval", default="wikitext2", help="wikitext2, ptb, persuasion, or a text file")
    parser.add_argument("--model", default=None, help="model folder, hub name or .gguf [the packaged SmolLM2]")
    parser.add_argument("--name", default="quantize_smollm2", help="results file stem")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    source = args.model or str(smollm2_gguf())
    _, tokenizer = oneshot.load_model(source, dtype="bfloat16")
    calib, calib_path = calibration_tokens(tokenizer, args.calib, args.nsamples, args.seqlen)
    text, eval_name = eval_text(args.eval)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="oneshot-quantize-") as tmp:
        for entry in args.rows.split(","):
            rows.append(_row(entry, source, tokenizer, calib, text, Path(tmp), args))
            r = rows[-1]
            print(f"{entry}: perplexity {r['perplexity']:.3f}, {r['bytes'] / 1e6:.1f} MB", flush=True)
    _write(rows, args, argv, eval_name, calib_path)


def _row(
    entry: str, source: str, tokenizer: Any, calib: Any, text: str, tmp: Path, args: argparse.Namespace
) -> dict[str, Any]:
    """Prune / quantize one row into a folder, reload it with stock transformers and score it."""
    model, _ = oneshot.load_model(source, dtype="bfloat16")
    out = tmp / entry.replace("/", "_").replace(":", "-").replace("=", "-")
    t0 = time.perf_counter()
    facts: dict[str, Any] = {"row": entry, "prune_seconds": 0.0, "sparsity": 0.0}
    if entry == "bf16":
        model.save_pretrained(out)
    else:
        name, options = parse_method(entry)
        if METHODS[name].quantizes or "then" in options:
            options = {"bits": args.bits, "group_size": args.group_size, **options}
        report = oneshot.prune(model, tokenizer, method=name, calibration=calib, out=out, quiet=True, **options)
        facts.update(prune_seconds=report.seconds, sparsity=report.achieved_sparsity)
    del model
    facts["bytes"] = folder_bytes(out)
    reloaded = reload_float32(out)
    facts["perplexity"] = oneshot.evaluate_perplexity(
        reloaded, tokenizer, text=text, seqlen=args.seqlen, max_windows=args.max_windows, quiet=True
    )
    facts["seconds"] = time.perf_counter() - t0
    shutil.rmtree(out)
    return facts


def _write(
    rows: list[dict[str, Any]], args: argparse.Namespace, argv: list[str] | None, eval_name: str, calib: str
) -> None:
    """The markdown table, the JSON and the size / perplexity plot."""
    command = command_line("benchmarks.quantize", argv)
    dense = next((r for r in rows if r["row"] == "bf16"), rows[0])
    windows = "all" if args.max_windows is None else f"first {args.max_windows}"
    lines = [
        f"# SmolLM2-135M-Instruct: size and {eval_name} perplexity, quantized and pruned (saved, reloaded)",
        "",
        f"Command: `{command.strip()}`  ",
        f"Calibration: {args.nsamples} x {args.seqlen} tokens of `{calib.split('shared/')[-1]}`, seed 0. Evaluation: "
        f"{eval_name}, {windows} non-overlapping {args.seqlen}-token windows. Quantized rows: {args.bits}-bit, "
        f"symmetric unless the row says `symmetric=false`, group size {args.group_size}, saved in the "
        "compressed-tensors pack-quantized format. Each "
        "row's folder is reloaded with stock transformers (+ compressed-tensors) in bf16 and scored in float32 "
        "(asymmetric rows: each layer dequantized by compressed-tensors' decompressor, which stock transformers "
        "5.23 + compressed-tensors 0.20 cannot load). "
        "Embeddings and the tied head stay bf16.  ",
        f"Machine: {machine_line()}.",
        "",
        "| row | perplexity | vs bf16 | size (MB) | size vs bf16 | zeros | prune (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [
            r["row"],
            f"{r['perplexity']:.2f}",
            f"{r['perplexity'] / dense['perplexity'] - 1:+.1%}",
            f"{r['bytes'] / 1e6:.1f}",
            f"{r['bytes'] / dense['bytes']:.3f}",
            f"{r['sparsity']:.2%}",
            f"{r['prune_seconds']:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    payload = {"command": command, "machine": machine(), "args": vars(args), "rows": rows}
    write_results(args.name, payload, "\n".join(lines) + "\n")
    _plot(rows, args.name)


def _plot(rows: list[dict[str, Any]], name: str) -> None:
    """Size against perplexity, one labelled point per row."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the bench extra is not installed: table and JSON only
        return
    from benchmarks.common import RESULTS

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        ax.scatter(r["bytes"] / 1e6, r["perplexity"])
        point = (r["bytes"] / 1e6, r["perplexity"])
        ax.annotate(r["row"], point, fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("weight files (MB)")
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    ax.set_title("SmolLM2-135M: size vs perplexity (saved and reloaded)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", dpi=120)


if __name__ == "__main__":
    main()
