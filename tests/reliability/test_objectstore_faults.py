"""The object store behind a faulty link: every call rides out 503s and reset connections.

A fault-injecting proxy (tests/reliability/faultproxy.py) stands between the client and
the real SeaweedFS S3 server: the coordinator's ObjectStore and the workers' presigned
transfers use its URL as the S3 endpoint. Transient faults are retried (bounded); a 404 or
a bad signature is answered at once, asked once; a tiny sweep completes through it.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from cotune.orchestrator.cli.client import CotuneClient
from cotune.orchestrator.data.layout import best_prefix
from cotune.orchestrator.data.objectstore import ObjectStore
from cotune.orchestrator.data.s3client import REQUEST_ATTEMPTS
from cotune.orchestrator.data.s3errors import ObjectNotFound, ObjectStoreError
from cotune.orchestrator.protocol.wire import PresignedGet, PresignedPost
from cotune.orchestrator.runtime.coordinator import CoordinatorService
from cotune.worker.transfer import RetryPolicy, Transfers

from tests.e2e.sweep_stack import WorkerProcess, service_settings, wait_for_job, write_spec
from tests.fixtures.services import S3Server
from tests.reliability.faultproxy import FAULTS, FaultProxy

pytestmark = pytest.mark.integration

MiB = 1024 * 1024


def store_via(proxy: FaultProxy, s3: S3Server, bucket: str, **options: Any) -> ObjectStore:
    return ObjectStore(proxy.url, bucket, s3.access_key, s3.secret_key, **options)


@pytest.fixture
def bucket(s3_server: S3Server) -> Any:
    name = f"faults-{uuid.uuid4().hex[:12]}"
    direct = s3_server.store(name)
    direct.ensure_bucket()
    yield name
    direct.delete_bucket()


def test_every_store_call_and_presigned_transfer_rides_out_injected_faults(
    s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    with FaultProxy(s3_server.endpoint, rate=0.2, seed=7) as proxy:
        store = store_via(
            proxy, s3_server, bucket, multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB
        )
        store.ensure_bucket()
        blobs = {f"jobs/j/obj-{i:03d}": os.urandom(1000 + i) for i in range(30)}
        for key, data in blobs.items():
            assert store.put_bytes(key, data).size == len(data)
        for key, data in blobs.items():
            assert store.get_bytes(key) == data
            info = store.head(key)
            assert info is not None and info.sha256 == hashlib.sha256(data).hexdigest()
        assert [o.key for o in store.list("jobs/j/")] == sorted(blobs)

        big = tmp_path / "big.bin"
        big.write_bytes(os.urandom(12 * MiB + 5))
        digest = hashlib.sha256(big.read_bytes()).hexdigest()
        for i in range(3):  # a multipart upload, then streamed reads of it
            assert store.put_file(f"models/big-{i}.bin", big).sha256 == digest
            got = store.get_file(f"models/big-{i}.bin", tmp_path / f"copy-{i}.bin")
            assert got.sha256 == digest
            with store.open_stream(f"models/big-{i}.bin") as stream:
                assert hashlib.sha256(stream.read()).hexdigest() == digest

        # A worker's side: presigned URLs signed for the proxy's host, retried by the worker.
        transfers = Transfers(retry=RetryPolicy(attempts=6, initial_s=0.05, max_s=0.5))
        try:
            for i in range(15):
                key = f"jobs/j/upload-{i:03d}.bin"
                data = os.urandom(2000 + i)
                (tmp_path / "up.bin").write_bytes(data)
                post = store.presign_post(key, max_bytes=10_000, expires_s=300)
                target = PresignedPost(url=post.url, fields=post.fields, key=key, max_bytes=10_000)
                sent = transfers.upload(target, tmp_path / "up.bin", label=key)
                source = PresignedGet(
                    url=store.presign_get(key, 300), sha256=sent.sha256, bytes=sent.bytes
                )
                down = transfers.download(source, tmp_path / f"down-{i}.bin", label=key)
                assert down.read_bytes() == data
        finally:
            transfers.close()
        assert store.delete_prefix("jobs/") == 30 + 15
    counts = proxy.counts
    print(f"requests {sum(counts.values())}, injected faults {dict(counts)}")
    assert all(counts[kind] > 0 for kind in FAULTS), counts


def test_a_stream_cut_midway_goes_on_from_where_it_broke(
    s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    data = os.urandom(6 * MiB + 3)
    digest = hashlib.sha256(data).hexdigest()
    s3_server.store(bucket).put_bytes("models/streamed.bin", data)
    with FaultProxy(s3_server.endpoint, rate=0.5, faults=("cut",), seed=3) as proxy:
        store = store_via(proxy, s3_server, bucket)
        for _ in range(4):
            with store.open_stream("models/streamed.bin") as stream:
                assert hashlib.sha256(stream.read()).hexdigest() == digest
    # A read picked up mid-object asks for the rest only, of the same version (If-Match).
    resumed = [s.range for s in proxy.seen if s.range and s.range != "bytes=0-"]
    print(f"requests {len(proxy.seen)}, cut {proxy.counts['cut']}, resumed at {resumed}")
    assert resumed and all(r.startswith("bytes=") and r.endswith("-") for r in resumed)


def test_a_missing_object_or_a_bad_signature_is_answered_at_once_and_asked_once(
    s3_server: S3Server, bucket: str
) -> None:
    with FaultProxy(s3_server.endpoint, rate=0.0) as proxy:
        store = store_via(proxy, s3_server, bucket)
        began = time.monotonic()
        with pytest.raises(ObjectNotFound):
            store.get_bytes("nope/missing")
        assert [s.outcome for s in proxy.seen if "nope/missing" in s.target] == ["pass"]
        forged = ObjectStore(proxy.url, bucket, s3_server.access_key, "not-the-secret")
        with pytest.raises(ObjectStoreError, match="Signature"):
            forged.put_bytes("private/x", b"forged")
        assert [s.outcome for s in proxy.seen if "private/x" in s.target] == ["pass"]
        took = time.monotonic() - began
    print(f"404 and 403 answered in {took:.2f} s, {len(proxy.seen)} requests")
    assert took < 2.0


def test_a_store_that_keeps_failing_gives_up_within_its_bounds(
    s3_server: S3Server, bucket: str
) -> None:
    with FaultProxy(s3_server.endpoint, rate=1.0, faults=("slowdown",)) as proxy:
        store = store_via(proxy, s3_server, bucket, max_attempts=3, retry_budget_s=10.0)
        began = time.monotonic()
        with pytest.raises(ObjectStoreError, match=r"PutObject of .*SlowDown \(HTTP 503\)"):
            store.put_bytes("jobs/j/never", b"x")
        took = time.monotonic() - began
    print(f"gave up after {len(proxy.seen)} requests in {took:.1f} s")
    # Three tries of the operation, each botocore's few tries of the request; no more.
    assert len(proxy.seen) == 3 * REQUEST_ATTEMPTS
    assert took < 10.0 + 8.0


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(1200)  # about 4 minutes on a quiet machine
def test_a_tiny_sweep_completes_through_an_object_store_that_fails_5_percent_of_requests(
    tmp_path: Path,
    redis_client: Any,
    redis_server: str,
    s3_server: S3Server,
    ray_cluster: str,
    alpaca_dataset: Path,
) -> None:
    home = tmp_path / "home"
    direct = service_settings(home, redis_server, s3_server)
    spec = write_spec(tmp_path, alpaca_dataset, name="s3-faults", trust={"redundancy": 0.0})
    with FaultProxy(s3_server.endpoint, rate=0.05, seed=11) as proxy:
        # The coordinator, its Ray tasks and (through presigned URLs) the workers: all
        # reach S3 through the proxy only.
        settings = replace(direct, s3_endpoint=proxy.url)
        with (
            CoordinatorService(settings, workers=0, api_port=0) as service,
            CotuneClient(service.url, service.admin_token) as client,
        ):
            token = client.create_join_token("s3-faults").token
            workers = [WorkerProcess(service.url, token, home, f"worker-{i}") for i in range(2)]
            try:
                job_id = client.submit(spec)
                job = wait_for_job(client, job_id, 900, workers)
                assert job.state == "succeeded", job.error
            finally:
                for worker in workers:
                    worker.stop()
    counts = proxy.counts
    print(f"requests {sum(counts.values())}, injected faults {dict(counts)}")
    assert proxy.faults_injected >= 5, counts
    assert (job.tasks.accepted, job.tasks.total) == (4, 4), job.tasks
    best = {
        o.key.rsplit("/", 1)[-1]
        for o in s3_server.store(settings.s3_bucket).list(best_prefix(job_id))
    }
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md"} <= best
