"""Presigned requests: how workers reach S3 without credentials.

A presigned GET reads one object; a presigned POST uploads exactly one key, with a
content-length range, until it expires (SigV4 allows a week at most). ObjectStore's
`presign_get` and `presign_post` call these with its client.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cotune.orchestrator.data.s3errors import InvalidKey, check_key, translated

MAX_PRESIGN_S = 7 * 24 * 3600  # the SigV4 limit on a presigned request's lifetime


@dataclass(frozen=True)
class PresignedPost:
    """A browser-style POST upload: send `fields` then the file as form field `file`."""

    url: str
    fields: dict[str, str]


def presign_get(client: Any, bucket: str, key: str, expires_s: int) -> str:
    """A URL that GETs this object without credentials until it expires."""
    check_key(bucket, key)
    _check_expiry(bucket, key, expires_s)
    with translated("presign GET", bucket, key):
        url: str = client.generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=expires_s
        )
    return url


def presign_post(
    client: Any, bucket: str, key: str, max_bytes: int, expires_s: int, min_bytes: int = 0
) -> PresignedPost:
    """A POST upload for exactly `key`, between min_bytes and max_bytes, until it expires."""
    check_key(bucket, key)
    _check_expiry(bucket, key, expires_s)
    if not 0 <= min_bytes <= max_bytes:
        raise InvalidKey(
            "presign POST",
            bucket,
            key,
            f"need 0 <= min_bytes <= max_bytes, got {min_bytes} and {max_bytes}",
        )
    size_range = ["content-length-range", min_bytes, max_bytes]
    with translated("presign POST", bucket, key):
        post = client.generate_presigned_post(
            Bucket=bucket, Key=key, Conditions=[size_range], ExpiresIn=expires_s
        )
    return PresignedPost(url=post["url"], fields={k: str(v) for k, v in post["fields"].items()})


def _check_expiry(bucket: str, key: str, expires_s: int) -> None:
    if not 1 <= expires_s <= MAX_PRESIGN_S:
        raise InvalidKey(
            "presign", bucket, key, f"expires_s must be in 1..{MAX_PRESIGN_S}, got {expires_s}"
        )
