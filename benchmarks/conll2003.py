"""CoNLL-2003 NER benchmark: fine-tune a BERT token classifier, prune it with every method, score F1.

Fine-tunes (and caches) a token classifier from the packaged all-MiniLM-L6-v2 (or --model), then
prunes all encoder linear layers (not embeddings, not the classifier) through ``oneshot.prune``,
for each method x {uniform, OWL} x sparsity, calibrating on N training sentences, and records
test entity-level F1, pruning seconds and achieved sparsity. Optionally sweeps the calibration
size. Writes a markdown table (the reference's layout), JSON and a PNG plot to benchmarks/results/.

    .venv/bin/python -m benchmarks.conll2003                                   # full grid
    .venv/bin/python -m benchmarks.conll2003 --methods sparsegpt,wanda --sparsities 0.5,0.7 \\
        --train-sentences 2000 --epochs 1 --test-sentences 800 --calib 256 --no-owl --name conll_quick
"""

from __future__ import annotations

import argparse
import logging
import random
import time
from pathlib import Path
from typing import Any

import torch

import oneshot
from benchmarks.common import (
    RESULTS,
    SHARED,
    command_line,
    machine,
    machine_line,
    minilm_dir,
    parse_method,
    parse_prune_options,
    write_results,
)
from benchmarks.ner import FinetuneConfig, calibration_set, evaluate, finetune, load_split
from oneshot.engine import resolve_device


def run_grid(args: argparse.Namespace) -> dict[str, Any]:
    """Fine-tune, then prune and evaluate every configuration; returns the JSON payload."""
    args.model = args.model or str(minilm_dir())
    train = load_split(args.data, "train")
    test = load_split(args.data, "test")
    if args.test_sentences:
        test = test[: args.test_sentences]
    ft = FinetuneConfig(train_sentences=args.train_sentences, epochs=args.epochs, lr=args.lr, seed=args.seed)
    device = resolve_device(args.device)
    model, tokenizer, ft_info = finetune(args.model, train, ft, cache=args.cache, device=device)
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    dense = evaluate(model, tokenizer, test)
    print(f"dense F1 {dense['f1']:.4f} (fine-tune: {ft_info})", flush=True)

    def calib(n: int) -> Any:
        picked = random.Random(args.seed).sample(train, min(n, len(train)))
        return calibration_set(tokenizer, picked)

    extra_opts = parse_prune_options(args.prune_option)

    def run(
        method: str, sparsity: float, owl: bool, n_calib: int, sparsity_map: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        model.load_state_dict(dense_state)
        name, own = parse_method(method)
        if name == "movement":  # the fine-tuned classifier's base: the encoder it was fine-tuned from
            own.setdefault("base", str(args.model or minilm_dir()))
        if name == "obs":
            own.setdefault("obs_memory_mb", args.obs_memory_mb)
        opts: dict[str, Any] = {"owl": True, "owl_m": args.owl_m, "owl_lambda": args.owl_lambda} if owl else {}
        if sparsity_map:
            opts["sparsity_map"] = sparsity_map
        opts.update(extra_opts)
        opts.update(own)
        if oneshot.PruneConfig(method=name, sparsity=sparsity, **opts).uses_data:
            opts.update(calibration=calib(n_calib))  # --passes auto: one pass when the batch fits, else batches of 8
        report = oneshot.prune(model, tokenizer, method=name, sparsity=sparsity, device=str(device), quiet=True, **opts)
        scores = evaluate(model, tokenizer, test)
        row = {
            "method": method,
            "allocation": "owl" if owl else "uniform",
            "sparsity": sparsity,
            "calib_sentences": n_calib,
            "f1": scores["f1"],
            "precision": scores["precision"],
            "recall": scores["recall"],
            "seconds": report.seconds,
            "achieved_sparsity": report.achieved_sparsity,
            "owl_blocks": report.extra.get("owl", {}).get("blocks"),
        }
        print(row, flush=True)
        return row

    rows = []
    allocations = [False] if args.no_owl else [False, True]
    for sparsity in (float(s) for s in args.sparsities.split(",")):
        for owl in allocations:
            for method in args.methods.split(","):
                rows.append(run(method, sparsity, owl, args.calib))
    sweep = []
    if args.sweep:
        for n in (int(x) for x in args.sweep.split(",")):
            for sparsity in (float(s) for s in args.sweep_sparsities.split(",")):
                for method in args.sweep_methods.split(","):
                    sweep.append(run(method, sparsity, False, n))
    sensitivity = []
    if args.block_sensitivity:
        # Prune one block at a time (the others dense): how much F1 each block costs, next to its
        # outlier ratio, shows whether OWL's "more outliers -> less sparsity" fits this model.
        s = args.block_sensitivity
        owl_row = run("wanda", s, True, args.calib)
        ratios = {b["block"]: b["outlier_ratio"] for b in owl_row["owl_blocks"]}
        for b in sorted(ratios):
            for method in args.sweep_methods.split(","):
                row = run(method, s, False, args.calib, {"*": "skip", f"*.layer.{b}.*": s})
                sensitivity.append({**row, "block": b, "outlier_ratio": ratios[b]})
    model.load_state_dict(dense_state)
    return {"dense": dense, "finetune": ft_info, "rows": rows, "sweep": sweep, "sensitivity": sensitivity}


def table(payload: dict[str, Any], command: str, args: argparse.Namespace) -> str:
    """Markdown in the reference layout: one row per sparsity, F1 per method, then seconds."""
    rows, dense = payload["rows"], payload["dense"]["f1"]
    methods = args.methods.split(",")
    lines = [
        "# CoNLL-2003 NER after one-shot pruning (entity-level F1 on test)",
        "",
        f"Command: `{command}`  ",
        f"Model: {args.model} fine-tuned ({payload['finetune'].get('config')}, "
        f"{payload['finetune'].get('seconds', 0):.0f}s); calibration: {args.calib} training sentences; all "
        f"encoder linears pruned. Machine: {machine_line()}.",
        "",
    ]
    for allocation in sorted({r["allocation"] for r in rows}, reverse=True):
        label = "uniform" if allocation == "uniform" else f"OWL (M={args.owl_m:g}, λ={args.owl_lambda:g})"
        lines += [
            f"## {label}",
            "",
            "| sparsity | " + " | ".join(methods) + " | seconds (" + " / ".join(methods) + ") | achieved |",
            "|---|" + "---|" * (len(methods) + 2),
            "| 0% (dense) | " + " | ".join(f"{dense:.3f}" for _ in methods) + " | – | – |",
        ]
        for sparsity in sorted({r["sparsity"] for r in rows}):
            got = {r["method"]: r for r in rows if r["allocation"] == allocation and r["sparsity"] == sparsity}
            f1s = " | ".join(f"{got[m]['f1']:.3f}" if m in got else "–" for m in methods)
            secs = " / ".join(f"{got[m]['seconds']:.1f}" if m in got else "–" for m in methods)
            ach = max((r["achieved_sparsity"] for r in got.values()), default=0.0)
            lines.append(f"| {sparsity:.0%} | {f1s} | {secs} | {ach:.2%} |")
        lines.append("")
    if payload["sweep"]:
        lines += [
            "## Calibration-size sweep (uniform)",
            "",
            "| sentences | method | sparsity | F1 | seconds |",
            "|---|---|---|---|---|",
        ]
        for r in payload["sweep"]:
            lines.append(
                f"| {r['calib_sentences']} | {r['method']} | {r['sparsity']:.0%} | {r['f1']:.3f} | {r['seconds']:.1f} |"
            )
    if payload.get("sensitivity"):
        lines += [
            "",
            f"## Block sensitivity: one block pruned to {args.block_sensitivity:.0%}, the rest dense",
            "",
            f"Outlier ratio D_l (M={args.owl_m:g}) as OWL measures it; OWL gives less sparsity to larger D_l.",
            "",
            "| block | outlier ratio | method | F1 | F1 drop |",
            "|---|---|---|---|---|",
        ]
        for r in payload["sensitivity"]:
            lines.append(
                f"| {r['block']} | {r['outlier_ratio']:.4f} | {r['method']} | {r['f1']:.3f} | "
                f"{payload['dense']['f1'] - r['f1']:.3f} |"
            )
    return "\n".join(lines) + "\n"


def plot(payload: dict[str, Any], path: Path) -> None:
    """F1 vs sparsity per method, uniform (solid) and OWL (dashed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logging.warning("matplotlib not installed: no plot (pip install matplotlib)")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    dense = payload["dense"]["f1"]
    for method in sorted({r["method"] for r in payload["rows"]}):
        for allocation, style in (("uniform", "-"), ("owl", "--")):
            pts = sorted(
                (r["sparsity"], r["f1"])
                for r in payload["rows"]
                if r["method"] == method and r["allocation"] == allocation
            )
            if pts:
                ax.plot(
                    [0.0] + [p[0] for p in pts],
                    [dense] + [p[1] for p in pts],
                    style,
                    marker="o",
                    label=f"{method} ({allocation})",
                )
    ax.set_xlabel("sparsity")
    ax.set_ylabel("entity F1 (test)")
    ax.set_title("CoNLL-2003, pruned all-MiniLM-L6-v2")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's options (also used by the reduced CI test)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(SHARED / "conll2003"), help="CoNLL folder or HF dataset name")
    parser.add_argument("--model", default=None, help="encoder folder or hub name [the packaged all-MiniLM-L6-v2]")
    parser.add_argument("--train-sentences", type=int, default=None, help="fine-tune on the first N (default all)")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-sentences", type=int, default=None, help="score the first N test sentences")
    parser.add_argument("--calib", type=int, default=4096, help="calibration sentences")
    parser.add_argument("--methods", default="obs,sparsegpt,wanda")
    parser.add_argument("--sparsities", default="0.5,0.6,0.7,0.8")
    parser.add_argument("--no-owl", action="store_true", help="uniform allocation only")
    parser.add_argument("--owl-m", type=float, default=1.0)
    parser.add_argument("--owl-lambda", type=float, default=0.08)
    parser.add_argument("--sweep", default="", help="calibration sizes to sweep, e.g. 64,256,1024,4096")
    parser.add_argument("--sweep-methods", default="sparsegpt,obs")
    parser.add_argument("--sweep-sparsities", default="0.7,0.8")
    parser.add_argument(
        "--block-sensitivity", type=float, default=None, help="also prune one block at a time to this sparsity"
    )
    parser.add_argument(
        "--prune-option", action="append", default=[], help="extra oneshot.prune KEY=VALUE (e.g. damp=0.001)"
    )
    parser.add_argument("--name", default="conll2003_minilm")
    parser.add_argument("--cache", type=Path, default=None, help="fine-tuned model cache [~/.cache/oneshot/conll]")
    parser.add_argument("--device", default="auto", help="fine-tune, prune and score here (auto: CUDA if available)")
    parser.add_argument("--obs-memory-mb", type=int, default=1024, help="OBS row-batch memory budget (raise on a GPU)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    payload = run_grid(args)
    command = command_line("benchmarks.conll2003", argv)
    payload.update(
        {"command": command.strip(), "machine": machine(), "args": vars(args), "seconds": time.perf_counter() - start}
    )
    write_results(args.name, payload, table(payload, command.strip(), args))
    plot(payload, RESULTS / f"{args.name}.png")


if __name__ == "__main__":
    main()
