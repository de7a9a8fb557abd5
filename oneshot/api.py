"""Python API: ``prune()`` (and ``evaluate_perplexity()``, from :mod:`oneshot.evaluation`).

>>> import oneshot
>>> report = oneshot.prune(model, tokenizer, method="wanda", sparsity=0.5)   # doctest: +SKIP
>>> print(report.summary())                                                  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from oneshot.calibration.data import CalibrationSet, build_calibration
from oneshot.checkpoint import Checkpoint, expert_weight_keys, has_safetensors, saved_quantization
from oneshot.config import DTYPES, TOKENS, CalibrationConfig, PruneConfig, read_recipe
from oneshot.distributed import Ranks, guarded
from oneshot.engine import PhaseTimes, SweepIO, prunable_layers, prunable_modules, resolve_device, single_pass_bytes
from oneshot.errors import ConfigError, ModelError
from oneshot.evaluation import evaluate_perplexity, resolve_seqlen
from oneshot.experts import experts_modules, projections
from oneshot.layers import (
    LAYER,
    OTHER,
    ROUTER,
    VECTOR,
    find_blocks,
    find_routers,
    is_conv1d,
    is_expert,
    parameter_roles,
)
from oneshot.loading import load_model, load_tokenizer, local_folder, resolve_dtype
from oneshot.memory import allocator_state, default_budget, peak_device_memory, peak_rss, tune_allocator
from oneshot.methods.allocation import apply_sparsity_map, uniform
from oneshot.methods.registry import METHODS
from oneshot.modes import TORCHRUN, refusal
from oneshot.passes.cost import measure_block_costs
from oneshot.passes.owl import owl_allocation
from oneshot.passes.sensitivity import sensitivity_allocation
from oneshot.passes.structured import prune_structured
from oneshot.passes.unstructured import LayerRecord, SweepResult, prune_sequential
from oneshot.quantized import (
    ASYMMETRIC_LOAD_WARNING,
    AUTO_GROUP_RULE,
    QuantizedLayer,
    auto_group_size,
    check_groups,
    check_loader,
)
from oneshot.streaming import StreamingRun, partial_dir
from oneshot.writer import check_output_dir, rewrite_report, save_pruned

log = logging.getLogger(__name__)

__all__ = ["Report", "evaluate_perplexity", "prune", "should_stream"]


#: The allocation sweeps that run before the pruning sweep, by their key in the report.
ALLOCATIONS = ("owl", "sensitivity")

#: How :func:`phase_line` names the phases of :meth:`Report.phase_seconds`.
_PHASE_LABELS = {"report": "error report", "forward": "forwards", "activations": "activation store"}


def phase_line(phases: dict[str, float]) -> str:
    """The phases that took time, as one line: ``capture 1.2, forwards 3.4, ...``."""
    return ", ".join(f"{_PHASE_LABELS.get(k, k)} {v:.1f}" for k, v in phases.items() if v >= 0.05)


def _weighted(layers: list[LayerRecord], value: Callable[[LayerRecord], float]) -> float:
    """The mean of ``value`` over ``layers`` weighted by their sizes (0 without layers)."""
    total = sum(r.shape[0] * r.shape[1] for r in layers)
    return sum(value(r) * r.shape[0] * r.shape[1] for r in layers) / total if total else 0.0


@dataclass
class Report:
    """What a pruning run did: per-layer records, phase times and the resolved config."""

    config: PruneConfig
    layers: list[LayerRecord]
    times: PhaseTimes
    seconds: float
    blocks: str
    model: str = ""
    out_dir: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    #: Quantized layers in their saved (compressed-tensors) form; pass to ``save_pruned(quantized=...)``.
    quantized: dict[str, QuantizedLayer] = field(default_factory=dict, repr=False)

    @property
    def achieved_sparsity(self) -> float:
        """Share of the weights the masks removed over all pruned layers, weighted by their size."""
        return _weighted(self.layers, lambda r: r.achieved_sparsity)

    @property
    def zero_fraction(self) -> float:
        """Share of the weights of the pruned layers equal to zero as written: pruned, or rounded to zero."""
        return _weighted(self.layers, lambda r: r.achieved_sparsity if r.zero_fraction is None else r.zero_fraction)

    @property
    def mean_relative_error(self) -> float | None:
        """Mean over layers of ‖(W − W′)X‖² / ‖WX‖² on the sampled calibration tokens (None: no data).

        For a structured run: over the projections whose input units were removed.
        """
        units = self.extra.get("structured", {}).get("blocks", [])
        errors = [r.relative_error for r in self.layers if r.relative_error is not None]
        errors += [u["relative_error"] for u in units if u.get("relative_error") is not None]
        return sum(errors) / len(errors) if errors else None

    def phase_seconds(self) -> dict[str, float]:
        """Every second of the run in one phase: the sweep's, the allocation sweep, the save, and setup.

        ``setup`` is what no other phase holds (loading the model and tokenizer, tokenizing the
        calibration text, the checks before any work), so the phases add up to ``seconds``.
        ``communicate`` (several ranks) overlaps the phase each collective happens in, and
        ``gradients_forward`` and ``gradients_head`` (a streamed backward's first forward, and its
        loss head's backward) are parts of ``gradients``: none of these is summed.
        """
        apart = ("per_block", "communicate", "gradients_forward", "gradients_head")
        phases = {k: v for k, v in dataclasses.asdict(self.times).items() if k not in apart}
        phases["allocation"] = sum(float(self.extra.get(name, {}).get("seconds", 0.0)) for name in ALLOCATIONS)
        phases["save"] = float(self.extra.get("write_seconds", 0.0))
        phases["setup"] = max(0.0, self.seconds - sum(phases.values()))
        if self.times.communicate:
            phases["communicate"] = self.times.communicate
        if self.times.gradients_forward:
            phases["gradients_forward"] = self.times.gradients_forward
        if self.times.gradients_head:
            phases["gradients_head"] = self.times.gradients_head
        return phases

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form, as saved in ``oneshot_report.json``.

        A structured run prunes no single weights: its sparsity fields are None, its figures (units
        removed, parameter reduction, each projection's output error) are under ``structured``, and
        ``layers`` lists the projections whose inputs lost units.
        """
        structured = self.extra.get("structured")
        layers = [dataclasses.asdict(r) for r in self.layers]
        if structured:
            layers = [{**u, "name": f"{self.blocks}.{u['block']}.{u['layer']}"} for u in structured["blocks"]]
        return {
            "model": self.model,
            "method": self.config.method,
            "target_sparsity": None if structured else self.config.sparsity,
            "nm": None if self.config.nm is None else f"{self.config.nm[0]}:{self.config.nm[1]}",
            "achieved_sparsity": None if structured else self.achieved_sparsity,
            "zero_fraction": None if structured else self.zero_fraction,
            "mean_relative_error": self.mean_relative_error,
            "seconds": self.seconds,
            "phase_seconds": self.phase_seconds(),
            "blocks": self.blocks,
            "out_dir": self.out_dir,
            "layers": layers,
            **self.extra,
        }

    def summary(self) -> str:
        """A few human-readable lines."""
        structured = self.extra.get("structured")
        if structured:
            units = structured["blocks"]
            sizes = sorted({f"{u['target']} {u['before']}->{u['after']}" for u in units})
            folded = "" if structured["target"] == "experts" else (
                f", bias compensation {'on' if structured['bias_compensation'] else 'off'}"
            )  # fmt: skip
            lines = [
                f"method structured ({structured['score']}, ratio {structured['ratio']:g}, target "
                f"{structured['target']}{folded})",
                f"per block: {', '.join(sizes)}; parameters {structured['params_before']:,} -> "
                f"{structured['params_after']:,} ({structured['params_after'] / structured['params_before']:.1%})",
                "mean relative output error of the sliced projections "
                + ("n/a" if self.mean_relative_error is None else f"{self.mean_relative_error:.4g}"),
                f"time {self.seconds:.1f}s ({phase_line(self.phase_seconds())})",
            ]
            if self.out_dir:
                lines.append(f"saved to {self.out_dir}")
            return "\n".join(lines)
        pattern = f"{self.config.nm[0]}:{self.config.nm[1]}" if self.config.nm else f"{self.config.sparsity:.0%}"
        quant = self.extra.get("quantization")
        if quant:
            grid = f"{quant['bits']}-bit " + ("per row" if quant["group_size"] is None else f"g{quant['group_size']}")
            grid += f" (group size chosen: {AUTO_GROUP_RULE})" if "group_size_chosen" in self.extra else ""
            pattern = f"{pattern}, then {quant['method']} {grid}" if self.config.then else grid
        damped = [r for r in self.layers if r.damp is not None and r.damp > self.config.damp]
        lines = [
            f"method {self.config.method} at {pattern}: {len(self.layers)} linear layers in {self.blocks}",
            f"achieved sparsity {self.achieved_sparsity:.4%}"
            + (f" (zeros after rounding {self.zero_fraction:.4%})" if quant else "")
            + ", mean relative error "
            + ("n/a (no calibration data)" if self.mean_relative_error is None else f"{self.mean_relative_error:.4g}"),
            f"time {self.seconds:.1f}s ({phase_line(self.phase_seconds())})",
        ]
        lines.extend(_moe_lines(self.layers, self.extra.get("block_parameters")))
        owl = self.extra.get("owl")
        if owl:
            values = [b["sparsity"] for b in owl["blocks"]]
            lines.append(
                f"OWL (M={owl['m']:g}, λ={owl['lambda']:g}): block sparsities {min(values):.3f}-{max(values):.3f}, "
                f"statistics sweep {owl['seconds']:.1f}s"
            )
        if damped:
            lines.append(f"{len(damped)} layers needed extra damping (see the report)")
        ranks = self.extra.get("distributed")
        if ranks and "bytes_communicated" in ranks:
            lines.append(
                f"{ranks['world_size']} ranks: {ranks['bytes_communicated'] / 1e6:.1f} MB communicated by rank 0 in "
                f"{ranks['communication_seconds']:.1f}s"
            )
        if self.out_dir:
            lines.append(f"saved to {self.out_dir}")
        return "\n".join(lines)


def _moe_lines(layers: list[LayerRecord], params: dict[str, Any] | None) -> list[str]:
    """The summary's account of the block parameters left dense, and of the experts' calibration tokens."""
    lines = []
    if params and params["total"]:
        dense = ", ".join(f"{k} {v / params['total']:.2%}" for k, v in params["dense"].items() if v)
        lines.append(
            f"block parameters: {params['pruned_layers'] / params['total']:.2%} in pruned layers"
            + (f" (dense: {dense})" if dense else "")
            + f"; {params['block_sparsity']:.2%} of them removed"
        )
    experts = sorted(r.routed_tokens for r in layers if r.routed_tokens is not None and r.name.endswith("down_proj"))
    if experts:
        everything = sum(
            r.tokens != r.routed_tokens for r in layers if r.routed_tokens is not None and r.name.endswith("down_proj")
        )
        lines.append(
            f"{len(experts)} experts: routed calibration tokens min {experts[0]}, median {experts[len(experts) // 2]}, "
            f"max {experts[-1]}" + (f"; {everything} calibrated on every token" if everything else "")
        )
    return lines


def _as_calibration(
    calibration: str | os.PathLike[str] | CalibrationConfig | CalibrationSet | torch.Tensor | None,
    config: PruneConfig,
) -> CalibrationConfig | CalibrationSet:
    if calibration is None:
        return config.calibration
    if isinstance(calibration, (CalibrationConfig, CalibrationSet)):
        return calibration
    if isinstance(calibration, torch.Tensor):
        return CalibrationSet(calibration.long())
    return dataclasses.replace(config.calibration, source=str(calibration))


def prune(
    model: nn.Module | str | os.PathLike[str],
    tokenizer: Any = None,
    *,
    method: str | None = None,
    sparsity: float | None = None,
    nm: str | tuple[int, int] | None = None,
    calibration: str | os.PathLike[str] | CalibrationConfig | CalibrationSet | torch.Tensor | None = None,
    out: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    config: PruneConfig | None = None,
    sparsities: dict[str, float | None] | None = None,
    recipe: str | os.PathLike[str] | None = None,
    **options: Any,
) -> Report:
    """Prune a model in place (or a checkpoint: a folder / hub name / .gguf) and return a :class:`Report`.

    ``calibration`` is a source (``"bundled"``, a file, a hub dataset name), a
    :class:`CalibrationConfig`, a ready :class:`CalibrationSet`, or a ``[N, T]`` tensor of token
    ids. Other keyword ``options`` are :class:`PruneConfig` fields (``damp``, ``device``, ``stream``,
    ``quiet``, ...); ``config`` replaces all of them. With ``out`` the pruned model is saved there (see
    :func:`oneshot.writer.save_pruned`). A checkpoint larger than ``max_memory`` (or any with
    ``stream=True``) is pruned block by block from its shards straight into ``out``
    (:mod:`oneshot.streaming`). ``owl=True`` (with ``owl_m``, ``owl_lambda``) allocates per-block
    sparsities by outlier ratio first; ``sparsity_map={glob: sparsity | "skip"}`` then overrides
    layers by name, and ``sparsities`` (exact layer names) overrides both. ``then="gptq"`` (with
    ``bits``, ``group_size``, ``symmetric``, ``act_order``) quantizes each layer after pruning it
    (``method="gptq"`` quantizes only); ``report.quantized`` then holds the layers' saved form.
    ``recipe`` is a recipe file (:func:`oneshot.config.read_recipe`); the other arguments override it.
    """
    start = time.perf_counter()
    if recipe is not None:
        method, sparsity, nm, options = _with_recipe(recipe, config, method, sparsity, nm, options)
    config = _make_config(config, method, sparsity, nm, calibration, options)
    ranks = Ranks.current()
    if ranks is not None:
        _check_distributed(config)
    out_path = _output_path(out, config, overwrite)
    model, tokenizer, run, name = _model_of(model, tokenizer, config, out_path, overwrite, ranks)
    auto_group = config.quantizes and config.group_size is None
    config, calib, recorded = _prepare(model, tokenizer, calibration, config, run)
    was_training = model.training
    model.eval()
    failed = False
    try:
        facts, calib = _facts(model, calib, run, ranks, auto_group)
        job = _Job(model, calib, config, facts, run, ranks)
        report = _prune_structured(job) if METHODS[config.method].structured else _prune_unstructured(job, sparsities)
        report.model = name
        report.config = resolved_config(config, model, recorded, report.extra)
        return _finish(report, model, tokenizer, out_path, overwrite, start, run, ranks)
    except BaseException:
        failed = True
        if run is not None and run.writes and run.resumable:
            log.error("the finished blocks are kept in %s: rerun with --resume to continue", run.partial)
        raise
    finally:
        model.train(was_training)
        if run is not None:
            run.close(keep=failed and run.resumable)  # a reading rank's activations, for the resume


def _with_recipe(
    recipe: str | os.PathLike[str],
    config: PruneConfig | None,
    method: str | None,
    sparsity: float | None,
    nm: str | tuple[int, int] | None,
    options: dict[str, Any],
) -> tuple[str | None, float | None, str | tuple[int, int] | None, dict[str, Any]]:
    """The recipe's options under the ones given as arguments (which win)."""
    if config is not None:
        raise ConfigError("pass either config=PruneConfig(...) or recipe=FILE, not both")
    options = {**read_recipe(recipe), **options}
    method = options.pop("method", None) if method is None else method
    sparsity = options.pop("sparsity", None) if sparsity is None else sparsity
    nm = options.pop("nm", None) if nm is None else nm
    return method, sparsity, nm, options


def _prepare(
    model: nn.Module, tokenizer: Any, calibration: object, config: PruneConfig, run: StreamingRun | None
) -> tuple[PruneConfig, CalibrationSet | None, CalibrationConfig | None]:
    """Check the layers (settling what depends on them), build the calibration, open the streaming run.

    Returns the settled config, the calibration tokens and the calibration as the run records it.
    """
    config = check_layers(model, config)
    if run is not None:
        run.config = config
    calib = _calibration(model, tokenizer, calibration, config)
    recorded = None if calib is None else _recorded_calibration(calibration, config, calib)
    if run is not None:
        run.begin(calib)
    return config, calib, recorded


def _model_of(
    model: nn.Module | str | os.PathLike[str],
    tokenizer: Any,
    config: PruneConfig,
    out_path: Path | None,
    overwrite: bool,
    ranks: Ranks | None,
) -> tuple[nn.Module, Any, StreamingRun | None, str]:
    """The model to prune, its tokenizer, the streaming run (None in memory) and the model's name."""
    name, run = "", None
    if isinstance(model, (str, os.PathLike)):
        name = str(model)
        model, tokenizer, run = _open(model, tokenizer, config, out_path, overwrite, ranks)
    elif config.stream or config.resume:
        raise ConfigError("streaming reads a checkpoint from disk: pass its folder or hub name, not a loaded model")
    else:
        tune_allocator()  # a loaded model: speed first (a checkpoint's mode is set by _open, before it is read)
    if not isinstance(model, nn.Module):
        raise ModelError(f"model must be a torch module or a path / hub name, got {type(model).__name__}")
    name = name or str(getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__)
    return model, tokenizer, run, name


def _facts(
    model: nn.Module, calib: CalibrationSet | None, run: StreamingRun | None, ranks: Ranks | None, auto_group: bool
) -> tuple[dict[str, Any], CalibrationSet | None]:
    """The report's first entries, and the calibration this process sweeps (its share under torchrun)."""
    facts = _run_facts(model, calib, run)
    facts["host_allocator"] = allocator_state()
    if auto_group:
        facts["group_size_chosen"] = AUTO_GROUP_RULE
    if ranks is not None:
        facts["distributed"] = {"world_size": ranks.world}
        if calib is not None:
            facts["distributed"]["samples"] = list(ranks.bounds(calib.nsamples))
            calib = ranks.share(calib)
            facts["distributed"]["nsamples_here"] = calib.nsamples
    return facts, calib


def _check_distributed(config: PruneConfig) -> None:
    """Refuse, before any work, what a run over several ranks does not do (each with the way out)."""
    why = refusal(config, TORCHRUN)
    if why is not None:
        raise ConfigError(why)


def check_layers(model: nn.Module, config: PruneConfig) -> PruneConfig:
    """Refuse, before any work, a model whose blocks have no prunable layer or whose widths the N:M misfits.

    Returns ``config`` with what depends on the layers settled (a quantized run's default group size).
    """
    layers = prunable_layers(model, config)
    if not layers and not METHODS[config.method].structured:
        blocks_name, blocks = find_blocks(model)
        found = ", ".join(f"{name} ({type(m).__name__})" for name, m in blocks[0].named_children())
        raise ModelError(
            f"found no linear layer to prune in {blocks_name}.0 (it holds: {found}); oneshot prunes nn.Linear and "
            "GPT-2 Conv1D layers" + (", and --skip leaves none" if config.skip_layers else "")
        )
    if config.quantizes:
        config = _check_quantizable(model, config, layers)
    if config.nm is not None:
        m = config.nm[1]
        misfit = [name for name, width in layers.items() if width % m]
        if misfit:
            raise ConfigError(
                f"--nm {config.nm[0]}:{m} needs every pruned layer's input width to be a multiple of {m}; "
                f"{len(misfit)} are not (e.g. {misfit[0]}): leave them dense with --skip or choose another M"
            )
    return config


def _check_quantizable(model: nn.Module, config: PruneConfig, layers: dict[str, int]) -> PruneConfig:
    """A quantized run's output must be loadable: the format's package present, plain Linear layers, whole groups.

    Returns ``config`` with its group size set: the default is the largest of 128 / 64 / 32 that fits.
    """
    check_loader()
    _check_quantizable_experts(model, {n: m for n, m in prunable_modules(model, config).items() if is_expert(m)})
    conv = [name for name, module in model.named_modules() if name in layers and is_conv1d(module)]
    if conv:
        raise ConfigError(
            f"the compressed-tensors format stores nn.Linear layers; {conv[0]} is a GPT-2 Conv1D "
            f"({len(conv)} layers): quantize a model with nn.Linear layers or leave these dense with --skip"
        )
    if config.group_size is None:
        config = dataclasses.replace(config, group_size=auto_group_size(layers))
        log.info("--group-size %d: %s", config.group_size, AUTO_GROUP_RULE)
    spec = config.quant_spec()
    check_groups(layers, spec)
    if not spec.symmetric:
        log.warning(ASYMMETRIC_LOAD_WARNING)
    return config


def _check_quantizable_experts(model: nn.Module, experts: dict[str, nn.Module]) -> None:
    """Quantized experts are saved one 2-D weight per expert, the way vLLM and transformers load them.

    Refused: a family whose checkpoint stores its experts fused (no per-expert weight to pack), and
    an experts module quantized in part (a serving kernel runs one scheme over all of a layer's experts).
    """
    if not experts:
        return
    keys = expert_weight_keys(model, experts)
    fused = [name for name in experts if name not in keys]
    if fused:
        raise ConfigError(
            f"this model's checkpoint stores its experts as fused 3-D tensors ({fused[0]} has no weight of its own), "
            "and the compressed-tensors format packs one 2-D weight per expert: leave the experts dense with "
            "--skip '*.experts.*' (the other layers are then quantized), or prune them without a quantizer"
        )
    modules: dict[str, list[str]] = {}
    for name in experts:
        modules.setdefault(name.rsplit(".", 2)[0], []).append(name)
    for module_name, names in modules.items():
        whole = len(projections(experts[names[0]].__dict__["experts"]))
        if len(names) != whole:
            raise ConfigError(
                f"{len(names)} of the {whole} expert projections of {module_name} are quantized: a quantized "
                "mixture-of-experts layer is served with one scheme for all its experts; quantize all of them or "
                f"none (--skip '{module_name}.*')"
            )


def _output_path(out: str | os.PathLike[str] | None, config: PruneConfig, overwrite: bool) -> Path | None:
    """The output folder, checked before any work (a resumed run's folder does not exist yet)."""
    path = Path(out).expanduser() if out is not None else None
    if path is not None and not (config.resume and partial_dir(path).exists()):
        check_output_dir(path, overwrite)
    return path


def _run_facts(model: nn.Module, calib: CalibrationSet | None, run: StreamingRun | None) -> dict[str, Any]:
    """The report's first entries: calibration size (None: no data read), mode and dtype."""
    return {
        "calibration": None if calib is None else {"nsamples": calib.nsamples, "seqlen": calib.seqlen},
        "mode": "streaming" if run is not None else "in-memory",
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }


def _make_config(
    config: PruneConfig | None,
    method: str | None,
    sparsity: float | None,
    nm: str | tuple[int, int] | None,
    calibration: object,
    options: dict[str, Any],
) -> PruneConfig:
    if config is not None:
        if method is not None or sparsity is not None or nm is not None or options:
            raise ConfigError("pass either config=PruneConfig(...) or individual options, not both")
        return config
    fields: dict[str, Any] = {"sparsity": sparsity, "nm": nm, **options}
    if method is not None:
        fields["method"] = method
    plain = PruneConfig(**fields)
    if not plain.uses_data:
        return plain  # the calibration argument is not used (see _calibration), so it is not part of the config
    if isinstance(calibration, CalibrationConfig):
        fields["calibration"] = calibration
    elif isinstance(calibration, (str, os.PathLike)):  # recorded in oneshot_config.json as the source used
        fields["calibration"] = dataclasses.replace(
            fields.get("calibration", CalibrationConfig()), source=str(calibration)
        )
    else:
        return plain
    return PruneConfig(**fields)


def _open(
    source: str | os.PathLike[str],
    tokenizer: Any,
    config: PruneConfig,
    out: Path | None,
    overwrite: bool,
    ranks: Ranks | None = None,
) -> tuple[nn.Module, Any, StreamingRun | None]:
    """Load the checkpoint in memory, or open a streaming run on it (see :func:`should_stream`).

    With several ranks all stream if any must; each reads the blocks itself, rank 0 writes.
    """
    folder = local_folder(source)
    method = saved_quantization(folder).get("quant_method")
    if method is not None:
        raise ModelError(
            f"{folder} is already quantized ({method}); prune or quantize the original checkpoint it was made from"
        )
    dtype = resolve_dtype(folder, config.dtype)
    stream = should_stream(folder, config, dtype)
    if ranks is not None:
        stream = not ranks.all_true(not stream)
    # before anything large is read: a heap's free chunks serve later requests whatever the thresholds
    tune_allocator(footprint=stream)  # in memory: speed first; streaming: footprint first
    if not stream:
        model, loaded = load_model(folder, config.dtype)
        return model, tokenizer or loaded, None
    if out is None:
        raise ConfigError("a streaming run writes the pruned model block by block: pass out= (--out)")
    run = StreamingRun(folder, config, out, overwrite, dtype, ranks=ranks)
    return run.model, tokenizer or load_tokenizer(folder), run


def should_stream(folder: Path, config: PruneConfig, dtype: torch.dtype) -> bool:
    """Stream when asked to, or when the weights (in ``dtype``) plus 20% would exceed the memory budget."""
    if config.stream is not None or config.resume:
        return bool(config.stream is not False)
    if not has_safetensors(folder):
        return False  # pickled weights: only transformers' (weights-only) loader reads them, in memory
    checkpoint = Checkpoint(folder)  # a corrupt, truncated or missing shard is a clear error here
    scale = torch.empty(0, dtype=dtype).element_size() / torch.empty(0, dtype=checkpoint.dtype()).element_size()
    need = int(checkpoint.nbytes * scale * 1.2)
    budget = config.max_memory or default_budget()
    if need > budget:
        log.info("the model needs about %.1f GB, more than the %.1f GB budget: streaming it", need / 1e9, budget / 1e9)
        return True
    return False


def _calibration(model: nn.Module, tokenizer: Any, calibration: object, config: PruneConfig) -> CalibrationSet | None:
    """The calibration tokens, or None when the run reads no data (a data-free method without OWL).

    A recorded ``digest`` (a recipe run again) must match the tokens built now.
    """
    if not config.uses_data:
        if calibration is not None:
            log.info("%s needs no calibration data: the calibration passed is not used", config.method)
        return None
    source = _as_calibration(calibration, config)  # type: ignore[arg-type]
    if isinstance(source, CalibrationConfig):
        if source.source == TOKENS:
            raise ConfigError(
                "this configuration was calibrated on token ids passed to oneshot.prune(calibration=...), which a "
                "recipe does not hold: pass the same ids as calibration= (their digest is checked)"
            )
        if tokenizer is None:
            raise ConfigError("a tokenizer is needed to build calibration data; pass tokenizer= or token ids")
        calib = build_calibration(tokenizer, source, resolve_seqlen(model, source.seqlen))
    else:
        calib = source
        resolve_seqlen(model, calib.seqlen)
    expected = config.calibration.digest if calibration is None or isinstance(calibration, torch.Tensor) else None
    expected = source.digest if isinstance(source, CalibrationConfig) else expected
    if expected is not None and expected != calib.digest():
        raise ConfigError(
            "the calibration tokens differ from the ones the recipe recorded (digest mismatch): the same text, "
            "tokenizer, --nsamples, --seqlen and --seed are needed to re-make the run"
        )
    if not config.quiet:
        log.info("calibrating on %d samples x %d tokens", calib.nsamples, calib.seqlen)
    return calib


def _recorded_calibration(calibration: object, config: PruneConfig, calib: CalibrationSet) -> CalibrationConfig:
    """The calibration as this run used it: its source (or :data:`TOKENS` for ids), size and digest."""
    source = _as_calibration(calibration, config)  # type: ignore[arg-type]
    if isinstance(source, CalibrationSet):
        source = CalibrationConfig(source=TOKENS)
    return dataclasses.replace(source, nsamples=calib.nsamples, seqlen=calib.seqlen, digest=calib.digest())


def resolved_config(
    config: PruneConfig, model: nn.Module, calibration: CalibrationConfig | None, facts: dict[str, Any]
) -> PruneConfig:
    """``config`` with what the run decided filled in: device, dtype, streaming, passes and the calibration used.

    This is the configuration saved next to the output and in its recipe, so the recipe re-makes the run.
    """
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    changes: dict[str, Any] = {
        "device": str(resolve_device(config.device)),
        "stream": facts.get("mode") == "streaming",
        "dtype": dtype if dtype in DTYPES else config.dtype,
    }
    if calibration is not None:
        changes["calibration"] = calibration
    if METHODS[config.method].structured:
        changes["sparsity"] = None  # a structured run removes units; its config sets no sparsity of its own
    if "passes" in facts:  # decided by sweeps that read data and prune single weights only
        changes["passes"] = facts["passes"]
    return dataclasses.replace(config, **changes)


@dataclass
class _Job:
    """What the pruning steps of one :func:`prune` call share."""

    model: nn.Module
    calib: CalibrationSet | None
    config: PruneConfig
    extra: dict[str, Any]
    run: StreamingRun | None
    ranks: Ranks | None = None  # several processes share the run (oneshot.distributed)


def _prune_structured(job: _Job) -> Report:
    config, extra, run = job.config, job.extra, job.run
    assert job.calib is not None  # structured reads data
    io = run.io() if run is not None else None
    structured = prune_structured(job.model, job.calib, config, io=io, ranks=job.ranks)
    experts = config.target == "experts"
    extra["structured"] = {
        "ratio": config.ratio,
        "score": ("frequency" if config.score == "frequency" else "reap") if experts else config.score,
        "target": config.target,
        "bias_compensation": False if experts else config.bias_compensation,
        "params_before": structured.params_before,
        "params_after": structured.params_after,
        "parameter_reduction": 1.0 - structured.params_after / max(structured.params_before, 1),
        "removed_units": {
            kind: sum(len(u.removed) for u in structured.units if u.target == kind)
            for kind in (("experts",) if experts else ("mlp", "attention"))
        },
        "blocks": [dataclasses.asdict(u) for u in structured.units],
    }
    if structured.expert_tokens:
        extra["structured"]["expert_scores"] = structured.expert_tokens
    return Report(config, [], structured.times, 0.0, structured.blocks_name, extra=extra)


def _allocation(job: _Job, sparsities: dict[str, float | None] | None) -> dict[str, float | None] | None:
    """Per-layer sparsities from OWL or sensitivity, the sparsity map and explicit overrides (None = uniform)."""
    model, config = job.model, job.config
    layers = uniform(list(prunable_layers(model, config)), float(config.sparsity or 0.0)) if config.sparsity_map else {}
    if config.sparsity_map:  # validate the map before any expensive work
        apply_sparsity_map(layers, config.sparsity_map)
    _check_names(sparsities or {}, model, config)
    allocation: dict[str, float | None] | None = None
    if config.owl:
        allocation = _allocation_pass(job, "owl", _owl_pass)
    elif config.allocate == "sensitivity":
        allocation = _allocation_pass(job, "sensitivity", _sensitivity_pass)
    if config.sparsity_map:
        allocation = apply_sparsity_map(allocation or layers, config.sparsity_map)
    if sparsities:
        allocation = {**(allocation or {}), **sparsities}
    return allocation


def _check_names(sparsities: dict[str, float | None], model: nn.Module, config: PruneConfig) -> None:
    """Refuse, before any work, a name in ``sparsities=`` that is not a layer the run prunes."""
    known = prunable_layers(model, config)
    unknown = [name for name in sparsities if name not in known]
    if unknown:
        raise ConfigError(
            f"sparsities= names {unknown[0]!r}, which is not a layer this run prunes ({len(unknown)} unknown); "
            f"names are qualified, e.g. {next(iter(known), 'model.layers.0.mlp.down_proj')!r}"
        )


def _owl_pass(job: _Job, io: SweepIO | None) -> dict[str, Any]:
    assert job.calib is not None  # OWL reads data
    owl = owl_allocation(job.model, job.calib, job.config, io=io, single_pass=_single_pass(job), ranks=job.ranks)
    return {"m": job.config.owl_m, "lambda": job.config.owl_lambda, "blocks": owl.blocks, "sparsities": owl.sparsities}


def _sensitivity_pass(job: _Job, io: SweepIO | None) -> dict[str, Any]:
    assert job.calib is not None  # the probes read data
    found = sensitivity_allocation(job.model, job.calib, job.config, io=io, ranks=job.ranks)
    return {
        "lambda": job.config.allocate_lambda,
        "error": job.config.allocate_error,
        "gradient_seconds": found.gradient_seconds,
        "probes": found.probes,
        "cost_vs_dense_forward": found.cost_vs_forward,
        "blocks": found.blocks,
        "sparsities": found.sparsities,
    }


def _allocation_pass(
    job: _Job, name: str, run_pass: Callable[[_Job, SweepIO | None], dict[str, Any]]
) -> dict[str, Any]:
    """Per-layer sparsities from an allocation sweep (OWL, sensitivity), kept in a streaming run's progress.

    The report gets the pass's facts under ``name`` (without the per-layer map) and its seconds.
    """
    run = job.run
    saved = run.progress.get(name) if run is not None else None
    if saved is None:
        t0 = time.perf_counter()
        io = run.read_only_io(name) if run is not None else None
        saved = run_pass(job, io)
        saved["seconds"] = time.perf_counter() - t0
        if run is not None:
            run.progress[name] = saved
    job.extra[name] = {k: v for k, v in saved.items() if k != "sparsities"}
    return dict(saved["sparsities"])


def _single_pass(job: _Job) -> bool:
    """Whether this run sweeps each block once (``--passes``; ``auto``: if one batch of all samples fits)."""
    if "passes" in job.extra:  # decided once per run: OWL's sweep and the pruning sweep agree
        return bool(job.extra["passes"] == "single")
    config, calib = job.config, job.calib
    assert calib is not None
    need = single_pass_bytes(job.model, calib.nsamples, calib.seqlen)
    device = resolve_device(config.device)
    if device.type == "cuda":
        budget = int(torch.cuda.mem_get_info(device)[0] * 0.8)
    else:
        budget = config.max_memory or default_budget()
    batched = config.batch_size != PruneConfig.batch_size  # asked for batches of its own size: two passes
    single = config.passes == "single" or (
        config.passes == "auto" and need <= budget and config.refine != "block" and not batched
    )
    moe_ranks = job.ranks is not None and bool(experts_modules(job.model))
    if moe_ranks and config.passes == "single":
        raise ConfigError(
            "a mixture of experts over several ranks sweeps in two passes (an expert's rare-token rule needs "
            "every rank's token counts before its statistics are taken): drop --passes single"
        )
    single = single and not moe_ranks
    if job.ranks is not None:  # one forward of all samples only if every rank's share fits
        single = job.ranks.all_true(single)
    costs = None
    resumed = job.run is not None and "passes" in job.run.progress
    if single and config.passes == "auto" and job.ranks is not None and job.ranks.world > 1 and not resumed:
        measured = None  # rank 0 alone measures (ranks sharing a machine would slow each other's timing)
        if job.ranks.rank == 0:
            tokens = calib.nsamples * calib.seqlen
            measured = measure_block_costs(job.model, config, METHODS[config.method], tokens, job.ranks.world, device)
        costs = job.ranks.all_gather_object(measured)[0]  # rank 0's measurement decides for all
        assert costs is not None
        single = costs.best() == "single"
    if job.run is not None:  # a resumed run sweeps the way it started, whatever memory it has now
        single = job.run.progress.setdefault("passes", "single" if single else "two") == "single"
    job.extra["passes"] = "single" if single else "two"
    if costs is not None:
        job.extra["passes_cost"] = costs.as_dict()
        job.extra["passes_reason"] = costs.reason()
        log.info("%s", costs.reason())
    elif config.passes == "auto" and config.refine == "block":
        job.extra["passes_reason"] = "--refine block fits each block to the dense block's outputs: two passes"
    elif config.passes == "auto" and moe_ranks:
        job.extra["passes_reason"] = "a mixture of experts over several ranks: two passes (token counts reduced first)"
    elif config.passes == "auto" and batched:
        job.extra["passes_reason"] = f"--batch-size {config.batch_size}: two passes (one forward per batch)"
    elif config.passes == "auto" and not single:
        job.extra["passes_reason"] = (
            f"one forward of all {calib.nsamples} samples needs about {need / 1e9:.1f} GB, more than the "
            f"{budget / 1e9:.1f} GB budget: two passes per block"
        )
        log.info("%s", job.extra["passes_reason"])
    return single


def _prune_unstructured(job: _Job, sparsities: dict[str, float | None] | None) -> Report:
    model, calib, config, extra, run = job.model, job.calib, job.config, job.extra, job.run
    allocation = _allocation(job, sparsities)
    result = SweepResult(blocks_name="")
    if run is not None:
        run.restore(result)
        if run.start:
            extra["resumed_from_block"] = run.start
    io = run.io(result) if run is not None else None
    single = calib is not None and _single_pass(job)
    sweep = prune_sequential(
        model, calib, config, sparsities=allocation, io=io, result=result, single_pass=single, ranks=job.ranks
    )
    order = {name: k for k, name in enumerate(prunable_layers(model, config))}
    sweep.layers.sort(key=lambda r: order.get(r.name, len(order)))  # layer order, however groups were solved
    if sweep.skipped:
        extra["skipped_layers"] = sweep.skipped
    if sweep.refits:
        extra["block_refit"] = [dataclasses.asdict(r) for r in sweep.refits]
    if config.quantizes:
        spec = config.quant_spec()
        extra["quantization"] = {
            "method": config.quantizer,
            "bits": spec.bits,
            "group_size": spec.group_size,
            "symmetric": spec.symmetric,
            "act_order": spec.act_order,
            "observer": spec.observer,
            "format": "compressed-tensors pack-quantized",
            "layers": sum(r.bits is not None for r in sweep.layers),
        }
    extra["block_parameters"] = block_parameters(model, sweep.layers)
    report = Report(config, sweep.layers, sweep.times, 0.0, sweep.blocks_name, extra=extra)
    report.quantized = sweep.quantized
    return report


def block_parameters(model: nn.Module, layers: list[LayerRecord]) -> dict[str, Any]:
    """Every parameter of the model's blocks accounted for: in the pruned layers, or dense and why.

    ``pruned_layers`` counts the weights of the layers the run pruned (``layers``); the rest is
    ``dense``: weights of layers left as they were (``skipped``: by ``--skip`` or a sparsity map),
    ``router`` (mixture-of-experts routers), ``vector`` (norms, biases) and ``other`` (a matrix
    no rule understands, named in ``not_understood`` and in a warning). ``block_sparsity`` is the
    share of all block parameters the masks removed.
    """
    blocks_name, blocks = find_blocks(model)
    total = 0
    by_role: dict[str, int] = {}
    other: list[str] = []
    routers: set[str] = set()
    for i, block in enumerate(blocks):
        routers.update(f"{blocks_name}.{i}.{name}" for name in find_routers(block))
        params = dict(block.named_parameters())
        for name, role in parameter_roles(block).items():
            by_role[role] = by_role.get(role, 0) + params[name].numel()
            total += params[name].numel()
            if role == OTHER:
                other.append(f"{blocks_name}.{i}.{name}")
    pruned = sum(r.shape[0] * r.shape[1] for r in layers)
    pruned_routers = sum(r.shape[0] * r.shape[1] for r in layers if r.name in routers)  # named by a sparsity map
    removed = sum(r.achieved_sparsity * r.shape[0] * r.shape[1] for r in layers)
    if other:
        log.warning(
            "%d block parameters are matrices no rule understands and stay dense (e.g. %s); see the report's "
            "block_parameters", len(other), other[0]
        )  # fmt: skip
    dense = {
        "skipped": by_role.get(LAYER, 0) - (pruned - pruned_routers),
        "router": by_role.get(ROUTER, 0) - pruned_routers,
        "vector": by_role.get(VECTOR, 0),
        "other": by_role.get(OTHER, 0),
    }
    return {
        "total": total,
        "pruned_layers": pruned,
        "dense": dense,
        "block_sparsity": removed / total if total else 0.0,
        "not_understood": other,
    }


def _finish(
    report: Report,
    model: nn.Module,
    tokenizer: Any,
    out_path: Path | None,
    overwrite: bool,
    start: float,
    run: StreamingRun | None,
    ranks: Ranks | None = None,
) -> Report:
    """Stamp time and memory, and save the model when an output folder was given (rank 0 of several)."""
    before = run.prior_seconds if run is not None else 0.0  # a resumed run: the blocks done before it
    report.seconds = time.perf_counter() - start + before
    report.extra["seconds_per_block"] = list(report.times.per_block)
    report.extra["peak_rss_bytes"] = peak_rss()
    if run is not None and run.store is not None:  # where a streaming run kept its activations
        report.extra["activation_store"] = "memory, written behind" if run.store.in_memory else "disk"
    device_peak = peak_device_memory(resolve_device(report.config.device))
    if device_peak is not None:
        report.extra["peak_device_memory_bytes"] = device_peak
    if ranks is not None:
        report.extra["distributed"] = {**report.extra.get("distributed", {}), **ranks.facts()}
    if out_path is not None:
        t0 = time.perf_counter()
        report.out_dir = str(out_path)
        with guarded(ranks, "writing the output"):  # rank 0 writes, every rank hears how it went
            if ranks is not None and not ranks.writes:
                pass
            elif run is not None:
                report.extra["verified_bytes"] = run.finish(
                    tokenizer, report.to_dict(), report.config.to_dict(), report.config.to_recipe()
                )
            else:
                save_pruned(
                    model,
                    tokenizer,
                    out_path,
                    report.to_dict(),
                    report.config.to_dict(),
                    overwrite=overwrite,
                    quantized=report.quantized,
                    recipe=report.config.to_recipe(),
                )
        report.extra["write_seconds"] = time.perf_counter() - t0
        report.seconds = time.perf_counter() - start + before
        report.extra["peak_rss_bytes"] = peak_rss()
        if ranks is None or ranks.writes:  # the saved report, with the save and its check counted
            rewrite_report(out_path, report.to_dict())
    return report
