"""The worker wire protocol, version 1: the HTTP bodies a worker and the coordinator exchange.

Both sides import these models (the coordinator's FastAPI routes, `worker/client.py`), so
the contract lives in one place. Light on purpose: pydantic only.

    POST /v1/workers/enroll                                    EnrollRequest    -> EnrollResponse
    POST /v1/workers/{worker_id}/lease                         LeaseRequest     -> LeaseResponse
    POST /v1/workers/{worker_id}/leases/{lease_id}/heartbeat   HeartbeatRequest -> HeartbeatResponse
    POST /v1/workers/{worker_id}/leases/{lease_id}/complete    CompleteRequest  -> CompleteResponse
    POST /v1/workers/{worker_id}/leases/{lease_id}/fail        FailRequest      -> Ack
    POST /v1/workers/{worker_id}/leases/{lease_id}/release     ReleaseRequest   -> Ack

Every call after enroll carries `Authorization: Bearer <worker_token>`. Every error answer
is an `ErrorBody` with the status codes listed at `ErrorCode`.

Artifacts move between the worker and the object store directly, through presigned URLs
the coordinator issues: GETs (with the sha256 and size the worker must verify) for inputs,
POSTs (exact key, size limit, expiry no longer than the lease) for outputs. Every key a
worker may write is unique to (task, attempt), chosen by the coordinator.

A training checkpoint travels as one tar archive (`CHECKPOINT_ARCHIVE`): its file set
depends on the trainer and is not known in advance, while a presigned POST names one exact
key. Each checkpoint goes to a fresh key, so the last good checkpoint is never overwritten
by a half-finished upload; heartbeat answers carry the targets for the next one.

Deadlines are the coordinator's unix time; answers carrying one also carry `server_time`,
so a worker whose clock is off still knows how long it has (deadline - server_time).
"""

from __future__ import annotations

from typing import Annotated, Literal, Self

from cotune.orchestrator.protocol.task import TrainTask
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

API_PREFIX = "/v1"

ENROLL_PATH = API_PREFIX + "/workers/enroll"
LEASE_PATH = API_PREFIX + "/workers/{worker_id}/lease"
HEARTBEAT_PATH = API_PREFIX + "/workers/{worker_id}/leases/{lease_id}/heartbeat"
COMPLETE_PATH = API_PREFIX + "/workers/{worker_id}/leases/{lease_id}/complete"
FAIL_PATH = API_PREFIX + "/workers/{worker_id}/leases/{lease_id}/fail"
RELEASE_PATH = API_PREFIX + "/workers/{worker_id}/leases/{lease_id}/release"

# The files a finished task uploads, each to its own presigned POST in `TaskOutputs.adapter`.
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_METRICS = "metrics.json"
ADAPTER_FILES: tuple[str, ...] = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, ADAPTER_METRICS)
CHECKPOINT_ARCHIVE = "checkpoint.tar"

# Heartbeats carry the per-step losses since the last acknowledged one; a worker cut off
# from the coordinator for long keeps only the newest this many.
MAX_STEP_LOSSES = 10_000

Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
# Ids appear in URL paths: no slashes, no spaces.
Id = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.:-]{1,128}$")]
# A flat file name: no folders, no leading dot (so never "." or "..").
FileName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]
# Presigned URLs are opaque and signed: kept as given (a URL type would normalise them).
Url = Annotated[str, StringConstraints(pattern=r"^https?://\S+$", max_length=8192)]
ObjectKey = Annotated[str, StringConstraints(min_length=1, max_length=1024)]
Reason = Annotated[str, StringConstraints(min_length=1, max_length=4000)]
MetricName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.:/-]{1,128}$")]
NonNegInt = Annotated[int, Field(ge=0)]
NonNegFloat = Annotated[float, Field(ge=0)]

ErrorCode = Literal[
    "invalid_request",  # 422: a body or parameter failed validation; `field` names it
    "unauthorized",  # 401: missing or unknown token, or a refused join token
    "forbidden",  # 403: the token is valid but not for this worker or lease
    "not_found",  # 404: no such worker or lease (or job, on the admin API)
    "conflict",  # 409: the request does not fit the current state (cancel a finished job)
    "lease_expired",  # 409: the lease ran past its deadline; the task went back to the queue
    "stale_lease",  # 409: the task was leased again (a newer attempt) or already finished
    "rejected",  # 422: an upload or report failed the coordinator's checks
    "too_large",  # 413: the request body is over the limit of its route
    "rate_limited",  # 429: too many calls with this token; retry after Retry-After seconds
    "unavailable",  # 503: the coordinator cannot serve now; retry with backoff
]
Action = Literal["continue", "stop"]
Phase = Literal["downloading", "training", "uploading"]


class WireModel(BaseModel):
    """Base of every body: unknown fields are an error, floats must be finite."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ErrorIssue(WireModel):
    """One of several problems found in one request (a sweep spec lists all of them)."""

    field: str
    message: str


class ErrorDetail(WireModel):
    code: ErrorCode
    message: str
    field: str | None = Field(None, description="Dotted path of the offending field, if any.")
    issues: list[ErrorIssue] | None = Field(
        None, description="Every problem found, where one request had several."
    )


class ErrorBody(WireModel):
    error: ErrorDetail


class Ack(WireModel):
    """The empty answer of fail and release."""


# --- enroll -------------------------------------------------------------------------------


class GpuInfo(WireModel):
    index: NonNegInt
    name: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    memory_bytes: NonNegInt
    bf16: bool


class Hardware(WireModel):
    gpus: list[GpuInfo] = Field(default_factory=list, max_length=64)
    cpu_count: Annotated[int, Field(ge=1)]
    memory_bytes: NonNegInt
    cotune_version: Annotated[str, StringConstraints(min_length=1, max_length=64)]


class EnrollRequest(WireModel):
    join_token: Annotated[str, StringConstraints(min_length=1, max_length=512)]
    hardware: Hardware


class EnrollResponse(WireModel):
    worker_id: Id
    worker_token: Annotated[str, StringConstraints(min_length=16, max_length=512)]


# --- lease --------------------------------------------------------------------------------


class Capabilities(WireModel):
    """What this worker can take: the coordinator leases only tasks that fit."""

    memory_bytes: NonNegInt = Field(description="Accelerator memory (or RAM on CPU) to use.")
    bf16: bool
    formats: list[str] | None = Field(None, description="Dataset formats it renders; None: all.")


class LeaseRequest(WireModel):
    capabilities: Capabilities


class PresignedGet(WireModel):
    """An input to download; the worker refuses it unless size and sha256 match."""

    url: Url
    sha256: Sha256
    bytes: NonNegInt
    name: FileName | None = Field(
        None,
        description="File name to save it as (its extension tells the format, e.g. "
        "shard-00000.jsonl.zst); default: the last segment of the URL's path.",
    )


class PresignedPost(WireModel):
    """An S3 POST-policy upload target: send `fields`, then the file, as multipart form."""

    url: Url
    fields: dict[str, str]
    key: ObjectKey
    max_bytes: NonNegInt


class ResumeCheckpoint(WireModel):
    """The task's latest checkpoint (from any earlier attempt): training continues from it."""

    step: NonNegInt
    archive: PresignedGet


class TaskInputs(WireModel):
    base_model: str | PresignedGet = Field(
        description="A local folder, a built-in model (cotune://tiny-llama), a hub id, or a "
        "tar archive of a staged model folder to download."
    )
    train: list[PresignedGet] = Field(min_length=1, description="Training data files.")
    eval: PresignedGet | None = None
    start_adapter: dict[FileName, PresignedGet] | None = Field(
        None, description="PEFT adapter to start from (a previous round's merge), by file name."
    )
    resume_checkpoint: ResumeCheckpoint | None = None


class TaskOutputs(WireModel):
    """Where results go; heartbeat answers renew these (fresh expiry, next checkpoint key)."""

    adapter: dict[FileName, PresignedPost] = Field(description="One target per ADAPTER_FILES.")
    checkpoint: PresignedPost = Field(description="Target for the next checkpoint archive.")

    @model_validator(mode="after")
    def _all_adapter_files(self) -> Self:
        missing = [name for name in ADAPTER_FILES if name not in self.adapter]
        if missing:
            raise ValueError(f"adapter: no upload target for {', '.join(missing)}")
        return self


class TaskLease(WireModel):
    task_id: Id
    attempt: Annotated[int, Field(ge=1)]
    lease_id: Id
    deadline: float = Field(description="Unix time the lease expires unless renewed.")
    server_time: float = Field(description="The coordinator's clock when it answered.")
    task: TrainTask
    inputs: TaskInputs
    outputs: TaskOutputs
    heartbeat_interval_s: Annotated[float, Field(gt=0, le=3600)]


class LeaseResponse(WireModel):
    """Either a task, or how long to wait before asking again (and why, if not for want of
    work: the worker holds as many leases as it may)."""

    task: TaskLease | None = None
    retry_after_s: Annotated[float, Field(ge=0, le=3600)] | None = None
    reason: Annotated[str, StringConstraints(max_length=1000)] | None = None

    @model_validator(mode="after")
    def _one_of(self) -> Self:
        if (self.task is None) == (self.retry_after_s is None):
            raise ValueError("exactly one of task and retry_after_s must be set")
        return self


# --- during a lease ----------------------------------------------------------------------


class ArtifactRef(WireModel):
    """An uploaded object, as the worker claims it; the coordinator checks before trusting."""

    key: ObjectKey
    sha256: Sha256
    bytes: NonNegInt


class CheckpointRef(WireModel):
    step: NonNegInt
    archive: ArtifactRef


class StepLoss(WireModel):
    step: Annotated[int, Field(ge=1)]
    loss: float


class HeartbeatRequest(WireModel):
    phase: Phase = "training"
    step: NonNegInt
    max_steps: NonNegInt
    loss: float | None = None
    learning_rate: NonNegFloat = 0.0
    tokens_per_s: NonNegFloat = 0.0
    tokens_seen: NonNegInt = 0
    memory_bytes: NonNegInt = 0
    losses: list[StepLoss] = Field(
        default_factory=list,
        max_length=MAX_STEP_LOSSES,
        description="Per-step training losses since the last acknowledged heartbeat.",
    )
    checkpoint: CheckpointRef | None = Field(
        None, description="A checkpoint uploaded since the last acknowledged heartbeat."
    )


class HeartbeatResponse(WireModel):
    action: Action
    deadline: float = Field(description="The renewed deadline (unix time).")
    server_time: float = Field(description="The coordinator's clock when it answered.")
    outputs: TaskOutputs


class CompleteRequest(WireModel):
    artifacts: dict[FileName, ArtifactRef]
    metrics: dict[MetricName, float | int] = Field(default_factory=dict, max_length=256)


class CompleteResponse(WireModel):
    accepted: bool
    credit: NonNegFloat = 0.0
    reason: str | None = Field(None, description="Why the result was not accepted.")


class FailRequest(WireModel):
    reason: Reason
    retryable: bool = Field(description="True when another attempt (elsewhere) may succeed.")
    checkpoint: CheckpointRef | None = None


class ReleaseRequest(WireModel):
    """Give a lease back unfinished (the worker is stopping, or was told to stop)."""

    reason: Reason
    checkpoint: CheckpointRef | None = None
