"""Staging a base model into a real S3 server (SeaweedFS): once per model, content-addressed,
recorded in the job (real Redis), and refused with the reason when the folder is not one."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import pytest
from cotune.orchestrator.control.state import State
from cotune.orchestrator.data.objectstore import ObjectStore
from cotune.orchestrator.pipeline.modelstage import (
    ModelStageError,
    record_staged,
    stage_model,
    to_stage,
)
from cotune.orchestrator.protocol.problems import Conflict, NotFound
from cotune.orchestrator.protocol.spec import parse_spec

pytestmark = pytest.mark.integration

FILES = {
    "config.json": b'{"model_type": "llama", "hidden_size": 64}\n',
    "model.safetensors": bytes(range(256)) * 4096,  # 1 MiB
    "tokenizer/tokenizer.json": b'{"version": "1.0"}\n',
}


def upload(store: ObjectStore, prefix: str, files: dict[str, bytes] = FILES) -> str:
    for name, data in files.items():
        store.put_bytes(prefix + name, data)
    return f"s3://{store.bucket}/{prefix}"


def local_folder(root: Path, files: dict[str, bytes] = FILES) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def test_staging_twice_uploads_once_and_the_archive_is_what_it_says(
    object_store: ObjectStore, tmp_path: Path
) -> None:
    url = upload(object_store, "uploads/tiny/")
    first = stage_model(url, object_store, work_dir=tmp_path / "work")
    assert first.uploaded and first.files == len(FILES)
    archive = first.archive
    assert archive.key == f"models/{archive.sha256}/model.tar" and archive.name == "model.tar"
    data = object_store.get_bytes(archive.key)
    assert (hashlib.sha256(data).hexdigest(), len(data)) == (archive.sha256, archive.bytes)
    # Again, from the URL without its trailing slash: the same archive, not uploaded again.
    again = stage_model(url.rstrip("/"), object_store, work_dir=tmp_path / "work")
    assert again.archive == archive and not again.uploaded
    # The same files in a local folder (another job's spec) are the same archive, stored once.
    local = stage_model(str(local_folder(tmp_path / "m")), object_store, work_dir=tmp_path / "w")
    assert local.archive == archive and not local.uploaded
    assert [o.key for o in object_store.list("models/")] == [archive.key]
    assert not any((tmp_path / "work").iterdir())  # the temporary archive is gone


def test_an_archive_cut_short_in_the_store_is_replaced(
    object_store: ObjectStore, tmp_path: Path
) -> None:
    url = upload(object_store, "uploads/tiny/")
    archive = stage_model(url, object_store, work_dir=tmp_path).archive
    object_store.put_bytes(archive.key, b"half an archive")
    again = stage_model(url, object_store, work_dir=tmp_path)
    assert again.uploaded
    held = object_store.head(archive.key)
    assert held is not None and (held.size, held.sha256) == (archive.bytes, archive.sha256)


def test_folder_markers_and_download_bookkeeping_are_left_out(
    object_store: ObjectStore, tmp_path: Path
) -> None:
    plain = stage_model(upload(object_store, "a/"), object_store, work_dir=tmp_path).archive
    noisy = {**FILES, ".cache/huggingface/download/config.json.metadata": b"etag"}
    url = upload(object_store, "b/", noisy)
    object_store.put_bytes("b/tokenizer/", b"")  # a console's "folder"
    assert stage_model(url, object_store, work_dir=tmp_path).archive == plain


@pytest.mark.parametrize(
    ("files", "url", "message"),
    [
        ({}, "s3://{bucket}/uploads/none/", "nothing in the store under s3://"),
        (
            {"m/model.safetensors": b"x"},
            "s3://{bucket}/m/",
            "has no config.json (not a Hugging Face model folder)",
        ),
        ({"m/config.json": b"{}"}, "s3://elsewhere/m/", "stages base models from its own bucket"),
        # (SeaweedFS refuses `..` in a key and folds `//`; a tab it keeps.)
        ({"m/config.json": b"{}", "m/a\tb": b"x"}, "s3://{bucket}/m/", "object m/a\tb"),
    ],
)
def test_a_prefix_that_is_not_a_model_is_refused_with_the_reason(
    object_store: ObjectStore, tmp_path: Path, files: dict[str, bytes], url: str, message: str
) -> None:
    for key, data in files.items():
        object_store.put_bytes(key, data)
    with pytest.raises(ModelStageError, match=re.escape(message)):
        stage_model(url.format(bucket=object_store.bucket), object_store, work_dir=tmp_path)
    assert list(object_store.list("models/")) == []  # nothing half-written


def test_a_local_folder_that_is_not_a_model_is_refused_with_the_reason(
    object_store: ObjectStore, tmp_path: Path
) -> None:
    with pytest.raises(ModelStageError, match="no such folder on the coordinator"):
        stage_model(str(tmp_path / "none"), object_store, work_dir=tmp_path / "w")
    linked = local_folder(tmp_path / "linked")
    (linked / "weights.bin").symlink_to(linked / "model.safetensors")
    with pytest.raises(ModelStageError, match=r"weights\.bin is a symbolic link"):
        stage_model(str(linked), object_store, work_dir=tmp_path / "w")
    assert list(object_store.list("models/")) == []


def test_a_job_stages_once_and_keeps_the_first_record(
    object_store: ObjectStore, redis_client: Any, tmp_path: Path
) -> None:
    url = upload(object_store, "uploads/tiny/")
    spec = parse_spec(
        {
            "name": "staged",
            "base_model": url,
            "dataset": {"path": "/data/train.jsonl", "format": "alpaca"},
            "training": {"max_steps": 4},
        }
    )
    state = State(redis_client)
    state.create_job("staged-1", spec.name, spec.to_yaml())
    state.transition_job("staged-1", "sharding", expect=["pending"])
    job = state.get_job("staged-1")
    assert to_stage(job, spec) == url
    done = stage_model(url, object_store, work_dir=tmp_path)  # on the pool, off the loop
    staged = record_staged(state, "staged-1", url, done)  # by the loop, when it returns
    assert staged == done.archive and state.get_job("staged-1").staged_model() == staged
    [event] = [e for e in state.events.read("staged-1") if e.kind == "base_model_staged"]
    assert event.data == {"key": staged.key, "sha256": staged.sha256, "bytes": staged.bytes}
    # A restart finds the record: nothing is left to stage.
    assert to_stage(state.get_job("staged-1"), spec) is None
    # A second record (another coordinator staged it too) keeps the first.
    other = staged.model_copy(update={"bytes": 1})
    assert state.record_base_model("staged-1", other.model_dump_json()) == staged.model_dump_json()
    # Only a sharding job takes a record.
    state.create_job("staged-2", spec.name, spec.to_yaml())
    with pytest.raises(Conflict, match="is pending, not sharding"):
        state.record_base_model("staged-2", staged.model_dump_json())
    with pytest.raises(NotFound, match="no job"):
        state.record_base_model("staged-3", staged.model_dump_json())
    # Hub ids and built-ins are not staged.
    builtin = spec.model_copy(update={"base_model": "cotune://tiny-llama"})
    assert to_stage(job, builtin) is None
