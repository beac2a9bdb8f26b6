"""The metrics on a real Redis and a real S3 (SeaweedFS): a scrape shows the state the real
State, Leases, Verdicts and Workers APIs made; every transition counts once, in Redis; and
GET /metrics serves it all as `promtool check metrics` wants it, with no unbounded label.
The clock is the test's."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from cotune.orchestrator.api import ApiContext, create_app
from cotune.orchestrator.control import metrics
from cotune.orchestrator.control.leases import Leases
from cotune.orchestrator.control.scrape import StateCollector, render
from cotune.orchestrator.control.state import State
from cotune.orchestrator.control.strikes import Strikes
from cotune.orchestrator.control.tokens import JoinTokens
from cotune.orchestrator.control.verdicts import Verdicts
from cotune.orchestrator.control.workers import Workers
from cotune.orchestrator.protocol.wire import (
    CompleteRequest,
    FailRequest,
    HeartbeatRequest,
    ReleaseRequest,
    TaskLease,
)
from cotune.orchestrator.settings import Settings
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.coordinator_kit import (
    CPU,
    HARDWARE,
    Clock,
    new_job,
    new_task,
    result_of,
    upload_checkpoint,
)

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
TTL = 30.0
MAX_AGE = 100.0
ADMIN = "admin-token-for-tests"
Samples = dict[str, dict[tuple[tuple[str, str], ...], float]]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def state(redis_client: Any, clock: Clock) -> State:
    return State(redis_client, clock=clock)


@pytest.fixture
def leases(state: State, object_store: Any) -> Leases:
    settings = Settings(lease_ttl_s=TTL, heartbeat_interval_s=5, lease_max_age_s=MAX_AGE)
    return Leases(state, object_store, settings)


def enroll(state: State, name: str, kind: str = "volunteer") -> str:
    token, _ = JoinTokens(state.redis, state.keys).create(name, kind=kind)  # type: ignore[arg-type]
    record, _ = Workers(state).enroll(token, HARDWARE)
    return record.worker_id


def lease_one(leases: Leases, worker: str, handed: list[int] | None = None) -> TaskLease:
    """The next task for `worker`; the bytes it is handed to download go into `handed`."""
    lease = leases.lease(worker, CPU)
    assert lease is not None
    inputs = lease.inputs
    gets = [*inputs.train, *(inputs.start_adapter or {}).values()]
    gets += [inputs.eval] if inputs.eval else []
    gets += [] if isinstance(inputs.base_model, str) else [inputs.base_model]
    gets += [inputs.resume_checkpoint.archive] if inputs.resume_checkpoint else []
    if handed is not None:
        handed.append(sum(g.bytes for g in gets))
    return lease


def parse(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def scrape(state: State) -> Samples:
    collector = StateCollector(state.scripts, state.clock, online_window_s=TTL)
    return parse(render(collector).decode())


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[name][tuple(sorted(labels.items()))]


def by(samples: Samples, name: str, label: str) -> dict[str, float]:
    """{label value: sample} of a one-label series, the zeros left out."""
    return {dict(k)[label]: v for k, v in samples[name].items() if v}


def test_the_scrape_shows_jobs_trials_tasks_queues_workers_and_losses(
    state: State, leases: Leases, object_store: Any, clock: Clock
) -> None:
    clock.advance(-1000)
    enroll(state, "carol")  # enrolled long ago, silent since: not online
    clock.advance(1000)
    alice = enroll(state, "alice")
    bob = enroll(state, "bob")
    farm = enroll(state, "farm", kind="cluster")
    Strikes(state).quarantine("bob")  # quarantined: online no more
    new_job(state, "run-1", trials=2, rounds=3)
    state.record_round("run-1", 0, 0, 2.5)
    state.record_round("run-1", 0, 1, 1.75)
    state.record_round("run-1", 1, 0, 3.0)
    state.finish_trial("run-1", 1, "pruned")
    new_job(state, "pend-1", trials=0, state_name="pending")
    new_job(state, "done-1", trials=1)
    state.record_round("done-1", 0, 0, 9.0)
    assert state.transition_job("done-1", "succeeded", expect=["running"])
    new_job(state, "gone-1", trials=0)
    state.cancel_job("gone-1")
    for shard in range(3):
        new_task(state, object_store, "run-1", shard=shard)
    big = new_task(state, object_store, "run-1", shard=3, tier="8g")
    clock.advance(7)
    lease = lease_one(leases, farm)  # a CPU-only worker: the cpu tier only
    assert lease.task_id != big.task_id
    leases.heartbeat(
        farm,
        lease.lease_id,
        HeartbeatRequest(
            step=3, max_steps=10, loss=2.0, tokens_per_s=120.5, memory_bytes=5 * 2**30
        ),
    )

    got = scrape(state)
    assert value(got, "cotune_state_up") == 1
    assert by(got, "cotune_jobs", "state") == {
        "running": 1,
        "pending": 1,
        "succeeded": 1,
        "cancelled": 1,
    }
    assert by(got, "cotune_trials", "state") == {"running": 1, "pruned": 1}  # done-1's: no
    assert by(got, "cotune_tasks", "state") == {"queued": 3, "leased": 1}
    assert by(got, "cotune_queue_depth", "tier") == {"cpu": 2, "8g": 1}
    assert {k: v for k, v in got["cotune_workers"].items() if v} == {
        (("kind", "volunteer"), ("state", "idle")): 1,  # alice (carol silent, bob quarantined)
        (("kind", "cluster"), ("state", "busy")): 1,  # farm, holding its lease
    }
    assert value(got, "cotune_owners_quarantined") == 1
    assert got["cotune_trial_eval_loss"] == {
        (("job_id", "run-1"), ("trial", "0")): 1.75,  # the latest round's
        (("job_id", "run-1"), ("trial", "1")): 3.0,
    }
    assert got["cotune_trial_rounds_done"] == {
        (("job_id", "run-1"), ("trial", "0")): 2,
        (("job_id", "run-1"), ("trial", "1")): 1,
    }
    # The job's own series: its plan is 2 trials x 3 rounds; trial 0 has done 2, the pruned
    # trial 1 counts all 3.
    assert value(got, "cotune_job_progress_ratio", job_id="run-1") == pytest.approx(5 / 6)
    assert value(got, "cotune_job_start_time_seconds", job_id="run-1") == pytest.approx(
        state.get_job("run-1").created_at
    )
    assert {dict(k)["state"]: v for k, v in got["cotune_job_trials"].items() if v} == {
        "running": 1,
        "pruned": 1,
    }
    assert {dict(k)["state"]: v for k, v in got["cotune_job_tasks"].items() if v} == {
        "queued": 3,
        "leased": 1,
    }
    assert {dict(k)["job_id"] for k in got["cotune_job_tasks"]} == {"run-1"}  # pend-1 has none
    # The heartbeat's figures, per kind (never per worker).
    assert by(got, "cotune_training_tokens_per_second", "kind") == {"cluster": 120.5}
    assert by(got, "cotune_training_memory_bytes", "kind") == {"cluster": 5 * 2**30}
    assert by(got, "cotune_training_steps", "kind") == {"cluster": 3}
    assert by(got, "cotune_training_steps_target", "kind") == {"cluster": 10}
    assert by(got, "cotune_jobs_finished_total", "state") == {"succeeded": 1, "cancelled": 1}
    assert value(got, "cotune_task_queue_wait_seconds_count") == 1
    assert value(got, "cotune_task_queue_wait_seconds_sum") == 7
    assert value(got, "cotune_task_queue_wait_seconds_bucket", le="5.0") == 0
    assert value(got, "cotune_task_queue_wait_seconds_bucket", le="15.0") == 1
    shard_bytes = state.get_task(lease.task_id).inputs().train[0].bytes
    assert value(got, "cotune_artifact_bytes_total", direction="download") == shard_bytes
    assert bob not in str(got)

    # A job that ends takes its trials, tasks and losses out of the gauges.
    clock.advance(TTL + 1)  # and workers silent for a lease TTL are offline
    assert state.transition_job("run-1", "failed", expect=["running"], error="test")
    got = scrape(state)
    assert by(got, "cotune_trials", "state") == {}
    assert by(got, "cotune_tasks", "state") == {}
    assert got.get("cotune_trial_eval_loss", {}) == {}
    for name in ("job_progress_ratio", "job_start_time_seconds", "job_trials", "job_tasks"):
        assert got.get(f"cotune_{name}", {}) == {}, name
    # farm's lease is past its deadline: its figures count until it is reclaimed.
    assert by(got, "cotune_training_tokens_per_second", "kind") == {"cluster": 120.5}
    assert leases.reclaim_expired() == 1
    got = scrape(state)
    for name in ("tokens_per_second", "memory_bytes", "steps", "steps_target"):
        assert by(got, f"cotune_training_{name}", "kind") == {}, name
    assert by(got, "cotune_workers", "kind") == {}
    assert by(got, "cotune_jobs_finished_total", "state") == {
        "succeeded": 1,
        "cancelled": 1,
        "failed": 1,
    }
    # A worker that asks for work and finds none (the job's queued tasks are cancelled as
    # they are popped) is online again.
    assert leases.lease(alice, CPU) is None
    got = scrape(state)
    assert by(got, "cotune_workers", "kind") == {"volunteer": 1}
    assert by(got, "cotune_queue_depth", "tier") == {"8g": 1}


def counters(samples: Samples) -> dict[str, float]:
    """Every non-zero event counter and histogram count kept in Redis, as `name{label}` ->
    value (this process's own series, which other tests move too, left out)."""
    own = tuple(family.name for family in metrics.PROCESS.collect())
    out = {}
    for name, series in samples.items():
        if name.endswith(("_total", "_seconds_count")) and name.startswith("cotune_"):
            if name.startswith(own):
                continue
            for labels, v in series.items():
                if v:
                    out[name + "".join(f"{{{b}}}" for _, b in labels)] = v
    return out


def assert_task_state_counts_kept(state: State, job_id: str) -> None:
    """The job's kept count per task state (what a scrape reads) matches its tasks."""
    actual = Counter(t.state for t in state.tasks_of(job_id))
    raw = state.redis.hgetall(state.keys.job_task_states(job_id))
    kept = {k.decode(): int(v) for k, v in raw.items() if int(v)}
    assert kept == dict(actual)


def test_every_transition_counts_once_in_redis(
    state: State, leases: Leases, object_store: Any, clock: Clock, redis_client: Any
) -> None:
    farm = enroll(state, "farm", kind="cluster")
    alice, bob, dave = (enroll(state, n) for n in ("alice", "bob", "dave"))
    new_job(state, "j-1", trials=2)
    t0, t1 = (new_task(state, object_store, "j-1", shard=s) for s in (0, 1))
    t2 = new_task(state, object_store, "j-1", trial=1, shard=0)
    verdicts = Verdicts(state, object_store)
    uploaded = 0.0
    handed: list[int] = []

    # A cluster worker's result, with a checkpoint on the way: accepted and credited.
    first = lease_one(leases, farm, handed)
    assert first.task_id == t0.task_id
    clock.advance(20)
    checkpoint = upload_checkpoint(first, step=2)
    uploaded += checkpoint.archive.bytes
    beat = HeartbeatRequest(step=2, max_steps=4, checkpoint=checkpoint)
    leases.heartbeat(farm, first.lease_id, beat)
    for _ in range(3):
        clock.advance(20)  # a heartbeat within every lease TTL: 80 s so far
        leases.heartbeat(farm, first.lease_id, HeartbeatRequest(step=3, max_steps=4))
    clock.advance(10)
    result = result_of(first)
    uploaded += sum(a.bytes for a in result.artifacts.values())
    leases.complete(farm, first.lease_id, result)
    once = scrape(state)
    leases.complete(farm, first.lease_id, result)  # a retry: counted once
    assert counters(scrape(state)) == counters(once)

    # A volunteer's result: verifying, then rejected by the round review; the next run of
    # the task accepted by the heavy checks.
    held = lease_one(leases, alice, handed)
    assert held.task_id == t1.task_id
    result = result_of(held)
    uploaded += sum(a.bytes for a in result.artifacts.values())
    leases.complete(alice, held.lease_id, result)
    waiting = state.get_task(t1.task_id)
    assert verdicts.reject(waiting, "round review: an outlier", strike=False, cause="review")
    assert not verdicts.reject(waiting, "again", strike=False, cause="review")  # no-op
    again = lease_one(leases, bob, handed)
    result = result_of(again)
    uploaded += sum(a.bytes for a in result.artifacts.values())
    leases.complete(bob, again.lease_id, result)
    assert verdicts.accept(state.get_task(t1.task_id))
    with pytest.raises(ValueError, match="rejection cause"):
        verdicts.reject(state.get_task(t1.task_id), "x", cause="made up")

    # t2 (max_attempts 3) by the cluster worker: rejected at complete (counts, trusted),
    # failed, released (free), expired: the third counted end fails it for good.
    lease = lease_one(leases, farm, handed)
    lying = dict(result_of(lease).artifacts)
    lying["metrics.json"] = lying["metrics.json"].model_copy(update={"sha256": "f" * 64})
    leases.complete(farm, lease.lease_id, CompleteRequest(artifacts=lying))
    lease = lease_one(leases, farm, handed)
    leases.fail(farm, lease.lease_id, FailRequest(reason="CUDA out of memory", retryable=True))
    lease = lease_one(leases, farm, handed)
    checkpoint = upload_checkpoint(lease, step=1)
    uploaded += checkpoint.archive.bytes
    leases.release(farm, lease.lease_id, ReleaseRequest(reason="stop", checkpoint=checkpoint))
    lease = lease_one(leases, farm, handed)
    assert lease.inputs.resume_checkpoint is not None  # handed out: counted as a download
    clock.advance(TTL + 1)
    assert leases.reclaim_expired() == 1
    assert state.get_task(t2.task_id).state == "failed"

    # Redundancy: alice's run of t6 is outvoted by erin's duplicate, whose result it adopts.
    erin = enroll(state, "erin")
    t6 = new_task(state, object_store, "j-1", shard=6)
    original = lease_one(leases, alice, handed)
    assert original.task_id == t6.task_id
    result = result_of(original)
    uploaded += sum(a.bytes for a in result.artifacts.values())
    leases.complete(alice, original.lease_id, result)
    assert verdicts.enqueue_duplicate(state.get_task(t6.task_id), 1)
    dup = lease_one(leases, erin, handed)
    result = result_of(dup)
    uploaded += sum(a.bytes for a in result.artifacts.values())
    leases.complete(erin, dup.lease_id, result)
    assert verdicts.accept(state.get_task(dup.task_id))
    winner = state.get_task(dup.task_id)
    assert verdicts.adopt(state.get_task(t6.task_id), winner, "outvoted")
    assert state.get_task(t6.task_id).state == "accepted"

    # Leases that end by their maximum age, by a revoked join token, by a quarantine.
    t3, t4, t5 = (new_task(state, object_store, "j-1", shard=s) for s in (3, 4, 5))
    old = lease_one(leases, alice, handed)
    for _ in range(6):
        clock.advance(20)
        try:
            leases.heartbeat(alice, old.lease_id, HeartbeatRequest(step=1, max_steps=4))
        except Exception as exc:
            assert "maximum age" in str(exc)
            break
    else:
        raise AssertionError("the lease never reached its maximum age")
    lease_one(leases, dave, handed)
    assert Workers(state).revoke_join_token("dave").leases == 1
    lease_one(leases, bob, handed)
    assert Strikes(state).quarantine("bob") == 1
    assert {state.get_task(t.task_id).state for t in (t3, t4, t5)} == {"queued"}

    # A round's merge (once), and jobs that end.
    state.record_merge("j-1", 0, 0, "jobs/j-1/trials/0/r0/merged/", 1.5, merge_s=42.0, eval_s=7.0)
    state.record_merge("j-1", 0, 0, "elsewhere/", 9.0, merge_s=1.0, eval_s=1.0)  # no-op
    state.record_merge("j-1", 0, 1, "jobs/j-1/trials/0/r1/merged/", 1.4, eval_s=3.0)
    assert_task_state_counts_kept(state, "j-1")  # through every transition above
    state.cancel_job("j-1")
    assert_task_state_counts_kept(state, "j-1")
    new_job(state, "j-2", trials=0)
    assert state.transition_job("j-2", "failed", expect=["running"], error="bad data")
    assert not state.transition_job("j-2", "failed", expect=["running"])

    got = scrape(state)
    assert counters(got) == {
        "cotune_task_attempts_total{accepted}": 3,  # farm's t0, bob's t1, erin's t6.dup1
        "cotune_task_attempts_total{rejected}": 3,  # alice's t1 (review) and t6, farm's t2
        "cotune_task_attempts_total{failed}": 1,
        "cotune_task_attempts_total{released}": 1,
        "cotune_task_attempts_total{expired}": 2,  # farm's t2, alice's too old
        "cotune_task_attempts_total{revoked}": 2,  # dave's (token), bob's (quarantine)
        "cotune_rejections_total{review}": 1,
        "cotune_rejections_total{intake}": 1,
        "cotune_rejections_total{redundancy}": 1,
        "cotune_tasks_failed_total": 1,
        # queued again: alice's t1 (review); t2 rejected, failed, released; alice's too
        # old, dave's and bob's revoked (t2's expiry failed it instead)
        "cotune_task_retries_total": 7,
        "cotune_jobs_finished_total{cancelled}": 1,
        "cotune_jobs_finished_total{failed}": 1,
        "cotune_tokens_trained_total{cluster}": 512,  # the task's count, not the claim
        "cotune_tokens_trained_total{volunteer}": 1024,  # bob's t1, erin's duplicate
        "cotune_artifact_bytes_total{download}": sum(handed),
        "cotune_artifact_bytes_total{upload}": uploaded,
        "cotune_task_queue_wait_seconds_count": 12,  # every lease
        "cotune_task_duration_seconds_count": 6,  # every reported result (t0, t1 x2, t2, t6 x2)
        "cotune_merge_duration_seconds_count": 1,  # round 1's merge was an earlier run's
        "cotune_evaluation_duration_seconds_count": 2,
    }
    assert len(handed) == 12 and sum(handed) > 0
    assert value(got, "cotune_task_duration_seconds_bucket", le="60.0") == 5
    assert value(got, "cotune_task_duration_seconds_bucket", le="120.0") == 6  # t0: 90 s
    assert value(got, "cotune_merge_duration_seconds_sum") == 42.0
    assert value(got, "cotune_evaluation_duration_seconds_sum") == 10.0
    # The leaderboard's top, by the coordinator's credit (alice's adopted run credits erin).
    assert by(got, "cotune_contributor_tokens", "contributor") == {
        name: tokens for name, tokens, _ in Workers(state).leaderboard()
    }
    assert set(by(got, "cotune_contributor_tokens", "contributor")) == {"farm", "bob", "erin"}
    # Every lease has ended: the kept training sums and busy counts are back to zero.
    assert redis_client.zcard(state.keys.deadlines()) == 0
    kept = redis_client.hgetall(state.keys.metric_training())
    assert kept and all(abs(float(v)) < 1e-9 for v in kept.values()), kept
    fields = {f.decode() for f in redis_client.hkeys(state.keys.metrics())}
    assert fields <= metrics.counter_fields()


FORBIDDEN_LABELS = {"worker", "worker_id", "lease", "lease_id", "task", "task_id", "owner"}


def metric_names_in_rules() -> set[str]:
    text = (ROOT / "deploy" / "prometheus" / "rules" / "cotune.yml").read_text()
    exprs = [r["expr"] for g in yaml.safe_load(text)["groups"] for r in g["rules"]]
    return {n for e in exprs for n in re.findall(r"\bcotune_[a-z_]+", e)}


def test_get_metrics_serves_the_exposition_with_bounded_labels(
    state: State, redis_client: Any, object_store: Any, clock: Clock, tmp_path: Path
) -> None:
    settings = Settings(home=tmp_path / "home", lease_ttl_s=TTL, heartbeat_interval_s=5)
    context = ApiContext.create(settings, redis_client, object_store, ADMIN, clock=clock)
    api = TestClient(create_app(context))
    farm = enroll(state, "farm", kind="cluster")
    new_job(state, "j-1")
    task = new_task(state, object_store, "j-1")
    lease = lease_one(context.leases, farm)
    admin = {"Authorization": f"Bearer {ADMIN}"}
    assert api.get("/v1/jobs", headers=admin).status_code == 200
    assert api.get("/v1/jobs/j-1", headers=admin).status_code == 200
    assert api.get("/v1/jobs/no-such-job-4711", headers=admin).status_code == 404
    assert api.get("/v1/jobs/j-1").status_code == 401
    assert api.get("/no/such/route/4711").status_code == 404

    answer = api.get("/metrics")
    assert answer.status_code == 200
    assert answer.headers["content-type"] == metrics.CONTENT_TYPE
    got = parse(answer.text)
    assert value(got, "cotune_tasks", state="leased") == 1
    latency = {
        dict(k)["route"]: dict(k)
        for k in got["cotune_api_request_duration_seconds_count"]
        if dict(k)["route"] != "/metrics"
    }
    assert latency["/v1/jobs/{job_id}"]["method"] == "GET" and "/v1/jobs" in latency
    # Other tests of this process add routes of their own; no raw path is ever a route.
    assert "unmatched" in latency and not any("4711" in route for route in latency)
    statuses = {
        (dict(k)["route"], dict(k)["status"])
        for k, v in got["cotune_api_request_duration_seconds_count"].items()
        if v
    }
    assert {("/v1/jobs/{job_id}", s) for s in ("2xx", "4xx")} <= statuses
    assert ("unmatched", "4xx") in statuses
    # No unbounded label: no worker, lease or task label, no id or raw path as a value.
    for name, series in got.items():
        for labels in series:
            assert not {k for k, _ in labels} & FORBIDDEN_LABELS, name
            values = " ".join(v for _, v in labels)
            for secret in (farm, lease.lease_id, task.task_id, "4711"):
                assert secret not in values, f"{name} has {secret} in a label"
    names = {n.removesuffix("_total") for n in got} | set(got)
    missing = {n for n in metric_names_in_rules() if n not in names}
    assert missing == set(), "the alert rules use series nobody exports"

    tool = shutil.which("promtool")
    if tool is None:
        pytest.skip("promtool is not installed (apt-get install prometheus; .ci/apt-packages)")
    lint = subprocess.run(
        [tool, "check", "metrics"], input=answer.text, capture_output=True, text=True, timeout=60
    )
    assert (lint.returncode, lint.stdout + lint.stderr) == (0, "")
