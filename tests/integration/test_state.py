"""State transitions on a real Redis: each idempotent, each refusal leaving every key as it was."""

from __future__ import annotations

from typing import Any

import pytest
from cotune.orchestrator.control.state import State
from cotune.orchestrator.protocol.problems import Conflict, NotFound

from tests.integration.coordinator_kit import Clock, new_job, new_task, snapshot

pytestmark = pytest.mark.integration


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def state(redis_client: Any, clock: Clock) -> State:
    return State(redis_client, clock=clock)


def test_create_job_is_idempotent_and_unknown_jobs_are_not_found(
    state: State, redis_client: Any
) -> None:
    first = state.create_job("tiny-00000001", "tiny", "name: tiny\n")
    assert (first.state, first.name, first.spec_yaml) == ("pending", "tiny", "name: tiny\n")
    before = snapshot(redis_client)
    again = state.create_job("tiny-00000001", "other", "name: other\n")
    assert again == first and snapshot(redis_client) == before
    with pytest.raises(NotFound, match="no job 'nope'"):
        state.get_job("nope")
    with pytest.raises(ValueError, match="job id"):
        state.create_job("bad:id", "x", "")
    assert [j.job_id for j in state.list_jobs()] == ["tiny-00000001"]
    assert state.list_jobs(["running"]) == []


def test_transition_job_is_compare_and_set(state: State, redis_client: Any, clock: Clock) -> None:
    state.create_job("j-1", "j", "")
    clock.advance(5)
    assert state.transition_job("j-1", "sharding", expect=["pending"], manifest_json="{}")
    job = state.get_job("j-1")
    assert job.state == "sharding" and job.manifest_json == "{}" and job.updated_at > job.created_at
    before = snapshot(redis_client)
    # Not in `expect` (any more): refused, nothing written, not even an event.
    assert not state.transition_job("j-1", "sharding", expect=["pending"])
    assert snapshot(redis_client) == before
    assert state.transition_job("j-1", "succeeded", expect=["sharding"], best_trial=2)
    assert state.get_job("j-1").best_trial == 2
    assert state.transition_job("j-1", "succeeded", expect=["succeeded"], best_trial=None)
    assert state.get_job("j-1").best_trial is None
    with pytest.raises(TypeError, match="unknown fields"):
        state.transition_job("j-1", "failed", expect=["succeeded"], colour="red")
    with pytest.raises(ValueError, match="unknown job state"):
        state.transition_job("j-1", "done", expect=["succeeded"])  # type: ignore[arg-type]
    with pytest.raises(NotFound):
        state.transition_job("nope", "running", expect=["pending"])
    kinds = [e.kind for e in state.events.read("j-1")]
    assert kinds == ["job_created", "job_state", "job_state", "job_state"]


def test_trials_rounds_and_finish_are_idempotent(state: State, redis_client: Any) -> None:
    new_job(state, "j-1", trials=0)
    trial = state.put_trial("j-1", 0, {"lora.lora_r": 8})
    assert (trial.state, trial.params, trial.rounds_done) == ("running", {"lora.lora_r": 8}, 0)
    assert state.put_trial("j-1", 0, {"lora.lora_r": 16}).params == {"lora.lora_r": 8}
    state.record_round("j-1", 0, 0, 1.5)
    before = snapshot(redis_client)
    assert state.record_round("j-1", 0, 0, 9.9).eval_losses == [1.5]  # the first value stays
    assert snapshot(redis_client) == before
    assert state.record_round("j-1", 0, 1, 1.25).eval_losses == [1.5, 1.25]
    assert state.finish_trial("j-1", 0, "pruned").state == "pruned"
    before = snapshot(redis_client)
    assert state.finish_trial("j-1", 0, "complete").state == "pruned"  # ended already
    assert snapshot(redis_client) == before
    with pytest.raises(ValueError, match="finite"):
        state.record_round("j-1", 0, 2, float("nan"))
    with pytest.raises(NotFound):
        state.put_trial("nope", 0, {})
    with pytest.raises(NotFound):
        state.record_round("j-1", 7, 0, 1.0)
    assert [t.number for t in state.get_trials("j-1")] == [0]


def test_enqueue_task_is_idempotent_and_checked(
    state: State, redis_client: Any, object_store: Any
) -> None:
    new_job(state, "j-1")
    task = new_task(state, object_store, "j-1", shard=0)
    stored = state.get_task(task.task_id)
    assert (stored.state, stored.attempt, stored.tier) == ("queued", 0, "cpu")
    assert stored.inputs() == task.inputs()
    before = snapshot(redis_client)
    assert state.enqueue_task(task) is False
    assert snapshot(redis_client) == before
    with pytest.raises(ValueError, match="unknown tier"):
        state.enqueue_task(task.__class__(**{**task.__dict__, "task_id": "t2", "tier": "2g"}))
    with pytest.raises(NotFound):
        state.enqueue_task(task.__class__(**{**task.__dict__, "task_id": "t3", "job_id": "no"}))
    new_task(state, object_store, "j-1", shard=1)
    assert [t.shard for t in state.tasks_for("j-1", 0, 0)] == [0, 1]
    assert state.tasks_for("j-1", 0, 1) == []


def test_cancel_job_cancels_queued_work_and_refuses_a_finished_job(
    state: State, redis_client: Any, object_store: Any
) -> None:
    new_job(state, "j-1", trials=2)
    for shard in range(3):
        new_task(state, object_store, "j-1", trial=shard % 2, shard=shard)
    job = state.cancel_job("j-1")
    assert job.state == "cancelled"
    assert {t.state for t in state.tasks_of("j-1")} == {"cancelled"}
    assert {t.state for t in state.get_trials("j-1")} == {"failed"}
    assert redis_client.llen(state.keys.queue("cpu", "j-1")) == 0
    assert redis_client.llen(state.keys.rotation("cpu")) == 0
    before = snapshot(redis_client)
    with pytest.raises(Conflict, match="already finished"):
        state.cancel_job("j-1")
    with pytest.raises(Conflict):
        new_task(state, object_store, "j-1", shard=9)
    assert snapshot(redis_client) == before
    with pytest.raises(NotFound):
        state.cancel_job("nope")


def test_a_round_is_merged_once(state: State, clock: Clock) -> None:
    new_job(state, "j-1")
    assert state.claim_merge("j-1", 0, 0, "coordinator-a")
    assert state.claim_merge("j-1", 0, 0, "coordinator-a")  # the holder asking again
    assert not state.claim_merge("j-1", 0, 0, "coordinator-b")
    assert state.get_merge("j-1", 0, 0) is None
    state.record_merge("j-1", 0, 0, "jobs/j-1/trials/0/r0/merged/", 1.25)
    state.record_merge("j-1", 0, 0, "elsewhere/", 9.0)  # the first record stays
    merge = state.get_merge("j-1", 0, 0)
    assert merge is not None
    assert (merge["merged_prefix"], merge["eval_loss"]) == ("jobs/j-1/trials/0/r0/merged/", 1.25)
    assert state.claim_merge("j-1", 0, 1, "coordinator-b", ttl_s=0.05)
    import time

    time.sleep(0.1)  # a claim lapses so a dead merger does not block the round forever
    assert state.claim_merge("j-1", 0, 1, "coordinator-a")


def test_leader_lock(state: State) -> None:
    assert state.acquire_leader("a", 30)
    assert not state.acquire_leader("b", 30)
    assert state.renew_leader("a", 30) and not state.renew_leader("b", 30)
    state.release_leader("b")  # not the holder: nothing happens
    assert not state.acquire_leader("b", 30)
    state.release_leader("a")
    assert state.acquire_leader("b", 30)


def test_events_are_ordered_and_resumable(state: State) -> None:
    new_job(state, "j-1", trials=0)
    first = state.emit("j-1", "note", text="hello", n=1)
    second = state.emit("j-1", "note", text="again", n=2)
    events = state.events.read("j-1")
    assert [e.kind for e in events] == ["job_created", "job_state", "note", "note"]
    assert [e.id for e in events][-2:] == [first, second]
    later = state.events.read("j-1", after=first)
    assert [(e.id, e.data) for e in later] == [(second, {"text": "again", "n": 2})]
    assert state.events.last_id("j-1") == second
    with pytest.raises(ValueError, match="not an event id"):
        state.events.read("j-1", after="yesterday")
