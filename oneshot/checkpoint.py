"""A safetensors checkpoint on disk, read a block at a time: the weights source of a streaming run.

The model is built as a skeleton on the meta device (accelerate's ``init_empty_weights``: no
parameter memory); only the tensors outside the transformer blocks that the capture pass needs
(embeddings, norms; not an untied output head) are materialised up front. Each block's tensors are
read from the shards with ``safe_open`` when the driver reaches the block and dropped back to the
meta device once the block is written. Shards are opened per read, so their memory maps never
accumulate in the process's resident memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from oneshot.errors import ModelError

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file (names, dtypes, shapes, offsets) and where its data starts.

    Raises :class:`ModelError` naming the file when the header is not valid safetensors.
    """
    try:
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("file shorter than its 8-byte header length")
            size = int.from_bytes(head, "little")
            if size > 100 << 20:
                raise ValueError(f"header length {size} is implausible")
            header: dict[str, Any] = json.loads(f.read(size))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise ModelError(
            f"{path} is not a valid safetensors file ({exc}); re-download or re-save the checkpoint"
        ) from exc
    if path.stat().st_size < 8 + size + end:
        raise ModelError(
            f"{path} is truncated: {path.stat().st_size} bytes, its header needs {8 + size + end}; "
            "re-download or re-save the checkpoint"
        )
    return header, 8 + size


@dataclass(frozen=True)
class TensorInfo:
    """Where one checkpoint tensor lives and what it is."""

    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """Size in bytes."""
        return math.prod(self.shape) * torch.empty(0, dtype=self.dtype).element_size()


def has_safetensors(folder: Path) -> bool:
    """Whether ``folder`` holds safetensors weights (a single file or an index of shards)."""
    return (folder / INDEX_FILE).exists() or (folder / SINGLE_FILE).exists()


class Checkpoint:
    """The safetensors shards of a model folder: tensor index, dtype, fingerprint and reads."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        index = self.folder / INDEX_FILE
        if index.exists():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (self.folder / SINGLE_FILE).exists():
            files = [SINGLE_FILE]
        else:
            found = sorted(p.name for p in self.folder.glob("*.bin")) or sorted(p.name for p in self.folder.iterdir())
            raise ModelError(
                f"{self.folder} has no safetensors weights (found: {', '.join(found[:5]) or 'nothing'}); streaming "
                "reads safetensors shards only: re-save the model with save_pretrained(safe_serialization=True)"
            )
        self.tensors: dict[str, TensorInfo] = {}
        self.headers: dict[str, dict[str, Any]] = {}
        self._starts: dict[str, int] = {}  # where each shard's tensor data begins
        for name in files:
            path = self.folder / name
            if not path.exists():
                raise ModelError(f"shard {name} named in {INDEX_FILE} is missing from {self.folder}; re-download it")
            header, _ = read_header(path)
            self.headers[name] = header
            for key, meta in header.items():
                if key != "__metadata__":
                    self.tensors[key] = TensorInfo(name, ST_DTYPES[meta["dtype"]], tuple(meta["shape"]))

    @property
    def nbytes(self) -> int:
        """Total size of all tensors."""
        return sum(t.nbytes for t in self.tensors.values())

    def dtype(self) -> torch.dtype:
        """The dtype most of the floating-point weight bytes are stored in."""
        counts: Counter[torch.dtype] = Counter()
        for info in self.tensors.values():
            if info.dtype.is_floating_point:
                counts[info.dtype] += info.nbytes
        return counts.most_common(1)[0][0] if counts else torch.float32

    def fingerprint(self) -> str:
        """A digest of every shard's name, size, modification time and header (not its data)."""
        digest = hashlib.sha256()
        for name, header in sorted(self.headers.items()):
            stat = (self.folder / name).stat()
            digest.update(f"{name}:{stat.st_size}:{stat.st_mtime_ns}:".encode())
            digest.update(json.dumps(header, sort_keys=True).encode())
        return digest.hexdigest()

    def read(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        """Read the named tensors (each shard opened once, and closed before returning)."""
        return dict(self.iter_read(keys))

    def iter_read(self, keys: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """The named tensors one at a time, by shard (each opened once): the caller keeps only what it needs.

        Each tensor is read with plain file reads into a tensor of its own, not through a memory
        map (a map's pages stay in the process's resident memory until the shard is closed: a
        second copy of everything read from it).
        """
        by_file: dict[str, list[str]] = {}
        for key in keys:
            by_file.setdefault(self.tensors[key].file, []).append(key)
        for name, names in by_file.items():
            with (self.folder / name).open("rb") as f:
                for key in sorted(names, key=lambda k: self._offsets(k)[0]):  # in file order
                    info = self.tensors[key]
                    out = torch.empty(info.shape, dtype=info.dtype)
                    self._fill(f, key, out)
                    yield key, out

    def read_into(self, key: str, out: torch.Tensor) -> None:
        """Read tensor ``key`` into ``out`` (its shape): straight into its memory when it is contiguous and of
        the checkpoint's dtype, else through one temporary."""
        info = self.tensors[key]
        if tuple(out.shape) != info.shape:
            raise ModelError(f"{key} in {self.folder} has shape {info.shape}, the model's {tuple(out.shape)}")
        with (self.folder / info.file).open("rb") as f:
            if out.dtype == info.dtype and out.is_contiguous() and out.device.type == "cpu":
                self._fill(f, key, out)
            else:
                staged = torch.empty(info.shape, dtype=info.dtype)
                self._fill(f, key, staged)
                out.copy_(staged)

    def _offsets(self, key: str) -> tuple[int, int]:
        """Where ``key``'s bytes start and end in its shard."""
        info = self.tensors[key]
        begin, end = self.headers[info.file][key]["data_offsets"]
        start = self._starts.get(info.file)
        if start is None:
            with (self.folder / info.file).open("rb") as f:
                start = self._starts[info.file] = 8 + int.from_bytes(f.read(8), "little")
        return start + int(begin), start + int(end)

    def _fill(self, f: Any, key: str, out: torch.Tensor) -> None:
        """Read ``key``'s bytes from the open shard ``f`` into the contiguous CPU tensor ``out``."""
        begin, end = self._offsets(key)
        if out.numel() == 0:
            return
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]
        if len(view) != end - begin:
            raise ModelError(f"{key} in {self.folder} holds {end - begin} bytes, its shape and dtype {len(view)}")
        f.seek(begin)
        if f.readinto(view) != len(view):
            raise ModelError(f"shard {self.tensors[key].file} in {self.folder} ends inside {key}: re-download it")


def model_prefix(model: nn.Module) -> str:
    """The model's ``base_model_prefix`` ("" if none): the name its encoder has inside a task model."""
    return str(getattr(model, "base_model_prefix", "") or "")


def key_candidates(name: str, prefix: str) -> list[str]:
    """Where parameter ``name`` may be stored: as is, with ``prefix.`` added, or with it removed."""
    return [name, f"{prefix}.{name}", name.removeprefix(f"{prefix}.")] if prefix else [name]


def checkpoint_keys(
    model: nn.Module, checkpoint: Checkpoint, *, packed: bool = False, converted: dict[str, list[str]] | None = None
) -> dict[str, str]:
    """Map each parameter name of ``model`` to its key in the checkpoint.

    Keys match directly, or differ by the model's ``base_model_prefix`` (a ``BertModel`` saved
    inside ``BertForMaskedLM`` and vice versa). Tied parameters absent from the checkpoint are left
    out (they are re-tied after loading). With ``packed`` a weight saved quantized (``…weight_packed``,
    the compressed-tensors format) counts as present. With ``converted``, a parameter that
    transformers' conversion mapping builds from several checkpoint tensors (a mixture of experts'
    fused ``gate_up_proj`` from per-expert ``w1`` / ``w3``) is put there with those keys instead.
    Raises :class:`ModelError` listing what is missing.
    """
    prefix = model_prefix(model)
    tied = set(_tied_keys(model))
    mapping: dict[str, str] = {}
    missing: list[str] = []
    for name, param in model.named_parameters(remove_duplicate=False):
        candidates = key_candidates(name, prefix)
        if packed and name.endswith(".weight"):
            candidates += [c + "_packed" for c in candidates]
        found = next((c for c in candidates if c in checkpoint.tensors), None)
        sources = [] if found is not None or converted is None else list(checkpoint_names(model, {name: param}))
        if found is not None:
            mapping[name] = found
        elif sources and sources != [name] and all(k in checkpoint.tensors for k in sources):
            converted[name] = sources  # type: ignore[index]
        elif name not in tied:
            missing.append(name)
    if missing:
        raise ModelError(
            f"{len(missing)} parameters of {type(model).__name__} are not in the checkpoint at {checkpoint.folder} "
            f"(e.g. {', '.join(missing[:3])}); the shards are incomplete or use other names: load the model "
            "in memory instead (without --stream)"
        )
    return mapping


def _tied_keys(model: nn.Module) -> list[str]:
    tied = getattr(model, "_tied_weights_keys", None) or {}
    config = getattr(model, "config", None)
    if not getattr(config, "tie_word_embeddings", True):
        return []
    return list(tied)


def model_class(config: Any) -> Any:
    """The transformers class of a config's first known architecture (else ``AutoModelForCausalLM``)."""
    import transformers

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    return transformers.AutoModelForCausalLM


def build_skeleton(folder: Path, dtype: torch.dtype) -> nn.Module:
    """The model of a checkpoint folder with every parameter on the meta device (buffers are real)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    with init_empty_weights():
        cls = model_class(config)
        build = getattr(cls, "from_config", None) or cls._from_config  # Auto* classes / concrete classes
        model: nn.Module = build(config, dtype=dtype)
    return model.eval()


def materialise(module: nn.Module, prefix: str, values: dict[str, torch.Tensor], keys: dict[str, str]) -> None:
    """Give ``module``'s meta parameters (qualified names under ``prefix``) real tensors from ``values``."""
    from accelerate.utils import set_module_tensor_to_device

    for name, param in module.named_parameters():
        full = f"{prefix}{name}"
        if full in keys and param.device.type == "meta":
            value = values[keys[full]]
            set_module_tensor_to_device(module, name, "cpu", value=value.to(param.dtype))


def release(module: nn.Module) -> None:
    """Drop ``module``'s parameters back to the meta device (frees their memory)."""
    from accelerate.utils import set_module_tensor_to_device

    for name, _ in list(module.named_parameters()):
        set_module_tensor_to_device(module, name, "meta")


def checkpoint_names(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` under the names ``save_pretrained`` writes: transformers' weight-conversion mapping reversed.

    A mixture-of-experts model's fused experts (``mlp.experts.gate_up_proj``) are saved under the
    checkpoint's own per-expert names (Mixtral's ``block_sparse_moe.experts.0.w1.weight``); the
    tensors are views of the model's where the mapping allows. Other models: ``state`` as it is.
    """
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # a transformers without conversion mappings saves the names as they are
        return state
    if not hasattr(model, "config"):
        return state
    reverted: dict[str, torch.Tensor] = revert_weight_conversion(model, state)  # type: ignore[arg-type]
    return reverted


def expert_checkpoint_keys(model: nn.Module, experts_name: str, experts: nn.Module) -> dict[str, str]:
    """Each expert projection's own weight key in the checkpoint, by layer name (``{experts_name}.3.gate_proj``).

    Found by running transformers' reverse conversion (:func:`checkpoint_names`) over marker
    tensors shaped like the fused parameters with an input width of one, each projection's rows
    holding its number: a per-expert key whose values are all one number is that projection's
    (Mixtral's ``block_sparse_moe.experts.3.w1.weight``). A family whose checkpoint stores the
    experts fused (GPT-OSS) has no such keys: the result is empty.
    """
    from oneshot.experts import projections

    made = projections(experts)
    ordered = list(made)
    markers: dict[str, torch.Tensor] = {}
    for number, projection in enumerate(made.values()):
        fused: torch.Tensor = getattr(experts, projection.fused_name)
        marker = markers.get(projection.fused_name)
        if marker is None:
            shape = list(fused.shape)
            shape[1 if getattr(experts, "is_transposed", False) else 2] = 1  # the input dimension
            marker = markers[projection.fused_name] = torch.full(shape, -1.0, dtype=torch.float64)
        projection.select(marker).fill_(float(number))
    prefix = f"{experts_name}." if experts_name else ""
    reverted = checkpoint_names(model, {prefix + name: marker for name, marker in markers.items()})
    found: dict[str, str] = {}
    for key, tensor in reverted.items():
        values = tensor.unique()
        if values.numel() == 1 and values.item() >= 0:
            number = int(values.item())
            want = made[ordered[number]].select(markers[made[ordered[number]].fused_name]).shape
            if tensor.shape == want:  # [out, 1]: the checkpoint's weight as the projection holds it, not transposed
                found[prefix + ordered[number]] = key
    return found if len(found) == len(ordered) else {}


def expert_weight_keys(model: nn.Module, names: Iterable[str]) -> dict[str, str]:
    """The checkpoint weight key of each of ``names`` that is an expert projection with one (see
    :func:`expert_checkpoint_keys`); other names are left out."""
    from oneshot.experts import experts_modules

    wanted = set(names)
    found: dict[str, str] = {}
    for experts_name, experts in experts_modules(model).items():
        if any(name.startswith(f"{experts_name}.") for name in wanted):
            keys = expert_checkpoint_keys(model, experts_name, experts)
            found.update({name: key for name, key in keys.items() if name in wanted})
    return found


def from_checkpoint_names(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checkpoint tensors under the model's parameter names: transformers' conversion mapping, as loading applies it.

    The inverse of :func:`checkpoint_names` (per-expert ``w1`` / ``w3`` / ``w2`` tensors -> the fused
    ``gate_up_proj`` / ``down_proj``); ``tensors`` must hold every source of each parameter built.
    """
    import copy

    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

    transforms = get_model_conversion_mapping(model)  # type: ignore[arg-type]
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    by_pattern = {pattern: c for c in converters for pattern in c.source_patterns}
    pending: dict[str, Any] = {}
    for key, tensor in sorted(tensors.items(), key=lambda kv: dot_natural_key(kv[0])):  # experts in index order
        target, pattern = rename_source_key(key, renamings, converters)
        if pattern is None:
            pending.setdefault(target, WeightRenaming(key, target)).add_tensor(target, key, key, tensor)
        else:
            pending.setdefault(target, copy.deepcopy(by_pattern[pattern])).add_tensor(target, key, pattern, tensor)
    built: dict[str, torch.Tensor] = {}
    for target, transform in pending.items():
        for name, value in transform.convert(target, model=model, config=getattr(model, "config", None)).items():
            built[name] = value[0] if isinstance(value, list) else value
    return built


def check_loadable(folder: Path) -> None:
    """Check that ``folder``'s config describes its tensors: every parameter present with its shape.

    Builds the model from the saved config on the meta device (no weight memory) and compares each
    parameter's shape with the saved tensor's, under the names transformers saves it with
    (:func:`checkpoint_names`: a mixture of experts' per-expert tensors). Raises :class:`ModelError`
    on a mismatch.
    """
    checkpoint = Checkpoint(folder)
    skeleton = build_skeleton(folder, checkpoint.dtype())
    params = dict(skeleton.named_parameters())
    named = checkpoint_names(skeleton, dict(params))
    group = saved_quantization(folder).get("config_groups", {}).get("group_0", {})
    bits = int(group.get("weights", {}).get("num_bits", 0))
    if set(named) != set(params):  # a conversion mapping: every tensor it names saved with its shape
        _check_converted(named, checkpoint, bits)
        return
    keys = checkpoint_keys(skeleton, checkpoint, packed=True)
    for name, param in skeleton.named_parameters():
        shape = tuple(param.shape)
        if name in keys and keys[name].endswith("_packed"):  # codes packed along the input: [out, ⌈in·bits/32⌉]
            shape = (shape[0], -(-shape[1] * bits // 32))
        if name in keys and shape != checkpoint.tensors[keys[name]].shape:
            raise ModelError(
                f"saved {keys[name]} has shape {checkpoint.tensors[keys[name]].shape} but the saved config "
                f"builds {tuple(param.shape)}"
            )


def _check_converted(named: dict[str, torch.Tensor], checkpoint: Checkpoint, bits: int) -> None:
    """Every tensor a conversion mapping names is in ``checkpoint`` with its shape (ModelError otherwise).

    A quantized weight ``X.weight`` is saved as ``X.weight_packed``, its codes packed along the input.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    for name, tensor in named.items():
        shape = tuple(tensor.shape)
        packed = f"{name}_packed"
        if name not in checkpoint.tensors and packed in checkpoint.tensors and len(shape) == 2:
            name, shape = packed, (shape[0], -(-shape[1] * bits // 32))
        shapes[name] = shape
    missing = [name for name in shapes if name not in checkpoint.tensors]
    if missing:
        raise ModelError(
            f"{len(missing)} tensors are not in the checkpoint at {checkpoint.folder} (e.g. {', '.join(missing[:3])})"
        )
    for name, shape in shapes.items():
        if shape != checkpoint.tensors[name].shape:
            raise ModelError(
                f"saved {name} has shape {checkpoint.tensors[name].shape} but the saved config builds {shape}"
            )


def saved_quantization(folder: Path) -> dict[str, Any]:
    """The ``quantization_config`` of a checkpoint folder's ``config.json`` (empty when it has none)."""
    path = folder / "config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    found: dict[str, Any] = config.get("quantization_config") or {}
    return found


class ReferenceWeights:
    """The weights of the same layers in another checkpoint (a base model for movement pruning).

    Layers are looked up by their qualified name in the pruned model, directly or with the model's
    ``base_model_prefix`` added or removed (a ``BertForTokenClassification`` fine-tuned from a
    ``BertModel``). Each weight is read on demand from the memory-mapped shards.
    """

    def __init__(self, folder: str | Path, prefix: str = "") -> None:
        folder = Path(folder)
        if not folder.is_dir():
            raise ModelError(f"base checkpoint {folder} is not a folder; pass the base model's save_pretrained folder")
        self.checkpoint = Checkpoint(folder)
        self.prefix = prefix

    def key(self, layer: str) -> str:
        """The checkpoint key of ``layer``'s weight; ModelError naming the layer if it has none."""
        candidates = key_candidates(f"{layer}.weight", self.prefix)
        for key in candidates:
            if key in self.checkpoint.tensors:
                return key
        raise ModelError(
            f"the base checkpoint {self.checkpoint.folder} has no weight for {layer} (looked for "
            f"{', '.join(candidates)}); pass the checkpoint this model was fine-tuned from"
        )

    def matrix(self, layer: str, shape: tuple[int, int], transposed: bool) -> torch.Tensor:
        """``layer``'s weight as float32 ``[out, in]`` (``transposed``: stored ``[in, out]``, GPT-2's Conv1D)."""
        key = self.key(layer)
        weight = self.checkpoint.read([key])[key]
        weight = (weight.T if transposed else weight).to(torch.float32)
        if tuple(weight.shape) != tuple(shape):
            raise ModelError(
                f"{layer} is {tuple(shape)} but the base checkpoint's {key} is {tuple(weight.shape)}: "
                "the base must have the same architecture"
            )
        return weight
