"""The records the coordinator keeps in Redis: jobs, trials, tasks, and the JSON they carry.

Records are frozen dataclasses read from Redis hashes (`*.from_hash`); the JSON blobs a task
carries (its inputs, its accepted result, its latest checkpoint) are pydantic models, so the
reconciler that writes them and the leases that read them agree on one shape.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from cotune.orchestrator.protocol.states import (
    TERMINAL_JOB_STATES,
    JobState,
    LeaseState,
    TaskState,
    TrialState,
)
from cotune.orchestrator.protocol.wire import ArtifactRef, FileName, NonNegInt, Sha256
from pydantic import BaseModel, ConfigDict, Field

_JSON = ConfigDict(extra="forbid", frozen=True)


def text(value: Any) -> str:
    """A Redis reply as text (clients may or may not decode responses)."""
    if isinstance(value, bytes):
        return value.decode()
    return str(value)


def decode_hash(raw: dict[Any, Any]) -> dict[str, str]:
    """HGETALL's answer as text keys and values."""
    return {text(k): text(v) for k, v in raw.items()}


def _opt(value: str | None) -> str | None:
    return value if value else None


def _opt_int(value: str | None) -> int | None:
    return int(value) if value else None


def _float(value: str | None) -> float:
    return float(value) if value else 0.0


# --- what a task carries ----------------------------------------------------------------


class StoredObject(BaseModel):
    """An object in the store a worker will download (sha256 and size known in advance)."""

    model_config = _JSON

    key: str = Field(min_length=1, max_length=1024)
    sha256: Sha256
    bytes: NonNegInt
    name: FileName | None = Field(None, description="File name the worker saves it as.")


class TaskInputs(BaseModel):
    """What a lease hands out (as presigned GETs): TaskRecord.inputs_json.

    `base_model` is the name the worker loads (cotune://tiny-llama, a hub id, a folder it
    has) or a staged tar archive of the model folder in the store.
    """

    model_config = _JSON

    base_model: str | StoredObject
    train: list[StoredObject] = Field(min_length=1)
    eval: StoredObject | None = None
    start_adapter: dict[FileName, StoredObject] | None = None


class CheckpointRecord(BaseModel):
    """The task's latest verified checkpoint (from any attempt): TaskRecord.checkpoint_json."""

    model_config = _JSON

    step: NonNegInt
    key: str
    sha256: Sha256
    bytes: NonNegInt
    attempt: int


class TaskResult(BaseModel):
    """A completion that passed the checks at `complete`: TaskRecord.result_json (pending
    while the task is `verifying`). Artifacts were checked in the store. `metrics` are the
    worker's, kept for display only: nothing that matters is read from them."""

    model_config = _JSON

    attempt: int
    worker_id: str
    artifacts: dict[FileName, ArtifactRef]
    metrics: dict[str, float | int]
    tokens: float = Field(
        description="Tokens the task trains, computed by the coordinator (control/intake.py "
        "`task_tokens`): credited at acceptance."
    )
    owner: str | None = Field(None, description="The worker's owner (its join token's name).")
    adopted_from: str | None = Field(
        None,
        description="An outvoted original's: the duplicate whose accepted result it took "
        "(its owner was credited there, not again here).",
    )


class CheckRecord(BaseModel):
    """The heavy checks' verdict on one attempt's upload (pipeline/verification.py):
    TaskRecord.check_json. `issues` empty: it passed."""

    model_config = _JSON

    attempt: int
    issues: list[str] = Field(default_factory=list)
    probe_loss: float | None = None
    change_norm: float | None = None

    @property
    def ok(self) -> bool:
        return not self.issues


# --- records --------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobRecord:
    job_id: str
    name: str
    state: JobState
    spec_yaml: str
    created_at: float
    updated_at: float
    error: str | None
    manifest_json: str | None
    best_trial: int | None
    base_model_json: str | None = None  # a staged base model: StoredObject JSON
    data_fit_json: str | None = None  # what sequence_len keeps of the rows: DataFit JSON

    @classmethod
    def from_hash(cls, h: dict[str, str]) -> JobRecord:
        return cls(
            job_id=h["job_id"],
            name=h["name"],
            state=h["state"],  # type: ignore[arg-type]
            spec_yaml=h.get("spec_yaml", ""),
            created_at=_float(h.get("created_at")),
            updated_at=_float(h.get("updated_at")),
            error=_opt(h.get("error")),
            manifest_json=_opt(h.get("manifest_json")),
            best_trial=_opt_int(h.get("best_trial")),
            base_model_json=_opt(h.get("base_model_json")),
            data_fit_json=_opt(h.get("data_fit_json")),
        )

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_JOB_STATES

    def staged_model(self) -> StoredObject | None:
        """The archive of the job's s3:// or local-folder base model in the store, once
        staged (pipeline/modelstage.py); None before, and for hub ids and built-ins."""
        if not self.base_model_json:
            return None
        return StoredObject.model_validate_json(self.base_model_json)


@dataclass(frozen=True)
class TrialRecord:
    job_id: str
    number: int
    params: dict[str, Any]
    state: TrialState
    rounds_done: int
    eval_losses: list[float]
    error: str | None

    @classmethod
    def from_hash(cls, job_id: str, h: dict[str, str], losses: dict[str, str]) -> TrialRecord:
        by_round = sorted((int(r), float(v)) for r, v in losses.items())
        return cls(
            job_id=job_id,
            number=int(h["number"]),
            params=json.loads(h.get("params") or "{}"),
            state=h["state"],  # type: ignore[arg-type]
            rounds_done=len(by_round),
            eval_losses=[loss for _, loss in by_round],
            error=_opt(h.get("error")),
        )


@dataclass(frozen=True)
class TaskRecord:
    """One (trial, round, shard) training task. Build new ones with `TaskRecord.new`.

    The fields after `worker_id` are kept by the coordinator (failures counted toward
    `max_attempts`, the current lease, the last heartbeat's progress). `failures` is a
    float: an expired attempt that left a newer checkpoint counts half (lua/lib.lua).
    """

    task_id: str
    job_id: str
    trial: int
    round: int
    shard: int
    state: TaskState
    attempt: int
    tier: str
    task_json: str
    inputs_json: str
    max_attempts: int
    result_json: str | None
    checkpoint_json: str | None
    worker_id: str | None
    failures: float = 0.0
    error: str | None = None
    lease_id: str | None = None
    step: int = 0
    max_steps: int = 0
    loss: float | None = None
    updated_at: float = 0.0
    # Trust (set by the reconciler, read by `complete` and the verification step): the base
    # model's config.json (what the expected tensor shapes come from) and the
    # adapter_config.json the coordinator writes for this task's uploads; a redundancy
    # duplicate's original; the heavy checks' record.
    model_json: str | None = None
    adapter_config_json: str | None = None
    duplicate_of: str | None = None
    check_json: str | None = None

    @classmethod
    def new(
        cls,
        *,
        job_id: str,
        trial: int,
        round: int,
        shard: int,
        tier: str,
        task: BaseModel,
        inputs: TaskInputs,
        max_attempts: int = 3,
    ) -> TaskRecord:
        """A queued task with the conventional id `<job>.t<trial>.r<round>.s<shard>`."""
        return cls(
            task_id=task_id_for(job_id, trial, round, shard),
            job_id=job_id,
            trial=trial,
            round=round,
            shard=shard,
            state="queued",
            attempt=0,
            tier=tier,
            task_json=task.model_dump_json(),
            inputs_json=inputs.model_dump_json(),
            max_attempts=max_attempts,
            result_json=None,
            checkpoint_json=None,
            worker_id=None,
        )

    @classmethod
    def from_hash(cls, h: dict[str, str]) -> TaskRecord:
        loss = h.get("loss")
        return cls(
            task_id=h["task_id"],
            job_id=h["job_id"],
            trial=int(h["trial"]),
            round=int(h["round"]),
            shard=int(h["shard"]),
            state=h["state"],  # type: ignore[arg-type]
            attempt=int(h.get("attempt") or 0),
            tier=h["tier"],
            task_json=h["task_json"],
            inputs_json=h["inputs_json"],
            max_attempts=int(h["max_attempts"]),
            result_json=_opt(h.get("result_json")),
            checkpoint_json=_opt(h.get("checkpoint_json")),
            worker_id=_opt(h.get("worker_id")),
            failures=float(h.get("failures") or 0),
            error=_opt(h.get("error")),
            lease_id=_opt(h.get("lease_id")),
            step=int(float(h.get("step") or 0)),
            max_steps=int(float(h.get("max_steps") or 0)),
            loss=float(loss) if loss else None,
            updated_at=_float(h.get("updated_at")),
            model_json=_opt(h.get("model_json")),
            adapter_config_json=_opt(h.get("adapter_config_json")),
            duplicate_of=_opt(h.get("duplicate_of")),
            check_json=_opt(h.get("check_json")),
        )

    def inputs(self) -> TaskInputs:
        return TaskInputs.model_validate_json(self.inputs_json)

    def result(self) -> TaskResult | None:
        return TaskResult.model_validate_json(self.result_json) if self.result_json else None

    def checkpoint(self) -> CheckpointRecord | None:
        if not self.checkpoint_json:
            return None
        return CheckpointRecord.model_validate_json(self.checkpoint_json)

    def check(self) -> CheckRecord | None:
        """The heavy checks' record of the current attempt (None: not checked yet)."""
        if not self.check_json:
            return None
        record = CheckRecord.model_validate_json(self.check_json)
        return record if record.attempt == self.attempt else None


def task_id_for(job_id: str, trial: int, round: int, shard: int) -> str:
    return f"{job_id}.t{trial}.r{round}.s{shard}"


#: A redundancy duplicate k counts its attempts from k x DUPLICATE_ATTEMPTS + 1: uploads are
#: keyed by (trial, round, shard, attempt) (data/layout.py), so the original's and its
#: duplicates' never share a key.
DUPLICATE_ATTEMPTS = 1000
DUPLICATE_SUFFIX = ".dup"


def duplicate_id(task_id: str, k: int) -> str:
    """The id of the k-th redundancy duplicate of a task: `<task_id>.dup<k>`."""
    return f"{task_id}{DUPLICATE_SUFFIX}{k}"


@dataclass(frozen=True)
class LeaseRecord:
    lease_id: str
    task_id: str
    worker_id: str
    attempt: int
    state: LeaseState
    deadline: float
    checkpoint_seq: int
    completion_json: str | None
    completion_digest: str | None
    fail_reason: str | None

    @classmethod
    def from_hash(cls, h: dict[str, str]) -> LeaseRecord:
        return cls(
            lease_id=h["lease_id"],
            task_id=h["task_id"],
            worker_id=h["worker_id"],
            attempt=int(h["attempt"]),
            state=h["state"],  # type: ignore[arg-type]
            deadline=float(h["deadline"]),
            checkpoint_seq=int(h.get("ckpt_seq") or 0),
            completion_json=_opt(h.get("completion")),
            completion_digest=_opt(h.get("completion_digest")),
            fail_reason=_opt(h.get("fail_reason")),
        )
