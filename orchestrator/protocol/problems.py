"""The errors the coordinator answers with: a wire error code, a message, the offending field.

State, leases, tokens and workers raise these; the HTTP API (orchestrator/api/errors.py)
turns each into a `wire.ErrorBody` with the status its code stands for. Raising one never
leaves a half-made change behind: every check happens before the first write.
"""

from __future__ import annotations

from cotune.orchestrator.protocol.wire import ErrorCode


class Problem(Exception):
    """A request the coordinator refuses; `code` tells the client what kind of refusal."""

    code: ErrorCode = "invalid_request"

    def __init__(
        self,
        message: str,
        field: str | None = None,
        issues: list[tuple[str, str]] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.issues = issues or []


class InvalidRequest(Problem):
    """A body or parameter that fails validation (a spec: every issue in `issues`)."""

    code = "invalid_request"


class Unauthorized(Problem):
    """A missing, unknown or expired token."""

    code = "unauthorized"


class Forbidden(Problem):
    """A valid token used on something that is not its own (another worker's lease)."""

    code = "forbidden"


class NotFound(Problem):
    """No such job, trial, task, worker or lease."""

    code = "not_found"


class Conflict(Problem):
    """The request does not fit the current state (cancelling a finished job)."""

    code = "conflict"


class LeaseExpired(Problem):
    """The lease ran past its deadline; its task went back to the queue."""

    code = "lease_expired"


class StaleLease(Problem):
    """The lease is over (completed, failed, released) or its task was leased again."""

    code = "stale_lease"


class Rejected(Problem):
    """An upload or report that fails the coordinator's checks."""

    code = "rejected"


class Unavailable(Problem):
    """A service the coordinator needs (Redis, S3) does not answer; retry later."""

    code = "unavailable"


class RateLimited(Problem):
    """Too many calls with one token; the answer says when to call again (Retry-After)."""

    code = "rate_limited"

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
