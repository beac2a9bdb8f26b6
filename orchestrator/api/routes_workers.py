"""Worker routes: the wire protocol of orchestrator/protocol/wire.py, exactly; plus the
worker list (admin) and the contributors' leaderboard (public).

The hot routes (lease, heartbeat, release, fail) are `async def` and do their Redis work on
the event loop: a few round trips of well under a millisecond each, against a thread-pool
hop per call for a synchronous route. Whatever reads the object store stays off the loop:
`complete` (its cheap checks read the upload) is synchronous, so FastAPI runs it on the
thread pool, and a heartbeat, release or fail that reports a checkpoint (hashed in the
store before it is recorded: control/checkpoints.py) is handed to the thread pool too.
"""

from __future__ import annotations

from cotune.orchestrator.api.auth import Admin, CoordinatorDep, LeaseId, WorkerDep
from cotune.orchestrator.control.workers import WorkerRecord
from cotune.orchestrator.protocol.admin import (
    Leaderboard,
    LeaderboardEntry,
    WorkerList,
    WorkerView,
)
from cotune.orchestrator.protocol.wire import (
    API_PREFIX,
    COMPLETE_PATH,
    ENROLL_PATH,
    FAIL_PATH,
    HEARTBEAT_PATH,
    LEASE_PATH,
    RELEASE_PATH,
    Ack,
    CompleteRequest,
    CompleteResponse,
    EnrollRequest,
    EnrollResponse,
    FailRequest,
    GpuInfo,
    HeartbeatRequest,
    HeartbeatResponse,
    LeaseRequest,
    LeaseResponse,
    ReleaseRequest,
)
from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

router = APIRouter(tags=["workers"])


@router.post(ENROLL_PATH)
def enroll(body: EnrollRequest, c: CoordinatorDep) -> EnrollResponse:
    """Enroll with a join token; the answer's worker token authenticates every later call."""
    record, token = c.workers.enroll(body.join_token, body.hardware)
    return EnrollResponse(worker_id=record.worker_id, worker_token=token)


@router.post(LEASE_PATH)
async def lease(body: LeaseRequest, worker: WorkerDep, c: CoordinatorDep) -> LeaseResponse:
    """The next task that fits, or how long to wait before asking again (with the reason
    when the worker already holds as many leases as it may: one per GPU)."""
    return c.leases.offer(worker.worker_id, body.capabilities)


@router.post(HEARTBEAT_PATH)
async def heartbeat(
    lease_id: LeaseId, body: HeartbeatRequest, worker: WorkerDep, c: CoordinatorDep
) -> HeartbeatResponse:
    """Progress; renews the deadline and the upload targets; may answer `stop`."""
    if body.checkpoint is not None:
        return await run_in_threadpool(c.leases.heartbeat, worker.worker_id, lease_id, body)
    return c.leases.heartbeat(worker.worker_id, lease_id, body)


@router.post(COMPLETE_PATH)
def complete(
    lease_id: LeaseId, body: CompleteRequest, worker: WorkerDep, c: CoordinatorDep
) -> CompleteResponse:
    """The result: accepted once every artifact checks out in the store."""
    return c.leases.complete(worker.worker_id, lease_id, body)


@router.post(FAIL_PATH)
async def fail(lease_id: LeaseId, body: FailRequest, worker: WorkerDep, c: CoordinatorDep) -> Ack:
    """The attempt failed; the task is tried again elsewhere if retryable and attempts remain."""
    if body.checkpoint is not None:
        await run_in_threadpool(c.leases.fail, worker.worker_id, lease_id, body)
    else:
        c.leases.fail(worker.worker_id, lease_id, body)
    return Ack()


@router.post(RELEASE_PATH)
async def release(
    lease_id: LeaseId, body: ReleaseRequest, worker: WorkerDep, c: CoordinatorDep
) -> Ack:
    """Give the task back unfinished (with a checkpoint to resume from, ideally)."""
    if body.checkpoint is not None:
        await run_in_threadpool(c.leases.release, worker.worker_id, lease_id, body)
    else:
        c.leases.release(worker.worker_id, lease_id, body)
    return Ack()


@router.get(API_PREFIX + "/workers", dependencies=[Admin])
def workers(c: CoordinatorDep) -> WorkerList:
    """Every enrolled worker with its hardware, counters and active leases (admin)."""
    return WorkerList(workers=[_view(w) for w in c.workers.all()])


@router.get(API_PREFIX + "/leaderboard")
def leaderboard(c: CoordinatorDep, limit: int = 100) -> Leaderboard:
    """Contributors by accepted training tokens (public)."""
    rows = c.workers.leaderboard(max(1, min(limit, 1000)))
    return Leaderboard(entries=[LeaderboardEntry(name=n, tokens=t, tasks=k) for n, t, k in rows])


def _view(w: WorkerRecord) -> WorkerView:
    hardware = w.hardware
    return WorkerView(
        worker_id=w.worker_id,
        name=w.name,
        kind=w.kind,
        enrolled_at=w.enrolled_at,
        last_seen=w.last_seen,
        gpus=[GpuInfo.model_validate(g) for g in hardware.get("gpus", [])],
        memory_bytes=int(hardware.get("memory_bytes", 0)),
        tokens=w.tokens,
        tasks_accepted=w.tasks_accepted,
        tasks_failed=w.tasks_failed,
        tasks_rejected=w.tasks_rejected,
        tasks_expired=w.tasks_expired,
        leases=list(w.leases),
    )
