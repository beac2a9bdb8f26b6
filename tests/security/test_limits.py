"""Request limits on the real app, Redis and SeaweedFS: every route's body size (413, with or
without a Content-Length, changing nothing) and per-worker rate limits (429 with
Retry-After), which the worker's client waits out before it retries."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cotune.orchestrator.api import ApiContext, create_app
from cotune.orchestrator.api.limits import OTHER_BODY_BYTES, WORKER_BODY_BYTES
from cotune.orchestrator.protocol.spec.files import MAX_SPEC_BYTES
from cotune.orchestrator.protocol.wire import (
    ENROLL_PATH,
    HEARTBEAT_PATH,
    LEASE_PATH,
    EnrollRequest,
    ErrorBody,
    LeaseRequest,
)
from cotune.orchestrator.settings import Settings
from fastapi.testclient import TestClient

from tests.integration.coordinator_kit import CPU, HARDWARE, Clock, snapshot

pytestmark = pytest.mark.integration
ADMIN = "admin-token-for-tests"
RATE, BURST = 2.0, 3.0


@pytest.fixture
def api(redis_client: Any, object_store: Any, tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(
        home=tmp_path / "home", worker_rate_per_s=RATE, worker_rate_burst=BURST, lease_ttl_s=30
    )
    context = ApiContext.create(settings, redis_client, object_store, ADMIN, clock=Clock())
    with TestClient(create_app(context), headers={"Content-Type": "application/json"}) as c:
        yield c


def enroll(api: TestClient) -> tuple[str, dict[str, str]]:
    join = api.post("/v1/tokens/join", json={"name": "alice"}, headers=admin())
    body = EnrollRequest(join_token=join.json()["token"], hardware=HARDWARE).model_dump_json()
    hello = api.post(ENROLL_PATH, content=body).json()
    return hello["worker_id"], {"Authorization": f"Bearer {hello['worker_token']}"}


def admin() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN}"}


def error_of(answer: Any) -> tuple[int, str, str]:
    error = ErrorBody.model_validate_json(answer.content).error
    return answer.status_code, error.code, error.message


def test_every_route_has_a_body_limit(api: TestClient, redis_client: Any) -> None:
    worker_id, worker = enroll(api)
    before = snapshot(redis_client)
    spec = b"name: x\n" + b"#" * MAX_SPEC_BYTES
    beat = b'{"step": 1, "max_steps": 4, "losses": [' + b" " * WORKER_BODY_BYTES + b"]}"
    cases = {
        "a sweep spec": api.post(
            "/v1/jobs", content=spec, headers={**admin(), "Content-Type": "application/yaml"}
        ),
        "a sweep spec, chunked": api.post(
            "/v1/jobs",
            content=iter([spec[: len(spec) // 2], spec[len(spec) // 2 :]]),
            headers={**admin(), "Content-Type": "application/yaml"},
        ),
        "a worker's request": api.post(
            HEARTBEAT_PATH.format(worker_id=worker_id, lease_id="l-1"),
            content=beat,
            headers=worker,
        ),
        "this route": api.post(
            "/v1/tokens/join", content=b'{"name": "' + b"a" * OTHER_BODY_BYTES + b'"}'
        ),
    }
    for what, answer in cases.items():
        status, code, message = error_of(answer)
        assert (status, code) == (413, "too_large"), (what, answer.text)
        assert message.endswith(f"the limit for {what.removesuffix(', chunked')}"), message
    assert snapshot(redis_client) == before
    # Under its limit, a body reaches the route (here: refused for what it says).
    small = api.post("/v1/tokens/join", content=b'{"name": "../x"}', headers=admin())
    assert small.status_code == 422
    print(f"{len(cases)} oversized bodies: all 413, nothing changed")


def test_a_worker_that_calls_too_often_hears_429_with_retry_after(api: TestClient) -> None:
    worker_id, worker = enroll(api)
    body = LeaseRequest(capabilities=CPU).model_dump_json()
    path = LEASE_PATH.format(worker_id=worker_id)
    answers = [api.post(path, content=body, headers=worker) for _ in range(int(BURST) + 2)]
    statuses = [a.status_code for a in answers]
    print(f"{len(answers)} calls at once, rate {RATE}/s burst {BURST}: {statuses}")
    assert statuses[: int(BURST)] == [200] * int(BURST) and 429 in statuses[int(BURST) :]
    limited = next(a for a in answers if a.status_code == 429)
    _, code, message = error_of(limited)
    assert code == "rate_limited" and "calls too often" in message
    assert int(limited.headers["Retry-After"]) >= 1
    # Other workers have buckets of their own.
    other_id, other = enroll(api)
    answer = api.post(LEASE_PATH.format(worker_id=other_id), content=body, headers=other)
    assert answer.status_code == 200


# The worker's client passes a per-call timeout, which TestClient ignores (and says so).
@pytest.mark.filterwarnings("ignore:You should not use the 'timeout' argument")
def test_the_worker_client_waits_out_retry_after(
    api: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    from cotune.worker.client import CoordinatorClient

    worker_id, worker = enroll(api)
    client = CoordinatorClient("http://testserver", backoff_initial_s=0.01, http=api)
    client.token = worker["Authorization"].removeprefix("Bearer ")
    request = LeaseRequest(capabilities=CPU)
    for _ in range(int(BURST)):
        client.lease(worker_id, request, retry_for_s=0)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="cotune.worker.client"):
        answer = client.lease(worker_id, request, retry_for_s=10)
    waited = time.monotonic() - started
    retries = [r for r in caplog.records if "retrying" in r.getMessage()]
    print(f"rate limited: {len(retries)} retry after {waited:.2f} s")
    assert answer.retry_after_s is not None  # no work queued: asked again later
    # Honouring Retry-After (1 s): one retry after a second; without it, 0.01 s backoffs
    # would have hit the empty bucket again and again.
    assert len(retries) == 1 and waited >= 1.0
