"""The boto3 S3 client cotune uses: SigV4, path-style addresses, retries and timeouts.

Retries come in two layers. botocore retries each HTTP request a few times (quickly, and
inside s3transfer's multipart transfers, one part at a time); `retrying` retries a whole
operation with exponential backoff and jitter (tenacity), bounded by attempts and time,
which also covers what botocore cannot: a body cut off mid-stream, a multipart upload
given up on, a server restarting for longer than botocore waits. Only transient failures
are retried (`is_transient`): a refused, reset or timed-out connection, a short body, a 5xx
or throttling (SlowDown) answer. A 403, 404 or bad request is final at once.

This and the modules beside it (objectstore.py, presign.py) are the only ones that touch
boto3 (the coordinator extra).
"""

from __future__ import annotations

import http.client
import logging
from typing import TYPE_CHECKING, Any

from cotune.orchestrator.data.s3errors import ObjectStoreError, code, describe, status

if TYPE_CHECKING:
    from tenacity import Retrying

log = logging.getLogger(__name__)

ATTEMPTS = 6  # tries of one operation, the first included
BUDGET_S = 30.0  # no new try starts after this long
REQUEST_ATTEMPTS = 3  # botocore's tries of one HTTP request, inside each of ours
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestTimeout",
        "RequestTimeoutException",
        "RequestLimitExceeded",
        "InternalError",
        "ServiceUnavailable",
    }
)


def make_client(
    endpoint_url: str | None,
    access_key: str | None,
    secret_key: str | None,
    region: str,
    *,
    connect_timeout_s: float,
    read_timeout_s: float,
    max_attempts: int,
) -> Any:
    import boto3
    from botocore.config import Config

    config = Config(
        signature_version="s3v4",
        s3={"addressing_style": "path"},
        # botocore's standard mode retries 5xx, throttling and connection errors with
        # jittered exponential backoff; `retrying` adds the operation-level layer.
        retries={"mode": "standard", "total_max_attempts": max_attempts},
        connect_timeout=connect_timeout_s,
        read_timeout=read_timeout_s,
        # Only where S3 demands it: many S3-compatible servers reject the newer
        # default (CRC checksums with aws-chunked bodies); we check sha256 ourselves.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name=region,
        config=config,
    )


def list_buckets(
    endpoint_url: str,
    access_key: str | None,
    secret_key: str | None,
    region: str = "us-east-1",
    timeout_s: float = 2.0,
) -> list[str]:
    """Bucket names at an endpoint, tried once: a cheap authenticated health probe."""
    client = make_client(
        endpoint_url,
        access_key,
        secret_key,
        region,
        connect_timeout_s=timeout_s,
        read_timeout_s=timeout_s,
        max_attempts=1,
    )
    try:
        return [b["Name"] for b in client.list_buckets().get("Buckets", [])]
    except Exception as exc:
        raise ObjectStoreError("ListBuckets", endpoint_url, "", describe(exc)) from exc


def is_transient(exc: BaseException) -> bool:
    """True when another try may succeed: the connection was refused, reset or timed out, a
    body was cut short, or S3 answered 5xx, 408, 429 or a throttling code (SlowDown).

    Follows the chain of causes (boto3 wraps a part's failure in S3UploadFailedError, we
    wrap botocore's in ObjectStoreError); an ObjectStoreError of our own making (a checksum
    that does not match, a bad key) is final.
    """
    from botocore.exceptions import ClientError, HTTPClientError, IncompleteReadError
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from urllib3.exceptions import NewConnectionError, ProtocolError
    from urllib3.exceptions import TimeoutError as Urllib3Timeout

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ClientError):
            return status(current) in _TRANSIENT_STATUS or code(current) in _TRANSIENT_CODES
        if isinstance(current, ObjectStoreError) and current.__cause__ is None:
            return False
        if isinstance(
            current,
            BotoConnectionError
            | HTTPClientError
            | IncompleteReadError
            | ProtocolError
            | Urllib3Timeout
            | NewConnectionError
            | http.client.IncompleteRead
            | ConnectionError  # the built-in one: refused, reset, aborted, broken pipe
            | TimeoutError,
        ):
            return True
        current = current.__cause__ or current.__context__
    return False


def retrying(
    operation: str, where: str, *, attempts: int = ATTEMPTS, budget_s: float = BUDGET_S
) -> Retrying:
    """A tenacity `Retrying` for one S3 operation: transient failures retried with
    exponential backoff and full jitter (0.25 s doubling, at most 8 s apart), at most
    `attempts` tries and no new one after `budget_s`; the last failure is re-raised as is.

        result = retrying("GetObject", "s3://bucket/key")(client.get_object, Bucket=..., Key=...)
    """
    from tenacity import (
        RetryCallState,
        Retrying,
        retry_if_exception,
        stop_after_attempt,
        stop_after_delay,
        wait_random_exponential,
    )

    def before_sleep(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        log.warning(
            "S3 %s of %s: try %d of %d failed (%s); retrying in %.1f s",
            operation,
            where,
            state.attempt_number,
            attempts,
            describe(error) if isinstance(error, Exception) else error,
            state.upcoming_sleep,
        )

    return Retrying(
        retry=retry_if_exception(is_transient),
        stop=stop_after_attempt(attempts) | stop_after_delay(budget_s),
        wait=wait_random_exponential(multiplier=0.25, max=8.0),
        before_sleep=before_sleep,
        reraise=True,
    )
