"""The request path's reads of the object store, without botocore.

`complete` reads the start of each uploaded file (its size, the safetensors header, and the
whole of a small file to hash it). Through boto3 each of those reads is a request object,
its event hooks, a SigV4 signature derived afresh and a response parser: about 1.5 ms of CPU
a call here, most of a completion's cost. `SignedReader` sends the same ranged GET over a
presigned URL (presign.py's `SigV4Presigner`, the day's signing key cached) on one urllib3
pool: a fraction of that. Answers other than 200/206 raise botocore's `ClientError` carrying
S3's status and code, so ObjectStore's retrying and error translation treat them exactly as
boto3's (s3client.is_transient, s3errors.translate).

    reader = SignedReader(signer)
    size, first = reader.prefix("jobs/j1/adapter.safetensors", 65536)   # None: no object
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cotune.orchestrator.data.presign import SigV4Presigner

#: How long a URL for the coordinator's own read stays valid: it is used at once.
_URL_TTL_S = 300
_CODE = re.compile(rb"<Code>([^<]{1,128})</Code>")
_MESSAGE = re.compile(rb"<Message>([^<]{0,512})</Message>")


class SignedReader:
    """Ranged GETs of one bucket over presigned URLs (module docstring)."""

    def __init__(
        self,
        signer: SigV4Presigner,
        *,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 60.0,
        connections: int = 32,
    ) -> None:
        import urllib3

        self._signer = signer
        self._pool = urllib3.PoolManager(maxsize=connections, block=False, retries=False)
        self._timeout = urllib3.Timeout(connect=connect_timeout_s, read=read_timeout_s)

    def prefix(self, key: str, length: int) -> tuple[int, bytes] | None:
        """(the object's size, its first `length` bytes: all of it when smaller), or None
        when there is no object. Raises ClientError for any other answer but an empty
        object's 416 (no range of it can be satisfied), which is (0, b"")."""
        answer = self._pool.request(
            "GET",
            self._signer.get_url(key, _URL_TTL_S),
            headers={"Range": f"bytes=0-{max(length, 1) - 1}"},
            timeout=self._timeout,
            preload_content=True,
        )
        data: bytes = answer.data
        if answer.status == 206:
            total = (answer.headers.get("Content-Range") or "").rpartition("/")[2]
            return (int(total) if total.isdigit() else len(data)), data[:length]
        if answer.status == 200:  # a server that ignores Range sends the whole object
            return len(data), data[:length]
        if answer.status == 404:
            return None
        if answer.status == 416:  # a range from byte 0 is unsatisfiable only for an empty object
            return 0, b""
        raise _client_error(answer.status, data)


def _client_error(status: int, body: bytes) -> Exception:
    """botocore's ClientError for an S3 error answer (status, code and message)."""
    from botocore.exceptions import ClientError

    found = _CODE.search(body)
    message = _MESSAGE.search(body)
    error = {
        "Code": found.group(1).decode(errors="replace") if found else str(status),
        "Message": message.group(1).decode(errors="replace") if message else "",
    }
    return ClientError(
        {"Error": error, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject"
    )
