"""review_round: scaled-up, random, zero-change, fresh-init and replayed uploads among honest
peers are flagged, the honest peers are not; first on synthetic peers around a common
direction, then on a round of real (short) training of the tiny Llama."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cotune.orchestrator.protocol.builtin_models import TINY_LLAMA_CONFIG
from cotune.orchestrator.protocol.memory import ModelShape
from cotune.orchestrator.protocol.task import LoraSettings
from cotune.orchestrator.verify.adapter import check_adapter
from cotune.orchestrator.verify.deltas import change_norm
from cotune.orchestrator.verify.expected import AdapterFactors, ExpectedAdapter, Factors
from cotune.orchestrator.verify.expected import expected_adapter as expected_for
from cotune.orchestrator.verify.issues import VerifyError
from cotune.orchestrator.verify.review import RoundReview, Thresholds, review_round

Rng = np.random.Generator


def _random(rng: Rng, expected: ExpectedAdapter, std: float = 1.0) -> AdapterFactors:
    r = expected.rank
    return {
        m.path: Factors(
            a=(std * rng.standard_normal((r, m.d_in))).astype(np.float32),
            b=(std * rng.standard_normal((m.d_out, r))).astype(np.float32),
        )
        for m in expected.modules
    }


def _map(adapter: AdapterFactors, fn: Callable[[Factors], Factors]) -> AdapterFactors:
    return {module: fn(f) for module, f in adapter.items()}


def _honest_peers(rng: Rng, start: AdapterFactors, k: int) -> list[AdapterFactors]:
    """The start moved along one common direction plus each peer's own noise (half its size)."""
    direction = {
        m: (rng.standard_normal(f.a.shape), rng.standard_normal(f.b.shape))
        for m, f in start.items()
    }

    def step(value: np.ndarray, common: np.ndarray) -> np.ndarray:
        own = 0.5 * rng.standard_normal(value.shape)
        return (value + 0.05 * (common + own)).astype(np.float32)

    return [
        {
            m: Factors(a=step(f.a, direction[m][0]), b=step(f.b, direction[m][1]))
            for m, f in start.items()
        }
        for _ in range(k)
    ]


def _attackers(
    rng: Rng,
    honest: list[AdapterFactors],
    own_work: AdapterFactors,
    start: AdapterFactors | None,
    expected: ExpectedAdapter,
) -> dict[str, AdapterFactors]:
    """Each kind of bad upload, built from an honest one, the attacker's own honest work
    (not among the uploads: scaled up, it would be a replay of it), the start, or noise."""
    median = float(np.median([change_norm(h, start) for h in honest]))
    noise = _random(rng, expected)
    bad = {
        "scaled x10": _map(own_work, lambda f: Factors(a=f.a, b=10 * f.b)),
        "random": noise,
        "norm-matched noise": _norm_matched_noise(rng, start, expected, median),
        "replay of shard 0": _map(honest[0], lambda f: Factors(a=f.a.copy(), b=f.b.copy())),
        "fresh init": _map(noise, lambda f: Factors(a=f.a, b=np.zeros_like(f.b))),
    }
    if start is not None:
        bad["start sent back"] = start
    return bad


def _norm_matched_noise(
    rng: Rng, start: AdapterFactors | None, expected: ExpectedAdapter, norm: float
) -> AdapterFactors:
    """Noise whose change from the start has exactly `norm`: only its direction is off."""
    noise = _random(rng, expected)

    def shifted(size: float) -> AdapterFactors:
        if start is None:
            return _map(noise, lambda f: Factors(a=f.a, b=size * f.b))
        return {
            m: Factors(a=start[m].a, b=(start[m].b + size * f.b).astype(np.float32))
            for m, f in noise.items()
        }

    return shifted(norm / change_norm(shifted(1.0), start))  # the change is linear in size


EXPECTED_KIND = {
    "scaled x10": "norm_high",
    "random": "norm_high",
    "norm-matched noise": "direction",
    "replay of shard 0": "replay",
    "start sent back": "zero_change",
    "fresh init": "fresh_init",
}


def _show(review: RoundReview, names: list[str]) -> None:
    print(f"start norm {review.start_norm:.4g}, median {review.median:.4g}, MAD {review.mad:.3g}")
    for i, name in enumerate(names):
        kinds = ",".join(f.kind for f in review.flags_of(i)) or "-"
        norm, agreement = review.norms[i], review.agreement[i]
        print(f"  {i:2d} {name:20s} norm {norm:9.4g} agreement {agreement:6.3f} {kinds}")


def _assert_caught(
    honest: list[AdapterFactors], bad: dict[str, AdapterFactors], start: AdapterFactors | None
) -> None:
    """Each attacker alone among the honest peers, then all of them together."""
    names = [f"honest {i}" for i in range(len(honest))]
    clean = review_round(honest, start)
    _show(clean, names)
    assert clean.flags == ()
    for name, upload in bad.items():
        review = review_round([*honest, upload], start)
        kinds = {f.kind for f in review.flags_of(len(honest))}
        # In round 0 the start is a fresh init itself: sending one back is zero work.
        kind = "zero_change" if (name == "fresh init" and start is None) else EXPECTED_KIND[name]
        assert kind in kinds, (name, review.flags)
        innocent = {0} if name.startswith("replay") else set()
        assert review.flagged == {len(honest)} | innocent, (name, review.flags)
        if innocent:  # the replayed peer is flagged only as the other half of the pair
            assert {f.kind for f in review.flags_of(0)} == {"replay"}
    review = review_round([*honest, *bad.values()], start)
    _show(review, names + list(bad))
    attackers = set(range(len(honest), len(honest) + len(bad)))
    assert review.flagged == attackers | {0}
    assert {f.kind for f in review.flags_of(0)} == {"replay"}
    assert all(not review.flags_of(i) for i in range(1, len(honest)))
    print(f"{len(bad)} bad uploads among {len(honest)} honest: {len(review.flags)} flags")


def test_synthetic_round(expected: ExpectedAdapter) -> None:
    rng = np.random.default_rng(5)
    start = _random(rng, expected, std=0.3)
    *honest, own_work = _honest_peers(rng, start, 7)
    _assert_caught(honest, _attackers(rng, honest, own_work, start, expected), start)


# A short real round: the tiny Llama learns a noisy fixed token chain; each shard sees its own
# batches of it. Sizes keep the whole round to a few seconds on a CPU.
SHARDS, STEPS, BATCH, SEQ, LR = 5, 4, 4, 16, 3e-3
REAL_LORA = LoraSettings(r=4, alpha=8, target_modules="all-linear")


def _batch(torch: Any, chain: Any, generator: Any) -> Any:
    tokens = [torch.randint(10, 60, (BATCH, 1), generator=generator)]
    for _ in range(SEQ - 1):
        noise = torch.randint(10, 60, (BATCH, 1), generator=generator)
        keep = torch.rand(BATCH, 1, generator=generator) > 0.2
        tokens.append(torch.where(keep, chain[tokens[-1]], noise))
    return torch.cat(tokens, dim=1)


@pytest.fixture(scope="module")
def real_rounds(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[AdapterFactors | None, list[AdapterFactors]]]:
    """Round 0 (each shard from its own fresh init) and round 1 (all from one start adapter)
    of real training, every upload saved by PEFT and read back through check_adapter. The
    last shard of each is the attacker's own honest work, the rest are its honest peers."""
    peft = pytest.importorskip("peft", reason="training the tiny model needs the worker extra")
    import torch
    from cotune.worker.training import peft_model
    from transformers import AutoModelForCausalLM

    from tests.unit.verify.conftest import tiny_task

    root = tmp_path_factory.mktemp("real-round")
    expected = expected_for(ModelShape.from_config(TINY_LLAMA_CONFIG), REAL_LORA)
    chain = torch.randint(10, 60, (1024,), generator=torch.Generator().manual_seed(123))

    def model_for(seed: int) -> Any:
        base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
        task = tiny_task(REAL_LORA, str(tiny_model_dir)).model_copy(update={"seed": seed})
        return peft_model(task, base, None)

    def upload(model: Any, name: str) -> AdapterFactors:
        model.save_pretrained(str(root / name), safe_serialization=True)
        check = check_adapter(root / name / "adapter_model.safetensors", expected)
        assert check.factors is not None, check.issues
        return check.factors

    def train(model: Any, seed: int) -> None:
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=LR)
        generator = torch.Generator().manual_seed(1000 + seed)
        for _ in range(STEPS):
            ids = _batch(torch, chain, generator)
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()

    round0 = []
    for shard in range(SHARDS):
        model = model_for(seed=shard)  # the worker seeds each shard's A from its task seed
        train(model, shard)
        round0.append(upload(model, f"r0-{shard}"))

    # Round 1 starts every shard from one adapter: round 0's first upload stands in for the
    # merge (any trained adapter does).
    model = model_for(seed=0)
    start_state = {k: torch.from_numpy(v.copy()) for k, v in _state(round0[0], expected).items()}
    peft.set_peft_model_state_dict(model, start_state)
    start = upload(model, "r1-start")
    round1 = []
    for shard in range(SHARDS):
        peft.set_peft_model_state_dict(model, start_state)
        train(model, 10 + shard)
        round1.append(upload(model, f"r1-{shard}"))
    return {"round 0": (None, round0), "round 1": (start, round1)}


def _state(adapter: AdapterFactors, expected: ExpectedAdapter) -> dict[str, np.ndarray]:
    state = {}
    for module in expected.modules:
        state[module.key_a] = adapter[module.path].a
        state[module.key_b] = adapter[module.path].b
    return state


@pytest.mark.parametrize("name", ["round 0", "round 1"])
def test_real_round(
    real_rounds: dict[str, tuple[AdapterFactors | None, list[AdapterFactors]]], name: str
) -> None:
    start, (*honest, own_work) = real_rounds[name]
    expected = expected_for(ModelShape.from_config(TINY_LLAMA_CONFIG), REAL_LORA)
    print(name)
    bad = _attackers(np.random.default_rng(9), honest, own_work, start, expected)
    _assert_caught(honest, bad, start)


def test_two_shards_compare_with_the_start_only(expected: ExpectedAdapter) -> None:
    """With two shards neither is judged by the other's size: the honest one beside a lazy
    or scaled-up one is never flagged for it (verify/bounds.py catches a scaled-up delta)."""
    rng = np.random.default_rng(3)
    start = _random(rng, expected, std=0.3)
    first, second, own_work = _honest_peers(rng, start, 3)
    assert review_round([first, second], start).flags == ()
    scaled = _map(own_work, lambda f: Factors(a=f.a, b=3 * f.b))  # x3 the B: > 4x the change
    assert review_round([first, scaled], start).flags == ()
    # One honest beside a huge one: the honest one is not "zero work" next to it.
    huge = _map(own_work, lambda f: Factors(a=f.a, b=30 * f.b))  # a change ~29x the start's
    assert review_round([first, huge], start).flagged == {1}
    # Alone, an upload is judged against the start adapter's scale only.
    assert review_round([first], start).flags == ()
    assert review_round([scaled], start).flags == ()  # ~2x the start's: plausible alone
    alone = review_round([huge], start)
    assert [f.kind for f in alone.flags] == ["norm_high"]
    assert "start adapter's norm" in alone.flags[0].message
    assert [f.kind for f in review_round([start], start).flags] == ["zero_change"]


def test_an_empty_round_and_bad_thresholds() -> None:
    empty = review_round([], None)
    assert empty.flags == () and empty.norms == ()
    with pytest.raises(VerifyError, match="mad_k must be > 0"):
        Thresholds(mad_k=0)
    with pytest.raises(VerifyError, match="replay_cosine"):
        Thresholds(replay_cosine=1.5)


def test_uploads_of_another_layout_are_a_caller_error(expected: ExpectedAdapter) -> None:
    rng = np.random.default_rng(4)
    upload = _random(rng, expected)
    other = dict(upload)
    other.pop(next(iter(other)))
    with pytest.raises(VerifyError, match="other modules"):
        review_round([upload, other], None)


def test_one_huge_upload_does_not_make_its_two_peers_look_like_zero_work(
    expected: ExpectedAdapter,
) -> None:
    """K = 3: the median of two others is their mean, which one huge upload dominates; the
    reference scale is their lower median, so only the huge one is flagged."""
    rng = np.random.default_rng(5)
    start = _random(rng, expected, std=0.3)
    first, second = _honest_peers(rng, start, 2)
    huge = _map(_random(rng, expected), lambda f: Factors(a=100 * f.a, b=100 * f.b))
    review = review_round([first, second, huge], start)
    print([(f.shard, f.kind) for f in review.flags])
    assert review.flagged == {2} and "zero_change" not in {f.kind for f in review.flags}
