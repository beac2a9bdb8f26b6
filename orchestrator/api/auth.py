"""Who may call what: the admin token for jobs, tokens, owners and the worker list; a worker's
own token for its endpoints (orchestrator/control/workers.py checks and renews it; its calls
are rate limited: api/limits.py). Both are bearer tokens.

The dependencies are `async def`: FastAPI runs a synchronous dependency on its thread pool,
one hop per dependency per request. Their work is a hash comparison or one Redis round trip,
cheaper than the hop (routes_workers.py says which routes run on the event loop)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from cotune.orchestrator.api.context import ApiContext
from cotune.orchestrator.api.limits import rate, refuse_if_limited
from cotune.orchestrator.control.tokens import token_matches
from cotune.orchestrator.protocol.problems import Unauthorized
from fastapi import Depends, Path, Request

ID_PATTERN = r"^[A-Za-z0-9_.\-]{1,128}$"


def context_of(request: Request) -> ApiContext:
    found: ApiContext = request.app.state.coordinator
    return found


async def coordinator(request: Request) -> ApiContext:
    return context_of(request)


def bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


async def require_admin(request: Request) -> None:
    token = bearer(request)
    if token is None:
        raise Unauthorized("missing admin token: send Authorization: Bearer <admin token>")
    if not token_matches(token, context_of(request).admin_token_sha256):
        raise Unauthorized("wrong admin token")


@dataclass(frozen=True)
class CallingWorker:
    """A worker whose token checked out, within its rate limit."""

    worker_id: str


async def authenticated_worker(
    request: Request, worker_id: Annotated[str, Path(pattern=ID_PATTERN)]
) -> CallingWorker:
    """The calling worker (its token checked and renewed), within its rate limit: one
    Redis round trip (control/workers.py `authorize`)."""
    context = context_of(request)
    wait = context.workers.authorize(worker_id, bearer(request), rate(context))
    refuse_if_limited(context, worker_id, wait)
    return CallingWorker(worker_id)


Admin = Depends(require_admin)
CoordinatorDep = Annotated[ApiContext, Depends(coordinator)]
WorkerDep = Annotated[CallingWorker, Depends(authenticated_worker)]
LeaseId = Annotated[str, Path(pattern=ID_PATTERN)]
JobId = Annotated[str, Path(pattern=ID_PATTERN)]
