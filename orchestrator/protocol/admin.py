"""The job and admin HTTP API's bodies, version 1: shared by the coordinator's routes and
`CotuneClient` (orchestrator/cli/client.py). Light: pydantic only.

    POST /v1/jobs                      spec (YAML or JSON)  -> SubmitResponse   (admin)
    GET  /v1/jobs                                           -> JobList          (admin)
    GET  /v1/jobs/{job_id}                                  -> JobDetail        (admin)
    POST /v1/jobs/{job_id}/cancel                           -> JobDetail        (admin)
    GET  /v1/jobs/{job_id}/trials                           -> TrialList        (admin)
    GET  /v1/jobs/{job_id}/events      text/event-stream of EventBody           (admin)
    GET  /v1/jobs/{job_id}/download                         -> DownloadList     (admin)
    POST /v1/tokens/join               JoinTokenRequest     -> JoinTokenResponse (admin)
    GET  /v1/tokens/join                                    -> JoinTokenList    (admin)
    DELETE /v1/tokens/join/{name}                           -> JoinTokenRevoked (admin)
    GET  /v1/owners                                         -> OwnerList        (admin)
    POST /v1/owners/{name}/quarantine                       -> OwnerQuarantined (admin)
    DELETE /v1/owners/{name}/quarantine                     -> OwnerPardoned    (admin)
    GET  /v1/workers                                        -> WorkerList       (admin)
    GET  /v1/leaderboard                                    -> Leaderboard      (public)

Errors are `wire.ErrorBody`, as on the worker endpoints.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from cotune.orchestrator.protocol.states import JobState, TaskState, TrialState
from cotune.orchestrator.protocol.wire import GpuInfo, NonNegInt, WireModel
from pydantic import Field, StringConstraints

API_FILE = "api.json"  # <home>/api.json: {"url", "pid"} of the API serving that home

JobStateName = JobState
TaskStateName = TaskState


class SubmitResponse(WireModel):
    job_id: str


class TaskCounts(WireModel):
    queued: NonNegInt = 0
    leased: NonNegInt = 0
    verifying: NonNegInt = 0
    accepted: NonNegInt = 0
    failed: NonNegInt = 0
    cancelled: NonNegInt = 0

    @property
    def total(self) -> int:
        return (
            self.queued
            + self.leased
            + self.verifying
            + self.accepted
            + self.failed
            + self.cancelled
        )


class JobSummary(WireModel):
    job_id: str
    name: str
    state: JobStateName
    created_at: float
    updated_at: float
    error: str | None = None
    best_trial: int | None = None
    tasks: TaskCounts
    trials: NonNegInt = Field(0, description="Trials started so far.")


class DataFit(WireModel):
    """What training.sequence_len keeps of a job's rows, measured by the coordinator when it
    scores the base model on the eval rows (a hash-chosen sample of the dataset, or the eval
    file the spec names): never a worker's count."""

    measured_on: Literal["eval split", "eval file"]
    sequence_len: Annotated[int, Field(ge=1)]
    rows: NonNegInt
    rows_cut: NonNegInt = Field(description="Rows longer than sequence_len: cut at the end.")
    rows_dropped: NonNegInt = Field(description="Rows left with no trained token: dropped.")
    warning: str | None = Field(None, description="Set when more than 2% are cut or dropped.")


class JobDetail(JobSummary):
    spec_yaml: str
    manifest: dict[str, Any] | None = Field(None, description="The dataset's shard manifest.")
    data_fit: DataFit | None = Field(None, description="Once the base model was evaluated.")


class JobList(WireModel):
    jobs: list[JobSummary]


class TaskView(WireModel):
    task_id: str
    round: NonNegInt
    shard: NonNegInt
    state: TaskStateName
    attempt: NonNegInt
    worker_id: str | None = None
    step: NonNegInt = 0
    max_steps: NonNegInt = 0
    loss: float | None = None
    error: str | None = None
    duplicate_of: str | None = Field(
        None, description="A redundancy run: the task it trains again (not a shard of its own)."
    )
    rows_cut: NonNegInt | None = Field(
        None, description="Its shard's rows cut short by sequence_len, as its worker reported."
    )
    rows_dropped: NonNegInt | None = Field(
        None, description="Its shard's rows that trained nothing, as its worker reported."
    )


class TrialView(WireModel):
    number: NonNegInt
    params: dict[str, Any]
    state: TrialState
    rounds_done: NonNegInt
    eval_losses: list[float]
    error: str | None = None
    tasks: list[TaskView] = Field(
        default_factory=list, description="The tasks of the trial's current (or last) round."
    )


class TrialList(WireModel):
    job_id: str
    trials: list[TrialView]


class EventBody(WireModel):
    """One job event; on the SSE stream its id is the `id:` line, its kind the `event:`."""

    id: str
    kind: str
    time: float
    data: dict[str, Any]


class DownloadFile(WireModel):
    name: str
    url: str
    sha256: str
    bytes: NonNegInt


class DownloadList(WireModel):
    job_id: str
    files: list[DownloadFile]


class JoinTokenRequest(WireModel):
    name: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9 _.@+-]{0,63}$")] = (
        Field("volunteer", description="Contributor the workers' credit goes to.")
    )
    kind: Literal["volunteer", "cluster"] = "volunteer"
    ttl_s: Annotated[float, Field(gt=0, le=366 * 24 * 3600)] | None = Field(
        None, description="Seconds until the token stops enrolling workers; none: never."
    )
    max_uses: Annotated[int, Field(ge=1, le=1_000_000)] | None = Field(
        None, description="Workers it may enroll at most; none: no limit."
    )


class JoinTokenResponse(WireModel):
    token: str
    name: str
    kind: Literal["volunteer", "cluster"]
    expires_at: float | None = None
    max_uses: int | None = None


class JoinTokenView(WireModel):
    """A join token as listed: never the token itself (the coordinator keeps only its hash)."""

    name: str
    kind: Literal["volunteer", "cluster"]
    created_at: float
    expires_at: float | None = None
    uses: NonNegInt = Field(0, description="Workers enrolled with it so far.")
    max_uses: int | None = None
    revoked_at: float | None = None


class JoinTokenList(WireModel):
    tokens: list[JoinTokenView]


class JoinTokenRevoked(WireModel):
    """What a revocation did now (a repeat revokes nothing more: zeros)."""

    name: str
    tokens: NonNegInt = Field(description="Join tokens of that name revoked now.")
    workers: NonNegInt = Field(description="Worker tokens enrolled with them, revoked now.")
    leases: NonNegInt = Field(description="Their active leases, revoked (tasks queued again).")


class OwnerView(WireModel):
    """An owner (a join token's name: its workers' credit and strikes go to it) as listed."""

    name: str
    strikes: float = Field(description="Strikes against it now (control/strikes.py).")
    quarantined: bool = Field(description="No more work for its workers, no more credit.")
    workers: NonNegInt = Field(description="Workers enrolled under its name.")


class OwnerList(WireModel):
    """Every owner with an enrolled worker, a strike or a quarantine, by name."""

    max_strikes: float = Field(description="Strikes that quarantine (COTUNE_MAX_STRIKES).")
    owners: list[OwnerView]


class OwnerQuarantined(WireModel):
    """What a quarantine did now (a repeat revokes nothing more: 0 leases)."""

    name: str
    strikes: float = Field(description="Its strikes now: the limit, once it has a volunteer.")
    leases: NonNegInt = Field(description="Its workers' active leases, revoked (tasks queued).")


class OwnerPardoned(WireModel):
    """What a pardon lifted: the owner's strikes were cleared, its quarantine lifted."""

    name: str
    strikes: float = Field(description="The strikes cleared.")
    quarantined: bool = Field(description="True if it was quarantined until now.")


class WorkerView(WireModel):
    worker_id: str
    name: str
    kind: Literal["volunteer", "cluster"]
    enrolled_at: float
    last_seen: float
    gpus: list[GpuInfo]
    memory_bytes: NonNegInt
    tokens: float
    tasks_accepted: NonNegInt
    tasks_failed: NonNegInt
    tasks_rejected: NonNegInt
    tasks_expired: NonNegInt
    leases: list[str]


class WorkerList(WireModel):
    workers: list[WorkerView]


class LeaderboardEntry(WireModel):
    name: str
    tokens: float
    tasks: NonNegInt


class Leaderboard(WireModel):
    entries: list[LeaderboardEntry]
