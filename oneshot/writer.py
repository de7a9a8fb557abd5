"""Write a pruned model as a folder that stock ``from_pretrained`` loads, atomically.

Everything is written to a temporary sibling folder, the folder is reloaded and checked against
the in-memory model, and only then renamed into place: a failed run leaves nothing behind, and an
existing output is replaced only with ``overwrite=True``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from oneshot.errors import OutputError

log = logging.getLogger(__name__)

REPORT_FILE = "oneshot_report.json"
CONFIG_FILE = "oneshot_config.json"


def check_output_dir(out: str | os.PathLike[str], overwrite: bool) -> Path:
    """Validate the output folder before any work is done; returns it as a Path."""
    path = Path(out).expanduser()
    if path.exists() and not overwrite:
        raise OutputError(f"output folder {path} already exists; choose another --out or pass --overwrite")
    if path.exists() and not path.is_dir():
        raise OutputError(f"output path {path} exists and is not a folder; choose another --out")
    return path


def _first_output(output: Any) -> torch.Tensor:
    for attr in ("logits", "last_hidden_state"):
        value = getattr(output, attr, None)
        if isinstance(value, torch.Tensor):
            return value
    first: torch.Tensor = output[0]
    return first


def reload_difference(model: nn.Module, folder: Path) -> float:
    """Max |difference| between the in-memory model's and the reloaded folder's outputs."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    loader: Any = type(model)
    reloaded = loader.from_pretrained(folder, dtype=dtype).to(device).eval()
    vocab = int(getattr(model.config, "vocab_size", 100))
    ids = (torch.arange(16, device=device).unsqueeze(0) * 7 + 3) % max(vocab - 1, 1) + 1  # [1, 16]
    with torch.no_grad():
        a = _first_output(model(input_ids=ids)).float()
        b = _first_output(reloaded(input_ids=ids)).float()
    return float((a - b).abs().max())


def save_pruned(
    model: nn.Module,
    tokenizer: Any,
    out: str | os.PathLike[str],
    report: dict[str, Any],
    config: dict[str, Any],
    *,
    overwrite: bool = False,
    verify: bool = True,
    max_shard_size: str = "2GB",
) -> Path:
    """Save model (safetensors, sharded above ``max_shard_size``), tokenizer, report and config.

    With ``verify`` the folder is reloaded and its outputs compared with the in-memory model's;
    the max difference goes into the report as ``reload_max_abs_diff``. Returns the final folder.
    """
    path = check_output_dir(out, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    try:
        was_training = model.training
        model.eval()
        saver: Any = model
        saver.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if verify:
            diff = reload_difference(model, tmp)
            report = {**report, "reload_max_abs_diff": diff}
            if diff > 1e-4:
                raise OutputError(f"reloaded model differs from the pruned model (max |Δ| = {diff:g}); not saved")
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        model.train(was_training)
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary folder
        if path.exists():
            backup = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            backup.rmdir()
            path.rename(backup)
            tmp.rename(path)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("saved pruned model to %s", path)
    return path
