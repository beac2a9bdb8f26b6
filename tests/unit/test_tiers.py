"""Memory tiers: a task sits in the smallest tier that holds it; a worker takes tiers it can
hold, largest first; sold GPUs land in their own tier."""

from __future__ import annotations

import pytest
from cotune.orchestrator.control.tiers import GB, TIER_NAMES, tier_for, tiers_for

GIB = 1 << 30


@pytest.mark.parametrize(
    ("need", "tier"),
    [(0, "cpu"), (2 * GB, "cpu"), (2 * GB + 1, "8g"), (15 * GB, "16g"), (24 * GB, "24g"),
     (70 * GB, "80g"), (141 * GB, "141g")],
)  # fmt: skip
def test_a_task_sits_in_the_smallest_tier_that_holds_it(need: int, tier: str) -> None:
    assert tier_for(need) == tier


def test_too_much_or_negative_memory_is_refused_with_advice() -> None:
    with pytest.raises(ValueError, match=r"fits no tier.*lower the sequence length"):
        tier_for(200 * GB)
    with pytest.raises(ValueError, match=">= 0"):
        tier_for(-1)


@pytest.mark.parametrize(
    ("card", "reported_bytes", "largest"),
    [
        ("RTX 3070 8 GB", 8192 * 2**20, "8g"),
        ("T4 16 GB", 15360 * 2**20, "16g"),
        ("RTX 4090 24 GB", 24564 * 2**20, "24g"),
        ("L4 24 GB", 23034 * 2**20, "24g"),
        ("A100 40 GB", 40960 * 2**20, "40g"),
        ("H100 80 GB", 81559 * 2**20, "80g"),
        ("H200 141 GB", 143771 * 2**20, "141g"),
    ],
)
def test_sold_cards_reach_their_own_tier(card: str, reported_bytes: int, largest: str) -> None:
    assert tiers_for(reported_bytes)[0] == largest, card


def test_a_worker_looks_at_tiers_largest_first() -> None:
    assert tiers_for(24 * GIB) == ["24g", "16g", "8g", "cpu"]
    assert tiers_for(1 * GB) == []
    assert tiers_for(10**15) == list(reversed(TIER_NAMES))


def test_a_worker_without_a_gpu_takes_the_cpu_tier_only() -> None:
    assert tiers_for(64 * GB, gpu=False) == ["cpu"]
    assert tiers_for(1 * GB, gpu=False) == []
