"""Join tokens and worker tokens on a real Redis and SeaweedFS: a use limit that holds when
many workers enroll at once, expiry, revocation (which revokes the workers enrolled with the
token and their leases, the tasks queued again uncounted), worker tokens that expire unless
used; through the Python API, the HTTP routes and the CLI."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cotune.orchestrator.api import ApiContext, create_app
from cotune.orchestrator.cli.app import app as cli_app
from cotune.orchestrator.control.leases import Leases
from cotune.orchestrator.control.state import State
from cotune.orchestrator.control.tokens import JoinTokens
from cotune.orchestrator.control.workers import Revocation, Workers
from cotune.orchestrator.protocol.problems import NotFound, StaleLease, Unauthorized
from cotune.orchestrator.protocol.wire import (
    ENROLL_PATH,
    LEASE_PATH,
    EnrollRequest,
    ErrorBody,
    HeartbeatRequest,
    LeaseRequest,
)
from cotune.orchestrator.runtime.apiserver import ApiServer, serve_api
from cotune.orchestrator.settings import Settings
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from tests.integration.coordinator_kit import CPU, HARDWARE, Clock, new_job, new_task

pytestmark = pytest.mark.integration
ADMIN = "admin-token-for-tests"


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def state(redis_client: Any, clock: Clock) -> State:
    return State(redis_client, clock=clock)


@pytest.fixture
def leases(state: State, object_store: Any) -> Leases:
    return Leases(state, object_store, Settings(lease_ttl_s=30, heartbeat_interval_s=5))


def test_a_use_limit_holds_when_many_workers_enroll_at_once(state: State) -> None:
    tokens = JoinTokens(state.redis, state.keys, state.clock)
    secret, record = tokens.create("alice", max_uses=3)
    workers = Workers(state)
    start = threading.Barrier(12)
    outcomes: list[str] = []
    lock = threading.Lock()

    def enroll() -> None:
        start.wait()
        try:
            workers.enroll(secret, HARDWARE)
            outcome = "enrolled"
        except Unauthorized as refused:
            outcome = refused.message
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=enroll) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    refused = [o for o in outcomes if o != "enrolled"]
    print(f"12 at once on max_uses 3: {12 - len(refused)} enrolled, {len(refused)} refused")
    assert len(refused) == 9
    assert all("used up" in o and "max_uses is 3" in o for o in refused), refused
    stored = tokens.get(record.token_sha256)
    assert stored is not None and stored.uses == 3
    assert len(state.redis.smembers(state.keys.owner_workers("alice"))) == 3
    assert len(workers.all()) == 3


def test_an_expired_join_token_enrolls_nobody_and_stays_listed_a_while(
    state: State, clock: Clock
) -> None:
    tokens = JoinTokens(state.redis, state.keys, state.clock)
    secret, record = tokens.create("bob", ttl_s=60)
    Workers(state).enroll(secret, HARDWARE)
    clock.advance(61)
    with pytest.raises(Unauthorized, match="join token expired") as refused:
        Workers(state).enroll(secret, HARDWARE)
    assert refused.value.field == "join_token"
    with pytest.raises(Unauthorized, match="unknown or expired join token"):
        Workers(state).enroll("ctj_guess", HARDWARE)
    listed = tokens.all()
    assert [(t.name, t.uses, t.expires_at) for t in listed] == [("bob", 1, record.expires_at)]
    assert state.redis.ttl(state.keys.join_token(record.token_sha256)) > 6 * 24 * 3600
    print(f"expired token listed: {listed[0]}")


def test_revoking_a_join_token_revokes_its_workers_and_their_leases(
    state: State, leases: Leases, object_store: Any
) -> None:
    new_job(state, "j-1")
    tasks = [new_task(state, object_store, "j-1", shard=s) for s in range(4)]
    tokens = JoinTokens(state.redis, state.keys, state.clock)
    registry = Workers(state)
    first, _ = tokens.create("alice")
    second, _ = tokens.create("alice")
    other, _ = tokens.create("bob")
    enrolled = {}
    for who, secret in (("a1", first), ("a2", second), ("b1", other)):
        record, worker_token = registry.enroll(secret, HARDWARE)
        enrolled[who] = (record.worker_id, worker_token)
    held = {who: leases.lease(worker_id, CPU) for who, (worker_id, _) in enrolled.items()}
    assert all(lease is not None for lease in held.values())

    done = registry.revoke_join_token("alice")
    print(f"revoked: {done}")
    assert done == Revocation(tokens=2, workers=2, leases=2)
    for who in ("a1", "a2"):
        worker_id, worker_token = enrolled[who]
        with pytest.raises(Unauthorized, match="worker token revoked"):
            registry.authenticate(worker_id, worker_token)
        lease = held[who]
        assert lease is not None
        assert leases.get_lease(lease.lease_id).state == "revoked"
        with pytest.raises(StaleLease, match="revoked"):
            leases.heartbeat(worker_id, lease.lease_id, HeartbeatRequest(step=1, max_steps=4))
        task = state.get_task(lease.task_id)
        assert (task.state, task.failures) == ("queued", 0)
    # Bob's worker and lease are untouched; alice's tokens enroll nobody any more.
    bob_id, bob_token = enrolled["b1"]
    assert registry.authenticate(bob_id, bob_token).worker_id == bob_id
    assert held["b1"] is not None and leases.get_lease(held["b1"].lease_id).state == "active"
    with pytest.raises(Unauthorized, match="join token revoked"):
        registry.enroll(first, HARDWARE)
    kinds = [e.kind for e in state.events.read("j-1")]
    assert kinds.count("lease_revoked") == 2
    # Again: nothing more to revoke; an unknown name is 404.
    assert registry.revoke_join_token("alice") == Revocation(0, 0, 0)
    with pytest.raises(NotFound, match="no join token named 'nobody'"):
        registry.revoke_join_token("nobody")
    assert len(tasks) == 4 and state.get_task(tasks[3].task_id).state == "queued"


def test_revoking_one_token_by_its_hash_spares_the_owners_other_tokens(state: State) -> None:
    tokens = JoinTokens(state.redis, state.keys, state.clock)
    registry = Workers(state)
    leaked, leaked_record = tokens.create("carol")
    kept, _ = tokens.create("carol")
    w1, t1 = registry.enroll(leaked, HARDWARE)
    w2, t2 = registry.enroll(kept, HARDWARE)
    done = registry.revoke_join_token(leaked_record.token_sha256)
    print(f"revoked by hash: {done}")
    assert done == Revocation(tokens=1, workers=1, leases=0)
    with pytest.raises(Unauthorized, match="revoked"):
        registry.authenticate(w1.worker_id, t1)
    assert registry.authenticate(w2.worker_id, t2).worker_id == w2.worker_id
    assert registry.enroll(kept, HARDWARE)[0].name == "carol"


def test_a_standing_join_token_is_registered_once_and_stays_revoked(state: State) -> None:
    """COTUNE_JOIN_TOKEN (a deployment's Secret): registered at the first start, left alone
    at the next, and a revoked one is not brought back by a restart."""
    tokens = JoinTokens(state.redis, state.keys, state.clock)
    standing = "ctj_standing-token-from-a-kubernetes-secret-000"
    assert tokens.ensure(standing, "volunteers") is True
    record = tokens.verify(standing)
    assert record is not None and (record.name, record.kind) == ("volunteers", "volunteer")
    assert tokens.ensure(standing, "volunteers") is False
    assert [t.name for t in tokens.all()] == ["volunteers"]
    Workers(state).revoke_join_token(record.token_sha256)
    assert tokens.ensure(standing, "volunteers") is False
    assert tokens.verify(standing) is None
    with pytest.raises(ValueError, match="at least 32 printable ASCII characters"):
        tokens.ensure("short", "volunteers")
    assert len(tokens.all()) == 1


def test_a_worker_token_expires_unless_used(state: State, clock: Clock) -> None:
    registry = Workers(state, token_ttl_s=3600)
    secret, _ = JoinTokens(state.redis, state.keys, state.clock).create("dave")
    record, worker_token = registry.enroll(secret, HARDWARE)
    assert record.token_expires_at == clock.now + 3600
    key = state.keys.worker(record.worker_id)
    # Used within its lifetime, it lives on (renewed at most once a minute).
    renewals = 0
    for _ in range(3):
        clock.advance(3000)
        before = state.redis.hget(key, "token_expires_at")
        registry.authenticate(record.worker_id, worker_token)
        renewals += state.redis.hget(key, "token_expires_at") != before
        clock.advance(1)
        unchanged = state.redis.hget(key, "token_expires_at")
        registry.authenticate(record.worker_id, worker_token)
        assert state.redis.hget(key, "token_expires_at") == unchanged
    print(f"3 renewals over {3 * 3001} s with a 3600 s token: {renewals}")
    assert renewals == 3
    # Abandoned past its lifetime, it is refused.
    clock.advance(3601)
    with pytest.raises(Unauthorized, match="worker token expired; enroll again"):
        registry.authenticate(record.worker_id, worker_token)


# --- over HTTP and the CLI ----------------------------------------------------------------


@pytest.fixture
def api(redis_client: Any, object_store: Any, tmp_path: Path, clock: Clock) -> TestClient:
    settings = Settings(home=tmp_path / "home", lease_ttl_s=30, worker_token_ttl_s=600)
    context = ApiContext.create(settings, redis_client, object_store, ADMIN, clock=clock)
    headers = {"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/json"}
    return TestClient(create_app(context), headers=headers)


def _error(answer: Any) -> tuple[int, str, str]:
    error = ErrorBody.model_validate_json(answer.content).error
    return answer.status_code, error.code, error.message


def test_the_token_routes(api: TestClient, clock: Clock) -> None:
    made = api.post("/v1/tokens/join", json={"name": "Ann Lee", "max_uses": 1, "ttl_s": 3600})
    assert made.status_code == 201, made.text
    assert made.json()["max_uses"] == 1
    secret = made.json()["token"]
    enroll = EnrollRequest(join_token=secret, hardware=HARDWARE).model_dump_json()
    hello = api.post(ENROLL_PATH, content=enroll, headers={"Authorization": ""})
    assert hello.status_code == 200, hello.text
    worker_id, worker_token = hello.json()["worker_id"], hello.json()["worker_token"]
    again = api.post(ENROLL_PATH, content=enroll, headers={"Authorization": ""})
    assert _error(again)[:2] == (401, "unauthorized") and "max_uses is 1" in _error(again)[2]

    listed = api.get("/v1/tokens/join").json()["tokens"]
    assert listed == [
        {
            "name": "Ann Lee",
            "kind": "volunteer",
            "created_at": clock.now,
            "expires_at": clock.now + 3600,
            "uses": 1,
            "max_uses": 1,
            "revoked_at": None,
        }
    ]
    assert secret not in api.get("/v1/tokens/join").text
    worker = {"Authorization": f"Bearer {worker_token}"}
    lease_body = LeaseRequest(capabilities=CPU).model_dump_json()
    lease_path = LEASE_PATH.format(worker_id=worker_id)
    assert api.post(lease_path, content=lease_body, headers=worker).status_code == 200

    revoked = api.delete("/v1/tokens/join/Ann%20Lee")
    assert revoked.status_code == 200, revoked.text
    assert revoked.json() == {"name": "Ann Lee", "tokens": 1, "workers": 1, "leases": 0}
    refused = api.post(lease_path, content=lease_body, headers=worker)
    assert _error(refused)[:2] == (401, "unauthorized") and "revoked" in _error(refused)[2]
    assert api.get("/v1/tokens/join").json()["tokens"][0]["revoked_at"] == clock.now
    assert _error(api.delete("/v1/tokens/join/nobody"))[:2] == (404, "not_found")
    assert api.delete("/v1/tokens/join/nobody", headers={"Authorization": ""}).status_code == 401

    # A worker token left unused past COTUNE_WORKER_TOKEN_TTL_S (here 600 s) is refused.
    second = api.post("/v1/tokens/join", json={"name": "eve"}).json()["token"]
    fresh = api.post(
        ENROLL_PATH,
        content=EnrollRequest(join_token=second, hardware=HARDWARE).model_dump_json(),
        headers={"Authorization": ""},
    ).json()
    clock.advance(601)
    stale = api.post(
        LEASE_PATH.format(worker_id=fresh["worker_id"]),
        content=lease_body,
        headers={"Authorization": f"Bearer {fresh['worker_token']}"},
    )
    assert _error(stale) == (401, "unauthorized", "worker token expired; enroll again")
    print(f"token routes: {len(listed)} listed, revoked {revoked.json()}")


@pytest.fixture
def served(redis_client: Any, object_store: Any, tmp_path: Path) -> Iterator[ApiServer]:
    settings = Settings(home=tmp_path / "served", lease_ttl_s=60)
    context = ApiContext.create(settings, redis_client, object_store, ADMIN)
    server = serve_api(context, "127.0.0.1", 0, write_api_file=False)
    try:
        yield server
    finally:
        server.stop()


def test_the_token_commands(served: ApiServer, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("COTUNE_COORDINATOR", "COTUNE_ADMIN_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    runner = CliRunner()

    def cotune(*args: str) -> Any:
        return runner.invoke(cli_app, [*args, "--coordinator", served.url, "--token", ADMIN])

    made = cotune("token", "create", "--join", "--name", "ann lee", "--max-uses", "2")
    assert made.exit_code == 0 and "enrolls at most 2 worker(s)" in made.output, made.output
    listed = cotune("token", "list")
    assert listed.exit_code == 0 and "ann lee" in listed.output and "0/2" in listed.output
    assert "ctj_" not in listed.output  # never the token itself
    revoked = cotune("token", "revoke", "ann lee")
    assert revoked.exit_code == 0, revoked.output
    assert "revoked 1 join token(s) named ann lee, 0 worker token(s)" in revoked.output
    missing = cotune("token", "revoke", "nobody")
    assert missing.exit_code == 1 and "no join token named 'nobody'" in missing.output
    assert cotune("token", "create", "--join", "--max-uses", "0").exit_code == 2
    print(f"token commands: create, list, revoke ({revoked.output.strip()})")
