"""Property tests of the merge math against dense float64 oracles (hypothesis: random shapes,
ranks, scales and weights)."""

from __future__ import annotations

import math

import pytest
import torch
from cotune.orchestrator.merge.base import LoraFactors
from cotune.orchestrator.merge.factored import (
    DROP_RELATIVE,
    average_factors,
    compress_dense,
    concat_factors,
    pad_rank,
    stack_factors,
    truncated_svd_factored,
    weighted_delta,
)
from cotune.orchestrator.merge.registry import make_strategy
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.merge.conftest import random_factors

SETTINGS = settings(max_examples=150, deadline=None)


@st.composite
def merge_cases(draw: st.DrawFn) -> tuple[list[LoraFactors], list[float], int]:
    """K random LoRA pairs (ranks may differ, R may exceed the dimensions), weights, out rank."""
    k = draw(st.integers(1, 5))
    d_out = draw(st.integers(1, 48))
    d_in = draw(st.integers(1, 48))
    ranks = draw(st.lists(st.integers(1, 12), min_size=k, max_size=k))
    scales = draw(st.lists(st.floats(0.05, 8.0), min_size=k, max_size=k))
    raw = draw(st.lists(st.floats(0.0, 10.0), min_size=k, max_size=k).filter(lambda w: sum(w) > 0))
    weights = [w / sum(raw) for w in raw]
    rank = draw(st.integers(1, 24))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    return random_factors(generator, d_out, d_in, ranks, scales), weights, rank


def _f64(factors: list[LoraFactors]) -> list[LoraFactors]:
    return [LoraFactors(a=f.a.double(), b=f.b.double(), scale=f.scale) for f in factors]


def _rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x.double() - y.double()).norm() / y.double().norm().clamp_min(1e-300))


@SETTINGS
@given(merge_cases())
def test_svd_is_the_truncated_svd_of_the_dense_weighted_delta(
    case: tuple[list[LoraFactors], list[float], int],
) -> None:
    factors, weights, rank = case
    dense = weighted_delta(_f64(factors), weights)  # float64 oracle
    u, s, vh = torch.linalg.svd(dense, full_matrices=False)
    k = min(rank, s.shape[0])
    oracle = (u[:, :k] * s[:k]) @ vh[:k]

    merged = make_strategy("svd", rank=rank).merge(factors, weights, rank=rank, module="m")
    ours = merged.b.double() @ merged.a.double()

    assert merged.a.dtype == torch.float32 and merged.a.shape[0] <= rank
    # Eckart-Young, the defining property: our residual is the optimal one. It holds even where
    # the rank-r truncation is not unique (sigma_r == sigma_r+1).
    optimal = float(s[k:].square().sum().sqrt())
    residual = float((dense - ours).norm())
    assert residual <= optimal + 1e-5 * float(dense.norm())
    # And where the truncation is well defined, it is THE truncated SVD. The float64 Gram
    # square roots resolve directions to ~sqrt(eps64) = 1e-8 of sigma_1, so a gap g at r moves
    # the top-r subspace by about 1e-8 * sigma_1 / g: a gap of 1e-3 * sigma_1 keeps it < 1e-5.
    gap = float(s[k - 1] - s[k]) if k < s.shape[0] else math.inf
    if gap > 1e-3 * float(s[0]):
        assert _rel(ours, oracle) <= 1e-5


@SETTINGS
@given(merge_cases())
def test_cat_is_exactly_the_weighted_sum(case: tuple[list[LoraFactors], list[float], int]) -> None:
    factors, weights, _ = case
    merged = make_strategy("cat").merge(factors, weights, rank=0, module="m")
    assert merged.a.shape[0] == sum(f.rank for f in factors)
    assert _rel(merged.b @ merged.a, weighted_delta(_f64(factors), weights)) <= 1e-6


@SETTINGS
@given(merge_cases())
def test_factored_svd_in_float64_is_exact(
    case: tuple[list[LoraFactors], list[float], int],
) -> None:
    # With rank >= R nothing is truncated: the factored path returns the delta itself, less
    # only the components under DROP_RELATIVE * sigma_1 that it leaves out on purpose.
    factors, weights, _ = case
    f64 = _f64(factors)
    total = sum(f.rank for f in factors)
    merged = truncated_svd_factored(*stack_factors(f64, weights), total)
    bound = DROP_RELATIVE * math.sqrt(total) + 1e-10
    assert _rel(merged.b @ merged.a, weighted_delta(f64, weights)) <= bound


@SETTINGS
@given(merge_cases())
def test_linear_is_the_product_of_the_weighted_factor_means(
    case: tuple[list[LoraFactors], list[float], int],
) -> None:
    factors, weights, _ = case
    same = [LoraFactors(a=f.a[:1], b=f.b[:, :1], scale=f.scale) for f in factors]
    merged = average_factors(same, weights)
    a = sum(w * math.sqrt(f.scale) * f.a for f, w in zip(same, weights, strict=True))
    b = sum(w * math.sqrt(f.scale) * f.b for f, w in zip(same, weights, strict=True))
    assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
    assert torch.allclose(merged.a, a, rtol=1e-5, atol=1e-6)
    assert torch.allclose(merged.b, b, rtol=1e-5, atol=1e-6)


def _degenerate_cases() -> dict[str, tuple[list[LoraFactors], list[float]]]:
    generator = torch.Generator().manual_seed(11)
    one, two = random_factors(generator, 30, 20, [4, 6], [2.0, 0.5])
    zero_b = LoraFactors(a=two.a, b=torch.zeros_like(two.b), scale=2.0)  # PEFT's fresh init
    tiny = LoraFactors(a=one.a, b=one.b * 1e-6, scale=1.0)
    return {
        "identical adapters": ([one, one, one], [0.2, 0.3, 0.5]),
        "a zero-B adapter": ([zero_b, one], [0.5, 0.5]),
        "all zero": ([zero_b, zero_b], [0.5, 0.5]),
        "scales 1e-6 apart": ([tiny, two], [0.5, 0.5]),
        "rank above the dimensions": (
            random_factors(generator, 5, 3, [4, 4], [1.0, 1.0]),
            [0.5, 0.5],
        ),
    }


@pytest.mark.parametrize("name", list(_degenerate_cases()))
def test_svd_handles_degenerate_stacks(name: str) -> None:
    factors, weights = _degenerate_cases()[name]
    dense = weighted_delta(_f64(factors), weights)
    s = torch.linalg.svdvals(dense)
    for rank in (1, 3, 4, 20):
        merged = make_strategy("svd").merge(factors, weights, rank=rank, module="m")
        ours = merged.b.double() @ merged.a.double()
        assert torch.isfinite(ours).all()
        optimal = float(s[rank:].norm())
        assert float((dense - ours).norm()) <= optimal + 1e-6 * float(dense.norm()) + 1e-30


def test_linear_is_not_the_mean_delta_but_identical_inputs_merge_to_themselves() -> None:
    generator = torch.Generator().manual_seed(0)
    one, two = random_factors(generator, 12, 10, [3, 3], [2.0, 2.0])
    merged = average_factors([one, two], [0.5, 0.5])
    assert _rel(merged.b @ merged.a, weighted_delta([one, two], [0.5, 0.5])) > 0.1
    same = average_factors([one, one], [0.25, 0.75])
    assert _rel(same.b @ same.a, weighted_delta([one], [1.0])) <= 1e-6


def test_cat_keeps_negative_scales_exact() -> None:
    generator = torch.Generator().manual_seed(1)
    factors = random_factors(generator, 9, 7, [2, 3], [-1.5, 0.5])
    merged = concat_factors(factors, [0.4, 0.6])
    assert _rel(merged.b @ merged.a, weighted_delta(factors, [0.4, 0.6])) <= 1e-6


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 40), st.integers(2, 40), st.integers(1, 8), st.integers(0, 2**31))
def test_compress_dense_exact_path_is_the_truncated_svd(
    d_out: int, d_in: int, rank: int, seed: int
) -> None:
    generator = torch.Generator().manual_seed(seed)
    dense = torch.randn(d_out, d_in, generator=generator, dtype=torch.float64)
    merged, exact = compress_dense(dense, rank)
    s = torch.linalg.svdvals(dense)
    k = min(rank, *dense.shape)
    assert exact
    assert float((dense - merged.b @ merged.a).norm()) <= float(s[k:].norm()) * (1 + 1e-9) + 1e-9


def test_compress_dense_randomized_path_is_close_to_optimal_and_seeded() -> None:
    # Above EXACT_DENSE_SVD_LIMIT the re-compression is randomized: near-optimal, not exact.
    generator = torch.Generator().manual_seed(3)
    low = torch.randn(1100, 24, generator=generator) @ torch.randn(24, 1030, generator=generator)
    dense = low + 0.01 * torch.randn(1100, 1030, generator=generator)
    first, exact = compress_dense(dense, 24, generator_seed=5)
    again, _ = compress_dense(dense, 24, generator_seed=5)
    s = torch.linalg.svdvals(dense.double())
    optimal = float(s[24:].norm())
    residual = float((dense.double() - first.b.double() @ first.a.double()).norm())
    assert not exact
    assert residual <= 1.01 * optimal
    assert torch.equal(first.a, again.a)


def test_pad_rank_adds_zero_components_that_change_nothing() -> None:
    generator = torch.Generator().manual_seed(2)
    (f,) = random_factors(generator, 5, 4, [2], [1.0])
    merged = concat_factors([f], [1.0])
    padded = pad_rank(merged, 6)
    assert padded.a.shape == (6, 4) and padded.b.shape == (5, 6)
    assert torch.equal(padded.b @ padded.a, merged.b @ merged.a)
    with pytest.raises(ValueError, match="more than the output rank"):
        pad_rank(merged, 1)
