"""Layer-wise sparsity allocation: uniform, OWL (outlier-weighted), measured sensitivity, and user maps.

OWL: Yin et al., "Outlier Weighed Layerwise Sparsity (OWL)" (ICML 2024), §3. A block's outlier
ratio D_l is the share of its Wanda scores ``|W_ij|·‖X_j‖`` above M times their mean; blocks with
more outliers are pruned less. As in the published code (``luuyin/OWL``, ``lib/prune_all.py``), D is
mapped linearly onto sparsities spanning exactly 2λ; the code centres them on the plain mean, here
on the **parameter-weighted** mean (the same when blocks have equal size, as in every dense
decoder), so a model whose blocks differ in size still hits the target over all its weights.

Sensitivity: each block's relative output error measured at a few probe sparsities, interpolated
linearly; the per-block sparsities minimise the summed error at the parameter-weighted target
(:func:`sensitivity_sparsities`).
"""

from __future__ import annotations

import bisect
import fnmatch
from collections.abc import Mapping, Sequence

import torch

from oneshot.errors import ConfigError

#: A sparsity map value: a sparsity in [0, 1) or "skip" (leave the layer dense).
MapValue = float | str


def uniform(names: Sequence[str], sparsity: float) -> dict[str, float | None]:
    """Every layer gets ``sparsity``."""
    return dict.fromkeys(names, sparsity)


def outlier_ratio(scores: torch.Tensor, m: float) -> float:
    """Share of ``scores`` strictly greater than ``m`` times their mean (OWL's D_l)."""
    flat = scores.flatten().float()
    return float((flat > m * flat.mean()).sum()) / max(flat.numel(), 1)


def owl_sparsities(ratios: Sequence[float], params: Sequence[int], target: float, lam: float) -> list[float]:
    """Per-block sparsities from outlier ratios D_l (OWL's published mapping).

    ``s_l = target − 2λ · (t_l − Σ_k w_k t_k)`` with ``t = (D − min D) / (max D − min D)`` and ``w``
    the blocks' shares of the parameters: sparsity falls linearly with D_l, the values span exactly
    ``2λ`` (the block with the most outliers ``2λ`` below the one with the fewest) and their
    parameter-weighted mean is ``target``. Equal ratios give uniform sparsity. A value outside
    [0, 1) is refused with the fix (a smaller λ).
    """
    if len(ratios) != len(params) or not ratios:
        raise ValueError("need one outlier ratio and one parameter count per block")
    d = torch.tensor(ratios, dtype=torch.float64)
    w = torch.tensor(params, dtype=torch.float64)
    w = w / w.sum()
    spread = d.max() - d.min()
    if float(spread) == 0.0 or lam == 0.0:
        return [target] * len(ratios)
    t = (d - d.min()) / spread  # [0, 1]: 1 = most outliers
    sparsity = target - 2 * lam * (t - (w * t).sum())  # spans 2λ, weighted mean = target
    low, high = float(sparsity.min()), float(sparsity.max())
    if low < 0.0 or high >= 1.0:
        raise ConfigError(
            f"OWL's block sparsities would span {low:.3f}-{high:.3f} (2λ = {2 * lam:g} around --sparsity {target:g}), "
            "outside [0, 1): use a smaller --owl-lambda"
        )
    return [float(s) for s in sparsity]


#: The highest sparsity a sensitivity probe measures (a block pruned further is all but empty).
MAX_PROBE = 0.99


def probe_sparsities(target: float, lam: float, count: int = 5) -> list[float]:
    """``count`` evenly spaced sparsities over ``[target − lam, target + lam]`` (inside [0, MAX_PROBE])."""
    lo, hi = max(0.0, target - lam), min(MAX_PROBE, target + lam)
    return [lo + (hi - lo) * k / (count - 1) for k in range(count)]


def sensitivity_sparsities(
    errors: Sequence[Sequence[float]],
    probes: Sequence[float],
    params: Sequence[int],
    target: float,
    step: float = 0.0025,
) -> list[float]:
    """Per-block sparsities minimising ``Σ_b e_b(s_b)`` subject to ``Σ_b n_b s_b = target · Σ_b n_b``.

    ``errors[b][k]`` is block b's output error at ``probes[k]`` (ascending); ``e_b`` interpolates
    them linearly and each ``s_b`` stays inside the probed range. Greedy: every block starts at the
    lowest probe and the sparsity budget is handed out in ``step`` increments, each to the block whose
    error grows least per pruned parameter (optimal when the curves are convex); the last increment
    is cut so the weighted mean equals ``target`` exactly.
    """
    if len(errors) != len(params) or not errors or any(len(e) != len(probes) for e in errors):
        raise ValueError("need one error per probe sparsity and one parameter count per block")
    lo, hi = probes[0], probes[-1]
    if not lo <= target <= hi:
        raise ValueError(f"target {target} outside the probed range [{lo}, {hi}]")

    def error(b: int, s: float) -> float:
        k = min(max(bisect.bisect_left(probes, s), 1), len(probes) - 1)
        t = (s - probes[k - 1]) / max(probes[k] - probes[k - 1], 1e-12)
        return errors[b][k - 1] + t * (errors[b][k] - errors[b][k - 1])

    sparsity = [lo] * len(errors)
    budget = (target - lo) * sum(params)  # parameters still to prune
    while budget > 1e-9:
        best, cost = -1, float("inf")
        for b, s in enumerate(sparsity):
            if s >= hi - 1e-12:
                continue
            up = min(step, hi - s)
            per_param = (error(b, s + up) - error(b, s)) / (up * params[b])
            if per_param < cost:
                best, cost = b, per_param
        up = min(step, hi - sparsity[best], budget / params[best])
        sparsity[best] += up
        budget -= up * params[best]
    return sparsity


def apply_sparsity_map(
    sparsities: Mapping[str, float | None], mapping: Sequence[tuple[str, MapValue]]
) -> dict[str, float | None]:
    """Override per-layer sparsities with ``(glob, value)`` entries, later entries winning.

    ``value`` is a sparsity in [0, 1) or ``"skip"`` (None in the result: leave dense). A glob that
    matches no layer is an error, since it is almost always a typo.
    """
    result = dict(sparsities)
    for pattern, value in mapping:
        hits = [name for name in result if fnmatch.fnmatchcase(name, pattern)]
        if not hits:
            example = next(iter(result), "model.layers.0.mlp.down_proj")
            raise ConfigError(
                f"sparsity map entry {pattern!r} matches no prunable layer; layer names look like {example!r} "
                "(globs: * and ?)"
            )
        for name in hits:
            result[name] = None if value == "skip" else float(value)
    return result


def parse_sparsity_map(raw: object, source: str = "sparsity map") -> tuple[tuple[str, MapValue], ...]:
    """Validate a mapping ``{glob: sparsity | "skip"}`` (from JSON/YAML or Python) into ordered pairs."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f'{source} must be a mapping of layer-name globs to a sparsity or "skip"')
    pairs: list[tuple[str, MapValue]] = []
    for key, value in raw.items():
        if value == "skip":
            pairs.append((str(key), "skip"))
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
            raise ConfigError(f'{source}: value for {key!r} must be a sparsity in [0, 1) or "skip" (got {value!r})')
        pairs.append((str(key), float(value)))
    return tuple(pairs)
