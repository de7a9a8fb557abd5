"""Synthetic LLaMA-architecture checkpoints with random weights, of any size, for scale tests.

Tensors are generated one shard at a time and written with the safetensors library (so the
checkpoint never has to fit in memory), in the names and order ``save_pretrained`` uses, with a
``config.json`` that stock transformers loads. Weights are N(0, 0.02²), norms are ones.

    .venv/bin/python -m benchmarks.synthetic --out /tmp/llama-2g --hidden 1024 --layers 44 --dtype float32
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def llama_config(
    hidden: int, layers: int, *, intermediate: int | None = None, heads: int = 16, kv_heads: int = 4, vocab: int = 8192
) -> Any:
    """A LLaMA config of the given width and depth (intermediate ≈ 2.75 × hidden, rounded to 128)."""
    from transformers import LlamaConfig

    inter = intermediate or (int(hidden * 2.75) + 127) // 128 * 128
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )


def qwen3_moe_config(
    hidden: int, layers: int, experts: int, *, moe_intermediate: int | None = None, heads: int = 16,
    kv_heads: int = 4, vocab: int = 8192, top_k: int = 8,
) -> Any:  # fmt: skip
    """A Qwen3-MoE config: ``experts`` routed experts per layer (width ≈ 0.375 × hidden, as Qwen3-30B-A3B), top-8."""
    from transformers import Qwen3MoeConfig

    inter = moe_intermediate or max(128, round(hidden * 0.375 / 128) * 128)
    return Qwen3MoeConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter * 4, moe_intermediate_size=inter,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads,
        num_experts=experts, num_experts_per_tok=min(top_k, experts), max_position_embeddings=4096,
        tie_word_embeddings=False,
    )  # fmt: skip


def parameter_shapes(config: Any) -> list[tuple[str, tuple[int, ...]]]:
    """Every checkpoint tensor's name and shape, in ``state_dict`` order, without allocating weights.

    The names are those ``save_pretrained`` writes (a mixture of experts' per-expert tensors, from
    transformers' conversion mapping), so the folder is a checkpoint as the hub ships it.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from oneshot.checkpoint import checkpoint_names

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    named = checkpoint_names(model, dict(model.named_parameters()))
    return [(name, tuple(p.shape)) for name, p in named.items()]


def checkpoint_bytes(config: Any, dtype: torch.dtype) -> int:
    """Size of the checkpoint's tensors in ``dtype``."""
    item = torch.empty(0, dtype=dtype).element_size()
    return sum(math.prod(shape) * item for _, shape in parameter_shapes(config))


def write_checkpoint(
    folder: Path, config: Any, dtype: torch.dtype = torch.bfloat16, *, max_shard_bytes: int = 2 * 10**9, seed: int = 0
) -> int:
    """Write a random checkpoint of ``config`` into ``folder``; returns its size in bytes."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    item = torch.empty(0, dtype=dtype).element_size()
    for name, shape in parameter_shapes(config):
        nbytes = item * math.prod(shape)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    weight_map: dict[str, str] = {}
    total = 0
    for i, shard in enumerate(shards, start=1):
        file = "model.safetensors" if len(shards) == 1 else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: _random(name, shape, dtype, gen) for name, shape in shard}
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, file))
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.dtype = str(dtype).removeprefix("torch.")
    config.save_pretrained(folder)
    return total


def write_tokenizer(folder: Path) -> None:
    """Save the tests' character-level tokenizer (printable ASCII, BOS) into a checkpoint folder."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import char_tokenizer

    char_tokenizer().save_pretrained(folder)  # type: ignore[attr-defined]


def _random(name: str, shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype)
    return (torch.randn(shape, generator=gen) * 0.02).to(dtype)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=None, help="MLP width (default ≈ 2.75 × hidden)")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    args = parser.parse_args(argv)
    config = llama_config(
        args.hidden,
        args.layers,
        intermediate=args.intermediate,
        heads=args.heads,
        kv_heads=args.kv_heads,
        vocab=args.vocab,
    )
    size = write_checkpoint(args.out, config, DTYPES[args.dtype])
    write_tokenizer(args.out)  # a character-level tokenizer: the folder runs with `oneshot prune` as it is
    print(f"wrote {size / 1e9:.2f} GB to {args.out}")


if __name__ == "__main__":
    main()
