"""One table of merge methods: the registry builds every method the spec accepts, and the
option checks name the option."""

from __future__ import annotations

from typing import get_args

import pytest
from cotune.orchestrator.merge.base import MergeError
from cotune.orchestrator.merge.registry import DEFAULT_METHOD, REGISTRY, make_strategy
from cotune.orchestrator.protocol.spec.sections import MergeMethod, MergeSpec


def test_the_spec_and_the_registry_name_the_same_methods() -> None:
    assert set(get_args(MergeMethod)) == set(REGISTRY)
    assert MergeSpec().method == DEFAULT_METHOD


@pytest.mark.parametrize("method", sorted(REGISTRY))
def test_every_method_builds_a_strategy(method: str) -> None:
    entry = REGISTRY[method]
    strategy = make_strategy(
        method, rank=4 if entry.takes_rank else None, density=0.5 if entry.takes_density else None
    )
    assert strategy.name == method


@pytest.mark.parametrize(
    ("method", "options", "named"),
    [
        ("nope", {}, "--method"),
        ("cat", {"rank": 4}, "--rank"),
        ("svd", {"density": 0.5}, "--density"),
        ("ties", {"density": 1.5}, "--density"),
        ("svd", {"rank": 0}, "--rank"),
    ],
)
def test_bad_options_name_the_option(method: str, options: dict, named: str) -> None:
    with pytest.raises(MergeError, match=named):
        make_strategy(method, **options)
