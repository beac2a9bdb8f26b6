"""Token routes: an admin issues join tokens for volunteers (and for cluster workers), lists
them and revokes them (with every worker token enrolled with them)."""

from __future__ import annotations

from typing import Annotated

from cotune.orchestrator.api.auth import Admin, CoordinatorDep
from cotune.orchestrator.control.tokens import NAME_PATTERN
from cotune.orchestrator.protocol.admin import (
    JoinTokenList,
    JoinTokenRequest,
    JoinTokenResponse,
    JoinTokenRevoked,
    JoinTokenView,
)
from cotune.orchestrator.protocol.wire import API_PREFIX
from fastapi import APIRouter, Path

router = APIRouter(tags=["tokens"])
TokenName = Annotated[str, Path(pattern=NAME_PATTERN)]


@router.post(API_PREFIX + "/tokens/join", dependencies=[Admin], status_code=201)
def create_join_token(body: JoinTokenRequest, c: CoordinatorDep) -> JoinTokenResponse:
    """A join token: `cotune worker --coordinator URL --join-token T` enrolls with it.

    The token is shown only in this answer; the coordinator keeps its sha256.
    """
    token, record = c.workers.join_tokens.create(
        body.name, body.kind, body.ttl_s, max_uses=body.max_uses
    )
    return JoinTokenResponse(
        token=token,
        name=record.name,
        kind=record.kind,
        expires_at=record.expires_at,
        max_uses=record.max_uses,
    )


@router.get(API_PREFIX + "/tokens/join", dependencies=[Admin])
def list_join_tokens(c: CoordinatorDep) -> JoinTokenList:
    """Every join token on record (expired ones for a week after), oldest first."""
    return JoinTokenList(
        tokens=[
            JoinTokenView(
                name=t.name,
                kind=t.kind,
                created_at=t.created_at,
                expires_at=t.expires_at,
                uses=t.uses,
                max_uses=t.max_uses,
                revoked_at=t.revoked_at,
            )
            for t in c.workers.join_tokens.all()
        ]
    )


@router.delete(API_PREFIX + "/tokens/join/{name}", dependencies=[Admin])
def revoke_join_tokens(name: TokenName, c: CoordinatorDep) -> JoinTokenRevoked:
    """Revoke every join token of this name, and every worker token enrolled with them:
    those workers' next call is 401 and their active leases are revoked (the tasks queued
    again, no failure counted). 404 if no join token has the name."""
    done = c.workers.revoke_join_token(name)
    return JoinTokenRevoked(name=name, tokens=done.tokens, workers=done.workers, leases=done.leases)
