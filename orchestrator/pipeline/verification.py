"""The verification step: the heavy checks of volunteer results in `verifying`, redundancy
votes, and the round review before a merge; every verdict through control/verdicts.py.

pipeline/steps.py calls `Verification.step` on each pass for a running trial's round that has
a task verifying. Idempotent and crash-safe like the rest of the reconciler: what is decided
is in Redis (a task's check record; its state after a verdict, which acts only on the
attempt it judged), and what runs is a Ray task (`pool.submit_call`, upload_checks.py) whose
handle is kept in memory only: a coordinator that died runs the check again.

For every result waiting in `verifying` (a task's or a redundancy duplicate's):
  1. its owner is quarantined: rejected (no new strike);
  2. not checked yet at its attempt: `check_upload` (download, exact keys and shapes, finite
     values, not the start sent back, the probe loss), its findings recorded on the task;
  3. issues, or a probe loss over the round's start loss (the previous round's merged eval
     loss, the base model's in round 0) + trust.probe_tolerance: rejected, a strike on the
     owner, the task queued again (not counted toward max_attempts).
Redundancy (pipeline/redundancy.py): a chosen task's result is vouched for, or outvoted, by
its duplicates' results. The round review: once every shard task of the round is accepted
or checked (and vouched for where chosen), `review_uploads` over the K uploads
(verify/review.py: zero work, replays, outlier norms, odd directions); flagged verifying
results are rejected (the merge waits for their replacements), the rest accepted and
credited. Trusted cluster results skip the heavy checks; they are peers in the review but
never judged by it. A check that keeps failing to run (MAX_CHECK_TRIES) rejects the result
without a strike: it could not be verified. Results of a trial that ended meanwhile (pruned,
failed) are left in `verifying`, uncredited: nothing will merge them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cotune.orchestrator.control.records import CheckRecord, TaskRecord, duplicate_id
from cotune.orchestrator.control.strikes import MAX_STRIKES
from cotune.orchestrator.control.verdicts import Verdicts
from cotune.orchestrator.pipeline import redundancy
from cotune.orchestrator.pipeline.redundancy import MAX_DUPLICATES, Ballot
from cotune.orchestrator.pipeline.roundmerge import EvalSetup, StoreConfig
from cotune.orchestrator.pipeline.upload_checks import (
    CheckRequest,
    CompareRequest,
    ProbeSetup,
    ReviewRequest,
    budget_of,
    check_upload,
    compare_uploads,
    layout_of,
    review_uploads,
    start_of,
    weights_of,
)

if TYPE_CHECKING:
    from cotune.orchestrator.control.state import State
    from cotune.orchestrator.data.objectstore import ObjectStore
    from cotune.orchestrator.pipeline.pool import Pool
    from cotune.orchestrator.protocol.spec import TrustSpec

log = logging.getLogger(__name__)

MAX_CHECK_TRIES = 3
Key = tuple[str, int]  # (task id, attempt): one result


@dataclass
class VerifyMemory:
    """What the step keeps between passes (all of it can be lost): Ray handles in flight,
    cosines computed, failed check runs."""

    checks: dict[Key, Any] = field(default_factory=dict)
    compares: dict[frozenset[Key], Any] = field(default_factory=dict)
    cosines: dict[frozenset[Key], float] = field(default_factory=dict)
    reviews: dict[tuple[Key, ...], Any] = field(default_factory=dict)
    check_failures: dict[Key, int] = field(default_factory=dict)

    def clear(self) -> None:
        self.checks.clear()
        self.compares.clear()
        self.reviews.clear()


@dataclass(frozen=True)
class RoundView:
    """One (trial, round) as the step sees it."""

    job_id: str
    trial: int
    round: int
    trust: TrustSpec
    baseline: float | None  # the round's start loss; None: unknown, the probe gate is off
    baseline_known: bool  # False: not measured yet (round 0's base eval runs): wait
    eval_setup: Callable[[str], EvalSetup]  # the probe's evaluation, for a task's JSON


class Verification:
    def __init__(
        self,
        state: State,
        store: ObjectStore,
        pool: Pool,
        store_config: StoreConfig,
        work_dir: Path,
        *,
        max_strikes: float = MAX_STRIKES,
    ) -> None:
        self.state = state
        self.pool = pool
        self.store_config = store_config
        self.work_dir = work_dir
        self.verdicts = Verdicts(state, store, max_strikes=max_strikes)

    def step(self, memory: VerifyMemory, view: RoundView) -> None:
        """Take every decision the round's results allow now (module docstring)."""
        for task in self._tasks(view):
            if task.state == "verifying":
                self._screen(memory, view, task)
        tasks = self._tasks(view)
        originals = [t for t in tasks if t.duplicate_of is None]
        vouched: set[str] = set()
        for original in originals:
            dups = [t for t in tasks if t.duplicate_of == original.task_id]
            if original.state == "accepted":
                queued = [d.task_id for d in dups if d.state == "queued"]
                if queued:  # re-queued after a rejection: no longer needed
                    self.verdicts.accept(original, cancel=queued)
                for dup in dups:
                    if dup.state == "verifying" and self._passes(dup, view):
                        self._against_accepted(memory, view, original, dup)
            elif original.state == "verifying" and self._passes(original, view):
                chosen = redundancy.chosen(original.task_id, view.trust.redundancy)
                if not chosen or self._vote(memory, view, original, dups):
                    vouched.add(original.task_id)
        self._review(memory, view, vouched)

    # --- one result -----------------------------------------------------------------------

    def _screen(self, memory: VerifyMemory, view: RoundView, task: TaskRecord) -> None:
        """Steps 1-3 of the module docstring for one verifying result."""
        result = task.result()
        owner = (result.owner if result else None) or self.verdicts.owner_of(task.worker_id or "")
        if self.verdicts.strikes.is_quarantined(owner):
            self.verdicts.reject(
                task, f"its owner {owner!r} is quarantined", strike=False, cause="quarantined"
            )
            return
        check = task.check()
        if check is None:
            self._check(memory, view, task)
            return
        issues = self._issues(task, check, view)
        if issues:
            self.verdicts.reject(task, "; ".join(issues))

    def _issues(self, task: TaskRecord, check: CheckRecord, view: RoundView) -> list[str]:
        issues = list(check.issues)
        if not issues and check.probe_loss is not None and view.baseline is not None:
            limit = view.baseline + view.trust.probe_tolerance
            if check.probe_loss > limit:
                issues.append(
                    f"probe loss {check.probe_loss:.4f} is worse than the round's start "
                    f"{view.baseline:.4f} by more than trust.probe_tolerance "
                    f"{view.trust.probe_tolerance:g}"
                )
        return issues

    def _passes(self, task: TaskRecord, view: RoundView) -> bool:
        """Checked at its attempt and nothing wrong (False too while not known)."""
        check = task.check()
        if check is None or not view.baseline_known:
            return False
        return not self._issues(task, check, view)

    def _check(self, memory: VerifyMemory, view: RoundView, task: TaskRecord) -> None:
        """Start, or collect, the heavy checks of the task's current result."""
        key = (task.task_id, task.attempt)
        handle = memory.checks.get(key)
        if handle is None:
            memory.checks[key] = self.pool.submit_call(check_upload, self._request(view, task))
            return
        done, outcome, error = self.pool.poll(handle)
        if not done:
            return
        del memory.checks[key]
        if error is not None:
            tries = memory.check_failures[key] = memory.check_failures.get(key, 0) + 1
            log.warning("job %s: checking %s failed (%d): %s", view.job_id, key, tries, error)
            if tries >= MAX_CHECK_TRIES and task.state == "verifying":
                self.verdicts.reject(
                    task, f"could not be verified: {error}", strike=False, cause="unverifiable"
                )
            return
        record = CheckRecord(
            attempt=task.attempt,
            issues=list(outcome.issues),
            probe_loss=outcome.probe_loss,
            change_norm=outcome.change_norm,
        )
        self.verdicts.record_check(task, record)

    # --- redundancy -----------------------------------------------------------------------

    def _vote(
        self, memory: VerifyMemory, view: RoundView, original: TaskRecord, dups: list[TaskRecord]
    ) -> bool:
        """True when the original is vouched for by the vote (redundancy.py)."""
        others, pending, owners = [], False, {self._owner(original)}
        for dup in dups:
            if dup.state in ("queued", "leased"):
                pending = True
            elif dup.state in ("verifying", "accepted"):
                if dup.check() is None:
                    if dup.state == "accepted":  # a trusted run: its probe loss is still needed
                        self._check(memory, view, dup)
                    pending = True
                elif self._passes(dup, view) and self._owner(dup) not in owners:
                    owners.add(self._owner(dup))  # one vote per owner (lease.lua sees to it)
                    others.append(dup)
        ballots = [self._ballot(t) for t in [original, *others]]
        cosines = self._cosines(memory, view, [original, *others])
        if cosines is None:
            return False
        vote = redundancy.decide(ballots[0], ballots[1:], self._agreement(view, cosines))
        if vote.need_run:
            if pending:
                return False
            if len(dups) < MAX_DUPLICATES:
                self.verdicts.enqueue_duplicate(original, len(dups) + 1)
                return False
            # Every duplicate spent and no two runs agree: nobody can tell who is right, so
            # the original is run again (no strike), by an owner with no run of it yet.
            self.verdicts.reject(
                original,
                f"no two of its {len(ballots)} runs agree; trained again",
                strike=False,
                cause="redundancy",
            )
            self.state.emit(view.job_id, "redundancy_rerun", task_id=original.task_id)
            return False
        for task_id in vote.accept:
            self.verdicts.accept(_find(others, task_id))
        for task_id in vote.reject:
            self.verdicts.reject(
                _find(others, task_id),
                f"outvoted by the other runs of {original.task_id}",
                cause="redundancy",
            )
        if vote.original is False and vote.winner is not None:
            winner = self.state.get_task(vote.winner)
            if winner.state == "accepted":
                self.verdicts.adopt(
                    original,
                    winner,
                    "outvoted: its duplicates' results agree with each other, not with it",
                )
            return False
        return bool(vote.original)

    def _agreement(
        self, view: RoundView, cosines: dict[frozenset[Key], float]
    ) -> Callable[[Ballot, Ballot], bool]:
        def agrees(a: Ballot, b: Ballot) -> bool:
            return redundancy.agree(
                a,
                b,
                cosines[redundancy.pair(a, b)],
                loss_tolerance=view.trust.redundancy_loss_tolerance,
                min_cosine=view.trust.redundancy_min_cosine,
                norm_tolerance=view.trust.redundancy_norm_tolerance,
            )

        return agrees

    def _ballot(self, task: TaskRecord) -> Ballot:
        check = task.check()
        return Ballot(
            task.task_id,
            task.attempt,
            task.state == "verifying",
            check.probe_loss if check else None,
            check.change_norm if check else None,
            self._owner(task),
        )

    def _against_accepted(
        self, memory: VerifyMemory, view: RoundView, original: TaskRecord, dup: TaskRecord
    ) -> None:
        """A duplicate's result once its original is accepted: it must agree with it."""
        if original.check() is None:
            self._check(memory, view, original)
            return
        cosines = self._cosines(memory, view, [original, dup])
        if cosines is None:
            return
        if self._agreement(view, cosines)(self._ballot(original), self._ballot(dup)):
            self.verdicts.accept(dup)
        else:
            self.verdicts.reject(
                dup,
                f"disagrees with the accepted result of {original.task_id}",
                cause="redundancy",
            )

    def _cosines(
        self, memory: VerifyMemory, view: RoundView, tasks: list[TaskRecord]
    ) -> dict[frozenset[Key], float] | None:
        """The cosine of every pair's changes; None while one is still being computed."""
        missing = False
        for i, first in enumerate(tasks):
            for second in tasks[i + 1 :]:
                key = frozenset(((first.task_id, first.attempt), (second.task_id, second.attempt)))
                if key in memory.cosines:
                    continue
                missing = True
                handle = memory.compares.get(key)
                if handle is None:
                    request = CompareRequest(
                        first=weights_of(first),
                        second=weights_of(second),
                        layout=layout_of(first),
                        start=start_of(first),
                        work_dir=str(self.work_dir / view.job_id),
                        store=self.store_config,
                    )
                    memory.compares[key] = self.pool.submit_call(compare_uploads, request)
                    continue
                done, cosine, error = self.pool.poll(handle)
                if done:
                    del memory.compares[key]
                    if error is None:
                        memory.cosines[key] = float(cosine)
                    else:
                        log.warning("job %s: comparing %s failed: %s", view.job_id, key, error)
        return None if missing else memory.cosines

    # --- the round review -------------------------------------------------------------------

    def _review(self, memory: VerifyMemory, view: RoundView, vouched: set[str]) -> None:
        originals = [t for t in self._tasks(view) if t.duplicate_of is None]
        if any(t.state not in ("accepted", "verifying") for t in originals):
            return
        waiting = [t for t in originals if t.state == "verifying"]
        if not waiting or any(t.task_id not in vouched for t in waiting):
            return
        signature = tuple((t.task_id, t.attempt) for t in originals)
        handle = memory.reviews.get(signature)
        if handle is None:
            request = ReviewRequest(
                uploads=tuple(weights_of(t) for t in originals),
                layout=layout_of(originals[0]),
                start=start_of(originals[0]),
                work_dir=str(self.work_dir / view.job_id),
                store=self.store_config,
            )
            memory.reviews[signature] = self.pool.submit_call(review_uploads, request)
            return
        done, flags, error = self.pool.poll(handle)
        if not done:
            return
        del memory.reviews[signature]
        if error is not None:
            log.warning(
                "job %s: reviewing trial %d round %d failed: %s",
                view.job_id,
                view.trial,
                view.round,
                error,
            )
            return
        for index, task in enumerate(originals):
            found = flags.get(index)
            if task.state != "verifying":
                if found:
                    log.warning("job %s: trusted %s flagged: %s", view.job_id, task.task_id, found)
                continue
            if found:
                self.verdicts.reject(task, "round review: " + "; ".join(found), cause="review")
            else:
                cancel = [duplicate_id(task.task_id, k) for k in range(1, MAX_DUPLICATES + 1)]
                self.verdicts.accept(task, cancel=cancel)

    # --- helpers ----------------------------------------------------------------------------

    def _tasks(self, view: RoundView) -> list[TaskRecord]:
        return self.state.tasks_for(view.job_id, view.trial, view.round)

    def _owner(self, task: TaskRecord) -> str:
        result = task.result()
        if result is not None and result.owner:
            return result.owner
        return self.verdicts.owner_of(result.worker_id if result else task.worker_id or "")

    def _request(self, view: RoundView, task: TaskRecord) -> CheckRequest:
        return CheckRequest(
            weights=weights_of(task),
            layout=layout_of(task),
            start=start_of(task),
            probe=ProbeSetup(view.eval_setup(task.task_json), view.trust.probe_rows),
            store=self.store_config,
            budget=budget_of(task, lambda: self.state.get_job(task.job_id).manifest_json),
        )


def _find(tasks: list[TaskRecord], task_id: str) -> TaskRecord:
    return next(t for t in tasks if t.task_id == task_id)
