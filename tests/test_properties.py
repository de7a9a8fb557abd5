"""Property tests (hypothesis): any shape, sparsity or option text gives exact counts or one of our own errors."""

from __future__ import annotations

from typing import Any

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oneshot.config import CalibrationConfig, PruneConfig, parse_memory, parse_nm
from oneshot.errors import ConfigError
from oneshot.methods.allocation import parse_sparsity_map
from oneshot.methods.masks import nm_mask, prune_count, unstructured_mask

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def score_matrices(draw: Any, cols_multiple_of: int = 1) -> torch.Tensor:
    rows = draw(st.integers(1, 6))
    cols = draw(st.integers(1, 12)) * cols_multiple_of
    values = draw(st.lists(st.integers(0, 4), min_size=rows * cols, max_size=rows * cols))  # many ties
    return torch.tensor(values, dtype=torch.float32).reshape(rows, cols)


@SETTINGS
@given(scores=score_matrices(), sparsity=st.floats(0.0, 0.999), per_row=st.booleans())
def test_unstructured_mask_exact_count_and_lowest_removed(scores: torch.Tensor, sparsity: float, per_row: bool) -> None:
    keep = unstructured_mask(scores, sparsity, per_row=per_row)
    assert keep.shape == scores.shape and keep.dtype == torch.bool
    groups = [(scores[r], keep[r]) for r in range(scores.shape[0])] if per_row else [(scores.flatten(), keep.flatten())]
    for s, k in groups:
        removed = int((~k).sum())
        assert removed == prune_count(s.numel(), sparsity)
        if 0 < removed < s.numel():
            assert s[~k].max() <= s[k].min()  # nothing kept scores below anything removed
            ties = (s == s[~k].max()).nonzero().flatten()
            dropped = ties[~k[ties]]
            assert (dropped <= ties[k[ties]].min()).all() if k[ties].any() else True  # ties: earliest removed


@SETTINGS
@given(data=st.data(), m=st.integers(2, 8))
def test_nm_mask_keeps_exactly_n_of_every_m(data: st.DataObject, m: int) -> None:
    n = data.draw(st.integers(1, m - 1))
    scores = data.draw(score_matrices(cols_multiple_of=m))
    keep = nm_mask(scores, n, m)
    groups = keep.reshape(scores.shape[0], -1, m)
    assert (groups.sum(-1) == n).all()
    s = scores.reshape(scores.shape[0], -1, m)
    kept_min = torch.where(groups, s, torch.inf).amin(-1)
    removed_max = torch.where(~groups, s, -torch.inf).amax(-1)
    assert (removed_max <= kept_min).all()


@SETTINGS
@given(cols=st.integers(1, 40), m=st.integers(2, 8))
def test_nm_mask_refuses_a_width_m_does_not_divide(cols: int, m: int) -> None:
    scores = torch.zeros(2, cols)
    if cols % m:
        try:
            nm_mask(scores, 1, m)
        except ConfigError as exc:
            assert f"multiple of M={m}" in str(exc)
        else:
            raise AssertionError("no error")
    else:
        assert nm_mask(scores, 1, m).sum() == 2 * cols // m


@SETTINGS
@given(text=st.one_of(st.text(max_size=8), st.from_regex(r"\s*\d{1,3}\s*:\s*\d{1,3}\s*", fullmatch=True)))
def test_parse_nm_returns_a_valid_pattern_or_our_error(text: str) -> None:
    try:
        n, m = parse_nm(text)  # type: ignore[misc]
    except ConfigError:
        return
    assert 0 < n < m


@SETTINGS
@given(text=st.one_of(st.text(max_size=10), st.from_regex(r"\d{1,4}(\.\d{1,2})?\s?(GB|MB|GiB|KB|B|)", fullmatch=True)))
def test_parse_memory_returns_bytes_or_our_error(text: str) -> None:
    try:
        value = parse_memory(text)
    except ConfigError:
        return
    assert isinstance(value, int) and value >= 0


MAP_VALUES = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.integers(-2, 2), st.booleans(), st.none(), st.text(max_size=5),
    st.just("skip"),
)  # fmt: skip


@SETTINGS
@given(raw=st.one_of(st.dictionaries(st.text(max_size=6), MAP_VALUES, max_size=4), st.lists(st.integers(), max_size=2)))
def test_parse_sparsity_map_pairs_or_our_error(raw: object) -> None:
    try:
        pairs = parse_sparsity_map(raw)
    except ConfigError:
        return
    assert isinstance(raw, dict) and len(pairs) == len(raw)
    assert all(v == "skip" or (isinstance(v, float) and 0.0 <= v < 1.0) for _, v in pairs)


def _maybe(values: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A field left out (its default) most of the time, else a drawn value."""
    return st.one_of(st.just(UNSET), st.just(UNSET), st.just(UNSET), values)


UNSET = object()
BUILT: list[PruneConfig] = []


@settings(max_examples=1500, deadline=None, derandomize=True)
@given(
    method=st.sampled_from(["magnitude", "wanda", "sparsegpt", "obs", "structured", "nope"]),
    sparsity=_maybe(st.one_of(st.floats(-1, 2), st.just(float("nan")))),
    nm=_maybe(st.sampled_from(["2:4", "4:8", "1:1", "x", (2, 4)])),
    ratio=st.one_of(st.just(UNSET), st.floats(-1, 2)),
    owl=_maybe(st.booleans()),
    owl_lambda=_maybe(st.floats(0, 1)),
    block_size=_maybe(st.integers(-2, 300)),
    batch_size=_maybe(st.integers(-1, 16)),
    damp=_maybe(st.floats(-1, 1)),
    skip_layers=_maybe(st.lists(st.text(max_size=3), max_size=2)),
    calibration=_maybe(st.builds(CalibrationConfig, nsamples=st.integers(1, 8))),
)
def test_prune_config_builds_consistently_or_raises_our_error(**drawn: Any) -> None:
    fields = {k: v for k, v in drawn.items() if v is not UNSET}
    try:
        config = PruneConfig(**fields)
    except ConfigError:
        return
    BUILT.append(config)
    assert config.sparsity is not None and 0.0 <= config.sparsity < 1.0
    if config.nm is not None:
        assert abs(config.sparsity - (1 - config.nm[0] / config.nm[1])) < 1e-12
    if config.method == "structured":
        assert config.ratio is not None and 0 < config.ratio < 1 and config.nm is None and not config.owl
    assert config.block_size >= 1 and config.batch_size >= 1 and config.damp > 0
    assert PruneConfig(**fields) == config  # deterministic


def test_the_config_property_test_builds_configs_of_every_kind() -> None:
    test_prune_config_builds_consistently_or_raises_our_error()
    assert {c.method for c in BUILT} >= {"magnitude", "wanda", "sparsegpt", "obs", "structured"}
