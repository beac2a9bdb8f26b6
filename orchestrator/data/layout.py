"""Every S3 object key cotune reads or writes: the bucket layout, spelled here and nowhere else.

    jobs/<job>/spec.yaml                             the submitted spec
    jobs/<job>/data/manifest.json                    the data's manifest (uploaded last: whole)
    jobs/<job>/data/shard-00000.jsonl.zst ...        the K training shards
    jobs/<job>/data/eval.jsonl.zst                   the eval split
    jobs/<job>/base_eval.json                        the base model's eval loss (model card)
    jobs/<job>/trials/<t>/r<round>/s<shard>/a<attempt>/adapter/<file>
                                                     one task attempt's trained adapter
    jobs/<job>/trials/<t>/r<round>/s<shard>/a<attempt>/ckpt/<seq:04d>/checkpoint.tar
                                                     its checkpoints, numbered from 0000
    jobs/<job>/trials/<t>/r<round>/merged/           the round's merged adapter (PEFT), eval.json
    jobs/<job>/best/                                 the best trial's adapter, README.md,
                                                     results.json
    models/<sha256>/model.tar                        a base model staged for workers and the
                                                     coordinator's evaluation (a tar of its
                                                     folder: protocol/modelarchive.py), by the
                                                     archive's sha256

Every key a worker may write holds its (task, attempt), so nobody overwrites anybody; a
part that could break that (a job id with a '/', a negative number) raises LayoutError.
Prefixes end with '/'; file names inside a folder are the caller's (sharding.py names the
data files, roundmerge.py and results.py the adapter files).
"""

from __future__ import annotations

import re
from typing import Protocol

from cotune.orchestrator.data.manifest import MANIFEST
from cotune.orchestrator.protocol.modelarchive import MODEL_ARCHIVE
from cotune.orchestrator.protocol.wire import CHECKPOINT_ARCHIVE

BASE_EVAL_FILE = "base_eval.json"
SPEC_FILE = "spec.yaml"
_SHA256 = re.compile(r"[0-9a-f]{64}")


class LayoutError(ValueError):
    """A key part that cannot be part of an object key; the message names the part."""


class TaskPlace(Protocol):
    """Where a task sits in its job (control/records.py's TaskRecord is one)."""

    @property
    def job_id(self) -> str: ...
    @property
    def trial(self) -> int: ...
    @property
    def round(self) -> int: ...
    @property
    def shard(self) -> int: ...


# -- a job ----------------------------------------------------------------------------------


def job_prefix(job_id: str) -> str:
    """`jobs/<job>/`: everything of one job."""
    if not job_id or "/" in job_id or job_id in (".", "..") or not job_id.isprintable():
        raise LayoutError(f"job_id: {job_id!r} cannot be part of an object key")
    return f"jobs/{job_id}/"


def spec_key(job_id: str) -> str:
    return job_prefix(job_id) + SPEC_FILE


def base_eval_key(job_id: str) -> str:
    return job_prefix(job_id) + BASE_EVAL_FILE


def best_prefix(job_id: str) -> str:
    """`jobs/<job>/best/`: the job's result, a PEFT adapter folder with its card."""
    return job_prefix(job_id) + "best/"


# -- its data -------------------------------------------------------------------------------


def data_prefix(job_id: str) -> str:
    """`jobs/<job>/data/`: where a job's shards live."""
    return job_prefix(job_id) + "data/"


def data_key(job_id: str, name: str) -> str:
    """One data file (a shard, the eval split, the manifest) by its manifest name."""
    return data_prefix(job_id) + _file_name("data file", name)


def manifest_key(job_id: str) -> str:
    return data_key(job_id, MANIFEST)


# -- trials, rounds, tasks ------------------------------------------------------------------


def trial_prefix(job_id: str, trial: int) -> str:
    return f"{job_prefix(job_id)}trials/{_number('trial', trial)}/"


def round_prefix(job_id: str, trial: int, round: int) -> str:
    return f"{trial_prefix(job_id, trial)}r{_number('round', round)}/"


def merged_prefix(job_id: str, trial: int, round: int) -> str:
    """Where the merged adapter of (trial, round) lives: a PEFT adapter folder."""
    return round_prefix(job_id, trial, round) + "merged/"


def attempt_prefix(task: TaskPlace, attempt: int) -> str:
    """Where one attempt of a task writes (nobody else writes there)."""
    place = round_prefix(task.job_id, task.trial, task.round)
    return f"{place}s{_number('shard', task.shard)}/a{_number('attempt', attempt)}/"


def adapter_key(task: TaskPlace, attempt: int, name: str) -> str:
    return f"{attempt_prefix(task, attempt)}adapter/{_file_name('adapter file', name)}"


def checkpoint_key(task: TaskPlace, attempt: int, seq: int) -> str:
    seq = _number("checkpoint seq", seq)
    return f"{attempt_prefix(task, attempt)}ckpt/{seq:04d}/{CHECKPOINT_ARCHIVE}"


# -- base models ----------------------------------------------------------------------------


def model_prefix(sha256: str) -> str:
    """`models/<sha256>/`: a base model staged for workers, by its archive's sha256."""
    if not _SHA256.fullmatch(sha256):
        raise LayoutError(f"model sha256: {sha256!r} is not 64 lowercase hex digits")
    return f"models/{sha256}/"


def model_archive_key(sha256: str) -> str:
    """`models/<sha256>/model.tar`: the staged archive itself (content-addressed: a key that
    exists with this size and sha256 holds these bytes, so it is never written twice)."""
    return model_prefix(sha256) + MODEL_ARCHIVE


def _number(part: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise LayoutError(f"{part}: {value!r} is not a whole number >= 0")
    return value


def _file_name(part: str, name: str) -> str:
    if not name or "/" in name or name in (".", "..") or not name.isprintable():
        raise LayoutError(f"{part}: {name!r} is not a plain file name")
    return name
