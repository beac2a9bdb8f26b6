"""Memory tiers: where a task sits by the accelerator memory it needs (best fit).

Tiers. A task needs some accelerator memory (the reconciler's estimate); it sits in the
smallest tier whose ceiling holds it (`tier_for`). A worker offering M bytes may take any
tier whose ceiling is <= M, and looks at them from the largest down (`tiers_for`): a big
GPU takes the big work first and only then helps with small work, while a small GPU never
sees work that does not fit it. Ceilings are in decimal GB, as GPUs are sold: every card
reports a little more than its label in bytes (a "24 GB" card has 24 GiB = 25.8e9 bytes,
an H100 "80 GB" 85.5e9), so each lands in its own tier. The smallest tier, "cpu" (up to
2 GB), holds tiny models that any machine can train; it is the only tier a worker without
a GPU takes (it offers its RAM as memory, and would otherwise grab GPU-sized work and
train it a hundred times slower than the GPU that fits it).
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 1_000_000_000


@dataclass(frozen=True)
class Tier:
    name: str
    ceiling_bytes: int


TIERS: tuple[Tier, ...] = (
    Tier("cpu", 2 * GB),
    Tier("8g", 8 * GB),
    Tier("16g", 16 * GB),
    Tier("24g", 24 * GB),
    Tier("40g", 40 * GB),
    Tier("80g", 80 * GB),
    Tier("141g", 141 * GB),
)
TIER_NAMES: tuple[str, ...] = tuple(t.name for t in TIERS)
CPU_TIER = "cpu"


def tier_for(memory_bytes: int) -> str:
    """The tier of a task needing `memory_bytes`: the smallest whose ceiling holds it."""
    if memory_bytes < 0:
        raise ValueError(f"a memory requirement is >= 0 bytes, got {memory_bytes}")
    for tier in TIERS:
        if memory_bytes <= tier.ceiling_bytes:
            return tier.name
    largest = TIERS[-1]
    raise ValueError(
        f"a task needing {memory_bytes / GB:.1f} GB fits no tier (the largest, "
        f"{largest.name}, holds {largest.ceiling_bytes / GB:.0f} GB): lower the sequence "
        "length, batch size or rank, or quantize the base model"
    )


def tiers_for(memory_bytes: int, gpu: bool = True) -> list[str]:
    """The tiers a worker offering `memory_bytes` may take, largest first (a worker without
    a GPU: the cpu tier only)."""
    fitting = [t.name for t in reversed(TIERS) if t.ceiling_bytes <= memory_bytes]
    return fitting if gpu else [t for t in fitting if t == CPU_TIER]
