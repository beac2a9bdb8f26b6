"""Job routes: submit a spec, list and inspect jobs and trials, follow events, cancel,
download the best adapter. All need the admin token."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterator
from typing import Annotated

from cotune.orchestrator.api.auth import Admin, CoordinatorDep, JobId
from cotune.orchestrator.api.context import ApiContext
from cotune.orchestrator.control.datafit import data_fit_of
from cotune.orchestrator.control.events import FIRST, check_event_id
from cotune.orchestrator.control.records import JobRecord, TaskRecord
from cotune.orchestrator.data.layout import best_prefix
from cotune.orchestrator.pipeline.submission import submit
from cotune.orchestrator.protocol.admin import (
    DownloadFile,
    DownloadList,
    EventBody,
    JobDetail,
    JobList,
    JobSummary,
    SubmitResponse,
    TaskCounts,
    TaskView,
    TrialList,
    TrialView,
)
from cotune.orchestrator.protocol.problems import Conflict, InvalidRequest
from cotune.orchestrator.protocol.states import JOB_STATES
from cotune.orchestrator.protocol.wire import API_PREFIX
from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.sse import EventSourceResponse, ServerSentEvent

router = APIRouter(prefix=API_PREFIX + "/jobs", tags=["jobs"], dependencies=[Admin])

DOWNLOAD_EXPIRY_S = 3600
_SPEC_BODY = {
    "requestBody": {
        "required": True,
        "description": "A sweep spec (docs/spec.md), as YAML or JSON.",
        "content": {
            "application/yaml": {"schema": {"type": "string"}},
            "application/json": {"schema": {"type": "object"}},
        },
    }
}


@router.post("", status_code=201, openapi_extra=_SPEC_BODY)
async def submit_job(request: Request, c: CoordinatorDep) -> SubmitResponse:
    """Submit a sweep spec: checked (every problem reported), stored, queued as `pending`."""
    body = await request.body()
    content_type = request.headers.get("content-type")
    stores = c.store_for
    job_id = await run_in_threadpool(submit, c.state, stores, body, content_type)
    return SubmitResponse(job_id=job_id)


@router.get("")
def list_jobs(
    c: CoordinatorDep,
    state: Annotated[list[str] | None, Query(description="Only jobs in these states.")] = None,
) -> JobList:
    """Every job, oldest first."""
    if state:
        unknown = [s for s in state if s not in JOB_STATES]
        if unknown:
            raise InvalidRequest(f"unknown states {unknown}; states: {list(JOB_STATES)}", "state")
    jobs = c.state.list_jobs(state)  # type: ignore[arg-type]
    return JobList(jobs=[_summary(c, job, c.state.tasks_of(job.job_id)) for job in jobs])


@router.get("/{job_id}")
def get_job(job_id: JobId, c: CoordinatorDep) -> JobDetail:
    return _detail(c, c.state.get_job(job_id))


@router.post("/{job_id}/cancel")
def cancel_job(job_id: JobId, c: CoordinatorDep) -> JobDetail:
    """Cancel: queued tasks are dropped, running ones told to stop. 409 once finished."""
    return _detail(c, c.state.cancel_job(job_id))


@router.get("/{job_id}/trials")
def trials(job_id: JobId, c: CoordinatorDep) -> TrialList:
    """The job's trials with their eval losses per round and their current tasks."""
    c.state.get_job(job_id)
    tasks = c.state.tasks_of(job_id)
    views = []
    for trial in c.state.get_trials(job_id):
        mine = [t for t in tasks if t.trial == trial.number]
        latest = max((t.round for t in mine), default=None)
        views.append(
            TrialView(
                number=trial.number,
                params=trial.params,
                state=trial.state,
                rounds_done=trial.rounds_done,
                eval_losses=trial.eval_losses,
                error=trial.error,
                tasks=[_task_view(t) for t in mine if t.round == latest],
            )
        )
    return TrialList(job_id=job_id, trials=views)


def _existing_job(job_id: JobId, c: CoordinatorDep) -> JobRecord:
    return c.state.get_job(job_id)  # 404 before a stream starts


def _cursor(
    after: Annotated[str | None, Query(description="Send events after this id.")] = None,
    last_event_id: Annotated[str | None, Header()] = None,
) -> str:
    cursor = after or last_event_id or FIRST
    try:
        return check_event_id(cursor)
    except ValueError as exc:
        raise InvalidRequest(str(exc), "after" if after else "Last-Event-ID") from None


@router.get("/{job_id}/events", response_class=EventSourceResponse)
def events(
    job: Annotated[JobRecord, Depends(_existing_job)],
    cursor: Annotated[str, Depends(_cursor)],
    c: CoordinatorDep,
    follow: bool = True,
) -> Iterator[ServerSentEvent]:
    """The job's events as server-sent events, from the first (or after `Last-Event-ID`).

    With `follow` (the default) the stream stays open until the job has finished and every
    event was sent; without, it ends after the events stored so far.
    """
    yield from _stream(c, job.job_id, cursor, follow)


def _stream(c: ApiContext, job_id: str, cursor: str, follow: bool) -> Iterator[ServerSentEvent]:
    while True:
        finished = c.state.get_job(job_id).terminal  # before reading: no event is missed
        batch = c.state.events.read(job_id, cursor, block_ms=1000 if follow else None)
        for event in batch:
            body = EventBody(id=event.id, kind=event.kind, time=event.time, data=event.data)
            yield ServerSentEvent(raw_data=body.model_dump_json(), event=event.kind, id=event.id)
            cursor = event.id
        if not batch and (finished or not follow):
            return


@router.get("/{job_id}/download")
def download(job_id: JobId, c: CoordinatorDep) -> DownloadList:
    """Presigned GET URLs (1 hour) of every file of the best adapter; 409 until succeeded."""
    job = c.state.get_job(job_id)
    if job.state != "succeeded":
        raise Conflict(
            f"job {job_id} is {job.state}: its best adapter is ready once the job succeeded",
            "job_id",
        )
    prefix = best_prefix(job_id)
    files = []
    for info in c.store.list(prefix):
        sha256 = info.sha256 or _stored_sha256(c, info.key)
        files.append(
            DownloadFile(
                name=info.key.removeprefix(prefix),
                url=c.store.presign_get(info.key, DOWNLOAD_EXPIRY_S),
                sha256=sha256,
                bytes=info.size,
            )
        )
    return DownloadList(job_id=job_id, files=files)


def _stored_sha256(c: ApiContext, key: str) -> str:
    head = c.store.head(key)
    if head is not None and head.sha256:
        return head.sha256
    digest = hashlib.sha256()
    with c.store.open_stream(key) as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _counts(tasks: list[TaskRecord]) -> TaskCounts:
    """The shard tasks by state (redundancy duplicates are runs of them, not tasks)."""
    shards = (t.state for t in tasks if t.duplicate_of is None)
    return TaskCounts.model_validate(dict(Counter(shards)))


def _summary(c: ApiContext, job: JobRecord, tasks: list[TaskRecord]) -> JobSummary:
    return JobSummary(
        job_id=job.job_id,
        name=job.name,
        state=job.state,
        created_at=job.created_at,
        updated_at=job.updated_at,
        error=job.error,
        best_trial=job.best_trial,
        tasks=_counts(tasks),
        trials=_trials(c, job),
    )


def _trials(c: ApiContext, job: JobRecord) -> int:
    return c.state.trial_count(job.job_id)


def _detail(c: ApiContext, job: JobRecord) -> JobDetail:
    summary = _summary(c, job, c.state.tasks_of(job.job_id))
    manifest = json.loads(job.manifest_json) if job.manifest_json else None
    return JobDetail(
        **summary.model_dump(),
        spec_yaml=job.spec_yaml,
        manifest=manifest,
        data_fit=data_fit_of(job),
    )


def _reported(t: TaskRecord, name: str) -> int | None:
    """A count the task's worker reported with its result (never used for a decision)."""
    result = t.result()
    value = result.metrics.get(name) if result is not None else None
    return int(value) if isinstance(value, int | float) and value >= 0 else None


def _task_view(t: TaskRecord) -> TaskView:
    return TaskView(
        task_id=t.task_id,
        round=t.round,
        shard=t.shard,
        state=t.state,
        attempt=t.attempt,
        worker_id=t.worker_id,
        step=t.step,
        max_steps=t.max_steps,
        loss=t.loss,
        error=t.error,
        duplicate_of=t.duplicate_of,
        rows_cut=_reported(t, "rows_cut"),
        rows_dropped=_reported(t, "rows_dropped"),
    )
