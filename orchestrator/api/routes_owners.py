"""Owner routes: the operator's levers over strikes and quarantine (control/strikes.py). An
admin lists the owners (join token names) with their strikes, quarantines one now (its
workers' active leases revoked) or pardons one (strikes cleared, quarantine lifted)."""

from __future__ import annotations

from cotune.orchestrator.api.auth import Admin, CoordinatorDep
from cotune.orchestrator.control.tokens import check_name
from cotune.orchestrator.protocol.admin import (
    OwnerList,
    OwnerPardoned,
    OwnerQuarantined,
    OwnerView,
)
from cotune.orchestrator.protocol.problems import InvalidRequest, NotFound
from cotune.orchestrator.protocol.wire import API_PREFIX
from fastapi import APIRouter

router = APIRouter(tags=["owners"])
# `{name:path}`: a name with a '/' in it still reaches this module, to be refused as a bad
# name (422) rather than as an unknown route (404).
QUARANTINE = API_PREFIX + "/owners/{name:path}/quarantine"


def _owner(name: str) -> str:
    """The name if a join token could have it (control/tokens.py); 422 naming it otherwise.
    An owner need not exist yet: quarantining a name no token has is a pre-emptive ban."""
    try:
        return check_name(name)
    except ValueError as exc:
        raise InvalidRequest(f"bad owner {exc}", "name") from None


@router.get(API_PREFIX + "/owners", dependencies=[Admin])
def list_owners(c: CoordinatorDep) -> OwnerList:
    """Every owner with an enrolled worker, a strike or a quarantine, by name."""
    return OwnerList(
        max_strikes=c.strikes.max_strikes,
        owners=[
            OwnerView(name=s.owner, strikes=s.strikes, quarantined=s.quarantined, workers=s.workers)
            for s in c.strikes.standings()
        ],
    )


@router.post(QUARANTINE, dependencies=[Admin])
def quarantine_owner(name: str, c: CoordinatorDep) -> OwnerQuarantined:
    """Quarantine the owner now: its workers get no more work, their active leases are
    revoked (the tasks queued again, no failure counted) and no more credit reaches it."""
    owner = _owner(name)
    leases = c.strikes.quarantine(owner)
    return OwnerQuarantined(name=owner, strikes=c.strikes.count(owner), leases=leases)


@router.delete(QUARANTINE, dependencies=[Admin])
def pardon_owner(name: str, c: CoordinatorDep) -> OwnerPardoned:
    """Clear the owner's strikes and lift its quarantine: its workers may lease at once.
    404 if it is neither quarantined nor struck."""
    owner = _owner(name)
    strikes, quarantined = c.strikes.count(owner), c.strikes.is_quarantined(owner)
    if not quarantined and not strikes:
        raise NotFound(
            f"owner {owner!r} is not quarantined and has no strikes: nothing to pardon", "name"
        )
    c.strikes.pardon(owner)
    return OwnerPardoned(name=owner, strikes=strikes, quarantined=quarantined)
