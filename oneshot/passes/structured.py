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
from oneshot.layers import as_matrix, find_blocks
from oneshot.methods.base import STAT_MEANVAR
from oneshot.methods.structured import (
    channel_scores,
    channels_of,
    compensation,
    keep_index,
    lowest,
    lowest_per_group,
    unit_scores,
)
from oneshot.surgery import AttentionRole, MlpRole, attention_role, mlp_role, param_count, slice_linear

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


def plans(model: nn.Module, config: PruneConfig) -> list[MlpPlan | AttentionPlan]:
    """The checked plan of every target ``config.target`` names (ConfigError before any work)."""
    _, blocks = find_blocks(model)
    targets = ("mlp", "attention") if config.target == "both" else (config.target,)
    found: list[MlpPlan | AttentionPlan] = []
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
    todo = plans(model, config)
    blocks_name, _ = find_blocks(model)
    result = StructuredResult(blocks_name=blocks_name, params_before=param_count(model))

    def block_visit(i: int, block: nn.Module, stats: Stats) -> None:
        result.units.extend(plan.apply(i, block, stats) for plan in todo)

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
