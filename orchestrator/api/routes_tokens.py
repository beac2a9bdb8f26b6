"""Token routes: an admin issues join tokens for volunteers (and for cluster workers)."""

from __future__ import annotations

from cotune.orchestrator.api.auth import Admin, CoordinatorDep
from cotune.orchestrator.protocol.admin import JoinTokenRequest, JoinTokenResponse
from cotune.orchestrator.protocol.wire import API_PREFIX
from fastapi import APIRouter

router = APIRouter(tags=["tokens"])


@router.post(API_PREFIX + "/tokens/join", dependencies=[Admin], status_code=201)
def create_join_token(body: JoinTokenRequest, c: CoordinatorDep) -> JoinTokenResponse:
    """A join token: `cotune worker --coordinator URL --join-token T` enrolls with it.

    The token is shown only in this answer; the coordinator keeps its sha256.
    """
    token, record = c.workers.join_tokens.create(body.name, body.kind, body.ttl_s)
    return JoinTokenResponse(
        token=token, name=record.name, kind=record.kind, expires_at=record.expires_at
    )
