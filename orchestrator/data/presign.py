"""Presigned requests: how workers reach S3 without credentials.

A presigned GET reads one object; a presigned POST uploads exactly one key, with a
content-length range, until it expires (SigV4 allows a week at most). ObjectStore's
`presign_get` and `presign_post` call these.

Every lease hands out one GET per input and four POSTs, and every heartbeat four POSTs
again, so presigning sits on the API's hot path. botocore builds, for each one, a request
object, runs its event hooks and derives the SigV4 signing key afresh (four HMACs): about
0.25 ms a URL here, 40% of a lease + release cycle. `SigV4Presigner` signs the same bytes
with the signing key cached for the day (one HMAC for a POST policy, two hashes and one HMAC
for a GET): tests/unit/test_presign.py checks that its output equals botocore's byte for
byte, and tests/integration/test_objectstore.py that SeaweedFS takes it. It serves stores
with static keys; anything else (a session token, the default credential chain) keeps
botocore's presigner.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

from cotune.orchestrator.data.s3errors import InvalidKey, check_key, translated

MAX_PRESIGN_S = 7 * 24 * 3600  # the SigV4 limit on a presigned request's lifetime


@dataclass(frozen=True)
class PresignedPost:
    """A browser-style POST upload: send `fields` then the file as form field `file`."""

    url: str
    fields: dict[str, str]


_ALGORITHM = "AWS4-HMAC-SHA256"
_UNSIGNED = "UNSIGNED-PAYLOAD"


class SigV4Presigner:
    """Presigned GETs and POSTs of one bucket, signed as botocore signs them (path-style
    addressing, static keys), with the day's signing key cached.

    `endpoint_url` is the client's resolved endpoint (boto3's `client.meta.endpoint_url`).
    """

    def __init__(
        self,
        endpoint_url: str,
        bucket: str,
        access_key: str,
        secret_key: str,
        region: str,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        parts = urlsplit(endpoint_url)
        default_port = {"http": 80, "https": 443}.get(parts.scheme)
        host = parts.hostname or ""
        if ":" in host:  # an IPv6 literal keeps its brackets in the Host header
            host = f"[{host}]"
        self._host = host if parts.port in (None, default_port) else f"{host}:{parts.port}"
        self._base = f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"
        self._path_prefix = parts.path.rstrip("/")
        self.bucket = bucket
        self._access_key = access_key
        self._secret = ("AWS4" + secret_key).encode()
        self._region = region
        self._clock = clock
        self._keys: dict[str, bytes] = {}

    def _signing_key(self, day: str) -> bytes:
        key = self._keys.get(day)
        if key is None:
            k = hmac.digest(self._secret, day.encode(), "sha256")
            for part in (self._region, "s3", "aws4_request"):
                k = hmac.digest(k, part.encode(), "sha256")
            self._keys = {day: k}  # one day at a time: yesterday's is never needed again
            key = k
        return key

    def _stamp(self) -> tuple[float, str, str, str]:
        now = self._clock()
        amz_date = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
        day = amz_date[:8]
        return now, amz_date, day, f"{day}/{self._region}/s3/aws4_request"

    def get_url(self, key: str, expires_s: int) -> str:
        _now, amz_date, day, scope = self._stamp()
        path = f"{self._path_prefix}/{self.bucket}/{quote(key, safe='/~')}"
        query = (
            f"X-Amz-Algorithm={_ALGORITHM}"
            f"&X-Amz-Credential={quote(f'{self._access_key}/{scope}', safe='-_.~')}"
            f"&X-Amz-Date={amz_date}&X-Amz-Expires={expires_s}&X-Amz-SignedHeaders=host"
        )
        canonical = f"GET\n{path}\n{query}\nhost:{self._host}\n\nhost\n{_UNSIGNED}"
        digest = hashlib.sha256(canonical.encode()).hexdigest()
        to_sign = f"{_ALGORITHM}\n{amz_date}\n{scope}\n{digest}"
        signature = hmac.new(self._signing_key(day), to_sign.encode(), "sha256").hexdigest()
        return f"{self._base}{path[len(self._path_prefix) :]}?{query}&X-Amz-Signature={signature}"

    def post(self, key: str, min_bytes: int, max_bytes: int, expires_s: int) -> PresignedPost:
        now, amz_date, day, scope = self._stamp()
        credential = f"{self._access_key}/{scope}"
        expiration = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(now) + expires_s))
        policy = {
            "expiration": expiration,
            "conditions": [
                ["content-length-range", min_bytes, max_bytes],
                {"bucket": self.bucket},
                {"key": key},
                {"x-amz-algorithm": _ALGORITHM},
                {"x-amz-credential": credential},
                {"x-amz-date": amz_date},
            ],
        }
        encoded = base64.b64encode(json.dumps(policy).encode()).decode()
        signature = hmac.new(self._signing_key(day), encoded.encode(), "sha256").hexdigest()
        fields = {
            "key": key,
            "x-amz-algorithm": _ALGORITHM,
            "x-amz-credential": credential,
            "x-amz-date": amz_date,
            "policy": encoded,
            "x-amz-signature": signature,
        }
        return PresignedPost(url=f"{self._base}/{self.bucket}", fields=fields)


def presign_get(
    client: Any, bucket: str, key: str, expires_s: int, signer: SigV4Presigner | None = None
) -> str:
    """A URL that GETs this object without credentials until it expires."""
    check_key(bucket, key)
    _check_expiry(bucket, key, expires_s)
    if signer is not None:
        return signer.get_url(key, expires_s)
    with translated("presign GET", bucket, key):
        url: str = client.generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=expires_s
        )
    return url


def presign_post(
    client: Any,
    bucket: str,
    key: str,
    max_bytes: int,
    expires_s: int,
    min_bytes: int = 0,
    signer: SigV4Presigner | None = None,
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
    if signer is not None:
        return signer.post(key, min_bytes, max_bytes, expires_s)
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
