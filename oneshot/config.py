"""Frozen, validated run configuration: the one source of truth for the CLI and the Python API.

The CLI maps its options onto these dataclasses and the API builds them from keyword arguments;
either way a :class:`PruneConfig` is validated once in ``__post_init__`` and then flows one way
through loading, calibration, pruning and writing. Its ``to_dict()`` is saved next to the output.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from oneshot.errors import ConfigError
from oneshot.methods.allocation import parse_sparsity_map
from oneshot.methods.base import MethodOptions

#: dtypes a model may be loaded and pruned in (the solvers always work in float32); ``auto`` is the
#: checkpoint's own dtype.
DTYPES = ("auto", "float32", "bfloat16", "float16")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


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


@dataclass(frozen=True)
class CalibrationConfig:
    """Where calibration text comes from and how it is cut into samples.

    ``source`` is ``"bundled"`` (a public-domain novel shipped with oneshot), a local ``.txt``,
    ``.jsonl`` or ``.parquet`` file, or a Hugging Face dataset name (``dataset_config``, ``split``
    and ``text_field`` then select the text). ``nsamples`` windows of ``seqlen`` tokens are drawn
    at seeded random offsets. ``seqlen=None`` means min(2048, the model's context length).
    """

    source: str = "bundled"
    nsamples: int = 128
    seqlen: int | None = None
    seed: int = 0
    dataset_config: str | None = None
    split: str = "train"
    text_field: str = "text"

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

    method: str = "sparsegpt"
    sparsity: float | None = None
    nm: tuple[int, int] | None = None
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    block_size: int = 128
    damp: float = 0.01
    max_damp_retries: int = 4
    batch_size: int = 8
    device: str = "auto"
    dtype: str = "auto"
    skip_layers: tuple[str, ...] = ()
    owl: bool = False
    owl_m: float = 5.0
    owl_lambda: float = 0.08
    sparsity_map: tuple[tuple[str, float | str], ...] = ()
    obs_memory_mb: int = 1024
    ratio: float | None = None
    score: str = "fluctuation"
    bias_compensation: bool = True
    target: str = "mlp"
    stream: bool | None = None
    max_memory: int | None = None
    resume: bool = False
    quiet: bool = False

    def __post_init__(self) -> None:
        from oneshot.methods.registry import METHODS  # local: registry imports the methods

        if self.method not in METHODS:
            known = ", ".join(sorted(METHODS))
            raise ConfigError(f"unknown method {self.method!r}; choose one of: {known}")
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
            object.__setattr__(self, "sparsity", 0.0 if self.sparsity is None else self.sparsity)
        if self.sparsity is None:
            raise ConfigError("no sparsity given; pass --sparsity (e.g. 0.5) or --nm (e.g. 2:4)")
        if not 0.0 <= float(self.sparsity) < 1.0:
            raise ConfigError(f"--sparsity must be in [0, 1) (got {self.sparsity}); e.g. 0.5 zeroes half the weights")
        object.__setattr__(self, "sparsity", float(self.sparsity))
        if self.block_size < 1:
            raise ConfigError(f"block size must be at least 1 (got {self.block_size})")
        if not self.damp > 0:
            raise ConfigError(f"damping must be positive (got {self.damp}); the usual value is 0.01")
        if self.max_damp_retries < 0:
            raise ConfigError(f"max_damp_retries must be >= 0 (got {self.max_damp_retries})")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1 (got {self.batch_size})")
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)} (got {self.dtype!r})")
        if not (self.device == "auto" or re.fullmatch(r"cpu|cuda(:\d+)?|mps", self.device)):
            raise ConfigError(f"--device must be auto, cpu, cuda, cuda:N or mps (got {self.device!r})")
        object.__setattr__(self, "skip_layers", tuple(self.skip_layers))
        if self.owl:
            if nm is not None:
                raise ConfigError("--owl allocates unstructured sparsity per block; it cannot be combined with --nm")
            if not self.owl_m > 0:
                raise ConfigError(f"--owl-m must be positive (got {self.owl_m}); the paper uses 5 (3-10 work)")
            if not 0 <= self.owl_lambda < self.sparsity:
                raise ConfigError(
                    f"--owl-lambda must be in [0, sparsity) = [0, {self.sparsity}) (got {self.owl_lambda}); "
                    "the paper uses 0.08"
                )
            if self.sparsity + self.owl_lambda >= 1.0:
                raise ConfigError(
                    f"--sparsity {self.sparsity} + --owl-lambda {self.owl_lambda} reaches 1; use a smaller --owl-lambda"
                )
        if isinstance(self.sparsity_map, Mapping):
            object.__setattr__(self, "sparsity_map", parse_sparsity_map(self.sparsity_map))
        else:
            object.__setattr__(self, "sparsity_map", parse_sparsity_map(dict(self.sparsity_map)))
        object.__setattr__(self, "max_memory", parse_memory(self.max_memory))
        if self.max_memory is not None and self.max_memory <= 0:
            raise ConfigError(f"--max-memory must be positive (got {self.max_memory})")
        if self.resume and self.stream is False:
            raise ConfigError("--resume continues a streaming run; drop --no-stream")
        if self.obs_memory_mb < 1:
            raise ConfigError(f"--obs-memory-mb must be at least 1 (got {self.obs_memory_mb})")

    def _check_structured(self) -> None:
        from oneshot.methods.structured import SCORES

        if self.ratio is None or not 0.0 < float(self.ratio) < 1.0:
            raise ConfigError(
                f"--method structured needs --ratio in (0, 1), the share of units to remove (got {self.ratio}); "
                "e.g. --ratio 0.2"
            )
        if self.score not in SCORES:
            raise ConfigError(f"--score must be one of {', '.join(SCORES)} (got {self.score!r})")
        if self.target not in ("mlp", "attention", "both"):
            raise ConfigError(f"--target must be mlp, attention or both (got {self.target!r})")
        if self.nm is not None or self.owl:
            raise ConfigError("--method structured removes whole units; it takes no --nm or --owl")

    def method_options(self) -> MethodOptions:
        """The knobs a method function takes, from this run's options."""
        return MethodOptions(
            nm=self.nm,
            block_size=self.block_size,
            damp=self.damp,
            max_damp_retries=self.max_damp_retries,
            memory_budget=self.obs_memory_mb << 20,
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of the resolved configuration (saved next to the output)."""
        data = dataclasses.asdict(self)
        if self.nm is not None:
            data["nm"] = f"{self.nm[0]}:{self.nm[1]}"
        data["sparsity_map"] = dict(self.sparsity_map)
        return data
