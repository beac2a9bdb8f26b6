"""ObjectStore on a real SeaweedFS S3 server: transfers, checksums, presigned requests, auth."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import httpx
import pytest
from cotune.orchestrator.data.objectstore import ObjectStore
from cotune.orchestrator.data.s3errors import (
    ChecksumMismatch,
    InvalidKey,
    ObjectNotFound,
    ObjectStoreError,
)
from cotune.orchestrator.settings import Settings

from tests.fixtures.services import S3Server

pytestmark = pytest.mark.integration

MiB = 1024 * 1024


def test_small_object_round_trip_records_sha256(object_store: ObjectStore) -> None:
    data = b"adapter bytes\n" * 100
    put = object_store.put_bytes("jobs/j1/spec.yaml", data)
    digest = hashlib.sha256(data).hexdigest()
    assert put.sha256 == digest
    assert put.size == len(data)
    head = object_store.head("jobs/j1/spec.yaml")
    assert head is not None
    assert (head.size, head.sha256) == (len(data), digest)
    assert object_store.exists("jobs/j1/spec.yaml")
    assert object_store.get_bytes("jobs/j1/spec.yaml", expected_sha256=digest) == data


def test_multipart_upload_and_verified_download(
    object_store: ObjectStore, s3_server: S3Server, tmp_path: Path
) -> None:
    store = s3_server.store(
        object_store.bucket, multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB
    )
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(12 * MiB + 123))
    digest = hashlib.sha256(src.read_bytes()).hexdigest()

    put = store.put_file("models/x/big.bin", src)

    assert put.sha256 == digest
    assert put.size == src.stat().st_size
    assert put.etag.endswith("-3")  # S3's mark of a 3-part multipart upload
    dst = tmp_path / "out" / "big.bin"
    got = store.get_file("models/x/big.bin", dst, expected_sha256=digest)
    assert got.sha256 == digest
    assert dst.read_bytes() == src.read_bytes()


def test_download_with_wrong_sha256_is_refused_and_leaves_no_file(
    object_store: ObjectStore, tmp_path: Path
) -> None:
    object_store.put_bytes("a/b.bin", b"real content")
    dst = tmp_path / "b.bin"
    with pytest.raises(ChecksumMismatch, match=r"a/b\.bin"):
        object_store.get_file("a/b.bin", dst, expected_sha256="0" * 64)
    assert not dst.exists()
    assert list(tmp_path.iterdir()) == []


def test_missing_object(object_store: ObjectStore, tmp_path: Path) -> None:
    assert object_store.head("nope/x") is None
    assert not object_store.exists("nope/x")
    with pytest.raises(ObjectNotFound, match=r"GetObject of s3://t-\w+/nope/x"):
        object_store.get_bytes("nope/x")
    with pytest.raises(ObjectNotFound):
        object_store.get_file("nope/x", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_list_open_stream_and_delete_prefix(object_store: ObjectStore) -> None:
    for i in range(5):
        object_store.put_bytes(f"jobs/j1/data/shard-{i:05d}.jsonl", b"x" * (i + 1))
    object_store.put_bytes("jobs/j2/spec.yaml", b"other job")

    listed = list(object_store.list("jobs/j1/"))
    assert [o.key for o in listed] == [f"jobs/j1/data/shard-{i:05d}.jsonl" for i in range(5)]
    assert [o.size for o in listed] == [1, 2, 3, 4, 5]

    with object_store.open_stream("jobs/j2/spec.yaml") as stream:
        assert stream.read(5) == b"other"
        assert stream.read() == b" job"

    with pytest.raises(InvalidKey, match="empty prefix"):
        object_store.delete_prefix("")
    assert object_store.delete_prefix("jobs/j1/") == 5
    assert list(object_store.list("jobs/j1/")) == []
    assert object_store.exists("jobs/j2/spec.yaml")


def test_presigned_get_works_then_expires(object_store: ObjectStore) -> None:
    object_store.put_bytes("jobs/j1/data/eval.jsonl", b"eval rows")
    url = object_store.presign_get("jobs/j1/data/eval.jsonl", expires_s=60)
    answer = httpx.get(url)
    assert answer.status_code == 200
    assert answer.content == b"eval rows"

    short = object_store.presign_get("jobs/j1/data/eval.jsonl", expires_s=1)
    time.sleep(2.5)
    expired = httpx.get(short)
    assert expired.status_code == 403
    assert b"expired" in expired.content.lower()


def test_presigned_post_enforces_size_range_and_key(object_store: ObjectStore) -> None:
    key = "jobs/j1/trials/0/r0/s0/a1/adapter/adapter_model.safetensors"
    post = object_store.presign_post(key, max_bytes=1000, expires_s=60, min_bytes=10)

    too_big = httpx.post(post.url, data=post.fields, files={"file": ("f", b"x" * 1001)})
    assert too_big.status_code in (400, 403)
    too_small = httpx.post(post.url, data=post.fields, files={"file": ("f", b"x" * 9)})
    assert too_small.status_code in (400, 403)
    other_key = dict(post.fields, key=key.replace("a1", "a2"))
    elsewhere = httpx.post(post.url, data=other_key, files={"file": ("f", b"x" * 100)})
    assert elsewhere.status_code == 403
    assert not object_store.exists(key)
    assert not object_store.exists(key.replace("a1", "a2"))

    fits = httpx.post(post.url, data=post.fields, files={"file": ("f", b"y" * 1000)})
    assert fits.status_code in (200, 201, 204), fits.text
    assert object_store.get_bytes(key) == b"y" * 1000


def test_sigv4_is_enforced(object_store: ObjectStore, s3_server: S3Server) -> None:
    object_store.put_bytes("private/x", b"secret")
    wrong = ObjectStore(
        s3_server.endpoint, object_store.bucket, s3_server.access_key, "not-the-secret"
    )
    with pytest.raises(ObjectStoreError, match=r"PutObject of s3://t-\w+/private/y.*Signature"):
        wrong.put_bytes("private/y", b"forged")
    with pytest.raises(ObjectStoreError, match="private/x"):
        wrong.get_bytes("private/x")
    anonymous = httpx.get(f"{s3_server.endpoint}/{object_store.bucket}/private/x")
    assert anonymous.status_code == 403
    assert not object_store.exists("private/y")


def test_read_prefix_gives_size_and_first_bytes_in_one_read(
    object_store: ObjectStore, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The request path's read (data/signedread.py), and boto3's where no static keys sign."""
    small, large = b'{"r": 8}', os.urandom(200 * 1024)
    object_store.put_bytes("prefix/small", small)
    object_store.put_bytes("prefix/large", large)
    object_store.put_bytes("prefix/empty", b"")
    assert object_store.read_prefix("prefix/small", 65536) == (len(small), small)
    assert object_store.read_prefix("prefix/large", 65536) == (len(large), large[:65536])
    assert object_store.read_prefix("prefix/large", 1) == (len(large), large[:1])
    assert object_store.read_prefix("prefix/empty", 65536) == (0, b"")
    assert object_store.read_prefix("prefix/missing", 65536) is None
    wrong = ObjectStore(
        s3_server.endpoint, object_store.bucket, s3_server.access_key, "not-the-secret"
    )
    with pytest.raises(ObjectStoreError, match=r"GetObject of s3://t-\w+/prefix/small.*403"):
        wrong.read_prefix("prefix/small", 65536)
    with pytest.raises(InvalidKey, match="may not start with '/'"):
        object_store.read_prefix("/prefix/small", 8)
    # Credentials from the environment: boto3's path, with the same answers.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    ambient = ObjectStore(s3_server.endpoint, object_store.bucket, None, None)
    assert ambient.read_prefix("prefix/large", 65536) == (len(large), large[:65536])
    assert ambient.read_prefix("prefix/empty", 65536) == (0, b"")
    assert ambient.read_prefix("prefix/missing", 65536) is None


def test_bad_arguments_are_refused_before_any_request(object_store: ObjectStore) -> None:
    with pytest.raises(InvalidKey, match="key is empty"):
        object_store.put_bytes("", b"x")
    with pytest.raises(InvalidKey, match="may not start with '/'"):
        object_store.head("/abs")
    with pytest.raises(InvalidKey, match=r"expires_s must be in 1\.\.604800, got 0"):
        object_store.presign_get("a", expires_s=0)
    with pytest.raises(InvalidKey, match=r"min_bytes <= max_bytes, got 10 and 5"):
        object_store.presign_post("a", max_bytes=5, expires_s=60, min_bytes=10)
    assert list(object_store.list("")) == []


def test_from_settings(s3_server: S3Server) -> None:
    settings = Settings(
        s3_endpoint=s3_server.endpoint,
        s3_bucket=s3_server.bucket,
        s3_access_key=s3_server.access_key,
        s3_secret_key=s3_server.secret_key,
    )
    store = ObjectStore.from_settings(settings)
    store.put_bytes("from-settings/x", b"1")
    assert store.get_bytes("from-settings/x") == b"1"
    store.delete_prefix("from-settings/")
    with pytest.raises(ValueError, match="COTUNE_S3_ENDPOINT is not set"):
        ObjectStore.from_settings(Settings())
