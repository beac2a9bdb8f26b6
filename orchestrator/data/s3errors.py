"""What can go wrong talking to S3: the ObjectStoreError family, and botocore's exceptions
turned into it (naming the operation, the object and the cause)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class ObjectStoreError(RuntimeError):
    """An S3 operation failed; names the operation, the object and the cause."""

    def __init__(self, operation: str, bucket: str, key: str, detail: str) -> None:
        where = f"s3://{bucket}/{key}" if key else f"s3://{bucket}"
        super().__init__(f"S3 {operation} of {where} failed: {detail}")
        self.operation = operation
        self.bucket = bucket
        self.key = key


class ObjectNotFound(ObjectStoreError):
    """The object (or bucket) does not exist."""


class ChecksumMismatch(ObjectStoreError):
    """What was downloaded does not hash to the expected sha256."""


class InvalidKey(ObjectStoreError, ValueError):
    """A key or argument that S3 would refuse or that would be unsafe to use."""


def check_key(bucket: str, key: str) -> None:
    """InvalidKey unless S3 takes `key` as it is (no leading '/', no NUL, 1024 bytes at most)."""
    if not key:
        raise InvalidKey("address", bucket, key, "the key is empty")
    if key.startswith("/") or "\x00" in key or len(key.encode()) > 1024:
        raise InvalidKey(
            "address", bucket, key, "a key may not start with '/', hold NUL or exceed 1024 bytes"
        )


def translate(operation: str, bucket: str, key: str, exc: Exception) -> ObjectStoreError:
    """The ObjectStoreError for what boto3 raised (ObjectNotFound for a 404)."""
    kind = ObjectNotFound if status(exc) == 404 else ObjectStoreError
    return kind(operation, bucket, key, describe(exc))


@contextlib.contextmanager
def translated(operation: str, bucket: str, key: str) -> Iterator[None]:
    """Turn whatever boto3 raises into an ObjectStoreError naming the operation and key."""
    try:
        yield
    except ObjectStoreError:
        raise
    except Exception as exc:
        raise translate(operation, bucket, key, exc) from exc


def status(exc: Exception) -> int | None:
    """The HTTP status S3 answered with, where the exception carries a response."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        answer = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return int(answer) if answer is not None else None
    return None


def code(exc: Exception) -> str | None:
    """S3's error code (NoSuchKey, BucketAlreadyOwnedByYou, ...), where there is one."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        answer = response.get("Error", {}).get("Code")
        return str(answer) if answer is not None else None
    return None


def describe(exc: Exception) -> str:
    error_code = code(exc)
    if error_code:
        message = getattr(exc, "response", {}).get("Error", {}).get("Message") or ""
        return f"{error_code} (HTTP {status(exc)}) {message}".strip()
    return f"{type(exc).__name__}: {exc}"
