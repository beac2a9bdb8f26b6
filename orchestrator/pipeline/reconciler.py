"""The reconciler: the control loop that advances every job, one idempotent step at a time.

Each pass (under the leader lock, so one coordinator acts at a time) reads every live job
from Redis and does the next thing it needs; everything it decides is written to Redis (or
Optuna's journal in Redis) before it acts on it, and every write is idempotent. A
coordinator killed at any instant therefore resumes where it was: the next pass finds the
same state and takes the same step, or finds it taken.

Job lifecycle (job state in brackets):

    [pending]   -> [sharding]  stage an s3:// or local-folder base model into the store
                               once (modelstage.py; recorded in the job), then shard the
                               dataset into K shards + eval split (sharding.py); a manifest
                               already in the store is reused. Both run as one call on the
                               pool (sharding_step.py), submitted once and polled by later
                               passes, which meanwhile go on advancing the other jobs
    [running]   ask Optuna for trials up to max_concurrent_trials (study.py); per trial:
                  round r tasks queued (rounds.py)  -> workers lease, train, complete
                  all K accepted -> merge + evaluate as a Ray task (roundmerge.py)
                  -> record_merge, report the eval loss to Optuna, record_round
                  -> last round: trial complete; else the pruner decides: pruned, or
                     round r+1 queued from the merged adapter
                until n_trials were asked and every trial finished
    [merging]   copy the best trial's last merged adapter to jobs/<id>/best/ with a model
                card and results.json (results.py) -> [succeeded] (or [failed]: no trial
                completed)

Crash points and why nothing is lost or repeated: a job's staging and sharding in flight is
submitted again (a recorded staged model is kept, a manifest in the store reused, and a late
result only moves a job still `sharding`); an Optuna trial asked but not recorded is
adopted (`JobStudy.orphans`); a round's tasks are enqueued by id (`<job>.t<t>.r<r>.s<k>`,
enqueue is a no-op for an existing id); a merge is claimed (`claim_merge`), its outputs
are found in the store by a rerun, and `record_merge`/`record_round` keep the first value;
the prune decision is made only while round r+1 has no task (once one exists the trial went
on); trials finished in Redis (pruned, complete, or failed by a task) are told to Optuna
on every pass until Optuna agrees.

    reconciler = Reconciler(state, store, settings, pool)
    reconciler.run(once=True)      # one pass (tests); run() loops until stop()
"""

from __future__ import annotations

import hashlib
import logging
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cotune.orchestrator.control import metrics
from cotune.orchestrator.control.leases import Leases
from cotune.orchestrator.pipeline.pool import Pool
from cotune.orchestrator.pipeline.steps import JobContext, JobSteps
from cotune.orchestrator.protocol.states import LIVE_JOB_STATES, TERMINAL_JOB_STATES

if TYPE_CHECKING:
    from cotune.orchestrator.control.state import State
    from cotune.orchestrator.data.objectstore import ObjectStore
    from cotune.orchestrator.settings import Settings

log = logging.getLogger(__name__)


def default_identity(settings: Settings) -> str:
    """This coordinator's name in the leader lock and merge claims: stable across restarts
    of the same deployment (host and home), so a restarted coordinator takes its own lock
    and claims back at once instead of waiting for them to lapse. Two live coordinators
    must never share it (`cotune up` refuses a second stack on one home)."""
    home = hashlib.sha256(str(settings.home.resolve()).encode()).hexdigest()[:10]
    return f"{socket.gethostname()}-{home}"


@dataclass(frozen=True)
class LoopTimes:
    interval_s: float = 0.5  # between passes
    leader_ttl_s: float = 15.0  # a silent leader loses the lock after this long


class Reconciler:
    """The loop; see the module docstring."""

    def __init__(
        self,
        state: State,
        store: ObjectStore,
        settings: Settings,
        pool: Pool,
        *,
        identity: str | None = None,
        times: LoopTimes = LoopTimes(),
        work_dir: Path | None = None,
    ) -> None:
        self.state = state
        self.store = store
        self.settings = settings
        self.pool = pool
        self.identity = identity or default_identity(settings)
        self.times = times
        self.work_dir = work_dir or settings.home / "coordinator"
        self._stop = threading.Event()
        self._contexts: dict[str, JobContext] = {}
        self.steps = JobSteps(
            state, store, settings, pool, identity=self.identity, work_dir=self.work_dir
        )
        self._leases = Leases(state, store, settings)
        self.is_leader = False
        self.passes = 0

    def stop(self) -> None:
        self._stop.set()

    def run(self, once: bool = False) -> None:
        """Pass after pass until `stop()` (or one pass with `once`); the lock is released
        when the loop ends."""
        try:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    self.run_once()
                except Exception as exc:
                    # A pass that fails (Redis or S3 away for a moment) is retried by the
                    # next; every step is idempotent.
                    metrics.count_error(exc)
                    log.exception("reconciler pass failed; retrying")
                if once:
                    return
                left = self.times.interval_s - (time.monotonic() - started)
                self._stop.wait(max(left, 0.05))
        finally:
            if self.is_leader:
                self.state.release_leader(self.identity)
                self.is_leader = False

    def run_once(self) -> bool:
        """One pass over every live job; False (and nothing done) if another coordinator
        holds the leader lock."""
        self.is_leader = self.state.acquire_leader(self.identity, self.times.leader_ttl_s)
        if not self.is_leader:
            return False
        self.passes += 1
        # The API reclaims overdue leases every second too; doing it here as well keeps
        # tasks moving while the API is down or restarting.
        self._leases.reclaim_expired()
        live = self.state.list_jobs(states=LIVE_JOB_STATES)
        seen = set()
        for job in live:
            seen.add(job.job_id)
            try:
                self._step(job.job_id)
            except Exception as exc:
                metrics.count_error(exc)
                log.exception("job %s: step failed", job.job_id)
                self.state.emit(
                    job.job_id, "coordinator_error", error=f"{type(exc).__name__}: {exc}"
                )
            if not self.state.renew_leader(self.identity, self.times.leader_ttl_s):
                self.is_leader = False  # the lock lapsed (a long step): stop acting
                return False
        for job_id in set(self._contexts) - seen:
            self._contexts.pop(job_id).close()
        self.pool.follow_queue(self.steps.demand())
        return True

    def _step(self, job_id: str) -> None:
        job = self.state.get_job(job_id)
        if job.state in TERMINAL_JOB_STATES:
            return
        ctx = self._contexts.get(job_id)
        if ctx is None:
            ctx = self._contexts[job_id] = JobContext(job_id)
        self.steps.advance(job, ctx)
