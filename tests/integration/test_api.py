"""The HTTP API on a real Redis and a real S3 (SeaweedFS), through FastAPI's TestClient: the
job, worker and owner routes, and a table of bad requests, each answered with a clear 4xx and
leaving every Redis key byte for byte as it was."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cotune.orchestrator.api import ApiContext, create_app
from cotune.orchestrator.control.verdicts import Verdicts
from cotune.orchestrator.protocol.wire import (
    COMPLETE_PATH,
    ENROLL_PATH,
    FAIL_PATH,
    HEARTBEAT_PATH,
    LEASE_PATH,
    RELEASE_PATH,
    ArtifactRef,
    CompleteRequest,
    EnrollRequest,
    ErrorBody,
    LeaseRequest,
    TaskLease,
)
from cotune.orchestrator.settings import Settings
from fastapi.testclient import TestClient

from tests.integration.coordinator_kit import (
    CPU,
    HARDWARE,
    Clock,
    new_task,
    result_of,
    snapshot,
    upload_checkpoint,
)

pytestmark = pytest.mark.integration
ADMIN = "admin-token-for-tests"
TTL = 30.0


def spec_yaml(dataset: str, name: str = "tiny") -> str:
    return (
        f"name: {name}\nbase_model: cotune://tiny-llama\n"
        f"dataset: {{path: {dataset}, format: alpaca, shards: 2}}\n"
        "training: {max_steps: 4, sequence_len: 64}\n"
    )


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def coordinator(redis_client: Any, object_store: Any, tmp_path: Path, clock: Clock) -> ApiContext:
    settings = Settings(home=tmp_path / "home", lease_ttl_s=TTL, heartbeat_interval_s=5)
    return ApiContext.create(
        settings, redis_client, object_store, ADMIN, clock=clock, retry_after_s=0.5
    )


@pytest.fixture
def api(coordinator: ApiContext) -> TestClient:
    # Not entered as a context manager: no lifespan, so no background reclaimer touches the
    # state between a test's snapshots. Bodies are JSON unless a request says otherwise.
    return TestClient(create_app(coordinator), headers={"Content-Type": "application/json"})


def admin(token: str = ADMIN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def submit(api: TestClient, text: str) -> str:
    answer = api.post(
        "/v1/jobs", content=text, headers={**admin(), "Content-Type": "application/yaml"}
    )
    assert answer.status_code == 201, answer.text
    return str(answer.json()["job_id"])


@dataclass
class Worker:
    worker_id: str
    token: str

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def enroll(api: TestClient, name: str) -> Worker:
    join = api.post("/v1/tokens/join", json={"name": name}, headers=admin())
    assert join.status_code == 201, join.text
    body = EnrollRequest(join_token=join.json()["token"], hardware=HARDWARE)
    answer = api.post(ENROLL_PATH, content=body.model_dump_json())
    assert answer.status_code == 200, answer.text
    return Worker(answer.json()["worker_id"], answer.json()["worker_token"])


def lease(api: TestClient, worker: Worker) -> TaskLease:
    answer = api.post(
        LEASE_PATH.format(worker_id=worker.worker_id),
        content=LeaseRequest(capabilities=CPU).model_dump_json(),
        headers=worker.headers(),
    )
    assert answer.status_code == 200, answer.text
    task = answer.json()["task"]
    assert task is not None, answer.text
    return TaskLease.model_validate(task)


def lease_path(path: str, worker: Worker, lease_id: str) -> str:
    return path.format(worker_id=worker.worker_id, lease_id=lease_id)


# --- happy paths ----------------------------------------------------------------------------


def test_jobs_are_submitted_listed_inspected_and_cancelled(
    api: TestClient,
    coordinator: ApiContext,
    alpaca_dataset: Path,
    object_store: Any,
    clock: Clock,
) -> None:
    job_id = submit(api, spec_yaml(str(alpaca_dataset)))
    clock.advance(1)
    assert job_id.startswith("tiny-")
    stored = object_store.get_bytes(f"jobs/{job_id}/spec.yaml").decode()
    assert f"path: {alpaca_dataset}" in stored
    as_json = json.dumps(
        {
            "name": "other",
            "base_model": "cotune://tiny-llama",
            "dataset": {"path": str(alpaca_dataset)},
            "training": {"max_steps": 2},
        }
    )
    answer = api.post(
        "/v1/jobs", content=as_json, headers={**admin(), "Content-Type": "application/json"}
    )
    assert answer.status_code == 201
    listed = api.get("/v1/jobs", headers=admin()).json()["jobs"]
    assert [j["name"] for j in listed] == ["tiny", "other"]
    assert [j["state"] for j in listed] == ["pending", "pending"]
    assert api.get("/v1/jobs", params={"state": "running"}, headers=admin()).json() == {"jobs": []}
    detail = api.get(f"/v1/jobs/{job_id}", headers=admin()).json()
    assert detail["spec_yaml"] == stored and detail["tasks"]["queued"] == 0

    state = coordinator.state
    assert state.transition_job(job_id, "running", expect=["pending"])
    state.put_trial(job_id, 0, {"training.learning_rate": 0.001})
    new_task(state, object_store, job_id, shard=0)
    new_task(state, object_store, job_id, shard=1)
    state.record_round(job_id, 0, 0, 2.5)
    trials = api.get(f"/v1/jobs/{job_id}/trials", headers=admin()).json()["trials"]
    assert len(trials) == 1 and trials[0]["eval_losses"] == [2.5]
    assert [t["shard"] for t in trials[0]["tasks"]] == [0, 1]

    worker = enroll(api, "alice")
    held = lease(api, worker)
    cancelled = api.post(f"/v1/jobs/{job_id}/cancel", headers=admin()).json()
    assert cancelled["state"] == "cancelled" and cancelled["tasks"]["cancelled"] == 1
    beat = api.post(
        lease_path(HEARTBEAT_PATH, worker, held.lease_id),
        json={"step": 1, "max_steps": 4},
        headers=worker.headers(),
    )
    assert beat.status_code == 200 and beat.json()["action"] == "stop"


def test_events_stream_and_resume_from_last_event_id(api: TestClient, alpaca_dataset: Path) -> None:
    job_id = submit(api, spec_yaml(str(alpaca_dataset)))
    api.post(f"/v1/jobs/{job_id}/cancel", headers=admin())
    # The job has finished: a followed stream sends everything, then ends.
    with api.stream("GET", f"/v1/jobs/{job_id}/events", headers=admin()) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        text = stream.read().decode()
    blocks = [b for b in text.split("\n\n") if b.strip()]
    kinds = [
        line.split(": ", 1)[1]
        for b in blocks
        for line in b.splitlines()
        if line.startswith("event: ")
    ]
    ids = [
        line.split(": ", 1)[1] for b in blocks for line in b.splitlines() if line.startswith("id: ")
    ]
    assert kinds == ["job_created", "job_state"]
    again = api.get(
        f"/v1/jobs/{job_id}/events",
        params={"follow": "false"},
        headers={**admin(), "Last-Event-ID": ids[0]},
    )
    assert "event: job_state" in again.text and "job_created" not in again.text


def test_download_lists_the_best_adapter_once_the_job_succeeded(
    api: TestClient, coordinator: ApiContext, alpaca_dataset: Path, object_store: Any
) -> None:
    job_id = submit(api, spec_yaml(str(alpaca_dataset)))
    object_store.put_bytes(f"jobs/{job_id}/best/adapter_config.json", b'{"r": 4}')
    object_store.put_bytes(f"jobs/{job_id}/best/README.md", b"# best adapter\n")
    assert api.get(f"/v1/jobs/{job_id}/download", headers=admin()).status_code == 409
    coordinator.state.transition_job(job_id, "succeeded", expect=["pending"])
    files = api.get(f"/v1/jobs/{job_id}/download", headers=admin()).json()["files"]
    assert sorted(f["name"] for f in files) == ["README.md", "adapter_config.json"]
    readme = next(f for f in files if f["name"] == "README.md")
    import httpx

    assert httpx.get(readme["url"]).content == b"# best adapter\n"


def test_health_metrics_and_openapi(api: TestClient) -> None:
    assert api.get("/healthz").json() == {"ok": True}
    assert api.get("/readyz").text == "ready\n"
    assert "cotune_state_up 1.0" in api.get("/metrics").text  # tests/integration/test_metrics.py
    paths = api.get("/openapi.json").json()["paths"]
    for path in (ENROLL_PATH, LEASE_PATH, HEARTBEAT_PATH, "/v1/jobs", "/v1/jobs/{job_id}/events"):
        assert path in paths
    assert "application/yaml" in paths["/v1/jobs"]["post"]["requestBody"]["content"]


def test_the_leaderboard_and_worker_list_show_accepted_work(
    api: TestClient, coordinator: ApiContext, object_store: Any, alpaca_dataset: Path
) -> None:
    job_id = submit(api, spec_yaml(str(alpaca_dataset)))
    coordinator.state.transition_job(job_id, "running", expect=["pending"])
    new_task(coordinator.state, object_store, job_id)
    alice = enroll(api, "alice")
    held = lease(api, alice)
    path = lease_path(COMPLETE_PATH, alice, held.lease_id)
    body = result_of(held, tokens=100).model_dump_json()  # the claim is never read
    first = api.post(path, content=body, headers=alice.headers())
    # A volunteer's result is taken in and credited once the heavy checks accept it.
    assert first.json() == {"accepted": True, "credit": 0.0, "reason": None}
    assert api.post(path, content=body, headers=alice.headers()).json() == first.json()
    assert api.get("/v1/leaderboard").json()["entries"] == []
    waiting = coordinator.state.get_task(held.task_id)
    assert waiting.state == "verifying"
    assert Verdicts(coordinator.state).accept(waiting)  # as pipeline/verification.py does
    board = api.get("/v1/leaderboard").json()["entries"]  # public
    assert board == [{"name": "alice", "tokens": 512.0, "tasks": 1}]  # the task's count
    workers = api.get("/v1/workers", headers=admin()).json()["workers"]
    assert [(w["name"], w["tasks_accepted"], w["leases"]) for w in workers] == [("alice", 1, [])]


# --- owners: strikes and quarantine, the operator's levers ---------------------------------


def owners(api: TestClient) -> list[tuple[str, float, bool, int]]:
    answer = api.get("/v1/owners", headers=admin())
    assert answer.status_code == 200, answer.text
    return [
        (o["name"], o["strikes"], o["quarantined"], o["workers"]) for o in answer.json()["owners"]
    ]


def lease_answer(api: TestClient, worker: Worker) -> Any:
    return api.post(
        LEASE_PATH.format(worker_id=worker.worker_id),
        content=LeaseRequest(capabilities=CPU).model_dump_json(),
        headers=worker.headers(),
    )


def test_an_owner_is_listed_quarantined_and_pardoned(
    api: TestClient, coordinator: ApiContext, object_store: Any, alpaca_dataset: Path
) -> None:
    job_id = submit(api, spec_yaml(str(alpaca_dataset)))
    coordinator.state.transition_job(job_id, "running", expect=["pending"])
    for shard in range(2):
        new_task(coordinator.state, object_store, job_id, shard=shard)
    alice, bob = enroll(api, "alice"), enroll(api, "bob")
    held, bobs = lease(api, alice), lease(api, bob)
    outcome = coordinator.strikes.add(alice.worker_id, "a strike, as a rejection records it")
    assert (outcome.strikes, outcome.quarantined) == (1.0, False)
    assert api.get("/v1/owners", headers=admin()).json()["max_strikes"] == 3.0
    assert owners(api) == [("alice", 1.0, False, 1), ("bob", 0.0, False, 1)]

    # Quarantine now: alice's active lease is revoked, its task queued again uncounted.
    done = api.post("/v1/owners/alice/quarantine", headers=admin())
    assert done.status_code == 200, done.text
    assert done.json() == {"name": "alice", "strikes": 3.0, "leases": 1}
    assert coordinator.leases.get_lease(held.lease_id).state == "revoked"
    task = coordinator.state.get_task(held.task_id)
    assert (task.state, task.failures) == ("queued", 0)
    assert coordinator.leases.get_lease(bobs.lease_id).state == "active"  # another owner's
    refused = lease_answer(api, alice)
    assert refused.status_code == 403, refused.text
    error = ErrorBody.model_validate_json(refused.content).error
    assert (error.code, error.field) == ("forbidden", "worker_id")
    assert "'alice' is quarantined" in error.message
    assert owners(api) == [("alice", 3.0, True, 1), ("bob", 0.0, False, 1)]
    again = api.post("/v1/owners/alice/quarantine", headers=admin())  # nothing more to revoke
    assert again.json() == {"name": "alice", "strikes": 3.0, "leases": 0}

    # Pardon: strikes cleared, quarantine lifted, alice leases at once.
    pardoned = api.delete("/v1/owners/alice/quarantine", headers=admin())
    assert pardoned.status_code == 200, pardoned.text
    assert pardoned.json() == {"name": "alice", "strikes": 3.0, "quarantined": True}
    assert owners(api) == [("alice", 0.0, False, 1), ("bob", 0.0, False, 1)]
    resumed = lease(api, alice)
    assert (resumed.task_id, resumed.attempt) == (held.task_id, 2)
    assert api.delete("/v1/owners/alice/quarantine", headers=admin()).status_code == 404


def test_an_owner_no_token_has_yet_can_be_banned_in_advance(api: TestClient) -> None:
    done = api.post("/v1/owners/carol/quarantine", headers=admin())
    assert done.json() == {"name": "carol", "strikes": 0.0, "leases": 0}
    assert owners(api) == [("carol", 0.0, True, 0)]
    join = api.post("/v1/tokens/join", json={"name": "carol"}, headers=admin()).json()["token"]
    body = EnrollRequest(join_token=join, hardware=HARDWARE).model_dump_json()
    refused = api.post(ENROLL_PATH, content=body)
    assert refused.status_code == 403 and "'carol' is quarantined" in refused.text
    pardoned = api.delete("/v1/owners/carol/quarantine", headers=admin())
    assert pardoned.json() == {"name": "carol", "strikes": 0.0, "quarantined": True}
    assert api.post(ENROLL_PATH, content=body).status_code == 200


def test_the_owner_strike_limit_is_cotune_max_strikes(
    redis_client: Any, object_store: Any, tmp_path: Path
) -> None:
    settings = Settings(home=tmp_path / "home", lease_ttl_s=TTL, max_strikes=2)
    context = ApiContext.create(settings, redis_client, object_store, ADMIN)
    api = TestClient(create_app(context), headers={"Content-Type": "application/json"})
    alice = enroll(api, "alice")
    assert context.strikes is context.leases.strikes  # what the routes and the leases use
    assert not context.strikes.add(alice.worker_id, "one").quarantined
    assert context.strikes.add(alice.worker_id, "two").quarantined
    assert api.get("/v1/owners", headers=admin()).json() == {
        "max_strikes": 2.0,
        "owners": [{"name": "alice", "strikes": 2.0, "quarantined": True, "workers": 1}],
    }


# --- bad input: a clear 4xx, and no key changed ----------------------------------------------


@dataclass
class Scene:
    api: TestClient
    job: str
    finished: str
    alice: Worker
    bob: Worker
    active: TaskLease  # alice's
    expired: TaskLease  # alice's attempt 1, its task leased again by bob
    completed: TaskLease  # alice's, accepted
    completion: CompleteRequest
    dataset: Path


@pytest.fixture
def scene(
    api: TestClient,
    coordinator: ApiContext,
    object_store: Any,
    alpaca_dataset: Path,
    clock: Clock,
) -> Scene:
    state = coordinator.state
    job = submit(api, spec_yaml(str(alpaca_dataset)))
    finished = submit(api, spec_yaml(str(alpaca_dataset), name="done"))
    state.transition_job(finished, "succeeded", expect=["pending"])
    state.transition_job(job, "running", expect=["pending"])
    state.put_trial(job, 0, {})
    for shard in range(3):
        new_task(state, object_store, job, shard=shard)
    alice, bob = enroll(api, "alice"), enroll(api, "bob")
    expired = lease(api, alice)
    clock.advance(TTL + 1)
    assert coordinator.leases.reclaim_expired() == 1
    assert lease(api, bob).attempt == 2
    completed = lease(api, alice)
    completion = result_of(completed)
    answer = api.post(
        lease_path(COMPLETE_PATH, alice, completed.lease_id),
        content=completion.model_dump_json(),
        headers=alice.headers(),
    )
    assert answer.json()["accepted"]
    active = lease(api, alice)
    return Scene(
        api, job, finished, alice, bob, active, expired, completed, completion, alpaca_dataset
    )


Request = Callable[[Scene], Any]
YAML = {"Content-Type": "application/yaml"}


def _post_spec(text: str, content_type: str = "application/yaml") -> Request:
    return lambda s: s.api.post(
        "/v1/jobs",
        content=text.replace("DATA", str(s.dataset)),
        headers={**admin(), "Content-Type": content_type},
    )


def _worker_call(path: str, who: str, lease: str, body: Callable[[Scene], Any]) -> Request:
    def call(s: Scene) -> Any:
        worker = s.alice if who == "alice" else s.bob
        target = {"active": s.active, "expired": s.expired, "completed": s.completed}[lease]
        payload = body(s)
        content = payload if isinstance(payload, str) else payload.model_dump_json()
        return s.api.post(
            lease_path(path, worker, target.lease_id), content=content, headers=worker.headers()
        )

    return call


def _moved_key(s: Scene) -> CompleteRequest:
    artifacts = dict(result_of(s.active).artifacts)
    ref = artifacts["metrics.json"]
    artifacts["metrics.json"] = ArtifactRef(
        key="jobs/x/metrics.json", sha256=ref.sha256, bytes=ref.bytes
    )
    return CompleteRequest(artifacts=artifacts)


def _other_artifacts(s: Scene) -> CompleteRequest:
    artifacts = dict(s.completion.artifacts)
    ref = artifacts["metrics.json"]
    artifacts["metrics.json"] = ref.model_copy(update={"sha256": "0" * 64})
    return CompleteRequest(artifacts=artifacts)


def _foreign_checkpoint(s: Scene) -> str:
    ref = upload_checkpoint(s.active, 2)
    bad = ref.archive.model_copy(update={"key": "jobs/x/ckpt.tar"})
    return json.dumps(
        {"step": 2, "max_steps": 4, "checkpoint": {"step": 2, "archive": bad.model_dump()}}
    )


SPEC_HEAD = "base_model: cotune://tiny-llama\ntraining: {max_steps: 2}\n"
LEASE_BODY = LeaseRequest(capabilities=CPU).model_dump_json()
BEAT = '{"step": 1, "max_steps": 4}'


def _lease_as(
    worker_id: Callable[[Scene], str], token: Callable[[Scene], dict[str, str]]
) -> Request:
    return lambda s: s.api.post(
        LEASE_PATH.format(worker_id=worker_id(s)), content=LEASE_BODY, headers=token(s)
    )


@dataclass(frozen=True)
class Bad:
    request: Request
    status: int
    code: str
    fragment: str  # of the message
    field: str | None
    # A forgery (another worker's lease, a checkpoint key never issued) earns the caller's
    # owner a strike (control/strikes.py): the one change such a refusal makes.
    strikes: str | None = None


BAD_REQUESTS: dict[str, Bad] = {
    "yaml syntax error": Bad(
        _post_spec("name: [oops\n"), 422, "invalid_request", "YAML syntax error",
        "<request body>:2:1",
    ),
    "spec with several problems": Bad(
        _post_spec("name: Bad Name\ndataset: {path: DATA}\nlora: {lora_rr: 4}\n" + SPEC_HEAD),
        422, "invalid_request", "2 problem(s)", "name",
    ),
    "relative dataset path": Bad(
        _post_spec("name: t\ndataset: {path: data/x.jsonl}\n" + SPEC_HEAD),
        422, "invalid_request", "relative", "dataset.path",
    ),
    "missing dataset": Bad(
        _post_spec("name: t\ndataset: {path: /nonexistent/x.jsonl}\n" + SPEC_HEAD),
        422, "invalid_request", "no such file", "dataset.path",
    ),
    "spec of the wrong media type": Bad(
        _post_spec("name: t", "text/csv"), 422, "invalid_request", "application/yaml",
        "content-type",
    ),
    "spec as a JSON list": Bad(
        _post_spec("[1, 2]", "application/json"), 422, "invalid_request", "JSON object", "body"
    ),
    "unknown job": Bad(
        lambda s: s.api.get("/v1/jobs/nope-1", headers=admin()),
        404, "not_found", "no job 'nope-1'", "job_id",
    ),
    "cancel an unknown job": Bad(
        lambda s: s.api.post("/v1/jobs/nope-1/cancel", headers=admin()),
        404, "not_found", "no job", "job_id",
    ),
    "trials of an unknown job": Bad(
        lambda s: s.api.get("/v1/jobs/nope-1/trials", headers=admin()),
        404, "not_found", "no job", "job_id",
    ),
    "events of an unknown job": Bad(
        lambda s: s.api.get("/v1/jobs/nope-1/events", headers=admin()),
        404, "not_found", "no job", "job_id",
    ),
    "missing admin token": Bad(
        lambda s: s.api.get("/v1/jobs"), 401, "unauthorized", "missing admin token", None
    ),
    "wrong admin token": Bad(
        lambda s: s.api.get("/v1/jobs", headers=admin("guess")),
        401, "unauthorized", "wrong admin token", None,
    ),
    "worker token on a job route": Bad(
        lambda s: s.api.post("/v1/jobs", content="x", headers={**s.alice.headers(), **YAML}),
        401, "unauthorized", "wrong admin token", None,
    ),
    "join token without admin token": Bad(
        lambda s: s.api.post("/v1/tokens/join", json={}),
        401, "unauthorized", "missing admin token", None,
    ),
    "join token with a bad name": Bad(
        lambda s: s.api.post("/v1/tokens/join", json={"name": "../x"}, headers=admin()),
        422, "invalid_request", "pattern", "name",
    ),
    "owner list without admin token": Bad(
        lambda s: s.api.get("/v1/owners"), 401, "unauthorized", "missing admin token", None
    ),
    "owner quarantine with a worker token": Bad(
        lambda s: s.api.post("/v1/owners/bob/quarantine", headers=s.alice.headers()),
        401, "unauthorized", "wrong admin token", None,
    ),
    "owner pardon without admin token": Bad(
        lambda s: s.api.delete("/v1/owners/bob/quarantine"),
        401, "unauthorized", "missing admin token", None,
    ),
    "owner quarantine of a bad name": Bad(
        lambda s: s.api.post("/v1/owners/bob:x/quarantine", headers=admin()),
        422, "invalid_request", "bad owner name 'bob:x': 1-64 letters", "name",
    ),
    "owner quarantine of a name with a slash": Bad(
        lambda s: s.api.post("/v1/owners/bob%2Fx/quarantine", headers=admin()),
        422, "invalid_request", "bad owner name 'bob/x'", "name",
    ),
    "owner pardon of a bad name": Bad(
        lambda s: s.api.delete("/v1/owners/%25bob/quarantine", headers=admin()),
        422, "invalid_request", "bad owner name '%bob'", "name",
    ),
    "owner pardon of an owner in good standing": Bad(
        lambda s: s.api.delete("/v1/owners/bob/quarantine", headers=admin()),
        404, "not_found", "'bob' is not quarantined and has no strikes", "name",
    ),
    "cancel a finished job": Bad(
        lambda s: s.api.post(f"/v1/jobs/{s.finished}/cancel", headers=admin()),
        409, "conflict", "already finished (succeeded)", "job_id",
    ),
    "download before success": Bad(
        lambda s: s.api.get(f"/v1/jobs/{s.job}/download", headers=admin()),
        409, "conflict", "is running", "job_id",
    ),
    "bad Last-Event-ID": Bad(
        lambda s: s.api.get(
            f"/v1/jobs/{s.job}/events", headers={**admin(), "Last-Event-ID": "x"}
        ),
        422, "invalid_request", "not an event id", "Last-Event-ID",
    ),
    "unknown join token": Bad(
        lambda s: s.api.post(
            ENROLL_PATH,
            content=EnrollRequest(join_token="guess", hardware=HARDWARE).model_dump_json(),
        ),
        401, "unauthorized", "unknown or expired join token", "join_token",
    ),
    "lease by an unknown worker": Bad(
        _lease_as(lambda s: "w-nobody", lambda s: s.alice.headers()),
        401, "unauthorized", "unknown worker", "worker_id",
    ),
    "lease without a token": Bad(
        _lease_as(lambda s: s.alice.worker_id, lambda s: {}),
        401, "unauthorized", "missing bearer token", None,
    ),
    "a worker posing as another": Bad(
        _lease_as(lambda s: s.alice.worker_id, lambda s: s.bob.headers()),
        401, "unauthorized", "wrong token", None,
    ),
    "heartbeat on another worker's lease": Bad(
        _worker_call(HEARTBEAT_PATH, "bob", "active", lambda s: BEAT),
        403, "forbidden", "another worker", "lease_id", strikes="bob",
    ),
    "release of another worker's lease": Bad(
        _worker_call(RELEASE_PATH, "bob", "active", lambda s: '{"reason": "mine now"}'),
        403, "forbidden", "another worker", "lease_id", strikes="bob",
    ),
    "heartbeat with a bad body": Bad(
        _worker_call(HEARTBEAT_PATH, "alice", "active", lambda s: '{"step": -1, "max_steps": 4}'),
        422, "invalid_request", "greater than or equal to 0", "step",
    ),
    "heartbeat on an unknown lease": Bad(
        lambda s: s.api.post(
            lease_path(HEARTBEAT_PATH, s.alice, "l-nope"), content=BEAT, headers=s.alice.headers()
        ),
        404, "not_found", "no lease l-nope", "lease_id",
    ),
    "stale completion (expired attempt)": Bad(
        _worker_call(COMPLETE_PATH, "alice", "expired", lambda s: s.completion),
        409, "lease_expired", "expired; its task was queued again", None,
    ),
    "completion again with other artifacts": Bad(
        _worker_call(COMPLETE_PATH, "alice", "completed", _other_artifacts),
        409, "stale_lease", "already completed with other artifacts", None,
    ),
    "failure after completion": Bad(
        _worker_call(
            FAIL_PATH, "alice", "completed", lambda s: '{"reason": "oops", "retryable": true}'
        ),
        409, "stale_lease", "is over (completed)", None,
    ),
    "completion at a key never issued": Bad(
        _worker_call(COMPLETE_PATH, "alice", "active", _moved_key),
        422, "rejected", "not the key issued", "artifacts.metrics.json.key",
    ),
    "checkpoint at a key never issued": Bad(
        _worker_call(HEARTBEAT_PATH, "alice", "active", _foreign_checkpoint),
        422, "rejected", "not a checkpoint key issued", "checkpoint.archive.key",
        strikes="alice",
    ),
    "unknown route": Bad(
        lambda s: s.api.get("/v1/nothing", headers=admin()), 404, "not_found", "no route", None
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_a_clear_4xx_and_change_nothing(
    case: str, scene: Scene, redis_client: Any
) -> None:
    bad = BAD_REQUESTS[case]
    before = snapshot(redis_client)
    answer = bad.request(scene)
    assert answer.status_code == bad.status, answer.text
    error = ErrorBody.model_validate_json(answer.content).error
    assert error.code == bad.code and bad.fragment in error.message, error
    assert error.field == bad.field
    after = snapshot(redis_client)
    if bad.strikes is None:
        assert after == before
    else:
        keys = scene.api.app.state.coordinator.state.keys  # type: ignore[attr-defined]
        caller = (scene.alice if bad.strikes == "alice" else scene.bob).worker_id
        written = {k for k in after if after[k] != before.get(k)}
        # The strike, its log, and (for an offense with an id: a forged checkpoint) its id.
        assert written - {keys.strike_seen().encode()} == {
            k.encode() for k in (keys.strikes(), keys.strike_log(), keys.worker(caller))
        }
        assert redis_client.hget(keys.strikes(), bad.strikes) == b"1"
    if bad.status == 401:
        assert answer.headers["WWW-Authenticate"] == "Bearer"


def test_a_spec_with_several_problems_lists_each_with_its_field(scene: Scene) -> None:
    answer = _post_spec("name: Bad Name\ndataset: {path: DATA}\nlora: {lora_rr: 4}\n" + SPEC_HEAD)(
        scene
    )
    issues = ErrorBody.model_validate_json(answer.content).error.issues or []
    assert [i.field for i in issues] == ["name", "lora.lora_rr"]
    assert "did you mean 'lora_r'" in issues[1].message


def test_a_duplicate_completion_gets_the_same_answer_and_changes_nothing(
    scene: Scene, redis_client: Any
) -> None:
    before = snapshot(redis_client)
    answer = _worker_call(COMPLETE_PATH, "alice", "completed", lambda s: s.completion)(scene)
    assert answer.status_code == 200 and answer.json() == {
        "accepted": True,
        "credit": 0.0,  # a volunteer's: pending verification
        "reason": None,
    }
    assert snapshot(redis_client) == before
