"""Request limits: a body size limit on every route, and per-worker rate limits.

Body sizes (413 `too_large` over the limit, before the route reads a byte more):

    POST /v1/jobs             MAX_SPEC_BYTES (1 MiB: a sweep spec; protocol/spec/files.py)
    POST /v1/workers/...      WORKER_BODY_BYTES (1 MiB: a heartbeat carries up to 10,000
                              step losses, ~0.45 MB; every other worker body is far smaller)
    everything else           OTHER_BODY_BYTES (64 KiB: tokens, cancels, queries)

A Content-Length over the limit is refused at once; a body without one (chunked) is counted
as it arrives and refused when it passes the limit.

Rates: every authenticated worker call takes a token from its worker's bucket
(lib.lua `take_token`, settings `worker_rate_per_s` and `worker_rate_burst`); an empty bucket
is answered 429 `rate_limited` with Retry-After (api/auth.py: the token check and the bucket
are one Redis script, control/workers.py `authorize`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cotune.orchestrator.api.errors import error_response
from cotune.orchestrator.protocol.problems import RateLimited
from cotune.orchestrator.protocol.spec.files import MAX_SPEC_BYTES
from cotune.orchestrator.protocol.wire import API_PREFIX
from starlette.exceptions import HTTPException

if TYPE_CHECKING:
    from cotune.orchestrator.api.context import ApiContext
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

KiB, MiB = 1 << 10, 1 << 20
WORKER_BODY_BYTES = 1 * MiB
OTHER_BODY_BYTES = 64 * KiB


def body_limit(method: str, path: str) -> tuple[int, str]:
    """(the limit in bytes, what it is for) of a request's body."""
    if method == "POST" and path.rstrip("/") == API_PREFIX + "/jobs":
        return MAX_SPEC_BYTES, "a sweep spec"
    if path.startswith(API_PREFIX + "/workers/"):
        return WORKER_BODY_BYTES, "a worker's request"
    return OTHER_BODY_BYTES, "this route"


def too_large(limit: int, what: str) -> HTTPException:
    # An HTTPException passes FastAPI's body parsing unchanged (anything else raised while
    # reading the body becomes a 400); api/errors.py answers it as `too_large`.
    return HTTPException(413, f"request body over {limit} bytes, the limit for {what}")


class BodyLimit:
    """ASGI middleware: refuse a request body over its route's limit (module docstring)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, what = body_limit(scope["method"], scope["path"])
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            refusal = too_large(limit, what)
            response = error_response("too_large", str(refusal.detail), status=413)
            await response(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise too_large(limit, what)
            return message

        await self.app(scope, counted, send)


def rate(context: ApiContext) -> tuple[float, float]:
    """The worker rate limit of the settings: (calls a second, burst)."""
    return context.settings.worker_rate_per_s, context.settings.worker_rate_burst


def refuse_if_limited(context: ApiContext, worker_id: str, wait: float) -> None:
    """RateLimited (429) when the worker's bucket said wait (control/workers.py `authorize`
    took the call from it)."""
    if wait > 0:
        per_s, burst = rate(context)
        raise RateLimited(
            f"worker {worker_id} calls too often (over {per_s:g} a second, "
            f"bursts of {burst:g}); retry in {wait:.1f} s",
            retry_after_s=wait,
        )


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
