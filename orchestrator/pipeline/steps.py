"""The reconciler's steps: given a job's state in Redis, take the next step (idempotently).

orchestrator/pipeline/reconciler.py runs the loop and explains the lifecycle and the crash points;
this module holds the steps themselves: stage the base model and shard (a call on the pool,
polled: pipeline/sharding_step.py), ask trials, advance each trial round by round (queue
tasks, verify volunteers' results (pipeline/verification.py), merge and evaluate, report,
prune or go on), tell Optuna, export. `JobContext` caches what is derived from Redis (the
spec, the staged base model, the manifest, the study) and the handles of work in flight on
the pool (sharding, merges, checks); losing it (a restart) loses nothing.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cotune.orchestrator.control.intake import adapter_config
from cotune.orchestrator.control.queue import Queue
from cotune.orchestrator.control.records import JobRecord, StoredObject, TaskRecord, TrialRecord
from cotune.orchestrator.data.layout import data_key, merged_prefix
from cotune.orchestrator.data.manifest import Manifest, ManifestError
from cotune.orchestrator.pipeline.baseeval import BaseEval
from cotune.orchestrator.pipeline.results import export_best
from cotune.orchestrator.pipeline.roundmerge import (
    EvalSetup,
    MergeOutcome,
    MergeRequest,
    StoreConfig,
    StoredFile,
)
from cotune.orchestrator.pipeline.rounds import round_tasks, start_adapter
from cotune.orchestrator.pipeline.sharding_step import ShardingStep
from cotune.orchestrator.pipeline.study import JobStudy, max_concurrent
from cotune.orchestrator.pipeline.upload_checks import check_fields
from cotune.orchestrator.pipeline.verification import RoundView, Verification, VerifyMemory
from cotune.orchestrator.protocol.spec import SpecError, SweepSpec, parse_spec_yaml
from cotune.orchestrator.protocol.spec.checks import effective_trials
from cotune.orchestrator.protocol.states import ENDED_TASK_STATES
from cotune.orchestrator.protocol.task import TrainTask
from cotune.orchestrator.protocol.wire import ADAPTER_WEIGHTS

if TYPE_CHECKING:
    from cotune.orchestrator.control.state import State
    from cotune.orchestrator.data.objectstore import ObjectStore
    from cotune.orchestrator.pipeline.pool import Pool
    from cotune.orchestrator.settings import Settings

log = logging.getLogger(__name__)

MERGE_TRIES = 3  # a merge that fails this often fails its trial


@dataclass
class JobContext:
    """What the reconciler keeps in memory about one job (all of it can be rebuilt)."""

    job_id: str
    spec: SweepSpec | None = None
    base_archive: StoredObject | None = None  # a staged base model (pipeline/modelstage.py)
    sharding: Any = None  # staging + sharding in flight (pipeline/sharding_step.py)
    manifest: Manifest | None = None
    study: JobStudy | None = None
    trial_specs: dict[int, SweepSpec] = field(default_factory=dict)
    merges: dict[tuple[int, int], Any] = field(default_factory=dict)  # in flight
    merge_failures: dict[tuple[int, int], int] = field(default_factory=dict)
    base_eval: Any = None  # the base evaluation in flight (pipeline/baseeval.py)
    base_eval_failed: bool = False
    base_eval_error: str | None = None  # it found no usable eval row: the job fails
    fit_recorded: bool = False
    verify: VerifyMemory = field(default_factory=VerifyMemory)

    def close(self) -> None:
        self.sharding = None  # a late result is dropped with it
        self.merges.clear()
        self.verify.clear()


class JobSteps:
    def __init__(
        self,
        state: State,
        store: ObjectStore,
        settings: Settings,
        pool: Pool,
        *,
        identity: str,
        work_dir: Path,
    ) -> None:
        self.state = state
        self.store = store
        self.settings = settings
        self.pool = pool
        self.identity = identity
        self.work_dir = work_dir
        self.store_config = StoreConfig(
            endpoint=store.endpoint_url,
            bucket=store.bucket,
            access_key=settings.s3_access_key,
            secret_key=settings.s3_secret_key,
            region=settings.s3_region,
        )
        self.sharding = ShardingStep(state, pool, self.store_config, work_dir)
        self.base_eval = BaseEval(state, store, pool, self.store_config)
        self.verification = Verification(
            state, store, pool, self.store_config, work_dir, max_strikes=settings.max_strikes
        )

    def advance(self, job: JobRecord, ctx: JobContext) -> None:
        if job.state == "pending":
            self.state.transition_job(job.job_id, "sharding", expect=["pending"])
            job = self.state.get_job(job.job_id)
        try:
            if ctx.spec is None:
                ctx.spec = parse_spec_yaml(job.spec_yaml, f"job {job.job_id} spec")
        except SpecError as exc:
            self._fail_job(job, f"the stored spec does not parse: {exc}")
            return
        steps = {"sharding": self._shard, "running": self._run, "merging": self._export}
        # A step that moves the job on is followed by the next one in the same pass.
        while job.state in steps:
            steps[job.state](job, ctx)
            moved = self.state.get_job(job.job_id)
            if moved.state == job.state:
                return
            job = moved

    def demand(self) -> int:
        """Tasks queued or leased, over every job: what cluster workers could take."""
        return sum(Queue(self.state).depths().values()) + self.state.leased_count()

    # --- sharding (off the loop) --------------------------------------------------------

    def _shard(self, job: JobRecord, ctx: JobContext) -> None:
        """Off the loop (sharding_step.py): submit once, then poll on every pass."""
        assert ctx.spec is not None
        if ctx.sharding is None:  # a restart (a new context) submits again: it is idempotent
            ctx.sharding = self.sharding.submit(job, ctx.spec)
        done, outcome, error = self.pool.poll(ctx.sharding)
        if not done:
            return  # the pass goes on with the other jobs
        ctx.sharding = None  # an error raised below is submitted again by the next pass
        reason = self.sharding.finish(job, ctx.spec, outcome, error)
        if reason is not None:
            self._fail_job(job, reason, expect="sharding")

    # --- running ------------------------------------------------------------------------

    def _context(self, job: JobRecord, ctx: JobContext) -> tuple[SweepSpec, Manifest, JobStudy]:
        assert ctx.spec is not None
        if ctx.manifest is None:
            if not job.manifest_json:
                raise ManifestError(f"job {job.job_id} is running without a manifest")
            ctx.manifest = Manifest.from_json(job.manifest_json)
            ctx.base_archive = job.staged_model()
        if ctx.study is None:
            redis_url = self.settings.redis_url or ""
            ctx.study = JobStudy.open(
                redis_url, self.state.keys.optuna(job.job_id), job.job_id, ctx.spec
            )
        return ctx.spec, ctx.manifest, ctx.study

    def _run(self, job: JobRecord, ctx: JobContext) -> None:
        spec, _manifest, study = self._context(job, ctx)
        self.base_eval.start(job.job_id, ctx, lambda: self._base_setup(ctx))
        if self._failed_fit(job, ctx):
            return
        trials = {t.number: t for t in self.state.get_trials(job.job_id)}
        for orphan in study.orphans(set(trials)):
            log.info(
                "job %s: adopting trial %d (asked before a restart)", job.job_id, orphan.number
            )
            trials[orphan.number] = self.state.put_trial(job.job_id, orphan.number, orphan.params)
        for trial in trials.values():
            if trial.state == "running":
                self._advance_trial(job, ctx, trial)
        current = self.state.get_trials(job.job_id)
        self._tell_finished(study, current)
        running = sum(t.state == "running" for t in current)
        asked, total = study.asked(), effective_trials(spec)
        while asked < total and running < max_concurrent(spec):
            new = study.ask()
            record = self.state.put_trial(job.job_id, new.number, new.params)
            self._advance_trial(job, ctx, record)
            asked, running = asked + 1, running + 1
        if asked >= total and running == 0 and len(current) >= total:
            self.state.transition_job(job.job_id, "merging", expect=["running"])

    def _trial_spec(self, ctx: JobContext, trial: TrialRecord) -> SweepSpec:
        assert ctx.spec is not None
        if trial.number not in ctx.trial_specs:
            ctx.trial_specs[trial.number] = ctx.spec.with_params(trial.params)
        return ctx.trial_specs[trial.number]

    def _advance_trial(self, job: JobRecord, ctx: JobContext, trial: TrialRecord) -> None:
        spec, manifest, study = self._context(job, ctx)
        n, number = trial.rounds_done, trial.number
        if n >= spec.rounds:
            self._finish_trial(study, job.job_id, number, "complete", trial.eval_losses[-1])
            return
        every = self.state.tasks_for(job.job_id, number, n)  # redundancy duplicates too
        tasks = [t for t in every if t.duplicate_of is None]
        if not tasks and n > 0:
            # The decision point after round n-1: made only while round n has no task.
            study.report(number, n - 1, trial.eval_losses[n - 1])
            if study.should_prune(number):
                self._finish_trial(study, job.job_id, number, "pruned")
                return
        if len(tasks) < len(manifest.shards):
            self._enqueue_round(job, ctx, trial, n)
            return
        if any(t.state in ENDED_TASK_STATES for t in tasks):
            return  # the task's failure failed the trial too (scripts.py, `settle`)
        for r in (n - 1, n) if n > 0 else (n,):  # a late duplicate of the last round too
            round_tasks_ = every if r == n else self.state.tasks_for(job.job_id, number, r)
            if any(t.state == "verifying" for t in round_tasks_):
                self.verification.step(ctx.verify, self._round_view(job, ctx, trial, r))
        tasks = [t for t in self.state.tasks_for(job.job_id, number, n) if t.duplicate_of is None]
        if all(t.state == "accepted" for t in tasks):
            self._merge_round(job, ctx, trial, n, tasks)

    def _round_view(self, job: JobRecord, ctx: JobContext, trial: TrialRecord, r: int) -> RoundView:
        """What the verification step needs of (trial, round r): the trust settings and the
        round's start loss (the base model's in round 0, measured once per job)."""
        if r == 0:
            known, baseline = self._base_loss(job, ctx)
        else:
            known, baseline = True, trial.eval_losses[r - 1]
        return RoundView(
            job_id=job.job_id,
            trial=trial.number,
            round=r,
            trust=self._trial_spec(ctx, trial).trust,
            baseline=baseline,
            baseline_known=known,
            eval_setup=lambda task_json: self._eval_setup(ctx, task_json),
        )

    def _enqueue_round(self, job: JobRecord, ctx: JobContext, trial: TrialRecord, n: int) -> None:
        assert ctx.manifest is not None
        start = start_adapter(self.store, job.job_id, trial.number, n - 1) if n > 0 else None
        trial_spec = self._trial_spec(ctx, trial)
        trust = check_fields(self.store, trial_spec, job.job_id, trial.number, n)
        for task in round_tasks(
            job_id=job.job_id,
            trial_spec=trial_spec,
            manifest=ctx.manifest,
            trial=trial.number,
            round=n,
            start=start,
            max_attempts=self.settings.max_attempts,
            store=self.store,
            staged_model=ctx.base_archive,
        ):
            # a no-op for a task queued before a restart
            self.state.enqueue_task(dataclasses.replace(task, **trust))

    def _merge_round(
        self, job: JobRecord, ctx: JobContext, trial: TrialRecord, n: int, tasks: list[TaskRecord]
    ) -> None:
        assert ctx.study is not None
        number, where = trial.number, (trial.number, n)
        merge = self.state.get_merge(job.job_id, number, n)
        if merge is not None:
            loss = float(merge["eval_loss"])
        else:
            outcome = self._merge_outcome(job, ctx, trial, n, tasks)
            if outcome is None:
                return
            self.state.record_merge(
                job.job_id,
                number,
                n,
                outcome.merged_prefix,
                outcome.eval_loss,
                merge_s=outcome.merge_s,
                eval_s=outcome.eval_s,
            )
            loss = outcome.eval_loss
            ctx.merge_failures.pop(where, None)
        ctx.study.report(number, n, loss)
        self.state.record_round(job.job_id, number, n, loss)

    def _merge_outcome(
        self, job: JobRecord, ctx: JobContext, trial: TrialRecord, n: int, tasks: list[TaskRecord]
    ) -> MergeOutcome | None:
        where = (trial.number, n)
        handle = ctx.merges.get(where)
        if handle is None:
            if not self.state.claim_merge(job.job_id, trial.number, n, self.identity):
                return None  # another coordinator merges it; its record_merge will show
            ctx.merges[where] = self.pool.submit_merge(
                self._merge_request(job, ctx, trial, n, tasks)
            )
            return None
        done, outcome, error = self.pool.poll(handle)
        if not done:
            return None
        del ctx.merges[where]
        if error is not None:
            tries = ctx.merge_failures[where] = ctx.merge_failures.get(where, 0) + 1
            why = f"merge of trial {trial.number} round {n}: {error}"
            log.warning("job %s: %s (try %d of %d)", job.job_id, why, tries, MERGE_TRIES)
            self.state.emit(job.job_id, "merge_failed", trial=trial.number, round=n, error=why)
            if tries >= MERGE_TRIES:
                assert ctx.study is not None
                self._finish_trial(ctx.study, job.job_id, trial.number, "failed", error=why)
            return None
        assert isinstance(outcome, MergeOutcome)
        return outcome

    def _merge_request(
        self, job: JobRecord, ctx: JobContext, trial: TrialRecord, n: int, tasks: list[TaskRecord]
    ) -> MergeRequest:
        assert ctx.manifest is not None
        spec = self._trial_spec(ctx, trial)
        adapters = []
        for task in tasks:
            result = task.result()
            if result is None:
                raise RuntimeError(f"task {task.task_id} is accepted without a result")
            weights = result.artifacts[ADAPTER_WEIGHTS]
            adapters.append(StoredFile(weights.key, weights.sha256))
        # Weights: the shards' sizes as the manifest has them; the config: the coordinator's.
        return MergeRequest(
            job_id=job.job_id,
            trial=trial.number,
            round=n,
            adapters=tuple(adapters),
            weights=tuple(float(ctx.manifest.shards[t.shard].rows) for t in tasks),
            adapter_config=json.dumps(adapter_config(tasks[0])),
            out_prefix=merged_prefix(job.job_id, trial.number, n),
            method=spec.merge.method,
            rank=spec.merge.rank,
            density=spec.merge.density,
            seed=spec.training.seed,
            evaluation=self._eval_setup(ctx, tasks[0].task_json),
            store=self.store_config,
        )

    def _eval_setup(self, ctx: JobContext, task_json: str) -> EvalSetup:
        assert ctx.manifest is not None
        split = ctx.manifest.eval
        return EvalSetup(
            task_json=task_json,
            eval_file=StoredFile(data_key(ctx.job_id, split.name), split.sha256),
            models_dir=str(self.settings.home / "models"),
            work_dir=str(self.work_dir / ctx.job_id),
            base_archive=StoredFile(b.key, b.sha256) if (b := ctx.base_archive) else None,
        )

    def _finish_trial(
        self,
        study: JobStudy,
        job_id: str,
        number: int,
        to: str,
        value: float | None = None,
        error: str | None = None,
    ) -> None:
        """Record the end in Redis first (the decision), then tell Optuna."""
        record = self.state.finish_trial(job_id, number, to, error=error)  # type: ignore[arg-type]
        self._tell_finished(study, [record])

    def _tell_finished(self, study: JobStudy, trials: list[TrialRecord]) -> None:
        for trial in trials:
            if trial.state == "running" or study.state_of(trial.number) != "running":
                continue
            if trial.state == "complete":
                study.tell(trial.number, "complete", trial.eval_losses[-1])
            else:
                study.tell(trial.number, "pruned" if trial.state == "pruned" else "failed")

    # --- the base model's loss, for the model card --------------------------------------

    def _base_setup(self, ctx: JobContext) -> EvalSetup:
        assert ctx.spec is not None
        task = TrainTask.from_spec(ctx.spec.with_params({}))
        return self._eval_setup(ctx, task.model_dump_json())

    def _base_loss(self, job: JobRecord, ctx: JobContext) -> tuple[bool, float | None]:
        """(known yet, loss): the base eval loss, or None if it could not be computed."""
        return self.base_eval.loss(job.job_id, ctx, lambda: self._base_setup(ctx))

    def _failed_fit(self, job: JobRecord, ctx: JobContext) -> bool:
        """Record the job's data fit once known; fail the job if its rows do not fit."""
        assert ctx.spec is not None
        why = self.base_eval.fit_problem(job, ctx.spec, ctx, lambda: self._base_setup(ctx))
        if why is not None:
            self._fail_job(job, why, expect=job.state)
        return why is not None

    # --- the end ------------------------------------------------------------------------

    def _export(self, job: JobRecord, ctx: JobContext) -> None:
        spec, manifest, _study = self._context(job, ctx)
        known, base_loss = self._base_loss(job, ctx)
        if not known or self._failed_fit(self.state.get_job(job.job_id), ctx):
            return
        trials = self.state.get_trials(job.job_id)
        tasks = self.state.tasks_of(job.job_id)
        best = export_best(
            self.store,
            job=job,
            spec=spec,
            manifest=manifest,
            trials=trials,
            tasks=tasks,
            base_eval_loss=base_loss,
        )
        if best is None:
            summary = "; ".join(f"trial {t.number} {t.state}" for t in trials) or "no trials"
            self._fail_job(job, f"no trial completed ({summary})", expect="merging")
            return
        self.state.transition_job(job.job_id, "succeeded", expect=["merging"], best_trial=best)

    def _fail_job(self, job: JobRecord, error: str, expect: str | None = None) -> None:
        log.error("job %s failed: %s", job.job_id, error)
        states = [expect] if expect else ["pending", "sharding", "running", "merging"]
        self.state.transition_job(job.job_id, "failed", expect=states, error=error)  # type: ignore[arg-type]
