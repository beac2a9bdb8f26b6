"""The worker's HTTP client for the coordinator's `/v1/workers` endpoints, with retry/backoff.

Transport errors and 429/5xx answers are retried with exponential backoff and jitter until
the caller's deadline (`retry_for_s`), never sooner than an answer's Retry-After (a rate
limit's 429 says how long); every other error answer raises at once, as the
`CoordinatorError` subclass that says what the worker should do about it.
"""

from __future__ import annotations

import logging
import random
import re
import threading
import time
from typing import Protocol, TypeVar

import httpx
from cotune.orchestrator.protocol.wire import (
    COMPLETE_PATH,
    ENROLL_PATH,
    FAIL_PATH,
    HEARTBEAT_PATH,
    LEASE_PATH,
    RELEASE_PATH,
    Ack,
    CompleteRequest,
    CompleteResponse,
    EnrollRequest,
    EnrollResponse,
    ErrorBody,
    FailRequest,
    HeartbeatRequest,
    HeartbeatResponse,
    LeaseRequest,
    LeaseResponse,
    ReleaseRequest,
    WireModel,
)
from pydantic import BaseModel, ValidationError

log = logging.getLogger(__name__)

R = TypeVar("R", bound=BaseModel)
_RETRY_STATUS = {429, 500, 502, 503, 504}


class CoordinatorError(Exception):
    """An answer (or silence) from the coordinator that the call cannot recover from."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class Unreachable(CoordinatorError):
    """No usable answer before the deadline: connection refused, timeouts, 5xx.

    `reason` is the short cause ("connection refused", "HTTP 503 ..."), for the log line of
    each retry.
    """

    def __init__(
        self,
        message: str,
        *,
        reason: str,
        status: int | None = None,
        code: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message, status=status, code=code)
        self.reason = reason
        self.retry_after_s = retry_after_s  # the answer's Retry-After (429, 503), if any


class Refused(CoordinatorError):
    """401/403: the join token or worker token is not (or no longer) accepted."""


class LeaseGone(CoordinatorError):
    """404/409 on a lease: it expired, was leased again, or the task is finished."""


class Rejected(CoordinatorError):
    """Any other 4xx: the request itself was refused (the message says why)."""


class Stopping(CoordinatorError):
    """The worker is stopping: the call was abandoned while waiting to retry."""


class LinkObserver(Protocol):
    """Told the outcome of every attempt (worker.view.WorkerView shows it on a terminal)."""

    def reached(self) -> None:
        """The coordinator answered (a refusal counts: it is there)."""
        ...

    def unreachable(self, reason: str) -> None:
        """No usable answer: `reason` is the short cause ("connection refused")."""
        ...


class _Unobserved:
    def reached(self) -> None:
        pass

    def unreachable(self, reason: str) -> None:
        pass


def check_coordinator_url(url: str) -> str:
    """The coordinator's base URL without a trailing slash; ValueError saying what is wrong."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as e:
        raise ValueError(f"--coordinator {url!r} is not a URL ({e})") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(
            f"--coordinator {url!r}: give an http(s) URL such as https://cotune.example.org"
        )
    if parsed.query or parsed.fragment:
        raise ValueError(f"--coordinator {url!r}: a base URL takes no query or fragment")
    return url.rstrip("/")


class CoordinatorClient:
    """One worker's view of the coordinator. `token` is set by `enroll`."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout_s: float = 30.0,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
        stop: threading.Event | None = None,
        http: httpx.Client | None = None,
        link: LinkObserver | None = None,
    ) -> None:
        self.base_url = check_coordinator_url(base_url)
        self.token: str | None = None
        self._backoff = (backoff_initial_s, backoff_max_s)
        self._stop = stop or threading.Event()
        self._link = link or _Unobserved()
        self._http = http or httpx.Client(timeout=httpx.Timeout(timeout_s, connect=10.0))

    def close(self) -> None:
        self._http.close()

    # --- the endpoints ----------------------------------------------------------------

    def enroll(self, request: EnrollRequest, *, retry_for_s: float) -> EnrollResponse:
        answer = self._call(ENROLL_PATH, request, EnrollResponse, retry_for_s=retry_for_s)
        self.token = answer.worker_token
        return answer

    def lease(self, worker_id: str, request: LeaseRequest, *, retry_for_s: float) -> LeaseResponse:
        path = LEASE_PATH.format(worker_id=worker_id)
        return self._call(path, request, LeaseResponse, retry_for_s=retry_for_s)

    def heartbeat(
        self,
        worker_id: str,
        lease_id: str,
        request: HeartbeatRequest,
        *,
        retry_for_s: float = 0,
        timeout_s: float | None = None,
    ) -> HeartbeatResponse:
        path = HEARTBEAT_PATH.format(worker_id=worker_id, lease_id=lease_id)
        return self._call(
            path, request, HeartbeatResponse, retry_for_s=retry_for_s, timeout_s=timeout_s
        )

    def complete(
        self, worker_id: str, lease_id: str, request: CompleteRequest, *, retry_for_s: float
    ) -> CompleteResponse:
        path = COMPLETE_PATH.format(worker_id=worker_id, lease_id=lease_id)
        return self._call(path, request, CompleteResponse, retry_for_s=retry_for_s)

    def fail(
        self,
        worker_id: str,
        lease_id: str,
        request: FailRequest,
        *,
        retry_for_s: float,
        interruptible: bool = True,
    ) -> Ack:
        path = FAIL_PATH.format(worker_id=worker_id, lease_id=lease_id)
        return self._call(path, request, Ack, retry_for_s=retry_for_s, interruptible=interruptible)

    def release(
        self,
        worker_id: str,
        lease_id: str,
        request: ReleaseRequest,
        *,
        retry_for_s: float,
        interruptible: bool = True,
    ) -> Ack:
        path = RELEASE_PATH.format(worker_id=worker_id, lease_id=lease_id)
        return self._call(path, request, Ack, retry_for_s=retry_for_s, interruptible=interruptible)

    # --- transport --------------------------------------------------------------------

    def _call(
        self,
        path: str,
        body: WireModel,
        answer: type[R],
        *,
        retry_for_s: float,
        timeout_s: float | None = None,
        interruptible: bool = True,
    ) -> R:
        """POST `body`; retries what may pass (transport errors, 429, 5xx) until the deadline.

        `retry_for_s` may be 0 or less: a single attempt (the heartbeat thread has its own
        cadence). An `interruptible` call stops retrying when the worker is stopping.
        """
        give_up_at = time.monotonic() + max(retry_for_s, 0.0)
        delay, delay_max = self._backoff
        attempt = 0
        while True:
            attempt += 1
            try:
                result = self._once(path, body, answer, timeout_s)
            except Unreachable as error:
                self._link.unreachable(error.reason)
                remaining = give_up_at - time.monotonic()
                if remaining <= 0:
                    raise
                # Jitter keeps a fleet of workers from retrying in lockstep after an outage;
                # a Retry-After (a rate limit's 429) is the least wait the coordinator asked.
                pause = min(delay * (0.5 + random.random()), delay_max)
                pause = min(max(pause, error.retry_after_s or 0.0), remaining)
                # One line per attempt (the backoff spaces them): a worker that waits on a
                # coordinator says on what, and until when.
                log.warning(
                    "coordinator %s unreachable (%s); retrying %s in %.1f s (attempt %d)",
                    self.base_url,
                    error.reason,
                    path,
                    pause,
                    attempt + 1,
                )
                if interruptible and self._stop.wait(pause):
                    raise Stopping(f"{path}: abandoned, the worker is stopping") from error
                if not interruptible:
                    time.sleep(pause)
                delay = min(delay * 2, delay_max)
                continue
            except CoordinatorError:
                self._link.reached()  # it answered, if only to refuse
                raise
            self._link.reached()
            return result

    def _once(self, path: str, body: WireModel, answer: type[R], timeout_s: float | None) -> R:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        url = self.base_url + path
        try:
            response = self._http.post(
                url,
                content=body.model_dump_json(),
                headers={**headers, **_JSON},
                timeout=timeout_s if timeout_s is not None else httpx.USE_CLIENT_DEFAULT,
            )
        except httpx.TransportError as e:
            reason = _transport_reason(e)
            raise Unreachable(
                f"cannot reach the coordinator at {self.base_url}: {reason}", reason=reason
            ) from e
        status = response.status_code
        if status < 300:
            try:
                return answer.model_validate_json(response.content)
            except ValidationError as e:
                raise CoordinatorError(
                    f"{path}: the coordinator's answer does not match the protocol: {e}",
                    status=status,
                ) from None
        code, message = _error_of(response)
        text = f"{path}: HTTP {status} {code}: {message}"
        if status in _RETRY_STATUS:
            reason = f"HTTP {status} {code}: {message}"
            wait = _retry_after(response)
            raise Unreachable(text, reason=reason, status=status, code=code, retry_after_s=wait)
        if status in (401, 403):
            raise Refused(text, status=status, code=code)
        if status in (404, 409, 410):
            raise LeaseGone(text, status=status, code=code)
        raise Rejected(text, status=status, code=code)


_JSON = {"Content-Type": "application/json", "Accept": "application/json"}


def _retry_after(response: httpx.Response) -> float | None:
    """The Retry-After header in seconds (the delay form; an HTTP date is ignored)."""
    try:
        return max(float(response.headers.get("retry-after", "")), 0.0)
    except ValueError:
        return None


def _transport_reason(error: httpx.TransportError) -> str:
    """A transport error's short cause ("[Errno 111] Connection refused": "connection
    refused"); its class name when it says nothing."""
    text = re.sub(r"^\[Errno -?\d+\]\s*", "", str(error)).strip()
    if not text:
        return type(error).__name__
    return text[0].lower() + text[1:] if text[1:2].islower() else text


def _error_of(response: httpx.Response) -> tuple[str, str]:
    """(code, message) of an error answer; tolerant of bodies that are not ErrorBody."""
    try:
        detail = ErrorBody.model_validate_json(response.content).error
    except ValidationError:
        text = response.content[:300].decode("utf-8", "replace").strip()
        return "unknown", text or response.reason_phrase
    where = f" (field {detail.field})" if detail.field else ""
    return detail.code, detail.message + where
