"""The compressed-tensors format: quantized layers as packed integer codes, scales and zero points.

A quantized run is saved the way transformers (with the ``compressed-tensors`` package) and vLLM
load it: every quantized ``nn.Linear`` ``X`` stores ``X.weight_packed`` (int32, the codes packed
densely along the input dimension, ``32 / bits`` per word for 2, 4 and 8 bits), ``X.weight_scale``
(``[out, groups]`` in the model's dtype), ``X.weight_zero_point`` (asymmetric grids only: the
zero codes packed along the output dimension) and ``X.weight_shape``; ``config.json`` gains a
``quantization_config`` with ``quant_method: compressed-tensors`` and ``format: pack-quantized``.
Codes are stored unsigned (``code = q + 2^(bits−1)`` for the loader's signed ``q``), so
``weight = scale · (code − zero)`` with zero ``2^(bits−1)`` on a symmetric grid.

This module only computes tensors and the config dict; reading a saved model back goes through
the ``compressed-tensors`` package itself (:func:`decompress`), the loader the format is for.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from oneshot.errors import ConfigError
from oneshot.methods.quantspec import QuantResult, QuantSpec

#: The package that reads the format (an optional extra: ``pip install oneshot[quant]``).
LOADER = "compressed-tensors"


def pack(codes: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Pack unsigned ``bits``-bit codes of a 2-D tensor into int32 words along ``dim``, densely.

    Element ``i`` of a row takes bits ``[i·bits, (i+1)·bits)`` of the row's bit string (little-end
    first), which may straddle two words; a row of ``n`` codes takes ``ceil(n·bits / 32)`` words.
    This is compressed-tensors' ``pack_to_int32`` layout (for 4 and 8 bits also the older one).
    """
    if codes.dim() != 2 or dim not in (0, 1):
        raise ValueError("pack takes a 2-D tensor and dim 0 or 1")
    if int(codes.min()) < 0 or int(codes.max()) >= 1 << bits:
        raise ValueError(f"codes must lie in [0, {(1 << bits) - 1}] to pack in {bits} bits")
    values = (codes if dim == 1 else codes.T).to(torch.int64)  # [rows, n]
    rows, n = values.shape
    words = -(-n * bits // 32)
    start = torch.arange(n, device=codes.device) * bits  # [n] first bit of each element
    out = torch.zeros(rows, words + 1, dtype=torch.int64, device=codes.device)
    out.scatter_add_(1, (start // 32).expand(rows, -1), values << (start % 32))  # low part (may overflow 32 bits)
    carry = values >> (32 - start % 32)  # the part past the word's end, zero when it fits
    out.scatter_add_(1, (start // 32 + 1).expand(rows, -1), carry)
    out = out[:, :words] & 0xFFFFFFFF
    packed = torch.where(out >= 1 << 31, out - (1 << 32), out).to(torch.int32)  # the same 32 bits as int32
    return (packed if dim == 1 else packed.T).contiguous()


def unpack(packed: torch.Tensor, bits: int, n: int, dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`pack`: the ``n`` unsigned codes per row (``dim=1``) or column (``dim=0``), int64."""
    words = (packed if dim == 1 else packed.T).to(torch.int64) & 0xFFFFFFFF  # [rows, words]
    rows = words.shape[0]
    words = torch.cat([words, torch.zeros(rows, 1, dtype=torch.int64, device=packed.device)], dim=1)
    start = torch.arange(n, device=packed.device) * bits
    low = words[:, start // 32] >> (start % 32)
    high = words[:, start // 32 + 1] << (32 - start % 32)
    codes = (low | high) & ((1 << bits) - 1)
    return codes if dim == 1 else codes.T


@dataclass(frozen=True)
class QuantizedLayer:
    """One quantized linear layer as saved: its compressed tensors and the grid they were made on."""

    tensors: dict[str, torch.Tensor]  # weight_packed, weight_scale, [weight_zero_point], weight_shape
    spec: QuantSpec


def compress(result: QuantResult, dtype: torch.dtype) -> QuantizedLayer:
    """The saved form of a quantized layer whose model weight is ``result.weight`` cast to ``dtype``."""
    spec = result.spec
    codes = result.codes()  # [out, in], unsigned
    tensors = {
        "weight_packed": pack(codes, spec.bits),
        "weight_scale": result.scales.to(dtype),
        "weight_shape": torch.tensor(tuple(result.weight.shape), dtype=torch.int64),
    }
    if not spec.symmetric:
        tensors["weight_zero_point"] = pack(result.zeros.to(torch.int64), spec.bits, dim=0)
    return QuantizedLayer(tensors, spec)


def weights_args(spec: QuantSpec) -> dict[str, Any]:
    """The ``weights`` entry of a compressed-tensors config group for ``spec``."""
    return {
        "num_bits": spec.bits,
        "type": "int",
        "symmetric": spec.symmetric,
        "group_size": spec.group_size,
        "strategy": "channel" if spec.group_size is None else "group",
        "dynamic": False,
        "actorder": "weight" if spec.act_order else None,
        "observer": spec.observer,
    }


def quantization_config(spec: QuantSpec, ignore: list[str]) -> dict[str, Any]:
    """``config.json``'s ``quantization_config``: every ``nn.Linear`` but the ``ignore`` names, on ``spec``."""
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": weights_args(spec),
                "input_activations": None,
                "output_activations": None,
                "format": "pack-quantized",
            }
        },
        "ignore": sorted(ignore),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }


#: Said when an asymmetric grid is saved: the format's zero points load in vLLM and through the
#: package's decompressor, but not through stock transformers at the versions tested here.
ASYMMETRIC_LOAD_WARNING = (
    "an asymmetric grid (--no-symmetric) saves packed zero points, the compressed-tensors layout vLLM "
    "loads; stock transformers (5.23, with compressed-tensors 0.20) cannot load them (it builds "
    "weight_zero_point unpacked: a size mismatch). For a folder transformers reloads, keep the default "
    "symmetric grid"
)


def check_loader() -> None:
    """Refuse, before any work, a quantized run without the package that loads its output."""
    try:
        import compressed_tensors  # noqa: F401
    except ImportError as exc:
        raise ConfigError(
            f"a quantized model is saved in the compressed-tensors format, and checked by reloading it with that "
            f"package: pip install 'oneshot[quant]' (or {LOADER})"
        ) from exc


#: The group sizes the default tries, largest first (the first that divides every quantized layer wins).
AUTO_GROUP_SIZES = (128, 64, 32)
#: How the default group size is chosen, as the output and the report say it.
AUTO_GROUP_RULE = (
    f"the largest of {', '.join(map(str, AUTO_GROUP_SIZES))} that divides every quantized layer's input width"
)


def auto_group_size(widths: Mapping[str, int]) -> int:
    """The largest of :data:`AUTO_GROUP_SIZES` that divides every quantized layer's input width.

    A model none of them fits is refused with the two ways out (a smaller group, or one per row).
    """
    for size in AUTO_GROUP_SIZES:
        if all(width % size == 0 for width in widths.values()):
            return size
    name, width = next((n, w) for n, w in widths.items() if w % AUTO_GROUP_SIZES[-1])
    raise ConfigError(
        f"no group size of {', '.join(map(str, AUTO_GROUP_SIZES))} divides the input width {width} of {name}; the "
        "compressed-tensors format needs whole groups: pass --group-size with a divisor of every layer's width "
        "(e.g. 16), or -1 for one scale per output row"
    )


def check_groups(widths: Mapping[str, int], spec: QuantSpec) -> None:
    """Refuse a group size that does not divide every quantized layer's input width (the format needs whole groups)."""
    size = spec.group_size
    if size is None:
        return
    misfit = {name: width for name, width in widths.items() if width % size}
    if misfit:
        name, width = next(iter(misfit.items()))
        fits = [g for g in (*AUTO_GROUP_SIZES, 16) if all(w % g == 0 for w in widths.values())]
        hint = f"--group-size {fits[0]}" if fits else "--group-size -1 (one scale per output row)"
        raise ConfigError(
            f"--group-size {size} does not divide the input width {width} of {name} ({len(misfit)} layers misfit); "
            f"the compressed-tensors format and the serving kernels need whole groups: use {hint}"
        )


def check_layer(name: str, layer: QuantizedLayer, weight: torch.Tensor) -> None:
    """Refuse to save a layer whose compressed form the loader would not turn back into ``weight`` exactly."""
    from oneshot.errors import OutputError

    restored = decompress(layer.tensors, weights_args(layer.spec))
    if restored.dtype != weight.dtype or not torch.equal(restored, weight.detach().to(restored.device)):
        raise OutputError(
            f"the compressed-tensors loader does not restore {name}'s quantized weight exactly; not saved"
        )


def decompress(layer: Mapping[str, torch.Tensor], spec_args: Mapping[str, Any]) -> torch.Tensor:
    """A saved layer's weight as the compressed-tensors package dequantizes it (the loader's own code)."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**spec_args))
    state: dict[str, torch.Tensor] = PackedQuantizationCompressor.decompress(dict(layer), scheme)
    return state["weight"]
