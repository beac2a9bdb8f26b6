"""The HTTP API fuzzed from its own OpenAPI document (schemathesis), authenticated as each
role: an admin, an enrolled worker, and nobody, with inputs that follow the schema and
inputs that break it. Whatever arrives, the answer is never a 5xx,
and a rejected request (4xx) changes no state in Redis.

Runs in-process against the real app on the real Redis and SeaweedFS (schemathesis'
ASGI transport). Excluded: the SSE event stream (it does not end while its job lives).
"""

from __future__ import annotations

from itertools import product
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from cotune.orchestrator.api import ApiContext, create_app
from cotune.orchestrator.control.tokens import JoinTokens
from cotune.orchestrator.settings import Settings
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from tests.integration.coordinator_kit import HARDWARE, Clock, snapshot

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ADMIN = "cta_fuzz-admin-token-0123456789abcdefghijklmnop"
# Bookkeeping a request may touch even when refused: a worker's last contact. Everything
# else must stay byte for byte the same after a 4xx.
VOLATILE_FIELDS = (b"last_seen", b"token_renewed_at", b"token_expires_at")
RATE_KEYS = (b"cotune:rate:",)
EXAMPLES = 12  # per operation, role and mode (valid and invalid inputs)


class Fuzzed:
    def __init__(self, context: ApiContext, tokens: dict[str, str | None]) -> None:
        self.context = context
        self.tokens = tokens


@pytest.fixture
def fuzzed(redis_client: Any, object_store: Any, tmp_path: Path) -> Fuzzed:
    settings_ = Settings(home=tmp_path / "home", lease_ttl_s=30, heartbeat_interval_s=5)
    context = ApiContext.create(settings_, redis_client, object_store, ADMIN, clock=Clock())
    join, _ = JoinTokens(redis_client, context.state.keys).create("fuzzer")
    _, token = context.workers.enroll(join, HARDWARE)
    return Fuzzed(context, {"admin": ADMIN, "worker": token, "anonymous": None, "join": join})


def operations(fuzzed: Fuzzed) -> list[Any]:
    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(fuzzed.context))
    found = [result.ok() for result in schema.get_all_operations()]
    return [op for op in found if not op.path.endswith("/events")]


def _state(redis: Any) -> dict[bytes, Any]:
    def tidy(entry: tuple[str, Any, bool]) -> tuple[str, Any, bool]:
        kind, value, expires = entry
        if kind == "hash":
            value = [(f, v) for f, v in value if f not in VOLATILE_FIELDS]
        return kind, value, expires

    return {
        key: tidy(entry) for key, entry in snapshot(redis).items() if not key.startswith(RATE_KEYS)
    }


@pytest.mark.parametrize("role", ["admin", "worker", "anonymous"])
def test_no_5xx_and_rejections_change_nothing(role: str, fuzzed: Fuzzed) -> None:
    redis = fuzzed.context.state.redis
    token = fuzzed.tokens[role]
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    counts: dict[str, int] = {}
    for operation, mode in product(operations(fuzzed), GenerationMode):

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy(generation_mode=mode))
        def fuzz(case: Any) -> None:
            before = _state(redis)
            response = case.call(headers=headers)
            name = f"{role} {case.method} {case.path}"
            counts[f"{response.status_code // 100}xx"] = (
                counts.get(f"{response.status_code // 100}xx", 0) + 1
            )
            assert response.status_code < 500, (
                f"{name}: {response.status_code} {response.text[:500]}"
            )
            if 400 <= response.status_code < 500:
                assert _state(redis) == before, f"{name}: a {response.status_code} changed state"

        try:
            fuzz()
        except Unsatisfiable:  # nothing to break in an operation without inputs
            counts["no invalid input"] = counts.get("no invalid input", 0) + 1
    print(
        f"{role}: {sum(counts.values())} requests, by status class {dict(sorted(counts.items()))}"
    )
    assert counts.get("4xx", 0) > 0
