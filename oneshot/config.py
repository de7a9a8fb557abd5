"""Frozen, validated run configuration: the one source of truth for the CLI and the Python API.

The CLI maps its options onto these dataclasses and the API builds them from keyword arguments;
either way a :class:`PruneConfig` is validated once in ``__post_init__`` and then flows one way
through loading, calibration, pruning and writing. Its ``to_dict()`` is saved next to the output.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from oneshot.errors import ConfigError
from oneshot.experts import EXPERT_RULES, ROUTED
from oneshot.methods import dsnot, fisher, movement, obs, ria, structured
from oneshot.methods.allocation import MAX_PROBE, parse_sparsity_map
from oneshot.methods.base import MethodOptions, MethodSpec
from oneshot.methods.linalg import BLOCK_SIZE, DAMP, MAX_DAMP_RETRIES
from oneshot.methods.masks import COMPARE
from oneshot.methods.quantspec import ACT_ORDER, BITS, GROUP_SIZE, OBSERVER, SYMMETRIC, QuantSpec
from oneshot.methods.registry import METHODS, QUANTIZERS
from oneshot.options import Knob

#: dtypes a model may be loaded and pruned in (the solvers always work in float32); ``auto`` is the
#: checkpoint's own dtype.
DTYPES = ("auto", "float32", "bfloat16", "float16")
#: Options that say where and how this machine runs a job, not what it computes: a recipe does not
#: record them, and a resumed streaming run may differ in them.
RUN_ONLY = ("quiet", "resume", "device", "stream", "max_memory")
#: The calibration source a run records when it was given token ids, not text.
TOKENS = "tokens"
#: How a block is swept: see ``PruneConfig.passes``.
PASSES = ("auto", "single", "two")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}

#: Why ``--resume`` with ``--no-stream`` is refused (an in-memory run keeps no partial folder).
RESUME_IN_MEMORY = "--resume continues a streaming run; drop --no-stream"


def parse_memory(value: str | int | None) -> int | None:
    """Parse a memory size such as ``"20GB"``, ``"512MiB"`` or a number of bytes.

    >>> parse_memory("1.5GB")
    1500000000
    """
    if value is None or isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(value))
    if match is None or match.group(2).upper() not in _UNITS:
        raise ConfigError(f"memory size {value!r} is not a size; use e.g. --max-memory 20GB or 512MiB")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def parse_nm(value: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """Parse an N:M pattern such as ``"2:4"`` (at most N non-zeros in every M consecutive weights).

    >>> parse_nm("2:4")
    (2, 4)
    """
    if value is None:
        return None
    if isinstance(value, tuple):
        n, m = value
    else:
        match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(value))
        if match is None:
            raise ConfigError(
                f"N:M pattern {value!r} is not of the form N:M; use e.g. --nm 2:4 "
                "(keep 2 of every 4 weights) or --nm 4:8"
            )
        n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise ConfigError(
            f"N:M pattern {n}:{m} is invalid: N must satisfy 0 < N < M "
            "(N weights are kept in every group of M); use e.g. 2:4 or 4:8"
        )
    return (n, m)


#: ``option(uses=...)`` kinds of run: every method that prunes weights one by one, every method that
#: reads data, every one of those that sweeps it, every method that solves layers sharing an input as one.
UNSTRUCTURED = "unstructured"
USES_DATA = "uses data"
SWEEPS_DATA = "prunes single weights from data"
STACKS = "solves layers sharing an input as one"

#: Mask refinements (``--refine``).
REFINES = ("dsnot", "block")
#: ``--refine block``'s default Adam learning rates: on the kept weights of a pruned block, and on a
#: quantized block's latent weights (in grid steps) and log-scales (``benchmarks/results/quant_refit_lr.md``).
REFIT_LR, QUANT_REFIT_LR = 1e-3, 2e-2


def option(
    default: Any,
    help: str,
    *,
    flag: str | None = None,
    type: Any = None,
    choices: tuple[str, ...] | None = None,
    uses: str | tuple[str, ...] | None = None,
    requires: str | None = None,
    cli: bool = True,
) -> Any:
    """Declare one run option: its default, ``--help`` text and CLI flag (default: from the field name).

    ``uses`` names the kind of run the option applies to (:data:`UNSTRUCTURED`, :data:`USES_DATA`,
    :data:`SWEEPS_DATA`, :data:`STACKS`; a method's own knobs are declared with :func:`knob`);
    ``requires`` another option it only matters with (``"owl"``: a boolean that
    must be on; ``"refine=dsnot"``: an option that must have that value). Setting an option
    that does not apply is refused. ``type`` is the CLI value type where the default is None;
    ``choices`` restricts the value. The CLI (:mod:`oneshot.cli`) is generated from these fields.
    """
    meta = {
        "help": help,
        "flag": flag,
        "type": type,
        "choices": choices,
        "uses": uses,
        "requires": requires,
        "cli": cli,
    }
    return field(default=default, metadata=meta)


def knob(declared: Knob[Any], *, stage: str = "method", requires: str | None = None) -> Any:
    """A run option that is a method's :class:`~oneshot.options.Knob`: default, help and range from it.

    It applies to the stages whose method lists the knob (``MethodSpec.knobs``): ``stage="method"``
    (flag ``--name``) to the pruning method, or to the quantizer when only that reads it;
    ``stage="then"`` (flag ``--then-name``, default None: the knob's own) to the ``--then`` quantizer.
    """
    then = stage == "then"
    meta = {
        "help": ("The --then quantizer's " + declared.help[0].lower() + declared.help[1:]) if then else declared.help,
        "flag": "--then-" + declared.flag[2:] if then else None,
        "type": declared.type or (type(declared.default) if then else None),
        "choices": declared.choices,
        "uses": None,
        "requires": requires,
        "cli": True,
        "knob": declared,
        "stage": stage,
    }
    return field(default=None if then else declared.default, metadata=meta)


def stage_values(config: PruneConfig, spec: MethodSpec, stage: str) -> dict[str, Any]:
    """The values of the knobs ``spec`` reads, for ``stage`` (``method`` or ``then``) of ``config``.

    The quantizer after a pruning method takes ``--then-X`` where given; a knob its pruning method
    does not read takes the plain ``--X``; otherwise the knob's own default.
    """
    first = METHODS[config.method]
    values: dict[str, Any] = {}
    for declared in spec.knobs:
        value = getattr(config, declared.name, declared.default)
        if stage == "then":
            own = getattr(config, "then_" + declared.name, None)
            value = own if own is not None else (value if declared not in first.knobs else declared.default)
        values[declared.name] = value
    return values


@dataclass(frozen=True)
class CalibrationConfig:
    """Where calibration text comes from and how it is cut into samples.

    ``source`` is ``"bundled"`` (a public-domain novel shipped with oneshot), a local ``.txt``,
    ``.jsonl`` or ``.parquet`` file, or a Hugging Face dataset name (``dataset_config``, ``split``
    and ``text_field`` then select the text); a run calibrated on token ids passed to
    :func:`oneshot.prune` records ``"tokens"`` (:data:`TOKENS`). ``digest`` is recorded by a run
    (:meth:`CalibrationSet.digest`); a recipe that carries one is checked against its tokens.
    ``nsamples`` windows of ``seqlen`` tokens are drawn
    at seeded random offsets. ``seqlen=None`` means min(2048, the model's context length).
    """

    source: str = option(
        "bundled",
        "Calibration text: 'bundled', a .txt/.jsonl/.parquet file, or a Hugging Face dataset name.",
        flag="--calib",
    )
    dataset_config: str | None = option(
        None, "Dataset config name (hub datasets only).", flag="--calib-config", type=str
    )
    split: str = option("train", "Dataset split (hub datasets only).", flag="--calib-split")
    text_field: str = option("text", "Field holding the text (.jsonl/.parquet/hub).")
    nsamples: int = option(128, "Number of calibration sequences.")
    seqlen: int | None = option(None, "Tokens per calibration sequence [default: min(2048, context)].", type=int)
    seed: int = option(0, "Seed for drawing calibration windows.")
    digest: str | None = option(
        None,
        "The calibration tokens' digest, as a run records it: a recipe run again checks its tokens are the same.",
        type=str,
        cli=False,
    )

    def __post_init__(self) -> None:
        if not self.source:
            raise ConfigError("calibration source is empty; pass --calib bundled, a file or a dataset name")
        if self.nsamples < 1:
            raise ConfigError(f"--nsamples must be at least 1 (got {self.nsamples})")
        if self.seqlen is not None and self.seqlen < 1:
            raise ConfigError(f"--seqlen must be at least 1 (got {self.seqlen})")


@dataclass(frozen=True)
class PruneConfig:
    """Everything that defines one pruning run.

    ``sparsity`` is the fraction of weights set to zero in every pruned linear layer. With an N:M
    pattern (``nm=(2, 4)``) the sparsity is implied (1 - N/M) and may be omitted; a different
    explicit value is an error. ``stream`` (None = decide from ``max_memory``) prunes a checkpoint
    folder block by block from its shards; ``resume`` continues an interrupted streaming run.
    """

    method: str = option(
        "sparsegpt", "Pruning method, or gptq / rtn to quantize only (see `oneshot methods`).", choices=tuple(METHODS)
    )
    sparsity: float | None = option(
        None, "Fraction of weights to zero in each layer, in [0, 1).", type=float, uses=UNSTRUCTURED
    )
    nm: tuple[int, int] | None = option(
        None, "N:M pattern, e.g. 2:4 (keep 2 of every 4); implies the sparsity.", type=str, uses=UNSTRUCTURED
    )
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    device: str = option("auto", "Compute device: auto, cpu, cuda, cuda:N.")
    dtype: str = option(
        "auto", "Dtype to compute (and save) in; auto = the checkpoint's own (a bf16 model stays bf16).", choices=DTYPES
    )
    stream: bool | None = option(
        None,
        "Read one block at a time from the safetensors shards and write it out at once, so the model never has "
        "to fit in memory [default: stream when the model would not fit --max-memory].",
        type=bool,
    )
    max_memory: int | None = option(
        None, "Memory budget that decides streaming, e.g. 20GB [default: 70% of the available memory].", type=str
    )
    resume: bool = option(False, "Continue an interrupted streaming run into the same --out from its last block.")
    passes: str = option(
        "auto",
        "single: prune each layer inside the block's one forward (later layers calibrated on the pruned ones, "
        "no second pass; the calibration set is one batch); two: a statistics forward, then a propagation "
        "forward per block; auto: single when that batch fits the memory budget (on several ranks: the cheaper "
        "of the two by a cost model measured on the device, in the report's passes_cost).",
        choices=PASSES,
        uses=SWEEPS_DATA,
    )
    stack: bool = option(
        True,
        "Solve layers that read the same input (q/k/v, gate/up) as one stacked matrix: one factorisation and "
        "one column loop, the same result as one by one.",
        uses=STACKS,
    )
    batch_size: int = option(
        8,
        "Calibration sequences per forward (a run that sweeps in two passes; the single pass forwards all "
        "samples as one batch, so --batch-size makes --passes auto choose two).",
        uses=USES_DATA,
    )
    block_size: int = knob(BLOCK_SIZE)
    damp: float = knob(DAMP)
    max_damp_retries: int = knob(MAX_DAMP_RETRIES)
    obs_memory_mb: int = knob(obs.MEMORY_MB)
    base: str | None = knob(movement.BASE)
    ria_alpha: float = knob(ria.ALPHA)
    compare: str = knob(COMPARE)
    optimizer_state: str | None = knob(fisher.OPTIMIZER_STATE)
    refine: str | None = option(
        None,
        "Refine after the method. dsnot: swap pruned and kept weights in each row to cancel its expected "
        "output shift (DSnoT; methods that keep the surviving weights as they are: all but sparsegpt and obs). "
        "block: refit each block's kept weights so its output matches the dense block's (masks fixed); in a "
        "quantized run, tune the rounding and the scales of the quantized weights instead (codes stay on the grid).",
        type=str,
        choices=REFINES,
        uses=UNSTRUCTURED,
    )
    dsnot_layers: str = knob(dsnot.LAYERS, requires="refine=dsnot")
    dsnot_cycles: int = knob(dsnot.CYCLES, requires="refine=dsnot")
    dsnot_threshold: float = knob(dsnot.THRESHOLD, requires="refine=dsnot")
    recon_epochs: int = option(
        4, "Block reconstruction: Adam passes over the calibration set per block.", requires="refine=block"
    )
    recon_lr: float | None = option(
        None,
        "Block reconstruction: Adam's learning rate [default: 1e-3 on the weights; in a quantized run 2e-2, "
        "in grid steps and in log-scale].",
        type=float,
        requires="refine=block",
    )
    then: str | None = option(
        None,
        "Quantize after pruning, in the same sweep: gptq (the pruned zeros held at zero while the kept weights "
        "are rounded with GPTQ's updates, SparseGPT's joint solve) or rtn. Saved in the compressed-tensors format.",
        type=str,
        choices=QUANTIZERS,
        uses=UNSTRUCTURED,
    )
    bits: int = knob(BITS)
    group_size: int | None = knob(GROUP_SIZE)
    symmetric: bool = knob(SYMMETRIC)
    act_order: bool = knob(ACT_ORDER)
    observer: str = knob(OBSERVER)
    then_block_size: int | None = knob(BLOCK_SIZE, stage="then")
    then_damp: float | None = knob(DAMP, stage="then")
    then_max_damp_retries: int | None = knob(MAX_DAMP_RETRIES, stage="then")
    skip_layers: tuple[str, ...] = option(
        (), "Glob of layer names to leave dense (repeatable).", flag="--skip", uses=UNSTRUCTURED
    )
    owl: bool = option(
        False, "Outlier-weighted layerwise sparsity: blocks with more outliers pruned less.", uses=UNSTRUCTURED
    )
    allocate: str | None = option(
        None,
        "sensitivity: measure each block's output error at a few sparsities around the target with the run's "
        "method, then give each block the sparsity that minimises the summed error at the same overall "
        "sparsity (an alternative to --owl).",
        type=str,
        choices=("sensitivity",),
        uses=UNSTRUCTURED,
    )
    allocate_lambda: float = option(
        0.1, "Sensitivity allocation: largest deviation of a block from --sparsity.", requires="allocate=sensitivity"
    )
    allocate_error: str = option(
        "relative",
        "Sensitivity allocation: what a block's probe error is. relative: ‖Δy‖² / ‖y‖² of the block's "
        "output y. fisher: ‖Δy‖² weighted by the mean ‖∂loss/∂y‖² of the dense model on the calibration "
        "samples (one backward per sample; streamed block by block with --stream), an estimate of the model's loss "
        "increase that sees how later blocks amplify an error.",
        type=str,
        choices=("relative", "fisher"),
        requires="allocate=sensitivity",
    )
    owl_m: float = option(5.0, "OWL outlier threshold M (× mean score).", requires="owl")
    owl_lambda: float = option(
        0.08, "OWL's λ: the block sparsities span 2λ, centred on --sparsity (the published mapping).", requires="owl"
    )
    sparsity_map: tuple[tuple[str, float | str], ...] = option(
        (),
        'JSON/YAML file {layer glob: sparsity or "skip"}, applied after OWL; later entries win.',
        type=Path,
        uses=UNSTRUCTURED,
    )
    expert_calibration: str = option(
        ROUTED,
        "Mixture-of-experts models: the tokens an expert's statistics come from. routed: the tokens the "
        "router sends to it; weighted: the same, each weighted by its routing weight; all: every "
        "calibration token through every expert (the block still outputs the routed mix).",
        choices=EXPERT_RULES,
        uses=USES_DATA,
    )
    expert_min_tokens: int = option(
        16,
        "Mixture-of-experts models: an expert routed fewer real calibration tokens than this is "
        "calibrated on every token instead (its routed share is too small to estimate statistics from).",
        uses=USES_DATA,
    )
    ratio: float | None = knob(structured.RATIO)
    score: str = knob(structured.SCORE)
    bias_compensation: bool = knob(structured.BIAS_COMPENSATION)
    target: str = knob(structured.TARGET)
    quiet: bool = option(False, "No progress bars or info messages.")

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            known = ", ".join(sorted(METHODS))
            raise ConfigError(f"unknown method {self.method!r}; choose one of: {known}")
        self._refuse_unused()
        nm = parse_nm(self.nm)
        object.__setattr__(self, "nm", nm)
        if nm is not None:
            implied = 1.0 - nm[0] / nm[1]
            if self.sparsity is not None and abs(self.sparsity - implied) > 1e-9:
                raise ConfigError(
                    f"--sparsity {self.sparsity} contradicts --nm {nm[0]}:{nm[1]} (which means "
                    f"{implied:.2f}); drop --sparsity when using --nm"
                )
            object.__setattr__(self, "sparsity", implied)
        if METHODS[self.method].structured:
            self._check_structured()
            object.__setattr__(self, "sparsity", 0.0)
        if METHODS[self.method].quantizes:
            self._check_quantize_only()
        if self.sparsity is None:
            raise ConfigError("no sparsity given; pass --sparsity (e.g. 0.5) or --nm (e.g. 2:4)")
        if not 0.0 <= float(self.sparsity) < 1.0:
            raise ConfigError(f"--sparsity must be in [0, 1) (got {self.sparsity}); e.g. 0.5 zeroes half the weights")
        object.__setattr__(self, "sparsity", float(self.sparsity))
        self._check_knobs()
        object.__setattr__(self, "skip_layers", tuple(self.skip_layers))
        if self.owl:
            self._check_owl()
        if self.allocate:
            self._check_allocate()
        object.__setattr__(self, "sparsity_map", _sparsity_map(self.sparsity_map))
        if METHODS[self.method].quantizes and any(value != "skip" for _, value in self.sparsity_map):
            raise ConfigError(
                f"--method {self.method} quantizes without pruning, so a sparsity map can only leave layers in full "
                'precision ("skip"); drop its sparsity values'
            )
        if nm is not None and any(value != "skip" for _, value in self.sparsity_map):
            raise ConfigError(
                f"--nm {nm[0]}:{nm[1]} gives every pruned layer the same pattern, so a sparsity map can only "
                'leave layers dense ("skip"); drop its sparsity values or drop --nm'
            )
        object.__setattr__(self, "max_memory", parse_memory(self.max_memory))
        if self.max_memory is not None and self.max_memory <= 0:
            raise ConfigError(f"--max-memory must be positive (got {self.max_memory})")
        if self.passes == "single" and self.batch_size != PruneConfig.batch_size:
            raise ConfigError(
                "--passes single forwards all calibration samples as one batch, so --batch-size does nothing; drop one"
            )
        if self.resume and self.stream is False:
            raise ConfigError(RESUME_IN_MEMORY)

    def _check_knobs(self) -> None:
        """Numeric and named knobs within their ranges."""
        for f in dataclasses.fields(self):  # each method knob within its declared range
            declared, value = f.metadata.get("knob"), getattr(self, f.name)
            if declared is not None and value is not None:
                declared.check(value, _flag(f))
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1 (got {self.batch_size})")
        if self.expert_min_tokens < 1:
            raise ConfigError(f"--expert-min-tokens must be at least 1 (got {self.expert_min_tokens})")
        if not (self.device == "auto" or re.fullmatch(r"cpu|cuda(:\d+)?|mps", self.device)):
            raise ConfigError(f"--device must be auto, cpu, cuda, cuda:N or mps (got {self.device!r})")
        for f in dataclasses.fields(self):
            choices, value = f.metadata.get("choices"), getattr(self, f.name)
            if choices and value is not None and value not in choices:
                raise ConfigError(f"{_flag(f)} must be one of {', '.join(choices)} (got {value!r})")
        if METHODS[self.method].reference and self.base is None:
            raise ConfigError(
                f"--method {self.method} scores each weight against the model it was fine-tuned from: "
                "pass --base BASE_FOLDER"
            )
        if self.refine == "dsnot" and METHODS[self.method].updates_weights:
            keeps = ", ".join(
                n for n, spec in METHODS.items() if not (spec.updates_weights or spec.structured or spec.quantizes)
            )
            raise ConfigError(
                f"--refine dsnot swaps weights back at their dense values, so it refines the methods that keep the "
                f"surviving weights as they are ({keeps}), not {self.method}, which updates them; "
                "use --refine block instead"
            )
        if self.refine == "block" and self.passes == "single":
            raise ConfigError("--refine block fits each block to the dense block's outputs: it needs --passes two")
        if self.recon_epochs < 1 or not (self.recon_lr is None or self.recon_lr > 0):
            raise ConfigError(
                f"--recon-epochs must be at least 1 and --recon-lr positive (got {self.recon_epochs}, {self.recon_lr})"
            )

    def _check_quantize_only(self) -> None:
        """``--method gptq`` / ``rtn`` quantize without pruning: no sparsity, no second quantizer."""
        if self.sparsity or self.nm is not None:
            raise ConfigError(
                f"--method {self.method} quantizes without pruning; to prune and quantize, name the pruning method "
                f"and add the quantizer: --method sparsegpt --sparsity 0.5 --then {self.method}"
            )
        if self.then is not None:
            raise ConfigError(f"--method {self.method} already quantizes; drop --then")
        if self.refine == "dsnot" or self.owl or self.allocate is not None:
            raise ConfigError(
                f"--method {self.method} quantizes without pruning, so --refine dsnot, --owl and --allocate (which "
                "act on pruning masks) do nothing; drop them (--refine block tunes the rounding and scales)"
            )
        object.__setattr__(self, "sparsity", 0.0)

    def _check_owl(self) -> None:
        """OWL's M and λ, and its incompatibility with N:M."""
        sparsity = float(self.sparsity or 0.0)
        if self.nm is not None:
            raise ConfigError("--owl allocates unstructured sparsity per block; it cannot be combined with --nm")
        if not self.owl_m > 0:
            raise ConfigError(f"--owl-m must be positive (got {self.owl_m}); the paper uses 5 (3-10 work)")
        if not 0 <= self.owl_lambda < sparsity:
            raise ConfigError(
                f"--owl-lambda must be in [0, sparsity) = [0, {sparsity}) (got {self.owl_lambda}); the paper uses 0.08"
            )
        if sparsity + self.owl_lambda >= 1.0:
            raise ConfigError(
                f"--sparsity {sparsity} + --owl-lambda {self.owl_lambda} reaches 1; use a smaller --owl-lambda"
            )

    def _check_allocate(self) -> None:
        """--allocate's range, and that it is one allocation (not with OWL or N:M)."""
        sparsity = float(self.sparsity or 0.0)
        if self.owl:
            raise ConfigError("--allocate sensitivity and --owl are two ways to set per-block sparsities: pick one")
        if self.nm is not None:
            raise ConfigError("--allocate sets unstructured sparsity per block; it cannot be combined with --nm")
        spec = METHODS[self.method]
        if spec.gradients or spec.reference:
            raise ConfigError(
                f"--allocate sensitivity probes blocks with the method's own statistics; {self.method} scores from "
                "gradients or a base model it reads once per run: use --owl or a --sparsity-map instead"
            )
        if sparsity > MAX_PROBE:
            raise ConfigError(
                f"--allocate sensitivity measures blocks at sparsities up to {MAX_PROBE}; --sparsity {sparsity} is "
                "above: prune uniformly (drop --allocate) or choose a lower --sparsity"
            )
        if not 0 < self.allocate_lambda <= sparsity or sparsity + self.allocate_lambda >= 1.0:
            raise ConfigError(
                f"--allocate-lambda must be in (0, {sparsity}] and keep --sparsity + λ below 1 "
                f"(got {self.allocate_lambda}); 0.1 is the default"
            )

    def _refuse_unused(self) -> None:
        """Refuse an option set away from its default that the chosen method (or setting) ignores."""
        for f in dataclasses.fields(self):
            uses, requires, declared = f.metadata.get("uses"), f.metadata.get("requires"), f.metadata.get("knob")
            if _is_default(getattr(self, f.name), f.default) or (uses is None and requires is None and not declared):
                continue
            if requires is not None and not _satisfied(self, requires):
                needed = "--" + requires.replace("_", "-").replace("=", " ")
                raise ConfigError(f"{_flag(f)} only matters with {needed}; add it or drop {_flag(f)}")
            if requires is None and not self._applies(f):
                users = (
                    knob_users(declared, f.metadata.get("stage", "method"))
                    if declared is not None
                    else _KINDS.get(str(uses), "")
                )
                stages = f"--method {self.method}" + (f" --then {self.then}" if self.then else "")
                raise ConfigError(f"{_flag(f)} does not apply to {stages} (it is used by {users}); drop it")
        if not self.uses_data and self.calibration != CalibrationConfig():
            raise ConfigError(
                f"--method {self.method} needs no calibration data, so the calibration options do nothing; drop them"
            )

    def _applies(self, f: dataclasses.Field[Any]) -> bool:
        """Whether option ``f`` (set away from its default) is read by this run: by a stage or a setting."""
        spec, uses, declared = METHODS[self.method], f.metadata.get("uses"), f.metadata.get("knob")
        then = METHODS.get(self.then or "")
        if declared is not None:  # a method's knob: read by the stage whose method lists it
            if f.metadata.get("stage") == "then":
                return then is not None and declared in then.knobs
            return declared in spec.knobs or (then is not None and declared in then.knobs)
        return (
            uses is None
            or (uses == UNSTRUCTURED and not spec.structured)
            or (uses == USES_DATA and self.uses_data)
            or (uses == SWEEPS_DATA and self.uses_data and not spec.structured)
            or (uses == STACKS and spec.run_stacked is not None)
        )

    def _check_structured(self) -> None:
        if self.ratio is None or not 0.0 < float(self.ratio) < 1.0:
            raise ConfigError(
                f"--method structured needs --ratio in (0, 1), the share of units to remove (got {self.ratio}); "
                "e.g. --ratio 0.2"
            )
        experts = self.target == "experts"
        if experts and self.score in ("variance", "magnitude"):
            raise ConfigError(f"--target experts scores experts by reap or frequency, not {self.score}")
        if not experts and self.score in structured.EXPERT_SCORES:
            raise ConfigError(f"--score {self.score} scores experts: use it with --target experts")

    @property
    def quantizer(self) -> str | None:
        """The quantizer this run ends with: the method itself (gptq, rtn), ``--then``, or None."""
        return self.method if METHODS[self.method].quantizes else self.then

    @property
    def quantizes(self) -> bool:
        """Whether the run puts weights on a quantization grid (and is saved in the compressed-tensors format)."""
        return self.quantizer is not None

    def refit_lr(self) -> float:
        """``--refine block``'s learning rate: as given, else 1e-3 (weights) or 2e-2 (a quantized run's grid steps)."""
        if self.recon_lr is not None:
            return self.recon_lr
        return QUANT_REFIT_LR if self.quantizes else REFIT_LR

    def quant_spec(self) -> QuantSpec:
        """The quantization grid of this run (float32 scales; each layer's own dtype is set where it is solved).

        The default group size depends on the model's layers: :func:`oneshot.quantized.auto_group_size`
        sets it (``dataclasses.replace``) before the grid is asked for.
        """
        if self.group_size is None:
            raise RuntimeError("the default --group-size is chosen from the model's layers before the grid is built")
        group = None if self.group_size == -1 else self.group_size
        return QuantSpec(self.bits, group, self.symmetric, self.act_order, observer=self.observer)

    @property
    def uses_data(self) -> bool:
        """Whether the run reads calibration data (a data-free method needs it only for OWL or a refinement)."""
        spec = METHODS[self.method]
        gradients = spec.gradients and self.optimizer_state is None  # the empirical Fisher runs the samples
        stage = bool(self.then and METHODS[self.then].needs)  # --then gptq reads Hessians
        extra = self.owl or self.allocate is not None or self.refine is not None or stage
        return bool(spec.needs) or spec.structured or gradients or extra

    def stat_needs(self) -> tuple[str, ...]:
        """The input statistics the method, the refinement and the quantization stage read, each once."""
        from oneshot.methods.dsnot import NEEDS

        needs = METHODS[self.method].needs + (NEEDS if self.refine == "dsnot" else ())
        needs += METHODS[self.then].needs if self.then else ()
        return tuple(dict.fromkeys(needs))

    def method_options(self, stage: str = "method") -> MethodOptions:
        """What the method function of ``stage`` (``method``, or ``then``: the quantizer) is given.

        The method stage also carries the refinement's knobs (``--refine dsnot`` runs inside it).
        """
        spec = METHODS[self.then if stage == "then" and self.then else self.method]
        values = stage_values(self, spec, stage)
        if stage == "method" and self.refine == "dsnot":
            values.update({declared.name: getattr(self, declared.name) for declared in dsnot.KNOBS})
        return MethodOptions(
            nm=self.nm,
            quant=self.quant_spec() if self.quantizes else None,
            keep_latent=self.quantizes and self.refine == "block",
            values=values,
        )

    def to_recipe(self) -> dict[str, Any]:
        """This run as a recipe (see :func:`read_recipe`): its stages, each with its knobs, and the other
        options that differ from the defaults. A quantizer's stage lists its whole grid."""
        data = self.to_dict()
        spec = METHODS[self.method]
        first: dict[str, Any] = {"method": self.method}
        if not spec.quantizes and not spec.structured:
            first["sparsity" if self.nm is None else "nm"] = data["sparsity" if self.nm is None else "nm"]
        stages = [first]
        for stage, stage_spec in (("method", spec), ("then", METHODS[self.then] if self.then else None)):
            if stage_spec is None:
                continue
            values = stage_values(self, stage_spec, stage)
            grid = {k.name for k in stage_spec.knobs} & _GRID if stage_spec.quantizes else set()
            own = {k: v for k, v in values.items() if k in grid or not _is_default(v, _knob(k).default)}
            if stage == "then":
                stages.append({"method": self.then, **own})
            else:
                first.update(own)
        knobs = {f.name for f in dataclasses.fields(self) if f.metadata.get("knob") is not None}
        rest: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name in {"method", "then", "sparsity", "nm", "calibration", *knobs, *RUN_ONLY}:
                continue
            if not _is_default(getattr(self, f.name), f.default):
                rest[f.name] = data[f.name]
        rest.update({name: data[name] for name in _REFINE_KNOBS if not _is_default(data[name], _knob(name).default)})
        if self.uses_data:
            rest["calibration"] = data["calibration"]
        recipe: dict[str, Any] = json.loads(json.dumps({"stages": stages, **rest}))  # tuples as lists
        return recipe

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of the resolved configuration (saved next to the output)."""
        data = dataclasses.asdict(self)
        if self.nm is not None:
            data["nm"] = f"{self.nm[0]}:{self.nm[1]}"
        data["sparsity_map"] = dict(self.sparsity_map)
        return data


#: A quantizer's grid: a recipe's quantizer stage lists all of it, default or not.
_GRID = {declared.name for declared in (BITS, GROUP_SIZE, SYMMETRIC, ACT_ORDER, OBSERVER)}
#: Knobs of the refinements (not of a stage's method): a recipe keeps them next to the stages.
_REFINE_KNOBS = tuple(declared.name for declared in dsnot.KNOBS)


def _knob(name: str) -> Knob[Any]:
    """The knob a :class:`PruneConfig` field of that name declares."""
    found: Knob[Any] = next(f.metadata["knob"] for f in dataclasses.fields(PruneConfig) if f.name == name)
    return found


def knob_users(declared: Knob[Any], stage: str = "method") -> str:
    """The methods that read a knob (``stage="then"``: the quantizers, as ``--then X``), for messages and help."""
    if stage == "then":
        return ", ".join(f"--then {name}" for name in QUANTIZERS if declared in METHODS[name].knobs)
    return ", ".join(name for name, spec in METHODS.items() if declared in spec.knobs)


_KINDS = {
    STACKS: "the methods that solve layers sharing an input as one: "
    + ", ".join(name for name, spec in METHODS.items() if spec.run_stacked is not None),
    UNSTRUCTURED: "the methods that prune single weights",
    USES_DATA: "the methods that read calibration data",
    SWEEPS_DATA: "the methods that prune single weights from calibration data",
}


def _is_default(value: object, default: object) -> bool:
    """Whether an option still has its default (an empty list or dict counts as the empty tuple)."""
    return value == default or (default == () and isinstance(value, (list, tuple, dict)) and not value)


def _satisfied(config: PruneConfig, requires: str) -> bool:
    """Whether ``config`` meets an option's ``requires`` (``"owl"`` or ``"refine=dsnot"``)."""
    name, sep, value = requires.partition("=")
    return getattr(config, name) == value if sep else bool(getattr(config, name))


def _flag(f: dataclasses.Field[Any]) -> str:
    """The CLI flag of an option field."""
    return str(f.metadata.get("flag") or "--" + f.name.replace("_", "-"))


def _sparsity_map(value: object) -> tuple[tuple[str, float | str], ...]:
    """A sparsity map from pairs, a dict, or a JSON / YAML file path, as validated ordered pairs."""
    if isinstance(value, (str, os.PathLike)):
        return read_sparsity_map(Path(value))
    if isinstance(value, Mapping):
        return parse_sparsity_map(value)
    return parse_sparsity_map(dict(value))  # type: ignore[call-overload]


def read_structured(path: Path, what: str) -> Any:
    """The content of a JSON or YAML file (by suffix), or a :class:`ConfigError` naming ``what`` it is for."""
    if not path.is_file():
        raise ConfigError(f"{what} {path} is not a file; pass a JSON or YAML file")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            return yaml.safe_load(text)
        return json.loads(text)
    except Exception as exc:  # json and yaml raise different types
        raise ConfigError(f"{what} {path} is not valid {path.suffix.lstrip('.') or 'JSON'}: {exc}") from exc


def read_sparsity_map(path: Path) -> tuple[tuple[str, float | str], ...]:
    """Read a ``{layer glob: sparsity | "skip"}`` map from a JSON or YAML file."""
    return parse_sparsity_map(read_structured(path, "--sparsity-map"), f"--sparsity-map {path}")


def read_recipe(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The :class:`PruneConfig` fields of a recipe file (YAML or JSON), as :func:`PruneConfig.to_recipe` writes it.

    A recipe lists its ``stages`` in order: a pruning method with its options, then optionally a
    quantizer (``gptq`` / ``rtn``) with its grid; other run options (``calibration``, ...) sit next
    to ``stages``. For example::

        stages:
          - {method: sparsegpt, sparsity: 0.5}
          - {method: gptq, bits: 4, group_size: 128}
        calibration: {nsamples: 128, seqlen: 2048}
    """
    where = f"recipe {path}"
    raw = read_structured(Path(path), "--recipe")
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping with a 'stages' list")
    raw = dict(raw)
    stages = raw.pop("stages", [])
    if not isinstance(stages, list) or not 1 <= len(stages) <= 2 or not all(isinstance(s, dict) for s in stages):
        raise ConfigError(
            f"{where}: 'stages' must list one or two stages, each a mapping with a 'method': a pruning method, "
            "then optionally a quantizer (gptq or rtn)"
        )
    fields: dict[str, Any] = {}
    for index, stage in enumerate(stages):
        stage = dict(stage)
        method = stage.pop("method", None)
        if index == 1 and method not in QUANTIZERS:
            raise ConfigError(f"{where}: the second stage must quantize (gptq or rtn), not {method!r}")
        if fields.get("method") in METHODS:  # the second stage: a knob both stages read is the quantizer's own
            first = {declared.name for declared in METHODS[fields["method"]].knobs}
            stage = {("then_" + k if k in first else k): v for k, v in stage.items()}
        stage["then" if index else "method"] = method
        clash = sorted(set(stage) & set(fields))
        if clash:
            raise ConfigError(f"{where}: {clash[0]} is set in two stages; set it once")
        fields.update(stage)
    fields.update(raw)
    known = {f.name for f in dataclasses.fields(PruneConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown option {unknown[0]!r}; recipes use the option names of `oneshot prune`")
    if isinstance(fields.get("calibration"), dict):
        fields["calibration"] = CalibrationConfig(**fields["calibration"])
    if isinstance(fields.get("nm"), str):
        fields["nm"] = parse_nm(fields["nm"])
    if isinstance(fields.get("skip_layers"), list):
        fields["skip_layers"] = tuple(fields["skip_layers"])
    return fields
