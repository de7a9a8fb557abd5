"""Load a model and tokenizer from a local folder, a Hugging Face hub name or a ``.gguf`` file.

The model class is the one named in the checkpoint's ``config.architectures`` (so a BERT encoder,
a token classifier and a causal LM all load as what they are), falling back to
``AutoModelForCausalLM``. GGUF checkpoints are dequantised once and cached as a plain safetensors
folder under ``$ONESHOT_CACHE`` (default ``~/.cache/oneshot``), because transformers refuses to
``save_pretrained`` a model loaded from GGUF.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from oneshot.checkpoint import Checkpoint, has_safetensors, model_class
from oneshot.errors import ModelError

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    """The folder where oneshot caches converted checkpoints (``$ONESHOT_CACHE``)."""
    return Path(os.environ.get("ONESHOT_CACHE", Path.home() / ".cache" / "oneshot"))


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.endswith(".gguf") or os.sep + os.sep in name


#: Bytes of a file that :func:`file_fingerprint` reads: the head, the tail and evenly spaced samples.
FINGERPRINT_CHUNK = 1 << 20
FINGERPRINT_SAMPLES = 16


def file_fingerprint(path: Path) -> str:
    """A content key of a (large) file: SHA-256 of its size, first and last 8 MiB and 16 1-MiB samples.

    Reads at most 32 MiB, so a 40 GB GGUF is keyed in well under a second. The same file copied,
    moved or reinstalled (a new virtual environment) gets the same key; a re-quantised or edited
    one a different key, since its header (metadata and tensor table) and data change.
    """
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    head = 8 * FINGERPRINT_CHUNK
    with path.open("rb") as f:
        if size <= 2 * head + FINGERPRINT_SAMPLES * FINGERPRINT_CHUNK:
            while block := f.read(head):
                digest.update(block)
        else:
            offsets = [0, size - head]
            offsets += [head + k * (size - 2 * head) // FINGERPRINT_SAMPLES for k in range(FINGERPRINT_SAMPLES)]
            for offset in offsets:
                f.seek(offset)
                digest.update(f.read(head if offset in (0, size - head) else FINGERPRINT_CHUNK))
    return digest.hexdigest()


def gguf_folder(path: Path) -> Path:
    """The plain safetensors folder of a GGUF file, dequantised once and cached by content."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    key = file_fingerprint(path)[:16]
    cached = cache_dir() / "gguf-v3" / f"{path.stem}-{key}"
    if (cached / "config.json").exists():
        return cached
    log.info("converting %s to safetensors (once; cached in %s)", path.name, cached)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    # A GGUF-loaded model is flagged as quantised and cannot be saved: rebuild a plain one.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the dequantised weights are plain floats
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict(), strict=False)
    plain.tie_weights()
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cached.name}.", dir=cached.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if cached.exists():
            shutil.rmtree(cached)
        tmp.rename(cached)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return cached


def local_folder(name_or_path: str | os.PathLike[str]) -> Path:
    """A local model folder for a folder, a ``.gguf`` file (converted once) or a hub name (downloaded).

    Raises :class:`ModelError` with a hint when the input cannot be a model.
    """
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelError(
                f"{name} is a file but not a .gguf checkpoint; pass a model folder "
                "(with config.json), a .gguf file or a Hugging Face hub name"
            )
        return gguf_folder(path)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelError(
                f"{name} has no config.json; pass a folder written by save_pretrained, "
                "a .gguf file or a Hugging Face hub name"
            )
        return path
    if _looks_local(name):
        raise ModelError(f"model path {name} does not exist; check the path or pass a hub name")
    try:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
        return Path(snapshot_download(name, allow_patterns=patterns))
    except Exception as exc:  # the hub client raises many types (offline, 404, gated, ...)
        raise ModelError(
            f"could not load {name!r}: it is not a local folder and the hub did not provide it "
            f"({exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            "check the name, your network, or pass a local folder"
        ) from exc


def checkpoint_dtype(folder: Path) -> torch.dtype:
    """The dtype a checkpoint folder stores its weights in: config.json's, else the shards' majority."""
    raw = json.loads((folder / "config.json").read_text())
    text_config = raw.get("text_config") or {}
    for value in (raw.get("dtype"), raw.get("torch_dtype"), text_config.get("dtype"), text_config.get("torch_dtype")):
        if value in _DTYPES:
            return _DTYPES[value]
    try:
        return Checkpoint(folder).dtype()
    except ModelError:
        return torch.float32


def resolve_dtype(folder: Path, requested: str) -> torch.dtype:
    """``auto`` -> the checkpoint's dtype; otherwise the named dtype."""
    return checkpoint_dtype(folder) if requested == "auto" else _DTYPES[requested]


def load_model(name_or_path: str | os.PathLike[str], dtype: str = "auto") -> tuple[nn.Module, Any]:
    """Load ``(model, tokenizer)`` from a local folder, a ``.gguf`` file or a hub name.

    ``dtype="auto"`` keeps the checkpoint's own dtype (a bf16 checkpoint stays bf16). Raises
    :class:`ModelError` with a hint when the path does not exist or loading fails.
    """
    from transformers import AutoConfig

    folder = local_folder(name_or_path)
    config = AutoConfig.from_pretrained(folder)
    if has_safetensors(folder):
        Checkpoint(folder)  # headers and sizes checked: a corrupt or truncated shard is named here
    try:  # transformers reads pickled .bin weights with torch.load(weights_only=True) only
        model, info = model_class(config).from_pretrained(
            folder, dtype=resolve_dtype(folder, dtype), output_loading_info=True
        )
    except (OSError, pickle.UnpicklingError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"could not load the weights in {folder}: {first}") from exc
    missing = list(info.get("missing_keys", []))
    if missing:
        raise ModelError(
            f"{folder} lacks {len(missing)} of the model's weights (e.g. {sorted(missing)[0]}): the checkpoint is "
            "incomplete; re-download it"
        )
    model.eval()
    return model, load_tokenizer(folder)


def load_tokenizer(folder: Path) -> Any:
    """The folder's tokenizer, or None when it has none (token ids must then be given)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError) as exc:
        log.warning("no tokenizer in %s (%s): calibration must be given as token ids", folder, exc)
        return None


def context_length(model: nn.Module) -> int | None:
    """The model's maximum sequence length from its config, if it declares one."""
    config = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
