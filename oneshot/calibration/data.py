"""Calibration sources -> ``CalibrationSet`` (token ids ``[N, T]`` plus an optional padding mask).

Sources: ``"bundled"`` (Jane Austen's *Persuasion*, public domain, shipped in the package), a local
``.txt`` / ``.jsonl`` / ``.parquet`` file, or a Hugging Face dataset name. The text is tokenised
once and ``nsamples`` windows are drawn at seeded random offsets (the SparseGPT / Wanda protocol),
each wrapped in the special tokens the tokenizer adds to a sequence (BOS for LLaMA/Gemma,
[CLS]/[SEP] for BERT), so the model sees inputs shaped like its training data.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from oneshot.config import CalibrationConfig
from oneshot.errors import DataError

log = logging.getLogger(__name__)

BUNDLED = "bundled"
TEXT_SUFFIXES = (".txt", ".raw", ".text", ".md")


@dataclass(frozen=True)
class CalibrationSet:
    """Calibration token ids ``[N, T]`` and an optional ``attention_mask`` (1 = real token).

    Padding positions (mask 0) never enter the statistics.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.input_ids.dim() != 2 or self.input_ids.shape[0] == 0:
            raise DataError(
                f"calibration ids must be a non-empty [N, T] tensor (got shape {tuple(self.input_ids.shape)})"
            )
        if self.attention_mask is not None and self.attention_mask.shape != self.input_ids.shape:
            raise DataError("calibration attention_mask must have the same shape as input_ids")

    def digest(self) -> str:
        """A digest of the token ids and mask: a resume, or a recipe run again, checks it is the very same tokens."""
        h = hashlib.sha256(self.input_ids.to(torch.int64).numpy().tobytes())
        if self.attention_mask is not None:
            h.update(self.attention_mask.to(torch.int64).numpy().tobytes())
        return h.hexdigest()

    @property
    def nsamples(self) -> int:
        """Number of calibration sequences N."""
        return int(self.input_ids.shape[0])

    @property
    def seqlen(self) -> int:
        """Sequence length T."""
        return int(self.input_ids.shape[1])

    def batches(self, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Split into ``(ids [B, T_b], mask [B, T_b] | None)`` batches, in order.

        Trailing columns that are padding in every row of a batch are cut off (right-padded
        sentences sorted by length then cost only their own length).
        """
        out = []
        for start in range(0, self.nsamples, batch_size):
            ids = self.input_ids[start : start + batch_size]
            mask = None if self.attention_mask is None else self.attention_mask[start : start + batch_size]
            if mask is not None:
                used = torch.nonzero(mask.any(dim=0)).flatten()
                end = int(used[-1]) + 1 if used.numel() else 1
                ids, mask = ids[:, :end], mask[:, :end]
            out.append((ids, mask))
        return out

    @classmethod
    def from_texts(cls, tokenizer: Any, texts: list[str] | list[list[str]], max_length: int = 128) -> CalibrationSet:
        """Sentences (strings, or lists of words) -> right-padded ids and mask, sorted by length."""
        words = bool(texts) and isinstance(texts[0], list)
        enc = tokenizer(
            texts, is_split_into_words=words, truncation=True, max_length=max_length, padding=True, return_tensors="pt"
        )
        order = torch.argsort(enc["attention_mask"].sum(1), descending=True, stable=True)
        return cls(enc["input_ids"][order], enc["attention_mask"][order])


def bundled_text() -> str:
    """The bundled public-domain calibration corpus (Austen's *Persuasion*, ~470 kB of text)."""
    data = resources.files("oneshot").joinpath("data/persuasion.txt.gz").read_bytes()
    return gzip.decompress(data).decode("utf-8")


def read_text(config: CalibrationConfig) -> str:
    """Read the calibration text named by ``config.source`` as one string.

    Raises :class:`DataError` for a missing, empty or unreadable source.
    """
    source = config.source
    if source == BUNDLED:
        return bundled_text()
    path = Path(source).expanduser()
    if path.exists():
        text = _read_file(path, config.text_field)
    elif source.startswith((".", "/", "~")) or path.suffix in (*TEXT_SUFFIXES, ".jsonl", ".parquet"):
        raise DataError(f"calibration file {source} does not exist; check the path or use --calib bundled")
    else:
        text = _read_hub_dataset(config)
    if not text.strip():
        raise DataError(f"calibration source {source} contains no text; pass a file with text in it")
    return text


def _read_file(path: Path, text_field: str) -> str:
    if path.is_dir():
        raise DataError(f"calibration source {path} is a folder; pass a .txt, .jsonl or .parquet file")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{lineno} is not valid JSON ({exc.msg})") from exc
                if not isinstance(record, dict) or text_field not in record:
                    raise DataError(
                        f"{path}:{lineno} has no field {text_field!r}; set --text-field to the field holding the text"
                    )
                rows.append(str(record[text_field]))
        return "\n\n".join(rows)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if text_field not in table.column_names:
            raise DataError(
                f"{path} has no column {text_field!r} (columns: {', '.join(table.column_names)}); set --text-field"
            )
        return "\n\n".join(str(v) for v in table.column(text_field).to_pylist())
    return path.read_text(encoding="utf-8", errors="replace")


def _read_hub_dataset(config: CalibrationConfig) -> str:
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets is a declared dependency
        raise DataError("reading a hub dataset needs the 'datasets' package: pip install datasets") from exc
    try:
        ds = datasets.load_dataset(config.source, config.dataset_config, split=config.split)
    except Exception as exc:  # datasets raises many unrelated types for "not found"
        raise DataError(
            f"could not load calibration dataset {config.source!r} (split {config.split!r}): "
            f"{exc.__class__.__name__}; pass a local .txt/.jsonl/.parquet file or --calib bundled"
        ) from exc
    if config.text_field not in ds.column_names:
        raise DataError(
            f"dataset {config.source!r} has no column {config.text_field!r} "
            f"(columns: {', '.join(ds.column_names)}); set --text-field"
        )
    return "\n\n".join(str(v) for v in ds[config.text_field])


def special_tokens(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a sequence (e.g. ``[BOS]`` / ``[CLS]``, ``[SEP]``)."""
    probe = "hello world"
    bare = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    full = list(tokenizer(probe)["input_ids"])
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return full[:start], full[start + len(bare) :]
    return [], []


def tokenize_text(tokenizer: Any, text: str) -> torch.Tensor:
    """Tokenise a long text without special tokens -> LongTensor ``[n_tokens]``."""
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # silence the "longer than max length" notice
    try:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    finally:
        transformers.logging.set_verbosity(verbosity)
    return torch.tensor(ids, dtype=torch.long)


def build_calibration(tokenizer: Any, config: CalibrationConfig, seqlen: int) -> CalibrationSet:
    """Draw ``config.nsamples`` seeded windows of ``seqlen`` tokens from ``config.source``.

    Raises :class:`DataError` when the text is shorter than one sample.
    """
    text = read_text(config)
    tokens = tokenize_text(tokenizer, text)
    prefix, suffix = special_tokens(tokenizer)
    body = seqlen - len(prefix) - len(suffix)
    if body < 1:
        raise DataError(f"--seqlen {seqlen} leaves no room for text after the special tokens; use a larger --seqlen")
    if tokens.numel() < body:
        raise DataError(
            f"calibration source {config.source} has {tokens.numel()} tokens, fewer than one sample of "
            f"{seqlen}; use a longer text or a smaller --seqlen"
        )
    if tokens.numel() < body * config.nsamples:
        log.warning(
            "calibration text has %d tokens for %d samples of %d: samples will overlap",
            tokens.numel(),
            config.nsamples,
            seqlen,
        )
    gen = torch.Generator().manual_seed(config.seed)
    starts = torch.randint(0, tokens.numel() - body + 1, (config.nsamples,), generator=gen)
    head = torch.tensor(prefix, dtype=torch.long)
    tail = torch.tensor(suffix, dtype=torch.long)
    rows = [torch.cat([head, tokens[s : s + body], tail]) for s in starts.tolist()]
    return CalibrationSet(torch.stack(rows))  # [N, T]
