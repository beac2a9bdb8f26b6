"""Redundancy on a whole job (real reconciler, Ray, `cotune evaluate`, Redis, SeaweedFS), with
trust.redundancy 1 so every volunteer task is trained twice: the duplicate is never leased to
another account of the same owner, and a disagreement is resolved by a third run whose
majority outvotes the cheat (a strike, no credit) while the runs that agree are credited; the
outvoted original takes the winner's result, so nothing is trained a fourth time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cotune.orchestrator.control.records import duplicate_id, task_id_for
from cotune.orchestrator.control.state import State
from cotune.orchestrator.control.strikes import Strikes
from cotune.orchestrator.control.workers import Workers
from cotune.orchestrator.pipeline.redundancy import Ballot, chosen, decide

from tests.security import adversary
from tests.security.job_kit import (
    JOB,
    Volunteer,
    drive,
    make_settings,
    reconciler,
    rejections,
    submit,
    task,
)

TOKENS = 4 * 64  # max_steps x micro_batch x grad_accum x sequence_len


def test_the_vote_follows_the_majority() -> None:
    """redundancy.decide on its own: the cases of its docstring."""
    t, d1, d2, d3 = (Ballot(name, 1, True, 1.0) for name in ("t", "d1", "d2", "d3"))
    same: set[frozenset[str]] = set()

    def agrees(a: Ballot, b: Ballot) -> bool:
        return frozenset((a.task_id, b.task_id)) in same

    def pairs(*names: str) -> set[frozenset[str]]:
        return {frozenset(pair) for pair in zip(names[::2], names[1::2], strict=True)}

    assert decide(t, [], agrees).need_run
    assert decide(t, [d1], agrees).need_run  # one disagreeing: another run
    same = pairs("t", "d2", "d1", "d3")  # two pairs: a tie decides nothing
    assert decide(t, [d1, d2, d3], agrees).need_run
    same = pairs("t", "d2")  # t and d2 agree: d1 is outvoted
    vote = decide(t, [d1, d2], agrees)
    assert (vote.original, vote.accept, vote.reject) == (True, ("d2",), ("d1",))
    same = pairs("d1", "d2")  # the duplicates agree: the original is outvoted, d1 replaces it
    vote = decide(t, [d1, d2], agrees)
    assert (vote.original, vote.accept, vote.reject, vote.winner) == (False, ("d1", "d2"), (), "d1")
    # One agreeing duplicate does not outvote a majority: d1, d2, d3 agree, t only with d1.
    same = pairs("t", "d1", "d1", "d2", "d1", "d3", "d2", "d3")
    vote = decide(t, [d1, d2, d3], agrees)
    assert (vote.original, vote.accept, vote.winner) == (False, ("d1", "d2", "d3"), "d1")
    same = set()  # no two agree: never accepted, another run
    vote = decide(t, [d1, d2, d3], agrees)
    assert vote.need_run and vote.original is None and not vote.accept
    assert [chosen(f"task-{n}", 0.5) for n in range(6)] == [
        chosen(f"task-{n}", 0.5) for n in range(6)
    ]  # the same tasks, every time
    picked = sum(chosen(f"task-{n}", 0.1) for n in range(2000))
    assert 150 < picked < 250 and not chosen("task-0", 0.0)


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_a_duplicate_goes_to_another_owner_and_a_third_run_breaks_a_disagreement(
    tmp_path: Path,
    redis_client: Any,
    redis_server: str,
    s3_server: Any,
    object_store: Any,
    synthetic_jsonl: Any,
    ray_cluster: str,
) -> None:
    from cotune.orchestrator.runtime.raypool import RayPool

    state, store = State(redis_client), object_store
    settings = make_settings(tmp_path, redis_server, s3_server, store)
    submit(
        state, synthetic_jsonl("alpaca", 100, seed=4), shards=1, rounds=1, trust={"redundancy": 1.0}
    )
    loop = reconciler(state, store, settings, RayPool.connect(None))
    sybil_1, sybil_2 = (Volunteer(state, store, settings, "mallory") for _ in range(2))
    alice = Volunteer(state, store, settings, "alice")
    bob = Volunteer(state, store, settings, "bob")
    drive(loop, state, lambda: state.get_job(JOB).state == "running", "sharding")
    original, dup1, dup2 = (
        task_id_for(JOB, 0, 0, 0),
        *(duplicate_id(task_id_for(JOB, 0, 0, 0), k) for k in (1, 2)),
    )

    # mallory takes the original and sends a plausible adapter that is not the task's run.
    lease = sybil_1.must_take()
    assert lease.task_id == original
    sybil_1.complete(lease, adversary.plausible(lease.task, 7))
    drive(loop, state, lambda: state.redis.exists(state.keys.task(dup1)) == 1, "a duplicate")
    assert sybil_2.take() is None  # the same owner's other account never gets it
    first = alice.must_take()
    assert first.task_id == dup1 and first.attempt == 1001  # keys of its own
    alice.complete(first, adversary.honest(first.task, 0, run=1))
    drive(loop, state, lambda: state.redis.exists(state.keys.task(dup2)) == 1, "a third run")
    assert sybil_2.take() is None and alice.take() is None  # neither owner of the two runs
    second = bob.must_take()
    assert second.task_id == dup2
    bob.complete(second, adversary.honest(second.task, 0, run=2))
    drive(loop, state, lambda: bool(rejections(state, original)), "the original outvoted")
    print(f"original: rejected: {rejections(state, original)[0]}")
    assert "outvoted" in rejections(state, original)[0]
    assert task(state, original).failures == 0 and Strikes(state).count("mallory") == 1.0
    assert (task(state, dup1).state, task(state, dup2).state) == ("accepted", "accepted")
    # No re-run: the original takes the winning duplicate's result, credited once (to alice,
    # for dup1), and the job completes on it.
    adopted = task(state, original)
    assert adopted.state == "accepted" and adopted.result() is not None
    assert adopted.result().adopted_from == dup1  # type: ignore[union-attr]
    assert alice.take() is None and bob.take() is None  # nothing left to train
    drive(loop, state, lambda: state.get_job(JOB).state == "succeeded", "the job succeeded", 400)
    board = {name: tokens for name, tokens, _ in Workers(state).leaderboard()}
    print(f"leaderboard: {board}, strikes: mallory {Strikes(state).count('mallory')}")
    assert board == {"alice": TOKENS, "bob": TOKENS}
