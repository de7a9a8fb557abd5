"""Mixture-of-experts layers: each expert's gate, up and down projection as a layer of its own.

transformers 5 stores the experts of its MoE families as fused 3-D parameters inside one experts
module per layer (``gate_up_proj`` ``[E, 2I, H]`` or, transposed, ``[E, H, 2I]``, concatenated
``[gate; up]`` or interleaved; ``down_proj`` ``[E, H, I]`` / ``[E, I, H]``; optional biases)
decorated with ``use_experts_implementation``, whose forward dispatches through the
``ExpertsInterface`` registry (``transformers/integrations/moe.py``). That decoration is the one
generic handle on every family: :func:`is_experts` recognises it by the attributes it adds, and
:class:`ExpertProjection` is one expert's projection as an ``[out, in]`` *view* of the fused
parameter, so reading, pruning and writing it reads and writes the fused tensor in place; the
saved checkpoint keeps the model's own parameters (and transformers' own conversion mapping gives
them their checkpoint names).

For calibration, :func:`routed_through_layers` switches the experts' implementation to
:func:`routed_forward` (registered in the ``ExpertsInterface`` as :data:`IMPLEMENTATION`): a loop
over experts that calls each expert's projections on the tokens the router sent to it, so the
engine's forward hooks see exactly each expert's routed inputs. What the hooks are told about
those rows (which calibration tokens they are, their routing weights) travels with the call in
:attr:`ExpertProjection.routed`. The block's output is the routed mix, whatever the rule.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

#: The name under which :func:`routed_forward` is registered in transformers' ``ExpertsInterface``.
IMPLEMENTATION = "oneshot_routed"

#: How an expert's statistics are gathered (``--expert-calibration``).
ROUTED, WEIGHTED, ALL = "routed", "weighted", "all"
EXPERT_RULES = (ROUTED, WEIGHTED, ALL)

_PROJECTIONS = "_oneshot_projections"  # the cached projections, outside the module's registered children


def is_experts(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers experts module (fused 3-D expert weights behind the ExpertsInterface)."""
    down = getattr(module, "down_proj", None)
    return (
        isinstance(down, torch.Tensor)
        and down.dim() == 3
        and all(hasattr(module, attr) for attr in ("has_gate", "is_transposed", "num_experts"))
    )


@dataclass
class Routed:
    """What the hooks need to know about the rows of one call of an expert projection.

    ``rows``: each input row's position among the layer's flattened ``[B·T]`` tokens (so the
    padding mask can be applied); ``weights``: each row's routing weight when the statistics are
    to be weighted by it (None: every row counts once).
    """

    rows: torch.Tensor
    weights: torch.Tensor | None = None


class ExpertProjection(nn.Module):
    """One expert's ``gate``, ``up`` or ``down`` projection: an ``[out, in]`` view of the fused parameter.

    Not a registered child of the experts module (the model's parameters and state dict are
    unchanged); ``weight`` and ``bias`` are read from the experts module's current parameters on
    every access, so they follow the module across devices and dtypes.
    """

    def __init__(self, experts: nn.Module, index: int, part: str) -> None:
        super().__init__()
        self.__dict__["experts"] = experts  # a plain reference: not a submodule
        self.index = index
        self.part = part  # "gate", "up" or "down"
        self.routed: Routed | None = None  # set by routed_forward for the duration of a call
        self.routed_tokens: int | None = None  # real calibration tokens routed to the expert (the block's last count)
        self.routed_saliency: float = 0.0  # Σ over those tokens of routing weight x ‖expert output‖ (REAP)

    @property
    def key(self) -> tuple[int, int]:
        """``(id(experts module), expert index)``: how a :class:`CalibrationRule` names this expert."""
        return (id(self.__dict__["experts"]), self.index)

    @property
    def fused_name(self) -> str:
        """The experts module's parameter this projection is a slice of."""
        experts: Any = self.__dict__["experts"]
        if self.part == "down":
            return "down_proj"
        return "gate_up_proj" if experts.has_gate else "up_proj"

    def select(self, fused: torch.Tensor) -> torch.Tensor:
        """This projection's part of a tensor shaped like its fused parameter, as ``[out, in]`` (a view).

        Works for the parameter itself, its gradient or a mask; a bias-shaped ``[E, n]`` tensor
        gives this projection's ``[out]`` slice.
        """
        experts: Any = self.__dict__["experts"]
        one = fused[self.index]  # [2I, H] / [H, 2I] / [H, I] / [I, H] / bias [n]
        if one.dim() == 2 and experts.is_transposed:
            one = one.T  # stored [in, out]
        if self.part == "down" or not experts.has_gate:
            return one
        half = one.shape[0] // 2
        if experts.is_concatenated:
            return one[:half] if self.part == "gate" else one[half:]
        return one[0::2] if self.part == "gate" else one[1::2]  # interleaved [g0, u0, g1, u1, ...]

    @property
    def weight(self) -> torch.Tensor:
        """The ``[out, in]`` weight, a view of the fused parameter."""
        return self.select(getattr(self.__dict__["experts"], self.fused_name))

    @property
    def bias(self) -> torch.Tensor | None:
        """The ``[out]`` bias, a view of the fused bias parameter (None without biases)."""
        experts: Any = self.__dict__["experts"]
        if not experts.has_bias:
            return None
        return self.select(getattr(experts, f"{self.fused_name}_bias"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ weightᵀ + bias``."""
        return F.linear(x, self.weight, self.bias)


def projections(experts: nn.Module) -> dict[str, ExpertProjection]:
    """Every expert's projections by name relative to the experts module (``3.gate_proj``), made once and kept."""
    made = experts.__dict__.get(_PROJECTIONS)
    if made is None:
        module: Any = experts
        parts = ("gate", "up", "down") if module.has_gate else ("up", "down")
        count = int(module.num_experts)
        made = {f"{e}.{part}_proj": ExpertProjection(experts, e, part) for e in range(count) for part in parts}
        experts.__dict__[_PROJECTIONS] = made
    return made


def shared_inputs(layers: dict[str, nn.Module]) -> dict[str, str]:
    """Each expert's up projection -> its gate projection (by name in ``layers``): they always read the same rows.

    Declared rather than learnt from the inputs, so the layer groups are the same on every rank
    whichever batches the expert was routed tokens in.
    """
    shared: dict[str, str] = {}
    for name, layer in layers.items():
        if isinstance(layer, ExpertProjection) and layer.part == "up":
            gate = name.rpartition(".")[0] + ".gate_proj"
            if gate in layers:
                shared[name] = gate
    return shared


@dataclass
class CalibrationRule:
    """How :func:`routed_forward` feeds the experts' hooks while statistics are gathered.

    ``rule``: :data:`ROUTED` (each expert sees the tokens routed to it), :data:`WEIGHTED` (the same,
    each token weighted by its routing weight) or :data:`ALL` (every token through every expert; the
    block still outputs the routed mix). An expert routed fewer than ``min_tokens`` real calibration
    tokens is calibrated on every token instead: ``everything`` names those experts
    (``(id(experts module), index)``) for a second statistics forward, or, with ``inline`` (one
    forward holds the whole calibration set), the expert's count in that call decides at once.

    While ``counting``, each expert's real routed tokens (``token_mask``: the batch's ``[B, T]``
    padding mask) are added up in ``counts`` and written on its projections as ``routed_tokens``.
    """

    rule: str = ROUTED
    min_tokens: int = 1
    inline: bool = False
    everything: set[tuple[int, int]] = field(default_factory=set)
    counts: dict[tuple[int, int], int] = field(default_factory=dict)
    counting: bool = False
    token_mask: torch.Tensor | None = None

    def count(self, experts: nn.Module, e: int, token_idx: torch.Tensor) -> int:
        """Add expert ``e``'s real routed tokens of this call (while counting); returns its total so far."""
        key = (id(experts), e)
        if not self.counting:
            return self.counts.get(key, 0)
        real = token_idx.numel()
        if self.token_mask is not None:
            real = int(self.token_mask.reshape(-1).to(token_idx.device)[token_idx].sum())
        total = self.counts[key] = self.counts.get(key, 0) + real
        for layer in _parts(projections(experts), e):
            layer.routed_tokens = total
            if real == total:  # the block's first tokens for this expert: a new count starts
                layer.routed_saliency = 0.0
        return total

    def saliency(
        self, experts: nn.Module, e: int, token_idx: torch.Tensor, gate: torch.Tensor, y: torch.Tensor
    ) -> None:
        """Add REAP's ``Σ g·‖y‖`` of expert ``e``'s real routed tokens (``gate`` ``[n]``, outputs ``y`` ``[n, H]``)."""
        if not self.counting:
            return
        terms = gate.float() * y.float().norm(dim=-1)  # [n]
        if self.token_mask is not None:
            terms = terms * self.token_mask.reshape(-1).to(token_idx.device)[token_idx]
        value = float(terms.sum())
        for layer in _parts(projections(experts), e):
            layer.routed_saliency += value

    def on_everything(self, experts: nn.Module, e: int, routed: int) -> bool:
        """Whether expert ``e``'s statistics are gathered from every token (``routed``: its count so far)."""
        rare = self.inline and self.counting and routed < self.min_tokens
        return self.rule == ALL or (id(experts), e) in self.everything or rare


_ACTIVE: list[CalibrationRule] = []  # the rule of the innermost open routed_through_layers


def _gated(experts: Any, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The experts module's own gating of separately computed gate and up outputs (its fused layout rebuilt)."""
    concatenated = experts.is_concatenated
    fused = torch.cat([gate, up], dim=-1) if concatenated else torch.stack([gate, up], dim=-1).flatten(-2)  # [n, 2I]
    out: torch.Tensor = experts._apply_gate(fused)
    return out


def _expert_output(experts: Any, layers: dict[str, ExpertProjection], e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert ``e`` on rows ``x`` ``[n, H]`` through its projection modules (so their hooks fire) -> ``[n, H]``."""
    if experts.has_gate:
        hidden = _gated(experts, layers[f"{e}.gate_proj"](x), layers[f"{e}.up_proj"](x))  # same x: shared stats
    else:
        hidden = experts.act_fn(layers[f"{e}.up_proj"](x))
    out: torch.Tensor = layers[f"{e}.down_proj"](hidden)
    if getattr(experts, "has_post_expert_norm", False):
        out = experts.post_expert_norm(out)
    return out


def _parts(layers: dict[str, ExpertProjection], e: int) -> list[ExpertProjection]:
    """Expert ``e``'s projections."""
    return [layers[k] for k in (f"{e}.gate_proj", f"{e}.up_proj", f"{e}.down_proj") if k in layers]


def _tell(layers: dict[str, ExpertProjection], e: int, routed: Routed | None) -> None:
    for layer in _parts(layers, e):
        layer.routed = routed


def routed_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """The experts forward for calibration: each expert's projections called on its routed tokens.

    Same result as the family's own forward (``[tokens, H]``: the routing-weighted sum of each token's
    top-k experts); under an open :func:`routed_through_layers` rule, the hooks see each expert's
    rows as the rule says.
    """
    experts: Any = self
    layers = projections(self)
    rule = _ACTIVE[-1] if _ACTIVE else CalibrationRule()
    out = torch.zeros_like(hidden_states)
    tokens = hidden_states.shape[0]
    for e in range(int(experts.num_experts)):
        token_idx, top_pos = torch.where(top_k_index == e)  # the rows routed to e, and which of their k
        routed = rule.count(self, e, token_idx)
        weights = top_k_weights[token_idx, top_pos, None]  # [n, 1]
        if rule.on_everything(self, e, routed):
            _tell(layers, e, Routed(torch.arange(tokens, device=hidden_states.device)))
            y = _expert_output(experts, layers, e, hidden_states)[token_idx]
        elif token_idx.numel() == 0:
            continue
        else:
            _tell(layers, e, Routed(token_idx, weights[:, 0] if rule.rule == WEIGHTED else None))
            y = _expert_output(experts, layers, e, hidden_states[token_idx])
        _tell(layers, e, None)
        rule.saliency(self, e, token_idx, weights[:, 0], y)
        out.index_add_(0, token_idx, (y * weights).to(out.dtype))
    return out


def _register() -> None:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if IMPLEMENTATION not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, routed_forward)


def experts_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The model's experts modules by qualified name."""
    return {name: m for name, m in model.named_modules() if is_experts(m)}


@contextlib.contextmanager
def routed_through_layers(model: nn.Module, rule: CalibrationRule | None = None) -> Iterator[CalibrationRule]:
    """While open, the model's experts run :func:`routed_forward` under ``rule`` (default: routed tokens).

    The experts' configs get the implementation back on exit. A model without experts is left as it is.
    """
    rule = rule or CalibrationRule()
    configs = {id(c): c for c in (getattr(m, "config", None) for m in experts_modules(model).values()) if c is not None}
    before = {key: getattr(c, "_experts_implementation_internal", None) for key, c in configs.items()}
    if configs:
        _register()
    _ACTIVE.append(rule)
    try:
        for c in configs.values():
            c._experts_implementation_internal = IMPLEMENTATION
        yield rule
    finally:
        _ACTIVE.remove(rule)
        for key, c in configs.items():
            c._experts_implementation_internal = before[key]
