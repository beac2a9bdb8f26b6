"""Base models without a hub: a spec's s3:// or local-folder base model, staged into the store.

Workers never read the coordinator's bucket or disk, and cannot load `s3://...`: so before
a job's first round (beside sharding, in the `sharding` state, as a call off the reconciler's
loop: pipeline/sharding_step.py) the coordinator packs the model folder into one
deterministic tar (protocol/modelarchive.py) and uploads it to models/<sha256>/model.tar
(data/layout.py). Tasks carry it as a StoredObject base model, leases hand it out as a
presigned GET with its sha256, and workers and the coordinator's own evaluation cache the
unpacked folder by that sha256.

    s3://bucket/prefix/   every object under the prefix, in the coordinator's own bucket
    /path/to/folder       its regular files, on the coordinator's disk

Once per job: the loop records the archive in the job's record when the call returns
(`record_staged`), so a restart does not stage it again (`to_stage`). Content-addressed: the
same files give the same archive, so two jobs on one model store it once (a key already
holding the archive's size and sha256 is not uploaded again), and a key is never
half-written (S3 writes an object whole; one whose size or sha256 differs is replaced).
Files stream through a temporary archive in the coordinator's work folder; nothing is held
whole in memory.

A folder that cannot be staged (missing, no config.json, a symbolic link, an object that
cannot be read) raises ModelStageError, and the job fails naming base_model; a store that
is away for a moment raises ObjectStoreError, which the next reconciler pass retries.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from cotune.orchestrator.control.records import StoredObject
from cotune.orchestrator.data.layout import model_archive_key
from cotune.orchestrator.data.s3client import is_transient
from cotune.orchestrator.data.s3errors import ObjectStoreError
from cotune.orchestrator.protocol.modelarchive import (
    CONFIG_FILE,
    MODEL_ARCHIVE,
    SKIPPED_FOLDERS,
    Member,
    ModelArchiveError,
    folder_members,
    member_name,
    write_archive,
)

if TYPE_CHECKING:
    from cotune.orchestrator.control.records import JobRecord
    from cotune.orchestrator.control.state import State
    from cotune.orchestrator.data.objectstore import ObjectStore
    from cotune.orchestrator.protocol.spec import SweepSpec

log = logging.getLogger(__name__)

STAGED_KINDS = ("s3", "local")  # SweepSpec.base_model_kind values that are staged


class ModelStageError(ValueError):
    """The base model cannot be staged; the message says what was wrong and where."""


@dataclass(frozen=True)
class StagedModel:
    archive: StoredObject
    uploaded: bool  # False: the store held this archive already (another job, a restart)
    files: int


def to_stage(job: JobRecord, spec: SweepSpec) -> str | None:
    """The base model the job has still to stage: None for a hub id or a built-in model
    (workers load those by name) and for one staged and recorded already."""
    if spec.base_model_kind not in STAGED_KINDS or job.staged_model() is not None:
        return None
    return spec.base_model


def record_staged(state: State, job_id: str, base_model: str, staged: StagedModel) -> StoredObject:
    """Record a staged model in the job's record: the first record stays and is answered
    (another coordinator may have staged it too). Conflict if the job is no longer sharding."""
    log.info(
        "job %s: base model %s staged as %s (%d files, %d bytes, %s)",
        job_id,
        base_model,
        staged.archive.key,
        staged.files,
        staged.archive.bytes,
        "uploaded" if staged.uploaded else "already in the store",
    )
    kept = state.record_base_model(job_id, staged.archive.model_dump_json())
    return StoredObject.model_validate_json(kept)


def stage_model(base_model: str, store: ObjectStore, *, work_dir: Path) -> StagedModel:
    """Pack the folder `base_model` names (s3://bucket/prefix/ or a local path) and upload
    the archive to models/<sha256>/model.tar unless the store holds it already."""
    members, where = _members(base_model, store)
    if not any(m.name == CONFIG_FILE for m in members):
        raise ModelStageError(f"{where} has no {CONFIG_FILE} (not a Hugging Face model folder)")
    work_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="stage-", dir=work_dir) as tmp:
        archive = Path(tmp) / MODEL_ARCHIVE
        try:
            sha256, size = write_archive(members, archive)
        except ModelArchiveError as exc:
            raise ModelStageError(f"{where}: {exc}") from None
        except ObjectStoreError as exc:
            if is_transient(exc):
                raise
            raise ModelStageError(f"cannot read {where}: {exc}") from None
        except OSError as exc:
            raise ModelStageError(f"{where}: cannot read it ({exc})") from None
        key = model_archive_key(sha256)
        held = store.head(key)
        uploaded = held is None or held.size != size or held.sha256 != sha256
        if uploaded:
            info = store.put_file(key, archive, "application/x-tar")
            if info.size != size or info.sha256 != sha256:
                raise ObjectStoreError(
                    "upload", store.bucket, key, "the stored object differs from the archive"
                )
    stored = StoredObject(key=key, sha256=sha256, bytes=size, name=MODEL_ARCHIVE)
    return StagedModel(stored, uploaded, len(members))


def _members(base_model: str, store: ObjectStore) -> tuple[list[Member], str]:
    """The files to pack, and where they are (for messages)."""
    if base_model.startswith("s3://"):
        return _store_members(base_model, store)
    folder = Path(base_model).expanduser()
    if not folder.is_dir():
        raise ModelStageError(f"no such folder on the coordinator: {folder}")
    try:
        return folder_members(folder), str(folder)
    except ModelArchiveError as exc:
        raise ModelStageError(f"{folder}: {exc}") from None


def _store_members(url: str, store: ObjectStore) -> tuple[list[Member], str]:
    bucket, _, key = url.removeprefix("s3://").partition("/")
    prefix = key.rstrip("/") + "/"
    where = f"s3://{bucket}/{prefix}"
    if bucket != store.bucket:
        raise ModelStageError(
            f"{where} is in bucket {bucket!r}; the coordinator stages base models from its own "
            f"bucket ({store.bucket!r}) only: copy the folder there"
        )
    try:
        objects = list(store.list(prefix))
    except ObjectStoreError as exc:
        if is_transient(exc):
            raise
        raise ModelStageError(f"cannot list {where}: {exc}") from None
    members = []
    for info in objects:
        name = info.key[len(prefix) :]
        if name.endswith("/") or name.split("/")[0] in SKIPPED_FOLDERS:
            continue  # a console's folder marker; download bookkeeping
        try:
            member_name(name)
        except ModelArchiveError as exc:
            raise ModelStageError(f"object {info.key}: {exc}") from None
        members.append(Member(name, info.size, _opener(store, info.key)))
    if not members:
        raise ModelStageError(f"nothing in the store under {where}")
    return members, where


def _opener(store: ObjectStore, key: str) -> Callable[[], BinaryIO]:
    return lambda: store.open_stream(key)
