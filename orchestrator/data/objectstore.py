"""The S3 object store every artifact lives in: streaming, sha256-checked, retried, presigned.

It talks to any S3 (AWS, R2, SeaweedFS, MinIO) through the client of s3client.py; its
failures are the ObjectStoreError family of s3errors.py. Workers reach S3 through the
presigned URLs it makes (presign.py), never with credentials. Which key holds what is
layout.py's.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from cotune.orchestrator.data import presign
from cotune.orchestrator.data.presign import PresignedPost
from cotune.orchestrator.data.s3client import is_stream_failure, make_client
from cotune.orchestrator.data.s3errors import (
    ChecksumMismatch,
    InvalidKey,
    ObjectStoreError,
    check_key,
    code,
    status,
    translate,
    translated,
)

if TYPE_CHECKING:
    from cotune.orchestrator.settings import Settings

MiB = 1024 * 1024
_CHUNK = MiB
_SHA256_META = "sha256"  # stored as the x-amz-meta-sha256 header of every object we write
_DELETE_BATCH = 1000  # DeleteObjects takes at most this many keys


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
        max_attempts: int = 5,
    ) -> None:
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
            max_attempts=max_attempts,
        )
        self._transfer: dict[str, Any] = {
            "multipart_threshold": multipart_threshold,
            "multipart_chunksize": multipart_chunksize,
            "max_concurrency": max_concurrency,
        }
        self._stream_attempts = max_attempts

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
        try:
            self._client.head_bucket(Bucket=self.bucket)
            return
        except Exception as exc:
            if status(exc) not in (404, 400):  # 400: some servers answer HEAD so for a miss
                raise self._error("HeadBucket", "", exc) from exc
        try:
            self._client.create_bucket(Bucket=self.bucket)
        except Exception as exc:
            if code(exc) != "BucketAlreadyOwnedByYou":
                raise self._error("CreateBucket", "", exc) from exc

    def delete_bucket(self) -> None:
        """Delete every object, then the bucket itself."""
        self.delete_prefix("", everything=True)
        try:
            self._client.delete_bucket(Bucket=self.bucket)
        except Exception as exc:
            if status(exc) != 404:
                raise self._error("DeleteBucket", "", exc) from exc

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
        with self._calling("upload", key):
            transfer = TransferConfig(**self._transfer)
            self._client.upload_file(str(path), self.bucket, key, ExtraArgs=extra, Config=transfer)
        info = self.head(key)
        if info is None or info.size != size:
            got = "nothing" if info is None else f"{info.size} bytes"
            raise ObjectStoreError("upload", self.bucket, key, f"sent {size} bytes, stored {got}")
        return info

    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> ObjectInfo:
        """Upload a small object from memory, recording its sha256."""
        check_key(self.bucket, key)
        sha256 = hashlib.sha256(data).hexdigest()
        with self._calling("PutObject", key):
            answer = self._client.put_object(
                Bucket=self.bucket, Key=key, Body=data, **_put_args(sha256, content_type)
            )
        return ObjectInfo(key=key, size=len(data), sha256=sha256, etag=_etag(answer.get("ETag")))

    # -- reads -----------------------------------------------------------------------------

    def get_file(self, key: str, path: Path, expected_sha256: str | None = None) -> ObjectInfo:
        """Stream an object to `path`, checking its sha256 (the expected one, else the stored one).

        The file appears only once complete and verified; a failed download leaves no file.
        """
        check_key(self.bucket, key)
        from tenacity import (
            retry,
            retry_if_exception,
            stop_after_attempt,
            wait_random_exponential,
        )

        # botocore retries the request; a connection dropped mid-body is ours to retry.
        download = retry(
            retry=retry_if_exception(is_stream_failure),
            stop=stop_after_attempt(self._stream_attempts),
            wait=wait_random_exponential(multiplier=0.2, max=5.0),
            reraise=True,
        )(self._download_once)
        with self._calling("download", key):
            return download(key, path, expected_sha256)

    def _download_once(self, key: str, path: Path, expected_sha256: str | None) -> ObjectInfo:
        answer = self._get_object(key)
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
        answer = self._get_object(key)
        with self._calling("GetObject", key):
            data: bytes = answer["Body"].read()
        want = expected_sha256 or answer.get("Metadata", {}).get(_SHA256_META)
        self._verified("GetObject", key, hashlib.sha256(data).hexdigest(), want)
        return data

    def open_stream(self, key: str) -> BinaryIO:
        """A readable binary stream over an object, for reading it without holding it whole.

        Close it when done (it is a context manager).
        """
        check_key(self.bucket, key)
        body = self._get_object(key)["Body"]
        return io.BufferedReader(_BodyReader(body), buffer_size=_CHUNK)

    def head(self, key: str) -> ObjectInfo | None:
        """What is stored under `key`, or None."""
        check_key(self.bucket, key)
        try:
            answer = self._client.head_object(Bucket=self.bucket, Key=key)
        except Exception as exc:
            if status(exc) == 404:
                return None
            raise self._error("HeadObject", key, exc) from exc
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
        paginator = self._client.get_paginator("list_objects_v2")
        with self._calling("ListObjectsV2", prefix):
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                for item in page.get("Contents", []):
                    size, etag = int(item["Size"]), _etag(item.get("ETag"))
                    yield ObjectInfo(key=item["Key"], size=size, sha256=None, etag=etag)

    def delete(self, key: str) -> None:
        check_key(self.bucket, key)
        with self._calling("DeleteObject", key):
            self._client.delete_object(Bucket=self.bucket, Key=key)

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
        with self._calling("DeleteObjects", prefix):
            answer = self._client.delete_objects(Bucket=self.bucket, Delete=request)
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
        return presign.presign_get(self._client, self.bucket, key, expires_s)

    def presign_post(
        self, key: str, max_bytes: int, expires_s: int, min_bytes: int = 0
    ) -> PresignedPost:
        """A POST upload for exactly `key`, between min_bytes and max_bytes, until it expires."""
        return presign.presign_post(self._client, self.bucket, key, max_bytes, expires_s, min_bytes)

    # -- internals -------------------------------------------------------------------------

    def _get_object(self, key: str) -> Any:
        with self._calling("GetObject", key):
            return self._client.get_object(Bucket=self.bucket, Key=key)

    def _calling(self, operation: str, key: str) -> contextlib.AbstractContextManager[None]:
        return translated(operation, self.bucket, key)

    def _error(self, operation: str, key: str, exc: Exception) -> ObjectStoreError:
        return translate(operation, self.bucket, key, exc)

    def _verified(self, operation: str, key: str, got: str, want: str | None) -> str:
        if want is not None and got != want.lower():
            raise ChecksumMismatch(operation, self.bucket, key, f"sha256 is {got}, expected {want}")
        return got


class _BodyReader(io.RawIOBase):
    """botocore's StreamingBody as a raw stream, so io.BufferedReader can wrap it."""

    def __init__(self, body: Any) -> None:
        self._body = body

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._body.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._body.close()
        super().close()


def _put_args(sha256: str, content_type: str | None) -> dict[str, Any]:
    args: dict[str, Any] = {"Metadata": {_SHA256_META: sha256}}
    if content_type:
        args["ContentType"] = content_type
    return args


def _etag(raw: str | None) -> str:
    return (raw or "").strip('"')
