"""The factored delta statistics equal the dense float64 computation (hypothesis: random
shapes, ranks and adapter counts), and adapters of different layouts are refused."""

from __future__ import annotations

import numpy as np
import pytest
from cotune.orchestrator.verify.deltas import (
    change_cosine,
    change_gram,
    change_norm,
    cosines,
    distances,
    product_gram,
)
from cotune.orchestrator.verify.expected import AdapterFactors, Factors
from cotune.orchestrator.verify.issues import VerifyError
from hypothesis import given, settings
from hypothesis import strategies as st

Shapes = dict[str, tuple[int, int]]


def _adapter(rng: np.random.Generator, shapes: Shapes, rank: int) -> AdapterFactors:
    return {
        module: Factors(
            a=rng.standard_normal((rank, d_in)).astype(np.float32),
            b=rng.standard_normal((d_out, rank)).astype(np.float32),
        )
        for module, (d_out, d_in) in shapes.items()
    }


def _dense(adapter: AdapterFactors | None, shapes: Shapes) -> np.ndarray:
    """Every module's B @ A in float64, flattened and concatenated (the oracle)."""
    if adapter is None:
        return np.zeros(sum(d_out * d_in for d_out, d_in in shapes.values()))
    return np.concatenate(
        [
            (adapter[m].b.astype(np.float64) @ adapter[m].a.astype(np.float64)).ravel()
            for m in shapes
        ]
    )


layouts = st.dictionaries(
    st.sampled_from(["q_proj", "k_proj", "down_proj"]),
    st.tuples(st.integers(1, 12), st.integers(1, 12)),
    min_size=1,
)


@settings(max_examples=60, deadline=None)
@given(
    shapes=layouts,
    ranks=st.lists(st.integers(1, 5), min_size=1, max_size=4),
    with_start=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_factored_statistics_equal_the_dense_ones(
    shapes: Shapes, ranks: list[int], with_start: bool, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    uploads = [_adapter(rng, shapes, r) for r in ranks]  # ranks may differ between adapters
    start = _adapter(rng, shapes, 2) if with_start else None

    dense = np.stack([_dense(u, shapes) for u in uploads])
    scale = float(np.abs(dense).max()) ** 2 * dense.shape[1]
    np.testing.assert_allclose(product_gram(uploads), dense @ dense.T, rtol=1e-9, atol=1e-9 * scale)

    changes = dense - _dense(start, shapes)
    oracle = changes @ changes.T
    gram = change_gram(uploads, start)
    np.testing.assert_allclose(gram, oracle, rtol=1e-9, atol=1e-9 * scale)
    norm = np.linalg.norm(changes[0])
    assert change_norm(uploads[0], start) == pytest.approx(norm, rel=1e-9, abs=1e-9)
    np.testing.assert_allclose(
        distances(gram), np.linalg.norm(changes[:, None] - changes[None], axis=2), atol=1e-6
    )
    if len(uploads) >= 2:
        cos = changes[0] @ changes[1] / (norm * np.linalg.norm(changes[1]))
        assert change_cosine(uploads[0], uploads[1], start) == pytest.approx(cos, abs=1e-9)


def test_none_is_a_zero_adapter_and_a_zero_change_has_no_direction() -> None:
    rng = np.random.default_rng(0)
    shapes = {"m": (6, 5)}
    adapter = _adapter(rng, shapes, 2)
    gram = product_gram([None, adapter, None])
    assert gram[0].tolist() == [0.0, 0.0, 0.0] and gram[2].tolist() == [0.0, 0.0, 0.0]
    assert change_norm(adapter, adapter) == pytest.approx(0.0, abs=1e-6)
    assert cosines(change_gram([adapter, adapter], adapter)).tolist() == [[0.0, 0.0], [0.0, 0.0]]


def test_different_layouts_are_refused_by_name() -> None:
    rng = np.random.default_rng(0)
    first = _adapter(rng, {"m": (6, 5)}, 2)
    with pytest.raises(VerifyError, match="module m is 6 x 4"):
        product_gram([first, _adapter(rng, {"m": (6, 4)}, 2)])
    with pytest.raises(VerifyError, match="other modules"):
        product_gram([first, _adapter(rng, {"n": (6, 5)}, 2)])
    broken = {"m": Factors(a=np.zeros((2, 5), np.float32), b=np.zeros((6, 3), np.float32))}
    with pytest.raises(VerifyError, match="not a LoRA pair"):
        product_gram([first, broken])


def test_a_large_module_never_needs_a_dense_matrix() -> None:
    """A 20000 x 20000 delta (3.2 GB in float64) at rank 8: the Gram is exact and cheap."""
    rng = np.random.default_rng(1)
    d = 20_000
    a = rng.standard_normal((8, d)).astype(np.float32)
    b = rng.standard_normal((d, 8)).astype(np.float32)
    x = {"m": Factors(a=a, b=b)}
    y = {"m": Factors(a=a, b=2 * b)}
    assert change_norm(y, x) == pytest.approx(change_norm(x, None), rel=1e-9)
    assert change_cosine(x, y, None) == pytest.approx(1.0, abs=1e-12)
