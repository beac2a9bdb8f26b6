"""The `sharding` step off the reconciler's loop: stage the base model and shard the dataset
as one call on the pool, which later passes poll.

Staging a model folder and sharding gigabytes take minutes; done inside a pass they stalled
every other job (no merges, no rounds queued) and could outlast the leader lock. So the pass
that finds a job `sharding` submits `stage_and_shard` once (`Pool.submit_cpu_call`: a Ray
task on one CPU, never waiting for a GPU) and keeps the handle in the job's context; each
later pass polls it and goes on to the other jobs while it runs (steps.py `_shard`):

    done          -> the loop records the staged base model (modelstage.record_staged), moves
                     the job to running with the manifest (expect=sharding: a job cancelled
                     meanwhile stays cancelled) and emits dataset_sharded
    ModelStageError, ShardingError, ManifestError
                  -> the job fails with the reason (`base_model <name>: ...`,
                     `sharding <path>: ...`)
    anything else -> raised: the pass logs it and emits coordinator_error, and the next pass
                     submits the call again (a store away for a moment)

The call is idempotent, so a coordinator restarted mid-sharding simply submits it again: a
staged model recorded in the job is not staged again, the archive is content-addressed, and a
manifest already in the store (uploaded last, so the data is whole) is reused rather than
sharded again. Its argument and value are plain picklable data: how to reach the store
(`StoreConfig`, not a live client), the manifest as JSON.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cotune.orchestrator.data.layout import manifest_key
from cotune.orchestrator.data.manifest import Manifest, ManifestError
from cotune.orchestrator.data.sharding import ShardingError
from cotune.orchestrator.data.shardstore import shard_to_store
from cotune.orchestrator.pipeline.modelstage import (
    ModelStageError,
    StagedModel,
    record_staged,
    stage_model,
    to_stage,
)
from cotune.orchestrator.pipeline.roundmerge import StoreConfig
from cotune.orchestrator.protocol.problems import Conflict

if TYPE_CHECKING:
    from cotune.orchestrator.control.records import JobRecord
    from cotune.orchestrator.control.state import State
    from cotune.orchestrator.pipeline.pool import Pool
    from cotune.orchestrator.protocol.spec import SweepSpec


@dataclass(frozen=True)
class ShardRequest:
    """What the call needs: the spec's dataset section, the model to stage, the store."""

    job_id: str
    dataset: str
    format: str
    shards: int
    eval_split: float | str
    seed: int
    max_bad_rows: float
    base_model: str | None  # to stage; None: a hub id, a built-in, or recorded already
    work_dir: str  # the staged archive is written through a temporary file here
    store: StoreConfig


@dataclass(frozen=True)
class ShardOutcome:
    manifest_json: str
    staged: StagedModel | None  # None when nothing was staged by this call
    reused: bool  # the manifest was in the store already (sharded before a restart)
    seconds: float


def stage_and_shard(request: ShardRequest) -> ShardOutcome:
    """Stage the base model (if asked), then shard the dataset into the store unless its
    manifest is there already. Runs on the pool (a Ray task), never on the loop's thread."""
    started = time.perf_counter()
    store = request.store.open()
    staged = None
    if request.base_model is not None:
        staged = stage_model(request.base_model, store, work_dir=Path(request.work_dir))
    key = manifest_key(request.job_id)
    reused = store.exists(key)
    if reused:  # sharded before a restart: the manifest is uploaded last, the data is whole
        manifest = Manifest.from_json(store.get_bytes(key), origin=key)
    else:
        manifest = shard_to_store(
            request.dataset,
            store=store,
            job_id=request.job_id,
            fmt=request.format,
            shards=request.shards,
            eval_split=request.eval_split,
            seed=request.seed,
            max_bad_rows=request.max_bad_rows,
        )
    return ShardOutcome(manifest.to_json(), staged, reused, time.perf_counter() - started)


class ShardingStep:
    """The loop's side: what to submit for a job, and what its result does to the job."""

    def __init__(self, state: State, pool: Pool, store_config: StoreConfig, work_dir: Path):
        self.state = state
        self.pool = pool
        self.store_config = store_config
        self.work_dir = work_dir

    def submit(self, job: JobRecord, spec: SweepSpec) -> Any:
        """Start the call (once per job and process: the caller keeps the handle)."""
        d = spec.dataset
        request = ShardRequest(
            job_id=job.job_id,
            dataset=d.path,
            format=d.format,
            shards=d.shards,
            eval_split=d.eval_split,
            seed=d.seed,
            max_bad_rows=d.max_bad_rows,
            base_model=to_stage(job, spec),
            work_dir=str(self.work_dir),
            store=self.store_config,
        )
        handle = self.pool.submit_cpu_call(stage_and_shard, request)
        self.state.emit(
            job.job_id,
            "sharding_started",
            dataset=d.path,
            shards=d.shards,
            staging=request.base_model,
        )
        return handle

    def finish(
        self, job: JobRecord, spec: SweepSpec, outcome: Any, error: BaseException | None
    ) -> str | None:
        """Apply the call's result: the job moves to running; or the reason it fails (the
        caller fails it); other errors are raised, for the next pass to submit again."""
        if isinstance(error, ModelStageError):
            return f"base_model {spec.base_model}: {error}"
        if isinstance(error, ShardingError | ManifestError):
            return f"sharding {spec.dataset.path}: {error}"
        if error is not None:
            raise error
        assert isinstance(outcome, ShardOutcome)
        if outcome.staged is not None:
            try:
                record_staged(self.state, job.job_id, spec.base_model, outcome.staged)
            except Conflict:
                return None  # no longer sharding (cancelled meanwhile): the result is dropped
        manifest = Manifest.from_json(outcome.manifest_json)
        moved = self.state.transition_job(
            job.job_id, "running", expect=["sharding"], manifest_json=outcome.manifest_json
        )
        if moved:
            self.state.emit(
                job.job_id,
                "dataset_sharded",
                rows=sum(s.rows for s in manifest.shards),
                eval_rows=manifest.eval.rows,
                bad_rows=manifest.bad_rows.count,
                shards=len(manifest.shards),
                seconds=round(outcome.seconds, 3),
                reused=outcome.reused,
            )
        return None
