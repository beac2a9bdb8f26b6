"""verify/bounds.py: the schedule matches transformers', honest AdamW training of the tiny model
stays within the bound (and comes close to it), and scaled or random factors do not."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from cotune.orchestrator.verify.bounds import (
    StepBudget,
    adam_ratio_bound,
    overreach,
    schedule,
)
from cotune.orchestrator.verify.expected import AdapterFactors, Factors

from tests.unit.verify.conftest import PEFT_SETTINGS, tiny_task

SCHEDULES = ("linear", "cosine", "constant", "constant_with_warmup", "polynomial", "inverse_sqrt")


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize(("steps", "warmup"), [(8, 0), (8, 3), (50, 10), (1, 0)])
def test_schedule_is_transformers_own(name: str, steps: int, warmup: int) -> None:
    torch = pytest.importorskip("torch", reason="transformers' schedules need torch")
    from transformers import get_scheduler

    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=steps)
    theirs = []
    for _ in range(steps):
        theirs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    ours = [schedule(name, t, steps, warmup) for t in range(steps)]
    assert ours == pytest.approx(theirs, rel=1e-9, abs=1e-12)


def test_the_ratio_bound_is_adams_worst_case() -> None:
    """S_1 = 1 (the first step is lr x sign(g)), and S_t is attained by the gradients that
    Cauchy-Schwarz names: none larger exists."""
    assert adam_ratio_bound(1) == pytest.approx(1.0)
    assert 7.0 < adam_ratio_bound(100_000) < 7.3
    rng = np.random.default_rng(0)
    for t in (2, 8, 40):
        worst = 0.0
        for _ in range(2000):
            g = rng.standard_normal(t) * rng.uniform(0, 3, t) ** 4
            m = sum(0.1 * 0.9 ** (t - 1 - i) * g[i] for i in range(t)) / (1 - 0.9**t)
            v = sum(0.001 * 0.999 ** (t - 1 - i) * g[i] ** 2 for i in range(t)) / (1 - 0.999**t)
            worst = max(worst, abs(m) / math.sqrt(v))
        assert worst <= adam_ratio_bound(t) * (1 + 1e-9), (t, worst)
        assert worst > 0.5 * adam_ratio_bound(t)


def _factors(model: object) -> AdapterFactors:
    params = dict(model.named_parameters())  # type: ignore[attr-defined]
    out = {}
    for key, value in params.items():
        if key.endswith("lora_A.default.weight"):
            module = key.removesuffix(".lora_A.default.weight")
            b = params[f"{module}.lora_B.default.weight"]
            out[module] = Factors(a=value.detach().numpy().copy(), b=b.detach().numpy().copy())
    return out


def train(tiny_model_dir: Path, steps: int, lr: float, start: object = None) -> tuple:
    """Honest AdamW (torch's, as the Trainer builds it) on random tokens, with the cosine
    schedule; returns (the start factors, the trained factors, the budget)."""
    torch = pytest.importorskip("torch", reason="training needs the worker extra")
    pytest.importorskip("peft", reason="training needs the worker extra")
    from cotune.worker.training import peft_model
    from transformers import AutoModelForCausalLM, get_scheduler

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    model = peft_model(tiny_task(PEFT_SETTINGS["all-linear"], str(tiny_model_dir)), base, None)
    if start is not None:
        with torch.no_grad():
            for key, param in model.named_parameters():
                if "lora_B" in key:
                    param.copy_(start[key])  # type: ignore[index]
    before = _factors(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=0, num_training_steps=steps)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        ids = torch.randint(0, 200, (4, 32), generator=generator)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    budget = StepBudget(learning_rate=lr, lr_scheduler="cosine", steps=steps)
    return before, _factors(model), budget


def test_honest_training_stays_within_the_bound_and_near_it(tiny_model_dir: Path) -> None:
    _, trained, budget = train(tiny_model_dir, steps=8, lr=2e-4)
    assert overreach(trained, None, budget) is None  # round 0: from a fresh init
    moved_b = max(float(np.abs(f.b).max()) for f in trained.values())
    reach = budget.reach(0.0)
    print(f"round 0: max |B| {moved_b:.3g} of the bound {reach:.3g} ({moved_b / reach:.0%})")
    assert moved_b > 0.3 * reach  # the bound is tight enough to catch a x10 delta
    for factor in (10.0, 1000.0):
        scaled = {m: Factors(a=f.a, b=f.b * factor) for m, f in trained.items()}
        found = overreach(scaled, None, budget)
        assert found is not None and "lora_B" in found.key, factor
        print(f"x{factor:g}: {found.message}")


def test_a_later_round_is_bounded_from_its_start(tiny_model_dir: Path) -> None:
    torch = pytest.importorskip("torch", reason="training needs the worker extra")
    generator = torch.Generator().manual_seed(3)
    start = {}
    # A start with a trained-looking B (a merge of round 0), set on the model before training.
    _, first, _ = train(tiny_model_dir, steps=2, lr=2e-4)
    for module, pair in first.items():
        key = f"{module}.lora_B.default.weight"
        start[key] = 0.01 * torch.randn(pair.b.shape, generator=generator)
    before, after, budget = train(tiny_model_dir, steps=6, lr=5e-4, start=start)
    assert overreach(after, before, budget) is None
    assert overreach(after, None, budget) is not None  # a fresh init is not where it began


def test_random_factors_overreach() -> None:
    rng = np.random.default_rng(0)
    budget = StepBudget(learning_rate=2e-4, lr_scheduler="cosine", steps=8)
    shape_a, shape_b = (4, 64), (64, 4)
    naive = {"m": Factors(a=rng.standard_normal(shape_a), b=rng.standard_normal(shape_b))}
    bound = 1 / math.sqrt(64)
    camouflaged = {
        "m": Factors(a=rng.uniform(-bound, bound, shape_a), b=rng.normal(0, 0.01, shape_b))
    }
    for forged in (naive, camouflaged):
        found = overreach(forged, None, budget)
        assert found is not None, forged
    honest_like = {"m": Factors(a=rng.uniform(-bound, bound, shape_a), b=np.full(shape_b, 1e-4))}
    assert overreach(honest_like, None, budget) is None


def test_weight_decay_and_warmup_move_the_bound() -> None:
    plain = StepBudget(learning_rate=1e-3, lr_scheduler="linear", steps=10)
    warm = StepBudget(learning_rate=1e-3, lr_scheduler="linear", steps=10, warmup_ratio=0.5)
    decayed = StepBudget(learning_rate=1e-3, lr_scheduler="linear", steps=10, weight_decay=0.1)
    assert warm.reach(0.0) < plain.reach(0.0) < decayed.reach(1.0)
    assert plain.reach(0.0) == pytest.approx(decayed.reach(0.0), rel=1e-2)
    eight = StepBudget(learning_rate=1e-3, lr_scheduler="linear", steps=10, optimizer="adamw_8bit")
    assert eight.reach(0.0) == pytest.approx(2 * plain.reach(0.0))
