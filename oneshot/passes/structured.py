"""The structured pass: remove the same share of MLP neurons and/or attention heads from every block.

Units are scored from the mean / variance of their channels at the input of the next projection
(:mod:`oneshot.methods.structured`, FLAP's fluctuation), the lowest are removed, and their mean
contribution is folded into the next projection's bias. The layer surgery and the config update
live in :mod:`oneshot.surgery`; a plan per target (MLP, attention) is checked before any work.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from oneshot.calibration.data import CalibrationSet
from oneshot.calibration.stats import Accumulator, MeanVar, TokenSample
from oneshot.config import PruneConfig
from oneshot.distributed import Ranks
from oneshot.engine import SAMPLE, BlockObserver, PhaseTimes, SweepIO, sweep
from oneshot.errors import ConfigError
from oneshot.experts import experts_modules, is_experts, projections
from oneshot.layers import as_matrix, find_blocks, find_routers
from oneshot.methods.base import STAT_MEANVAR
from oneshot.methods.structured import (
    channel_scores,
    channels_of,
    compensation,
    expert_scores,
    keep_index,
    lowest,
    lowest_per_group,
    unit_scores,
)
from oneshot.surgery import (
    EXPERT_COUNT_KEYS,
    AttentionRole,
    MlpRole,
    attention_role,
    mlp_role,
    param_count,
    remove_experts,
    set_expert_count,
    slice_linear,
)

Stats = Callable[[str], dict[str, Accumulator]]


@dataclass(frozen=True)
class UnitRecord:
    """Units removed from one block by structured pruning."""

    block: int
    target: str  # "mlp" or "attention"
    before: int
    after: int
    removed: list[int]
    compensated: bool
    layer: str = ""  # the projection whose input channels went (down_proj, o_proj), block-relative
    relative_error: float | None = None  # its output error over the sampled calibration tokens


@dataclass
class StructuredResult:
    """Output of :func:`prune_structured`."""

    blocks_name: str
    units: list[UnitRecord] = field(default_factory=list)
    times: PhaseTimes = field(default_factory=PhaseTimes)
    params_before: int = 0
    params_after: int = 0
    expert_tokens: list[dict[str, Any]] = field(default_factory=list)  # --target experts: each layer's scores


def _needs_new_bias(model: nn.Module, block: nn.Module, layer: str, flag: str | None, what: str) -> bool:
    """Whether compensating into ``layer`` must create its bias; ConfigError if the config cannot express one."""
    if getattr(block.get_submodule(layer), "bias", None) is not None:
        return False
    if flag is not None and hasattr(getattr(model, "config", None), flag):
        return True
    raise ConfigError(
        f"{type(model).__name__}'s {what} has no bias and its config offers none, so the removed units' mean "
        "cannot be folded in; pass --no-bias-compensation"
    )


def removal_error(
    weight: torch.Tensor, removed: torch.Tensor, accs: dict[str, Accumulator], mean: torch.Tensor | None
) -> float | None:
    """``‖W_C (X_C − μ_C)ᵀ‖² / ‖W Xᵀ‖²`` over the sampled tokens: the output error of a projection ``W``
    ``[out, in]`` whose input channels ``C`` are removed, their mean ``μ`` folded into its bias (without
    ``mean``: ``‖W_C X_Cᵀ‖²``). None without a token sample."""
    sample = accs.get(SAMPLE)
    if not isinstance(sample, TokenSample):
        return None
    x = sample.finalize().to(weight.device, torch.float32)  # [tokens, in]; no tokens: 0 (the guard below)
    gone = x[:, removed] - (0.0 if mean is None else mean[removed].to(x.device))  # [tokens, |C|]
    shift = gone @ weight[:, removed].T  # [tokens, out]
    dense = x @ weight.T  # [tokens, out]
    denominator = float(dense.square().sum())
    return float(shift.square().sum()) / denominator if denominator > 0 else 0.0


def _meanvar(accs: dict[str, Accumulator]) -> tuple[torch.Tensor, torch.Tensor]:
    acc = accs[STAT_MEANVAR]
    assert isinstance(acc, MeanVar)
    return acc.finalize()


@dataclass(frozen=True)
class MlpPlan:
    """Which MLP neurons go: ``remove`` of ``width`` in every block, by ``score``."""

    role: MlpRole
    width: int
    remove: int
    score: str
    compensate: bool
    new_bias: bool

    @classmethod
    def of(cls, model: nn.Module, block: nn.Module, config: PruneConfig) -> MlpPlan:
        """Check the ratio against the MLP width (and whether a bias can be added) before any work."""
        role = mlp_role(block)
        width = int(as_matrix(block.get_submodule(role.down)).shape[1])
        remove = int(round(float(config.ratio or 0.0) * width))
        if not 0 < remove < width:
            raise ConfigError(
                f"--ratio {config.ratio} removes {remove} of {width} MLP neurons; choose a ratio in (0, 1)"
            )
        compensate = config.bias_compensation
        new_bias = compensate and _needs_new_bias(model, block, role.down, role.bias_flag, "MLP")
        return cls(role, width, remove, config.score, compensate, new_bias)

    def apply(self, i: int, block: nn.Module, stats: Stats) -> UnitRecord:
        """Score block ``i``'s neurons, slice them out of the up and down projections, fold their mean."""
        mean, var = _meanvar(stats(self.role.down))
        w_down = as_matrix(block.get_submodule(self.role.down))  # [hidden, inter]
        removed = lowest(channel_scores(var, w_down, self.score), self.remove)
        error = removal_error(w_down, removed, stats(self.role.down), mean if self.compensate else None)
        delta = compensation(w_down, mean, removed) if self.compensate else None
        keep = keep_index(w_down.shape[1], removed)
        for up in self.role.ups:
            slice_linear(block, up, keep, "out", add_bias=self.new_bias)
        slice_linear(block, self.role.down, keep, "in", bias_delta=delta, add_bias=self.new_bias)
        after = self.width - self.remove
        return UnitRecord(i, "mlp", self.width, after, removed.tolist(), self.compensate, self.role.down, error)

    def update_config(self, model_config: Any) -> None:
        """The smaller width (and the bias flag) in the model config, so the output reloads."""
        for key in self.role.size_keys:
            setattr(model_config, key, self.width - self.remove)
        if self.new_bias and self.role.bias_flag:
            setattr(model_config, self.role.bias_flag, True)


@dataclass(frozen=True)
class AttentionPlan:
    """Which query heads go: ``remove_per_group`` of the heads sharing each key/value head."""

    role: AttentionRole
    heads: int
    kv: int
    head_dim: int
    remove_per_group: int
    score: str
    compensate: bool
    new_bias: bool

    @classmethod
    def of(cls, model: nn.Module, block: nn.Module, config: PruneConfig) -> AttentionPlan:
        """Check the ratio against the head groups and hidden size before any work."""
        model_config: Any = getattr(model, "config", None)
        role = attention_role(block, model_config)
        heads = int(model_config.num_attention_heads)
        kv = int(getattr(model_config, "num_key_value_heads", None) or heads)
        group = heads // kv
        remove = int(round(float(config.ratio or 0.0) * group))
        if not 0 < remove < group:
            raise ConfigError(
                f"--ratio {config.ratio} removes {remove} of the {group} query heads sharing each key/value head; "
                f"choose a ratio between {0.5 / group:.2f} and {1 - 0.5 / group:.2f}"
            )
        new_heads = heads - kv * remove
        hidden = int(getattr(model_config, "hidden_size", 0) or 0)
        if hidden and hidden % new_heads:
            raise ConfigError(
                f"removing {remove} of every {group} query heads leaves {new_heads} heads, but transformers "
                f"requires hidden_size ({hidden}) to be a multiple of the head count; choose another --ratio"
            )
        compensate = config.bias_compensation
        new_bias = compensate and _needs_new_bias(model, block, role.out, role.bias_flag, "attention output")
        return cls(role, heads, kv, int(model_config.head_dim), remove, config.score, compensate, new_bias)

    @property
    def heads_after(self) -> int:
        """Query heads left in every block."""
        return self.heads - self.kv * self.remove_per_group

    def apply(self, i: int, block: nn.Module, stats: Stats) -> UnitRecord:
        """Score block ``i``'s heads, slice them out of q and o, fold their mean into o's bias."""
        role = self.role
        mean, var = _meanvar(stats(role.out))
        w_out = as_matrix(block.get_submodule(role.out))  # [hidden, heads * head_dim]
        scores = unit_scores(channel_scores(var, w_out, self.score), self.head_dim)  # [heads]
        removed = lowest_per_group(scores, self.kv, self.remove_per_group)
        channels = channels_of(removed, self.head_dim)
        error = removal_error(w_out, channels, stats(role.out), mean if self.compensate else None)
        delta = compensation(w_out, mean, channels) if self.compensate else None
        keep = keep_index(w_out.shape[1], channels)
        slice_linear(block, role.query, keep, "out", add_bias=self.new_bias)
        if self.new_bias:  # the config flag gives k/v biases too: zeros keep them exact
            for name in role.kv:
                rows = as_matrix(block.get_submodule(name)).shape[0]
                slice_linear(block, name, torch.arange(rows), "out", add_bias=True)
        slice_linear(block, role.out, keep, "in", bias_delta=delta, add_bias=self.new_bias)
        module: Any = block.get_submodule(role.module)
        if hasattr(module, "num_key_value_groups"):
            module.num_key_value_groups = self.heads // self.kv - self.remove_per_group
        return UnitRecord(
            i, "attention", self.heads, self.heads_after, removed.tolist(), self.compensate, role.out, error
        )

    def update_config(self, model_config: Any) -> None:
        """The smaller head count (head_dim made explicit, the bias flag) in the model config."""
        model_config.num_attention_heads = self.heads_after
        model_config.head_dim = self.head_dim
        if self.new_bias and self.role.bias_flag:
            setattr(model_config, self.role.bias_flag, True)


@dataclass(frozen=True)
class ExpertPlan:
    """Which routed experts go: ``remove`` of the ``count`` of every mixture-of-experts layer, by ``score``.

    An expert's REAP saliency (Lasby et al., "REAP the Experts", 2025) is the mean over the
    calibration tokens routed to it of its routing weight times the norm of its output; ``frequency``
    counts those tokens. The removed experts' fused weights, biases and router rows are dropped.
    """

    count: int
    remove: int
    score: str
    result: StructuredResult

    @classmethod
    def of(cls, model: nn.Module, config: PruneConfig, result: StructuredResult) -> ExpertPlan:
        """Check the ratio against the expert count (the same in every MoE layer) before any work."""
        counts = {int(getattr(m, "num_experts", 0)) for m in experts_modules(model).values()}
        if not counts:
            raise ConfigError(f"--target experts removes routed experts; {type(model).__name__} has no experts module")
        if len(counts) != 1:
            raise ConfigError(f"--target experts needs the same expert count in every layer (found {sorted(counts)})")
        count = counts.pop()
        remove = int(round(float(config.ratio or 0.0) * count))
        top_k = int(getattr(getattr(model, "config", None), "num_experts_per_tok", 1) or 1)
        if not 0 < remove <= count - top_k:
            raise ConfigError(
                f"--ratio {config.ratio} removes {remove} of {count} experts per layer; at least one must go and the "
                f"router's top-{top_k} must remain: choose a ratio in [{0.5 / count:.3f}, {1 - top_k / count:.3f}]"
            )
        groups = int(getattr(getattr(model, "config", None), "n_group", 1) or 1)
        if (count - remove) % groups:
            raise ConfigError(
                f"the router picks experts in {groups} groups: removing {remove} of {count} experts leaves "
                f"{count - remove}, not a multiple of {groups}; choose another --ratio"
            )
        score = "frequency" if config.score == "frequency" else "reap"
        return cls(count, remove, score, result)

    def apply(self, i: int, block: nn.Module, stats: Stats) -> list[UnitRecord]:
        """Score block ``i``'s experts from their routed tokens and drop the lowest ``remove`` of each MoE layer."""
        records = []
        routers = find_routers(block)
        for name, experts in [(n, m) for n, m in block.named_modules() if n and is_experts(m)]:
            parent = name.rpartition(".")[0]
            downs = [layer for key, layer in projections(experts).items() if key.endswith("down_proj")]
            counts = torch.tensor([layer.routed_tokens or 0 for layer in downs])
            saliency = torch.tensor([layer.routed_saliency for layer in downs])
            removed = lowest(expert_scores(counts, saliency, self.score), self.remove)
            keep = keep_index(self.count, removed)
            remove_experts(block, name, [r for r in routers if r.startswith(parent + ".") or not parent], keep)
            self.result.expert_tokens.append({"block": i, "layer": name, "routed_tokens": counts.tolist(),
                                              "saliency": (saliency / counts.clamp(min=1)).tolist()})  # fmt: skip
            records.append(
                UnitRecord(i, "experts", self.count, self.count - self.remove, removed.tolist(), False, name)
            )
        return records

    def update_config(self, model_config: Any) -> None:
        """The smaller expert count in the model config, so the output reloads with fewer experts."""
        if not set_expert_count(model_config, self.count, self.count - self.remove):
            raise ConfigError(f"the model config names its expert count under none of {', '.join(EXPERT_COUNT_KEYS)}")


def plans(
    model: nn.Module, config: PruneConfig, result: StructuredResult
) -> list[MlpPlan | AttentionPlan | ExpertPlan]:
    """The checked plan of every target ``config.target`` names (ConfigError before any work)."""
    _, blocks = find_blocks(model)
    if config.target == "experts":
        return [ExpertPlan.of(model, config, result)]
    targets = ("mlp", "attention") if config.target == "both" else (config.target,)
    found: list[MlpPlan | AttentionPlan | ExpertPlan] = []
    if "mlp" in targets:
        found.append(MlpPlan.of(model, blocks[0], config))
    if "attention" in targets:
        found.append(AttentionPlan.of(model, blocks[0], config))
    return found


def prune_structured(
    model: nn.Module,
    calib: CalibrationSet,
    config: PruneConfig,
    *,
    observer: BlockObserver | None = None,
    io: SweepIO | None = None,
    ranks: Ranks | None = None,
) -> StructuredResult:
    """Remove the same share of MLP neurons and/or attention heads from every block, in place.

    Units are scored from the mean/variance of their channels at the input of the next
    projection (over calibration tokens, blocks calibrated on the already pruned ones), the lowest
    are removed, and (unless ``config.bias_compensation`` is off) their mean contribution is added
    to the next projection's bias. The model config is updated so ``save_pretrained`` output
    reloads with stock transformers. With ``ranks`` every rank chooses the units from the reduced
    statistics, so all remove the same ones.
    """
    blocks_name, _ = find_blocks(model)
    result = StructuredResult(blocks_name=blocks_name, params_before=param_count(model))
    todo = plans(model, config, result)

    def block_visit(i: int, block: nn.Module, stats: Stats) -> None:
        for plan in todo:
            done = plan.apply(i, block, stats)
            result.units.extend(done if isinstance(done, list) else [done])

    def no_visit(full: str, block: int, module: nn.Module, accs: dict[str, Accumulator]) -> None:
        return None

    sweep(
        model,
        calib,
        config,
        (STAT_MEANVAR,),
        no_visit,
        times=result.times,
        observer=observer,
        block_visit=block_visit,
        desc="structured",
        io=io,
        single_pass=False,  # units are removed after the statistics forward: the block must run again
        ranks=ranks,
    )
    for plan in todo:
        plan.update_config(getattr(model, "config", None))
    result.params_after = param_count(model)
    return result
