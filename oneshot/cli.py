"""The ``oneshot`` command: ``prune``, ``eval`` and ``methods``. Options map onto :class:`PruneConfig`."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import click

from oneshot.config import DTYPES, CalibrationConfig, PruneConfig
from oneshot.errors import ConfigError, OneshotError
from oneshot.methods.allocation import parse_sparsity_map
from oneshot.methods.registry import list_methods


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s", stream=sys.stderr)
    # transformers is chatty about loading; keep its errors, drop its info and (with --quiet) its bars
    import transformers

    transformers.logging.set_verbosity_error()
    if quiet or not sys.stderr.isatty():
        transformers.logging.disable_progress_bar()


def _run(fn: Any) -> Any:
    try:
        return fn()
    except OneshotError as exc:
        raise click.ClickException(str(exc)) from exc


def _read_map(path: Path | None) -> tuple[tuple[str, float | str], ...]:
    if path is None:
        return ()
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text)
        else:
            raw = json.loads(text)
    except Exception as exc:  # json and yaml raise different types
        raise ConfigError(f"--sparsity-map {path} is not valid {path.suffix.lstrip('.') or 'JSON'}: {exc}") from exc
    return parse_sparsity_map(raw, f"--sparsity-map {path}")


DTYPE_OPTION = click.option(
    "--dtype",
    type=click.Choice(DTYPES),
    default="auto",
    show_default=True,
    help="Dtype to compute (and save) in; auto = the checkpoint's own (a bf16 model stays bf16).",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="oneshot")
def main() -> None:
    """One-shot post-training pruning for Hugging Face models.

    \b
    Examples:
      oneshot methods
      oneshot prune ./my-model --method sparsegpt --sparsity 0.5 --out ./my-model-50
      oneshot prune ./my-model --method wanda --nm 2:4 --calib data.txt --out ./my-model-24
      oneshot eval ./my-model-50 --data wiki.test.raw --seqlen 512
    """


@main.command()
@click.argument("model")
@click.option("--method", default="sparsegpt", show_default=True, help="Pruning method (see `oneshot methods`).")
@click.option("--sparsity", type=float, default=None, help="Fraction of weights to zero in each layer, in [0, 1).")
@click.option("--nm", default=None, help="N:M pattern, e.g. 2:4 (keep 2 of every 4); implies the sparsity.")
@click.option(
    "--calib",
    default="bundled",
    show_default=True,
    help="Calibration text: 'bundled', a .txt/.jsonl/.parquet file, or a Hugging Face dataset name.",
)
@click.option("--calib-config", default=None, help="Dataset config name (hub datasets only).")
@click.option("--calib-split", default="train", show_default=True, help="Dataset split (hub datasets only).")
@click.option("--text-field", default="text", show_default=True, help="Field holding the text (.jsonl/.parquet/hub).")
@click.option("--nsamples", type=int, default=128, show_default=True, help="Number of calibration sequences.")
@click.option("--seqlen", type=int, default=None, help="Tokens per calibration sequence [default: min(2048, context)].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for drawing calibration windows.")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Output folder (must not exist).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
@click.option("--device", default="auto", show_default=True, help="Compute device: auto, cpu, cuda, cuda:N.")
@DTYPE_OPTION
@click.option(
    "--stream/--no-stream",
    default=None,
    help="Read one block at a time from the safetensors shards and write it out at once, so the model "
    "never has to fit in memory [default: stream when the model would not fit --max-memory].",
)
@click.option(
    "--max-memory",
    default=None,
    help="Memory budget that decides streaming, e.g. 20GB [default: 70% of the available memory].",
)
@click.option(
    "--resume",
    is_flag=True,
    help="Continue an interrupted streaming run into the same --out from its last finished block.",
)
@click.option("--batch-size", type=int, default=8, show_default=True, help="Calibration sequences per forward.")
@click.option("--block-size", type=int, default=128, show_default=True, help="SparseGPT lazy-update block width.")
@click.option("--damp", type=float, default=0.01, show_default=True, help="Relative Hessian damping (SparseGPT).")
@click.option("--skip", "skip", multiple=True, help="Glob of layer names to leave dense (repeatable).")
@click.option("--owl", is_flag=True, help="Outlier-weighted layerwise sparsity: blocks with more outliers pruned less.")
@click.option("--owl-m", type=float, default=5.0, show_default=True, help="OWL outlier threshold M (× mean score).")
@click.option("--owl-lambda", type=float, default=0.08, show_default=True, help="OWL max deviation from --sparsity.")
@click.option(
    "--sparsity-map",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help='JSON/YAML {layer glob: sparsity or "skip"}, applied after OWL; later entries win.',
)
@click.option("--obs-memory-mb", type=int, default=1024, show_default=True, help="OBS working memory per batch.")
@click.option("--ratio", type=float, default=None, help="structured: share of units to remove in every block.")
@click.option(
    "--score",
    type=click.Choice(["fluctuation", "variance", "magnitude"]),
    default="fluctuation",
    show_default=True,
    help="structured: unit score (fluctuation = Var(x_j)·‖W_:,j‖², FLAP).",
)
@click.option("--no-bias-compensation", is_flag=True, help="structured: do not fold removed units' mean into the bias.")
@click.option(
    "--target",
    type=click.Choice(["mlp", "attention", "both"]),
    default="mlp",
    show_default=True,
    help="structured: remove MLP neurons, attention heads (LLaMA-style configs), or both.",
)
@click.option("--quiet", is_flag=True, help="No progress bars or info messages.")
def prune(model: str, out: Path, overwrite: bool, **opts: Any) -> None:
    """Prune MODEL (a folder, a .gguf file or a hub name) and save it to --out.

    \b
    The output folder loads with stock transformers `from_pretrained` and also holds
    oneshot_report.json (per-layer sparsity, reconstruction error, seconds, damping) and
    oneshot_config.json (the resolved run configuration).

    \b
    Examples:
      oneshot prune ./SmolLM2.gguf --method sparsegpt --sparsity 0.5 --nsamples 64 --seqlen 512 --out ./pruned
      oneshot prune ./model --method wanda --sparsity 0.7 --owl --out ./pruned-owl
      oneshot prune ./model --method obs --sparsity 0.5 --sparsity-map map.json --out ./pruned-obs
      oneshot prune ./model --method structured --ratio 0.2 --target mlp --out ./smaller
      oneshot prune ./Llama-70B --method wanda --sparsity 0.5 --stream --out ./pruned70   # any size
      oneshot prune ./Llama-70B --method wanda --sparsity 0.5 --stream --resume --out ./pruned70

    \b
    A checkpoint larger than --max-memory is streamed: one block in memory at a time, each pruned
    block written to the output shards at once, progress recorded so that --resume continues
    after a crash or a kill. Streaming needs a folder (or hub name) with safetensors weights.
    """
    from oneshot.api import prune as api_prune

    _setup_logging(opts["quiet"])

    def go() -> None:
        calib = CalibrationConfig(
            source=opts["calib"],
            nsamples=opts["nsamples"],
            seqlen=opts["seqlen"],
            seed=opts["seed"],
            dataset_config=opts["calib_config"],
            split=opts["calib_split"],
            text_field=opts["text_field"],
        )
        config = PruneConfig(
            method=opts["method"],
            sparsity=opts["sparsity"],
            nm=opts["nm"],
            calibration=calib,
            block_size=opts["block_size"],
            damp=opts["damp"],
            batch_size=opts["batch_size"],
            device=opts["device"],
            dtype=opts["dtype"],
            skip_layers=tuple(opts["skip"]),
            owl=opts["owl"],
            owl_m=opts["owl_m"],
            owl_lambda=opts["owl_lambda"],
            sparsity_map=_read_map(opts["sparsity_map"]),
            obs_memory_mb=opts["obs_memory_mb"],
            ratio=opts["ratio"],
            score=opts["score"],
            bias_compensation=not opts["no_bias_compensation"],
            target=opts["target"],
            stream=opts["stream"],
            max_memory=opts["max_memory"],
            resume=opts["resume"],
            quiet=opts["quiet"],
        )
        report = api_prune(model, config=config, out=out, overwrite=overwrite)
        click.echo(report.summary())

    _run(go)


@main.command(name="eval")
@click.argument("model")
@click.option("--data", required=True, help="Text file to score (e.g. wiki.test.raw), or 'bundled'.")
@click.option("--seqlen", type=int, default=512, show_default=True, help="Window length in tokens.")
@click.option("--max-windows", type=int, default=None, help="Score only the first N windows.")
@click.option("--batch-size", type=int, default=4, show_default=True, help="Windows per forward.")
@click.option("--device", default="auto", show_default=True, help="Compute device.")
@DTYPE_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object instead of text.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def eval_cmd(
    model: str,
    data: str,
    seqlen: int,
    max_windows: int | None,
    batch_size: int,
    device: str,
    dtype: str,
    as_json: bool,
    quiet: bool,
) -> None:
    """Perplexity of MODEL on non-overlapping windows of a text file.

    \b
    Example:
      oneshot eval ./pruned --data wiki.test.raw --seqlen 512
    """
    from oneshot.api import evaluate_perplexity
    from oneshot.loading import load_model

    _setup_logging(quiet)

    def go() -> None:
        t0 = time.perf_counter()
        m, tok = load_model(model, dtype)
        ppl = evaluate_perplexity(
            m, tok, data, seqlen=seqlen, max_windows=max_windows, batch_size=batch_size, device=device, quiet=quiet
        )
        if as_json:
            click.echo(json.dumps({"model": model, "data": data, "seqlen": seqlen, "perplexity": ppl}))
        else:
            took = time.perf_counter() - t0
            click.echo(f"perplexity {ppl:.3f} ({model} on {data}, {seqlen}-token windows, {took:.1f}s)")

    _run(go)


@main.command()
def methods() -> None:
    """List the pruning methods and the statistics each one gathers."""
    for spec in list_methods():
        needs = ", ".join(spec.needs) or "no statistics"
        click.echo(f"{spec.name:<10} {spec.summary} [{needs}]")


if __name__ == "__main__":  # pragma: no cover
    main()
