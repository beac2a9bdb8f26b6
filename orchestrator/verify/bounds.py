"""How far honest training can move each factor of an adapter: a bound from the optimizer, the
task's learning-rate schedule and its step count, checked value by value.

Every optimizer the spec allows is AdamW (torch's, or bitsandbytes' 8-bit ones) with the
Trainer's betas (0.9, 0.999). One AdamW step moves a parameter by lr_t x m_hat/(sqrt(v_hat) +
eps) plus the decoupled weight decay lr_t x wd x |p|. Whatever the gradients, by
Cauchy-Schwarz over the moments' weights,

    |m_hat_t / sqrt(v_hat_t)| <= S_t = (1 - b1)/(1 - b1^t) x sqrt((1 - b2^t)/(1 - b2))
                                       x sqrt(sum_{k<t} (b1^2/b2)^k)

(S_1 = 1; S_t stays near 1 for the first tens of steps and tends to 7.3), so after n steps no
value is further from its start than

    bound = sum_t lr_t x S_t  +  wd x sum_t lr_t x (max |start| + bound)

with lr_t the task's schedule (warmup, then linear, cosine, ... as transformers computes it:
tests/unit/verify/test_bounds.py holds `schedule` to transformers' own). This is a hard limit,
not a statistic: an honest run cannot exceed it, and it needs no peers, so it holds with one
shard as with a hundred. What it catches: a delta scaled up (x10 moves B ten times further
than training can), random factors (N(0, 1), or "camouflaged" at a trained adapter's norm:
a B of 0.01 is still ~20x what 8 steps at 2e-4 can reach), a start from another adapter.

The start values: after round 0, the round's start adapter (the coordinator's merge, which the
worker loads as it is); in round 0 a fresh PEFT init, B = 0 and A from kaiming_uniform(a=sqrt
5), |A| <= 1/sqrt(d_in). Stored values are rounded to their dtype (bf16: 8 bits of mantissa),
so each value may also be off by ROUNDING x its size.

bitsandbytes' 8-bit AdamW keeps m and v quantized (blockwise, for tensors over 4096 values),
so its m/sqrt(v) is not bound exactly by S_t: its reach is taken EIGHT_BIT_SLACK times larger.
That factor is a margin, not a measurement: the GPU path has not been measured yet.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from cotune.orchestrator.verify.expected import AdapterFactors
from cotune.orchestrator.verify.issues import VerifyError

BETA1, BETA2 = 0.9, 0.999  # the Trainer's AdamW defaults; the worker does not change them
#: Relative slack per value: bf16's rounding (2^-8) of the stored and of the start value, and
#: float32 sums.
ROUNDING = 2.0**-7
#: The 8-bit optimizers' margin over the exact AdamW bound (module docstring).
EIGHT_BIT_SLACK = 2.0
EIGHT_BIT = ("paged_adamw_8bit", "adamw_8bit")
#: transformers' polynomial schedule's defaults (lr_end 1e-7, power 1).
POLY_END, POLY_POWER = 1e-7, 1.0


def adam_ratio_bound(step: int) -> float:
    """S_t of the module docstring: the most |m_hat / sqrt(v_hat)| can be at step t >= 1."""
    if step < 1:
        raise VerifyError(f"steps count from 1, got {step}")
    q = BETA1**2 / BETA2
    geometric = (1 - q**step) / (1 - q)
    return (1 - BETA1) / (1 - BETA1**step) * math.sqrt((1 - BETA2**step) / (1 - BETA2) * geometric)


def schedule(name: str, step: int, steps: int, warmup: int) -> float:
    """The learning-rate multiplier at optimizer step index `step` (0-based, as the Trainer's
    scheduler sees it) of a run of `steps` steps with `warmup` warmup steps; transformers'
    formulas for each `TrainTask.lr_scheduler` (an unknown name: 1, the peak)."""
    if name == "constant":
        return 1.0
    if step < warmup:
        return step / max(1, warmup)
    if name == "constant_with_warmup":
        return 1.0
    if name == "linear":
        return max(0.0, (steps - step) / max(1, steps - warmup))
    if name == "cosine":
        progress = (step - warmup) / max(1, steps - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    if name == "polynomial":
        if step > steps:
            return POLY_END
        remaining = 1 - (step - warmup) / max(1, steps - warmup)
        return (1 - POLY_END) * remaining**POLY_POWER + POLY_END
    if name == "inverse_sqrt":
        timescale = warmup or 10_000
        return 1.0 / math.sqrt((step + timescale - warmup) / timescale)
    return 1.0


@dataclass(frozen=True)
class StepBudget:
    """What the optimizer could do in one task: its peak lr, schedule, steps, weight decay."""

    learning_rate: float
    lr_scheduler: str
    steps: int
    warmup_steps: int | None = None
    warmup_ratio: float | None = None
    weight_decay: float = 0.0
    optimizer: str = "adamw_torch"

    def warmup(self) -> int:
        """The warmup in steps; a ratio rounds down (a shorter warmup only raises the bound)."""
        if self.warmup_ratio is not None:
            return math.floor(self.warmup_ratio * self.steps)
        return self.warmup_steps or 0

    def lr_sums(self) -> tuple[float, float]:
        """(sum_t lr_t x S_t, sum_t lr_t) over the task's steps."""
        warmup = self.warmup()
        adam = plain = 0.0
        for t in range(self.steps):
            lr = self.learning_rate * schedule(self.lr_scheduler, t, self.steps, warmup)
            adam += lr * adam_ratio_bound(t + 1)
            plain += lr
        return adam, plain

    def reach(self, start_max: float) -> float:
        """The most any value can move from a start whose largest |value| is `start_max`."""
        adam, plain = self.lr_sums()
        if self.optimizer in EIGHT_BIT:
            adam *= EIGHT_BIT_SLACK
        decay = self.weight_decay * plain
        # |p| <= start_max + bound along the way: bound = adam + decay x (start_max + bound).
        if decay >= 1:
            return math.inf
        return (adam + decay * start_max) / (1 - decay)


@dataclass(frozen=True)
class Overreach:
    """The factor that moved furthest past what training allows."""

    key: str
    moved: float
    allowed: float

    @property
    def message(self) -> str:
        return (
            f"{self.key}: moved {self.moved:.3g} from its start, but {self.allowed:.3g} is the "
            f"most the task's optimizer steps can move a value (a scaled-up or random upload)"
        )


def overreach(
    upload: AdapterFactors, start: AdapterFactors | None, budget: StepBudget
) -> Overreach | None:
    """The factor of `upload` furthest beyond `budget`'s reach from `start` (None: a fresh
    PEFT init), or None when every value is within it. Modules must match (VerifyError)."""
    worst: Overreach | None = None
    worst_ratio = 1.0
    for key, moved, allowed in _moves(upload, start, budget):
        if moved > allowed and moved / allowed > worst_ratio:
            worst, worst_ratio = Overreach(key, moved, allowed), moved / allowed
    return worst


def _moves(
    upload: AdapterFactors, start: AdapterFactors | None, budget: StepBudget
) -> Iterator[tuple[str, float, float]]:
    """(factor, the most any of its values moved beyond rounding, what training allows)."""
    if start is not None and sorted(start) != sorted(upload):
        raise VerifyError("the upload and its start adapt other modules")
    for module, pair in sorted(upload.items()):
        for part, now in (("A", pair.a), ("B", pair.b)):
            values = now.astype(np.float64)
            if start is not None:
                was = (start[module].a if part == "A" else start[module].b).astype(np.float64)
                if was.shape != values.shape:
                    raise VerifyError(f"{module}.lora_{part}: shape differs from the start's")
                slack = ROUNDING * (np.abs(was) + np.abs(values))
                moved = float(np.max(np.abs(values - was) - slack, initial=0.0))
                start_max = float(np.max(np.abs(was), initial=0.0))
            elif part == "B":  # a fresh init's B is zero
                moved = float(np.max(np.abs(values) * (1 - ROUNDING), initial=0.0))
                start_max = 0.0
            else:  # kaiming_uniform(a=sqrt(5)): |A| <= 1/sqrt(d_in); how far it moved is unknown
                start_max = 1.0 / math.sqrt(values.shape[1])
                moved = float(np.max(np.abs(values) * (1 - ROUNDING), initial=0.0)) - start_max
            allowed = budget.reach(start_max)
            yield f"{module}.lora_{part}", max(moved, 0.0), allowed
