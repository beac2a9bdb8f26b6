"""A job's sharded data in the object store, under `jobs/<job>/data/` (layout.py).

    shard_to_store("data.jsonl", store=store, job_id="tiny-1a2b3c4d", fmt="alpaca",
                   shards=4, eval_split=0.05, seed=0)

The manifest is uploaded last, so its presence in the store means the data is complete.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from cotune.orchestrator.data.layout import LayoutError, data_key, data_prefix, manifest_key
from cotune.orchestrator.data.manifest import MANIFEST, Manifest, load_manifest, verify_files
from cotune.orchestrator.data.sharding import ShardingError, shard_dataset

if TYPE_CHECKING:
    from cotune.orchestrator.data.objectstore import ObjectStore


def upload_shards(out_dir: Path, store: ObjectStore, job_id: str) -> Manifest:
    """Upload a sharded folder under `jobs/<job_id>/data/`; the manifest goes last, so its
    presence means the data is complete. The files are checked against the manifest first
    (ManifestError when they differ); the store's errors (ObjectStoreError) pass through."""
    _check_job_id(job_id)
    manifest = load_manifest(out_dir)
    verify_files(out_dir, manifest)
    for info in manifest.files():
        key = data_key(job_id, info.name)
        stored = store.put_file(key, Path(out_dir) / info.name)
        if stored.sha256 != info.sha256 or stored.size != info.bytes:
            raise ShardingError(f"{key}: the stored object differs from the file")
    store.put_file(manifest_key(job_id), Path(out_dir) / MANIFEST)
    return manifest


def shard_to_store(
    source: str | Path,
    *,
    store: ObjectStore,
    job_id: str,
    fmt: str,
    shards: int,
    eval_split: float | str | Path,
    seed: int,
    max_bad_rows: float = 0.01,
    progress: bool = False,
) -> Manifest:
    """`shard_dataset` into a temporary folder, then `upload_shards`."""
    _check_job_id(job_id)  # a bad job id fails before any work
    with tempfile.TemporaryDirectory(prefix="cotune-shards-") as tmp:
        out = Path(tmp) / "data"
        shard_dataset(
            source,
            fmt=fmt,
            shards=shards,
            eval_split=eval_split,
            seed=seed,
            out_dir=out,
            max_bad_rows=max_bad_rows,
            store=store,
            progress=progress,
        )
        return upload_shards(out, store, job_id)


def _check_job_id(job_id: str) -> None:
    try:
        data_prefix(job_id)
    except LayoutError as exc:
        raise ShardingError(str(exc)) from None
