"""Sharding against a real S3 server (SeaweedFS): uploads, s3:// sources, and their errors."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import pytest
from cotune.orchestrator.data.manifest import MANIFEST, Manifest, ManifestError
from cotune.orchestrator.data.objectstore import ObjectStore
from cotune.orchestrator.data.sharding import EVAL_NAME, ShardingError, shard_dataset, shard_name
from cotune.orchestrator.data.shardstore import shard_to_store, upload_shards
from cotune.orchestrator.data.synthetic import generate_rows, write_jsonl

pytestmark = pytest.mark.integration

ARGS = {"fmt": "alpaca", "shards": 3, "eval_split": 0.1, "seed": 11}


def _local(source: Path, out: Path) -> Manifest:
    return shard_dataset(source, out_dir=out, **ARGS)


def test_shard_to_store_uploads_the_same_bytes_as_local_sharding(
    object_store: ObjectStore, alpaca_dataset: Path, tmp_path: Path
):
    manifest = shard_to_store(alpaca_dataset, store=object_store, job_id="job-1", **ARGS)
    local = _local(alpaca_dataset, tmp_path / "local")
    assert manifest == local
    prefix = "jobs/job-1/data/"
    names = sorted(o.key.removeprefix(prefix) for o in object_store.list(prefix))
    assert names == sorted([EVAL_NAME, MANIFEST, *(shard_name(i) for i in range(3))])
    for name in names:
        stored = object_store.get_bytes(prefix + name)
        assert stored == (tmp_path / "local" / name).read_bytes()
    for info in manifest.files():
        head = object_store.head(prefix + info.name)
        assert head is not None and (head.sha256, head.size) == (info.sha256, info.bytes)


def test_s3_sources_shard_like_local_files(
    object_store: ObjectStore, alpaca_dataset: Path, tmp_path: Path
):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = list(generate_rows("alpaca", 400, seed=4))
    plain = tmp_path / "rows.jsonl"
    write_jsonl(plain, ({**r, "input": r.get("input")} for r in rows))  # as parquet sees them
    gz = tmp_path / "rows.jsonl.gz"
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    parquet = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist([{**r, "input": r.get("input")} for r in rows]), parquet)
    object_store.put_file("in/rows.jsonl.gz", gz)
    object_store.put_file("in/rows.parquet", parquet)
    write_jsonl(tmp_path / "part-a.jsonl", ({**r, "input": r.get("input")} for r in rows[:150]))
    write_jsonl(tmp_path / "part-b.jsonl", ({**r, "input": r.get("input")} for r in rows[150:]))
    object_store.put_file("folder/part-a.jsonl", tmp_path / "part-a.jsonl")
    object_store.put_file("folder/part-b.jsonl", tmp_path / "part-b.jsonl")
    object_store.put_bytes("folder/notes.txt", b"ignored: not a dataset file")
    want = _local(plain, tmp_path / "want")

    bucket = object_store.bucket
    for name, uri, raw in [
        ("gz", f"s3://{bucket}/in/rows.jsonl.gz", gz.read_bytes()),
        ("parquet", f"s3://{bucket}/in/rows.parquet", parquet.read_bytes()),
        ("prefix", f"s3://{bucket}/folder/", None),
    ]:
        got = shard_dataset(uri, out_dir=tmp_path / name, store=object_store, **ARGS)
        assert got.shards == want.shards and got.eval == want.eval, name
        assert got.source.uri == uri and got.source.rows == 400
        if raw is not None:
            assert got.source.sha256 == hashlib.sha256(raw).hexdigest()
            assert got.source.bytes == len(raw)
        for info in got.files():
            assert (tmp_path / name / info.name).read_bytes() == (
                tmp_path / "want" / info.name
            ).read_bytes()


def test_s3_source_errors_name_the_object(object_store: ObjectStore, tmp_path: Path):
    bucket = object_store.bucket
    cases = [
        ("s3://other-bucket/x.jsonl", "bound to bucket"),
        (f"s3://{bucket}/missing.jsonl", "no such object"),
        (f"s3://{bucket}/data.csv", "unsupported object type"),
        (f"s3://{bucket}/empty/", "prefix holds no dataset files"),
        (f"s3://{bucket}", "expected s3://bucket/key"),
    ]
    for uri, message in cases:
        with pytest.raises(ShardingError, match=message) as failure:
            shard_dataset(uri, out_dir=tmp_path / "out", store=object_store, **ARGS)
        assert uri in str(failure.value)
        assert not (tmp_path / "out").exists()


def test_a_tampered_folder_uploads_nothing(
    object_store: ObjectStore, alpaca_dataset: Path, tmp_path: Path
):
    out = tmp_path / "out"
    _local(alpaca_dataset, out)
    (out / EVAL_NAME).write_bytes(b"replaced")
    with pytest.raises(ManifestError, match=r"eval\.jsonl\.zst: does not match"):
        upload_shards(out, object_store, "job-2")
    assert list(object_store.list("jobs/job-2/")) == []
    with pytest.raises(ShardingError, match="job_id"):
        upload_shards(out, object_store, "../escape")
