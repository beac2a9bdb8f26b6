"""The S3 object store every artifact lives in: streaming, sha256-checked, retried, presigned.

It talks to any S3 (AWS, R2, SeaweedFS, MinIO) through the client of s3client.py; every
call, streamed bodies included, is retried on transient failures (s3client.retrying: a
reset connection, a 503 or SlowDown, a body cut short; not a 403 or 404), and what still
fails is the ObjectStoreError family of s3errors.py. Workers reach S3 through the
presigned URLs it makes (presign.py), never with credentials. Which key holds what is
layout.py's.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar

from cotune.orchestrator.data import presign
from cotune.orchestrator.data.presign import PresignedPost
from cotune.orchestrator.data.s3client import (
    ATTEMPTS,
    BUDGET_S,
    REQUEST_ATTEMPTS,
    make_client,
    retrying,
)
from cotune.orchestrator.data.s3errors import (
    ChecksumMismatch,
    InvalidKey,
    ObjectNotFound,
    ObjectStoreError,
    check_key,
    code,
    status,
    translated,
)
from cotune.orchestrator.data.s3stream import ResumingReader
from cotune.orchestrator.data.signedread import SignedReader

if TYPE_CHECKING:
    from cotune.orchestrator.settings import Settings

MiB = 1024 * 1024
_CHUNK = MiB
_SHA256_META = "sha256"  # stored as the x-amz-meta-sha256 header of every object we write
_DELETE_BATCH = 1000  # DeleteObjects takes at most this many keys
T = TypeVar("T")


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object. `sha256` is None where the store does not say (listings)."""

    key: str
    size: int
    sha256: str | None
    etag: str


def sha256_file(path: Path) -> tuple[str, int]:
    """The hex sha256 and size of a file, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


class ObjectStore:
    """One bucket of an S3 server.

    Example:
        store = ObjectStore.from_settings(settings)
        info = store.put_file("jobs/j1/spec.yaml", Path("sweep.yaml"))
        store.get_file("jobs/j1/spec.yaml", Path("copy.yaml"), expected_sha256=info.sha256)
    """

    def __init__(
        self,
        endpoint_url: str | None,
        bucket: str,
        access_key: str | None,
        secret_key: str | None,
        region: str = "us-east-1",
        *,
        multipart_threshold: int = 64 * MiB,
        multipart_chunksize: int = 16 * MiB,
        max_concurrency: int = 4,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 60.0,
        max_attempts: int = ATTEMPTS,
        retry_budget_s: float = BUDGET_S,
    ) -> None:
        """`max_attempts` tries of each operation within `retry_budget_s` (s3client.py)."""
        if not bucket:
            raise InvalidKey("configure", bucket, "", "the bucket name is empty")
        self.endpoint_url = endpoint_url
        self.bucket = bucket
        self.region = region
        self._client = make_client(
            endpoint_url,
            access_key,
            secret_key,
            region,
            connect_timeout_s=connect_timeout_s,
            read_timeout_s=read_timeout_s,
            max_attempts=REQUEST_ATTEMPTS,
        )
        self._transfer: dict[str, Any] = {
            "multipart_threshold": multipart_threshold,
            "multipart_chunksize": multipart_chunksize,
            "max_concurrency": max_concurrency,
        }
        self._attempts = max_attempts
        self._budget_s = retry_budget_s
        # Static keys: presigned on the hot path without botocore (presign.py says why), and
        # the request path's reads sent over such URLs (signedread.py).
        self._signer = (
            presign.SigV4Presigner(
                self._client.meta.endpoint_url, bucket, access_key, secret_key, region
            )
            if access_key and secret_key
            else None
        )
        self._reader = (
            SignedReader(
                self._signer, connect_timeout_s=connect_timeout_s, read_timeout_s=read_timeout_s
            )
            if self._signer is not None
            else None
        )

    @classmethod
    def from_settings(cls, settings: Settings, **options: Any) -> ObjectStore:
        """The store the settings point at (COTUNE_S3_*); see `stack.settings_for_stack`."""
        if not settings.s3_endpoint:
            raise ValueError(
                "COTUNE_S3_ENDPOINT is not set: start the embedded stack (`cotune up`) "
                "or point cotune at an S3 server (docs/operations.md)"
            )
        return cls(
            settings.s3_endpoint,
            settings.s3_bucket,
            settings.s3_access_key,
            settings.s3_secret_key,
            settings.s3_region,
            **options,
        )

    # -- buckets ---------------------------------------------------------------------------

    def ensure_bucket(self) -> None:
        """Create the bucket unless it exists (and is ours)."""
        if not self._call("HeadBucket", "", self._bucket_exists):
            self._call("CreateBucket", "", self._create_bucket)

    def delete_bucket(self) -> None:
        """Delete every object, then the bucket itself."""
        self.delete_prefix("", everything=True)
        with contextlib.suppress(ObjectNotFound):
            self._call("DeleteBucket", "", self._client.delete_bucket, Bucket=self.bucket)

    def _bucket_exists(self) -> bool:
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except Exception as exc:
            if status(exc) in (404, 400):  # 400: some servers answer HEAD so for a miss
                return False
            raise
        return True

    def _create_bucket(self) -> None:
        try:
            self._client.create_bucket(Bucket=self.bucket)
        except Exception as exc:
            if code(exc) != "BucketAlreadyOwnedByYou":  # a retry after a lost answer
                raise

    # -- writes ----------------------------------------------------------------------------

    def put_file(self, key: str, path: Path, content_type: str | None = None) -> ObjectInfo:
        """Upload a file (multipart above the threshold), recording its sha256."""
        check_key(self.bucket, key)
        from boto3.s3.transfer import TransferConfig

        try:
            sha256, size = sha256_file(path)
        except OSError as exc:
            raise ObjectStoreError(
                "upload", self.bucket, key, f"cannot read {path}: {exc}"
            ) from exc
        extra = _put_args(sha256, content_type)
        transfer = TransferConfig(**self._transfer)
        # A retry sends the whole file again (s3transfer already retried each part).
        self._call(
            "upload",
            key,
            self._client.upload_file,
            str(path),
            self.bucket,
            key,
            ExtraArgs=extra,
            Config=transfer,
        )
        info = self.head(key)
        if info is None or info.size != size:
            got = "nothing" if info is None else f"{info.size} bytes"
            raise ObjectStoreError("upload", self.bucket, key, f"sent {size} bytes, stored {got}")
        return info

    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> ObjectInfo:
        """Upload a small object from memory, recording its sha256."""
        check_key(self.bucket, key)
        sha256 = hashlib.sha256(data).hexdigest()
        answer = self._call(
            "PutObject",
            key,
            self._client.put_object,
            Bucket=self.bucket,
            Key=key,
            Body=data,
            **_put_args(sha256, content_type),
        )
        return ObjectInfo(key=key, size=len(data), sha256=sha256, etag=_etag(answer.get("ETag")))

    # -- reads -----------------------------------------------------------------------------

    def get_file(self, key: str, path: Path, expected_sha256: str | None = None) -> ObjectInfo:
        """Stream an object to `path`, checking its sha256 (the expected one, else the stored one).

        The file appears only once complete and verified; a failed download leaves no file.
        """
        check_key(self.bucket, key)
        # A try that fails mid-body starts over: a partial file is never kept.
        return self._call("download", key, self._download_once, key, path, expected_sha256)

    def _download_once(self, key: str, path: Path, expected_sha256: str | None) -> ObjectInfo:
        answer = self._client.get_object(Bucket=self.bucket, Key=key)
        stored = answer.get("Metadata", {}).get(_SHA256_META)
        want = expected_sha256 or stored
        digest = hashlib.sha256()
        size = 0
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.part")
        try:
            with partial.open("wb") as out:
                for chunk in answer["Body"].iter_chunks(chunk_size=_CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
            got = self._verified("download", key, digest.hexdigest(), want)
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
        return ObjectInfo(key=key, size=size, sha256=got, etag=_etag(answer.get("ETag")))

    def get_bytes(self, key: str, expected_sha256: str | None = None) -> bytes:
        """A whole (small) object in memory, checked like `get_file`."""
        check_key(self.bucket, key)
        data, metadata = self._call("GetObject", key, self._read_whole, key)
        want = expected_sha256 or metadata.get(_SHA256_META)
        self._verified("GetObject", key, hashlib.sha256(data).hexdigest(), want)
        return data

    def _read_whole(self, key: str) -> tuple[bytes, dict[str, str]]:
        answer = self._client.get_object(Bucket=self.bucket, Key=key)
        return answer["Body"].read(), answer.get("Metadata", {})

    def open_stream(self, key: str) -> BinaryIO:
        """A readable binary stream over an object, for reading it without holding it whole.

        A connection dropped mid-body is picked up where it broke (a ranged GET of the same
        version, by its ETag). Close it when done (it is a context manager).
        """
        check_key(self.bucket, key)
        answer = self._call("GetObject", key, self._client.get_object, Bucket=self.bucket, Key=key)

        def rest(offset: int, etag: str | None) -> Any:
            match = {"IfMatch": etag} if etag else {}
            span = f"bytes={offset}-"
            return self._client.get_object(Bucket=self.bucket, Key=key, Range=span, **match)

        reader = ResumingReader(answer, rest, lambda read: self._call("GetObject", key, read))
        return io.BufferedReader(reader, buffer_size=_CHUNK)

    def get_range(self, key: str, start: int, length: int) -> bytes:
        """Bytes [start, start + length) of an object (fewer past its end), by a ranged GET:
        a header is read without fetching the whole object."""
        check_key(self.bucket, key)
        if length <= 0:
            return b""
        span = f"bytes={start}-{start + length - 1}"

        def read() -> bytes:
            answer = self._client.get_object(Bucket=self.bucket, Key=key, Range=span)
            data: bytes = answer["Body"].read()
            return data

        return self._call("GetObject", key, read)

    def read_prefix(self, key: str, length: int) -> tuple[int, bytes] | None:
        """(the object's size, its first `length` bytes: all of it when smaller), or None
        when there is none: one ranged GET, without botocore where the keys are static."""
        check_key(self.bucket, key)
        reader = self._reader
        if reader is not None:
            try:
                return self._call("GetObject", key, reader.prefix, key, length)
            except ObjectNotFound:
                return None
        info = self.head(key)
        if info is None:
            return None
        return info.size, self.get_range(key, 0, length) if info.size else b""

    def head(self, key: str) -> ObjectInfo | None:
        """What is stored under `key`, or None."""
        check_key(self.bucket, key)
        try:
            answer = self._call(
                "HeadObject", key, self._client.head_object, Bucket=self.bucket, Key=key
            )
        except ObjectNotFound:
            return None
        return ObjectInfo(
            key=key,
            size=int(answer["ContentLength"]),
            sha256=answer.get("Metadata", {}).get(_SHA256_META),
            etag=_etag(answer.get("ETag")),
        )

    def exists(self, key: str) -> bool:
        return self.head(key) is not None

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object whose key starts with `prefix`, in key order (sha256 not included)."""
        page_after: dict[str, str] = {}  # a page at a time, each retried on its own
        while True:
            page = self._call(
                "ListObjectsV2",
                prefix,
                self._client.list_objects_v2,
                Bucket=self.bucket,
                Prefix=prefix,
                **page_after,
            )
            for item in page.get("Contents", []):
                size, etag = int(item["Size"]), _etag(item.get("ETag"))
                yield ObjectInfo(key=item["Key"], size=size, sha256=None, etag=etag)
            if not page.get("IsTruncated"):
                return
            page_after = {"ContinuationToken": page["NextContinuationToken"]}

    def delete(self, key: str) -> None:
        check_key(self.bucket, key)
        self._call("DeleteObject", key, self._client.delete_object, Bucket=self.bucket, Key=key)

    def delete_prefix(self, prefix: str, *, everything: bool = False) -> int:
        """Delete every object under `prefix`; return how many. An empty prefix needs
        `everything=True`, so a missing variable cannot empty the bucket."""
        if not prefix and not everything:
            raise InvalidKey(
                "delete_prefix", self.bucket, prefix, "empty prefix: pass everything=True"
            )
        deleted = 0
        batch: list[str] = []
        for info in self.list(prefix):
            batch.append(info.key)
            if len(batch) == _DELETE_BATCH:
                deleted += self._delete_batch(prefix, batch)
                batch = []
        if batch:
            deleted += self._delete_batch(prefix, batch)
        return deleted

    def _delete_batch(self, prefix: str, keys: Sequence[str]) -> int:
        request = {"Objects": [{"Key": k} for k in keys], "Quiet": True}
        answer = self._call(
            "DeleteObjects", prefix, self._client.delete_objects, Bucket=self.bucket, Delete=request
        )
        errors = answer.get("Errors", [])
        if errors:
            first = errors[0]
            raise ObjectStoreError(
                "DeleteObjects",
                self.bucket,
                first.get("Key", prefix),
                f"{len(errors)} objects not deleted: {first.get('Code')} {first.get('Message')}",
            )
        return len(keys)

    # -- presigned requests ----------------------------------------------------------------

    def presign_get(self, key: str, expires_s: int) -> str:
        """A URL that GETs this object without credentials until it expires."""
        return presign.presign_get(self._client, self.bucket, key, expires_s, self._signer)

    def presign_post(
        self, key: str, max_bytes: int, expires_s: int, min_bytes: int = 0
    ) -> PresignedPost:
        """A POST upload for exactly `key`, between min_bytes and max_bytes, until it expires."""
        return presign.presign_post(
            self._client, self.bucket, key, max_bytes, expires_s, min_bytes, self._signer
        )

    # -- internals -------------------------------------------------------------------------

    def _call(self, operation: str, key: str, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        """`fn(*args, **kw)` with transient failures retried (s3client.retrying); what still
        fails raises as the ObjectStoreError naming the operation and the object."""
        where = f"s3://{self.bucket}/{key}"
        again = retrying(operation, where, attempts=self._attempts, budget_s=self._budget_s)
        with translated(operation, self.bucket, key):
            return again(fn, *args, **kw)

    def _verified(self, operation: str, key: str, got: str, want: str | None) -> str:
        if want is not None and got != want.lower():
            raise ChecksumMismatch(operation, self.bucket, key, f"sha256 is {got}, expected {want}")
        return got


def _put_args(sha256: str, content_type: str | None) -> dict[str, Any]:
    args: dict[str, Any] = {"Metadata": {_SHA256_META: sha256}}
    if content_type:
        args["ContentType"] = content_type
    return args


def _etag(raw: str | None) -> str:
    return (raw or "").strip('"')
