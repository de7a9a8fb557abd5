"""The ``oneshot`` command: ``prune``, ``eval`` and ``methods``. Options map onto :class:`PruneConfig`."""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from oneshot.config import CalibrationConfig, PruneConfig, knob_users, read_recipe
from oneshot.errors import OneshotError
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
    except OSError as exc:  # the machine, not the input: disk full, permission denied, ...
        raise click.ClickException(str(exc)) from exc


def _cli_fields() -> list[dataclasses.Field[Any]]:
    """Every declared option, in ``--help`` order (the calibration options where ``calibration`` sits)."""
    found: list[dataclasses.Field[Any]] = []
    for f in dataclasses.fields(PruneConfig):
        if f.name == "calibration":
            found.extend(c for c in dataclasses.fields(CalibrationConfig) if c.metadata.get("cli"))
        elif f.metadata.get("cli"):
            found.append(f)
    return found


def config_option(f: dataclasses.Field[Any]) -> Callable[[Any], Any]:
    """The click option of one declared config field (see :func:`oneshot.config.option`)."""
    meta = f.metadata
    flag = str(meta.get("flag") or "--" + f.name.replace("_", "-"))
    kind = meta.get("type") or type(f.default)
    help_text = str(meta["help"])
    if meta.get("knob") is not None and meta.get("requires") is None:
        help_text += f" [{knob_users(meta['knob'], meta.get('stage', 'method'))} only]"
    if kind is bool:
        if f.default is True or f.default is None:
            show = f.default is not None
            return click.option(f"{flag}/--no-{flag[2:]}", f.name, default=f.default, show_default=show, help=help_text)
        return click.option(flag, f.name, is_flag=True, help=help_text)
    kwargs: dict[str, Any] = {"help": help_text, "default": None if f.default in (None, ()) else f.default}
    kwargs["show_default"] = kwargs["default"] is not None
    if kind is Path:
        kwargs["type"] = click.Path(exists=True, dir_okay=False, path_type=Path)
    elif meta.get("choices"):  # checked by the config, so a bad value is a one-line error
        kwargs["metavar"] = "[" + "|".join(meta["choices"]) + "]"
    elif isinstance(f.default, tuple):
        kwargs["multiple"] = True
    else:
        kwargs["type"] = kind
    return click.option(flag, f.name, **kwargs)


def config_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate ``command`` with every declared run option."""
    for f in reversed(_cli_fields()):
        command = config_option(f)(command)
    return command


def config_from_options(opts: dict[str, Any], recipe: Path | None = None) -> PruneConfig:
    """A :class:`PruneConfig` from the parsed CLI options (unset ones keep their defaults).

    With a ``recipe`` file its options come first and the options typed on the command line win.
    """

    def given(fields: tuple[dataclasses.Field[Any], ...]) -> dict[str, Any]:
        values = {f.name: opts[f.name] for f in fields if f.name in opts and f.name != "calibration"}
        if recipe is not None:  # only what was typed overrides the recipe, not click's defaults
            context = click.get_current_context(silent=True)
            typed = {
                name
                for name in values
                if context is None or context.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE
            }
            values = {k: v for k, v in values.items() if k in typed}
        return {k: tuple(v) if isinstance(v, (tuple, list)) else v for k, v in values.items() if v is not None}

    base = read_recipe(recipe) if recipe is not None else {}
    calibration = base.pop("calibration", CalibrationConfig())
    calibration = dataclasses.replace(calibration, **given(dataclasses.fields(CalibrationConfig)))
    return PruneConfig(calibration=calibration, **{**base, **given(dataclasses.fields(PruneConfig))})


_FIELDS = {f.name: f for f in dataclasses.fields(PruneConfig)}


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
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Output folder (must not exist).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
@click.option(
    "--recipe",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="YAML / JSON recipe: the stages (a pruning method, then optionally a quantizer) and options, as saved "
    "in every output folder's recipe.yaml; options typed on the command line override it.",
)
@config_options
def prune(model: str, out: Path, overwrite: bool, recipe: Path | None, **opts: Any) -> None:
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
      oneshot prune ./model --method gptq --bits 4 --group-size 128 --out ./model-w4     # quantize only
      oneshot prune ./model --method sparsegpt --sparsity 0.5 --then gptq --bits 4 --out ./model-50-w4
      oneshot prune ./model --recipe ./model-50-w4/recipe.yaml --out ./again
      torchrun --nproc-per-node 4 -m oneshot prune ./model --method sparsegpt --sparsity 0.5 --out ./p

    \b
    A quantized run (--method gptq / rtn, or --then) is saved in the compressed-tensors format
    (packed int codes, scales and zero points; `pip install 'oneshot[quant]'`), which transformers
    with compressed-tensors and vLLM load; at 4 bits its linear layers take about 0.27x their bf16 bytes.

    \b
    A checkpoint larger than --max-memory is streamed: one block in memory at a time, each pruned
    block written to the output shards at once, progress recorded so that --resume continues
    after a crash or a kill. Streaming needs a folder (or hub name) with safetensors weights.

    \b
    Under torchrun (NCCL on GPUs, Gloo on CPUs; several nodes through its rendezvous) the ranks
    split the calibration samples, reduce the statistics of each block, solve its layers in
    parallel (each layer on one rank, by cost) and broadcast them; rank 0 writes the output.
    """
    from oneshot.api import prune as api_prune
    from oneshot.distributed import Ranks, init_from_env, leave

    joined = init_from_env(str(opts["device"]))
    rank = getattr(Ranks.current(), "rank", 0)  # 0 when alone
    _setup_logging(opts["quiet"] or rank > 0)  # one rank's log and bars are enough

    def go() -> None:
        config = config_from_options(opts, recipe)
        report = api_prune(model, config=config, out=out, overwrite=overwrite)
        if rank == 0:
            click.echo(report.summary())

    try:
        _run(go)
    finally:
        if joined:
            leave()


@main.command(name="eval")
@click.argument("model")
@click.option("--data", default=None, help="Text file to score for perplexity (e.g. wiki.test.raw), or 'bundled'.")
@click.option(
    "--tasks",
    default=None,
    help="Zero-shot accuracy with lm-evaluation-harness instead of perplexity: comma-separated harness tasks "
    "(hellaswag,arc_easy,...) or task YAML files (offline); needs `pip install 'oneshot[eval]'`.",
)
@click.option("--limit", type=int, default=None, help="--tasks: score only the first N documents of each task.")
@click.option("--num-fewshot", type=int, default=0, show_default=True, help="--tasks: examples put before each one.")
@click.option("--seqlen", type=int, default=512, show_default=True, help="Window length in tokens.")
@click.option("--max-windows", type=int, default=None, help="Score only the first N windows.")
@click.option("--batch-size", type=int, default=4, show_default=True, help="Windows per forward.")
@config_option(_FIELDS["device"])
@config_option(_FIELDS["dtype"])
@click.option(
    "--bos",
    metavar="[auto|once|window]",
    default="auto",
    show_default=True,
    help="BOS protocol: once = one BOS before the whole text (the SparseGPT / Wanda papers' protocol); window = "
    "BOS before every window (Gemma needs it); auto = window for Gemma, else once.",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object instead of text.")
@config_option(_FIELDS["quiet"])
def eval_cmd(
    model: str,
    data: str | None,
    tasks: str | None,
    limit: int | None,
    num_fewshot: int,
    seqlen: int,
    max_windows: int | None,
    batch_size: int,
    device: str,
    dtype: str,
    bos: str,
    as_json: bool,
    quiet: bool,
) -> None:
    """Perplexity of MODEL on non-overlapping windows of a text file, or zero-shot accuracy on --tasks.

    \b
    Examples:
      oneshot eval ./pruned --data wiki.test.raw --seqlen 512
      oneshot eval ./pruned --tasks hellaswag,arc_easy,arc_challenge,winogrande,boolq,piqa,rte
      oneshot eval ./pruned --tasks ./my_task.yaml --limit 100     # a local task file, offline
    """
    from oneshot.evaluation import bos_protocol, evaluate_perplexity
    from oneshot.loading import load_model

    _setup_logging(quiet)
    if (data is None) == (tasks is None):
        raise click.UsageError("pass --data FILE for perplexity or --tasks TASKS for zero-shot accuracy (one of them)")

    def go() -> None:
        t0 = time.perf_counter()
        m, tok = load_model(model, dtype)
        if tasks is not None:
            _eval_tasks(m, tok, tasks.split(","), limit, num_fewshot, batch_size, device, as_json, model)
            return
        assert data is not None
        protocol = bos_protocol(m, bos)
        ppl = evaluate_perplexity(
            m, tok, data, seqlen=seqlen, max_windows=max_windows, batch_size=batch_size, device=device, bos=protocol,
            quiet=quiet,
        )  # fmt: skip
        if as_json:
            click.echo(json.dumps({"model": model, "data": data, "seqlen": seqlen, "bos": protocol, "perplexity": ppl}))
        else:
            took = time.perf_counter() - t0
            click.echo(f"perplexity {ppl:.3f} ({model} on {data}, {seqlen}-token windows, BOS {protocol}, {took:.1f}s)")

    _run(go)


def _eval_tasks(
    m: Any, tok: Any, tasks: list[str], limit: int | None, fewshot: int, batch: int, device: str, as_json: bool,
    name: str,
) -> None:  # fmt: skip
    """Run the harness on ``tasks`` and print one line per task (or a JSON object)."""
    from oneshot.engine import resolve_device
    from oneshot.harness import evaluate_tasks

    found = evaluate_tasks(
        m, tok, tasks, limit=limit, num_fewshot=fewshot, batch_size=batch, device=str(resolve_device(device))
    )
    if as_json:
        click.echo(json.dumps({"model": name, "num_fewshot": fewshot, "limit": limit, "results": found}))
        return
    for task, metrics in found.items():
        click.echo(f"{task}: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items())))


@main.command()
def methods() -> None:
    """List the pruning methods and the statistics each one gathers."""
    for spec in list_methods():
        needs = ", ".join(spec.needs) or "no statistics"
        click.echo(f"{spec.name:<10} {spec.summary} [{needs}]")


@main.command()
def modes() -> None:
    """Which option works in memory, streamed, under torchrun and on a GPU (the table of docs/modes.md)."""
    from oneshot.modes import markdown

    click.echo(markdown(), nl=False)


if __name__ == "__main__":  # pragma: no cover
    main()
