"""Physically remove MLP neurons and attention heads from a block, and keep the config consistent.

Which linear layers form a block's MLP and attention is read from a small table of block-relative
names (data, not per-family code). Pruned layers are replaced by smaller ``nn.Linear`` / ``Conv1D``
modules and the config's sizes are updated, so stock ``from_pretrained`` rebuilds the smaller
model. Head removal needs a config with an explicit ``head_dim`` (LLaMA-style): GPT-2, OPT, BERT
and GPT-NeoX derive the head size from hidden_size / heads, so fewer heads cannot be expressed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from oneshot.errors import ConfigError
from oneshot.layers import find_linears, is_conv1d


@dataclass(frozen=True)
class MlpRole:
    """An MLP: ``ups`` produce the neurons, ``down`` consumes them; ``size_key`` is the config width."""

    down: str
    ups: tuple[str, ...]
    size_keys: tuple[str, ...]
    bias_flag: str | None = None  # config flag that gives every MLP projection a bias


@dataclass(frozen=True)
class AttentionRole:
    """Attention with separate projections and an explicit head_dim in the config."""

    out: str
    query: str
    kv: tuple[str, str]
    module: str
    bias_flag: str | None = None


MLP_ROLES = (
    MlpRole("mlp.down_proj", ("mlp.gate_proj", "mlp.up_proj"), ("intermediate_size",), "mlp_bias"),  # LLaMA family
    MlpRole("fc2", ("fc1",), ("ffn_dim",)),  # OPT
    MlpRole("mlp.c_proj", ("mlp.c_fc",), ("n_inner",)),  # GPT-2
    MlpRole("mlp.dense_4h_to_h", ("mlp.dense_h_to_4h",), ("intermediate_size",)),  # GPT-NeoX
    MlpRole("output.dense", ("intermediate.dense",), ("intermediate_size",)),  # BERT
)
ATTENTION_ROLES = (
    AttentionRole(
        "self_attn.o_proj", "self_attn.q_proj", ("self_attn.k_proj", "self_attn.v_proj"), "self_attn", "attention_bias"
    ),
)


def mlp_role(block: nn.Module) -> MlpRole:
    """The MLP layout of ``block`` (ConfigError if none is known)."""
    names = set(find_linears(block))
    for role in MLP_ROLES:
        if role.down in names and all(u in names for u in role.ups):
            return role
    raise ConfigError(
        f"structured pruning does not know the MLP layout of {type(block).__name__} (linear layers: "
        f"{', '.join(sorted(names))}); supported: LLaMA/Gemma/Qwen/Mistral, OPT, GPT-2, GPT-NeoX, BERT"
    )


def attention_role(block: nn.Module, config: object) -> AttentionRole:
    """The attention layout of ``block`` when heads can be removed (ConfigError otherwise)."""
    names = set(find_linears(block))
    for role in ATTENTION_ROLES:
        if role.out in names and role.query in names and all(k in names for k in role.kv):
            if getattr(config, "head_dim", None) is None:
                break
            return role
    raise ConfigError(
        f"attention heads of {type(block).__name__} cannot be removed so that stock transformers reloads the "
        "model (its config derives the head size from hidden_size / heads); use --target mlp"
    )


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def slice_linear(
    root: nn.Module,
    name: str,
    keep: torch.Tensor,
    side: str,
    bias_delta: torch.Tensor | None = None,
    add_bias: bool = False,
) -> nn.Module:
    """Replace linear ``name`` under ``root`` by one keeping ``keep`` outputs (``side="out"``) or inputs.

    ``bias_delta`` is added to the (kept) bias; ``add_bias`` creates a zero bias where there was
    none. Works for ``nn.Linear`` and GPT-2's ``Conv1D``. Returns the new module.
    """
    old: Any = root.get_submodule(name)
    weight: torch.Tensor = old.weight.detach()
    conv = is_conv1d(old)
    w = weight.T if conv else weight  # [out, in]
    w = w[keep] if side == "out" else w[:, keep]
    old_bias = old.bias.detach() if getattr(old, "bias", None) is not None else None
    if old_bias is not None and side == "out":
        old_bias = old_bias[keep]
    has_bias = old_bias is not None or add_bias or bias_delta is not None
    out_f, in_f = w.shape
    if conv:
        from transformers.pytorch_utils import Conv1D

        new: Any = Conv1D(out_f, in_f)
        new.to(device=weight.device, dtype=weight.dtype)
        new.weight.data.copy_(w.T)
    else:
        new = nn.Linear(in_f, out_f, bias=has_bias, device=weight.device, dtype=weight.dtype)
        new.weight.data.copy_(w)
    if has_bias:
        bias = (
            old_bias.clone() if old_bias is not None else torch.zeros(out_f, dtype=weight.dtype, device=weight.device)
        )
        if bias_delta is not None:
            bias = bias + bias_delta.to(device=weight.device, dtype=weight.dtype)
        new.bias.data.copy_(bias)
    _replace(root, name, new)
    module: nn.Module = new
    return module


def param_count(model: nn.Module) -> int:
    """Unique parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


#: Config attributes that hold a mixture of experts' routed expert count (Mixtral, Qwen-MoE, DeepSeek).
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")


def remove_experts(block: nn.Module, experts_name: str, routers: list[str], keep: torch.Tensor) -> int:
    """Keep only experts ``keep`` (sorted indices) of the experts module ``experts_name`` of ``block``.

    Every parameter and buffer of the experts module and of each router (names relative to
    ``block``) whose first dimension is the expert count is indexed along it (fused weights,
    biases, router rows, DeepSeek's score correction bias); the attributes of the MoE module
    holding the count are updated. Returns the old expert count.
    """
    experts: Any = block.get_submodule(experts_name)
    count = int(experts.num_experts)
    for owner in [experts, *(block.get_submodule(r) for r in routers)]:
        for store in (owner._parameters, owner._buffers):
            for key, value in list(store.items()):
                if value is not None and value.dim() >= 1 and value.shape[0] == count:
                    kept = value.detach()[keep.to(value.device)].clone()
                    is_param = key in owner._parameters
                    store[key] = nn.Parameter(kept, requires_grad=value.requires_grad) if is_param else kept
    parent = experts_name.rpartition(".")[0]
    for module in (block.get_submodule(parent) if parent else block).modules():
        for key in ("num_experts", *EXPERT_COUNT_KEYS):
            if getattr(module, key, None) == count and not isinstance(getattr(type(module), key, None), property):
                setattr(module, key, int(keep.numel()))
    experts.__dict__.pop("_oneshot_projections", None)  # the views of the old experts
    return count


def set_expert_count(model_config: Any, before: int, after: int) -> list[str]:
    """The new routed expert count in the model config (and its text config); returns the keys set."""
    found = []
    for config in (model_config, getattr(model_config, "text_config", None)):
        for key in EXPERT_COUNT_KEYS:
            if config is not None and getattr(config, key, None) == before:
                setattr(config, key, after)
                found.append(key)
    return found
