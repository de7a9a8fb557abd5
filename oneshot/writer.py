"""Write a pruned model as a folder that stock ``from_pretrained`` loads, atomically.

Everything is written to a temporary sibling folder, every saved tensor is re-read and compared
with the in-memory model (one tensor at a time, never a second model), and only then is the folder
renamed into place: a failed run leaves nothing behind, and an existing output is replaced only
with ``overwrite=True``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy
import torch
from torch import nn

from oneshot.checkpoint import check_loadable
from oneshot.errors import ModelError, OutputError
from oneshot.shards import SavedTensor, iter_saved, tensor_bytes

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


def verify_saved_model(model: nn.Module, folder: Path) -> int:
    """Compare every tensor saved in ``folder`` with the model's, one at a time; returns bytes compared.

    Reads the shards with plain file reads (never a second model in memory). Every saved tensor
    must equal the model's bit for bit, every model tensor must be saved (or tied to a saved one),
    and the saved config must build the saved shapes. Raises :class:`OutputError` otherwise.
    """
    state = model.state_dict()
    saved_ptrs: set[int] = set()
    total = 0
    for saved in iter_saved(folder):
        tensor = state.get(saved.key)
        if tensor is None:
            raise OutputError(f"saved tensor {saved.key} is not a tensor of the model; not saved")
        if tuple(tensor.shape) != saved.shape or not _same_bytes(tensor, saved):
            raise OutputError(f"saved tensor {saved.key} differs from the pruned model on re-reading; not saved")
        saved_ptrs.add(tensor.data_ptr())
        total += saved.nbytes
    missing = [k for k, t in state.items() if t.data_ptr() not in saved_ptrs and t.numel() > 0]
    if missing:
        raise OutputError(f"{len(missing)} tensors of the model were not saved (e.g. {missing[0]}); not saved")
    try:
        check_loadable(folder)
    except ModelError as exc:
        raise OutputError(f"the saved folder would not reload: {exc}; not saved") from exc
    return total


def _same_bytes(tensor: torch.Tensor, saved: SavedTensor) -> bool:
    """Whether the saved bytes equal the tensor's, compared one read chunk at a time."""
    view = tensor_bytes(tensor)
    if len(view) != saved.nbytes:
        return False
    offset = 0
    for chunk in saved.chunks():
        if not numpy.array_equal(
            numpy.frombuffer(view[offset : offset + len(chunk)], numpy.uint8), numpy.frombuffer(chunk, numpy.uint8)
        ):
            return False
        offset += len(chunk)
    return True


def publish(tmp: Path, path: Path, overwrite: bool) -> None:
    """Rename the finished temporary folder ``tmp`` to ``path`` (replacing it only with ``overwrite``)."""
    check_output_dir(path, overwrite)
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

    With ``verify`` every saved tensor is re-read and compared with the in-memory model
    (:func:`verify_saved_model`); the bytes checked go into the report as ``verified_bytes``.
    Returns the final folder.
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
            report = {**report, "verified_bytes": verify_saved_model(model, tmp)}
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        model.train(was_training)
        publish(tmp, path, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("saved pruned model to %s", path)
    return path
