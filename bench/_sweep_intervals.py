"""The tiny sweep's record as intervals on one time axis, for bench/endtoend.py.

`SweepIntervals(record, logs, sampled)` turns what bench/_sweep_record.py gathered (the
job's events, tasks, merges, the worker logs, the sampler's observations) into
bench/_timeline.py `Interval`s of the five categories (training, merge, evaluation, waiting,
orchestration), each labelled with what went on, plus one row per task attempt, merge and
worker agent with the durations behind them. Which source each interval comes from is
bench/endtoend.py's docstring; times in rows are seconds after the job's `job_created`.
"""

from __future__ import annotations

from typing import Any

from bench._sweep_record import Sampled, WorkerLog
from bench._timeline import Interval

# Events that end a lease other than by an accepted result.
ENDS = {"task_rejected", "task_attempt_failed", "task_released", "lease_expired", "lease_revoked"}


class SweepIntervals:
    """The sweep's intervals (bench/_timeline.py) from the record, logs and samples, and
    the per-task and per-merge rows behind them."""

    def __init__(self, record: dict[str, Any], logs: list[WorkerLog], seen: Sampled) -> None:
        self.record, self.logs, self.seen = record, logs, seen
        self.events = sorted(record["events"], key=lambda e: e["time"])
        self.intervals: list[Interval] = []
        self.later: list[Interval] = []  # labels that only apply where nothing above does
        self.notes: list[str] = []
        self.tasks: list[dict[str, Any]] = []
        self.merges: list[dict[str, Any]] = []
        self.workers: list[dict[str, Any]] = []
        self.base_eval: dict[str, Any] = {}
        self.by_round: dict[tuple[int, int], list[str]] = {}
        for t in record["tasks"]:
            if t["duplicate_of"] is None:
                self.by_round.setdefault((t["trial"], t["round"]), []).append(t["task_id"])
        self.created = self._first("job_created")
        self.running = self._first("job_state", to="running")
        self.finished = self._first("job_state", to=record["state"])
        self.queued: dict[str, list[float]] = {}
        for e in self._all("task_queued"):
            self.queued.setdefault(e["data"]["task_id"], []).append(e["time"])
        # Labels of one category rank in the order added: what workers do first, the job's
        # own transitions last.
        self._workers()
        self._tasks()
        self._merges()
        self._base_eval()
        self._job()

    def _all(self, kind: str, **match: Any) -> list[dict[str, Any]]:
        return [
            e
            for e in self.events
            if e["kind"] == kind and all(e["data"].get(k) == v for k, v in match.items())
        ]

    def _first(self, kind: str, **match: Any) -> float:
        found = self._all(kind, **match)
        if not found:
            raise RuntimeError(f"no {kind} event {match or ''} in the job's record")
        return float(found[0]["time"])

    def add(self, start: float | None, end: float | None, category: str, label: str) -> None:
        if start is not None and end is not None and end > start:
            self.intervals.append(Interval(start, end, category, label))

    def _first_queued(self, task_ids: list[str], after: float = 0.0) -> float | None:
        times = [t for i in task_ids for t in self.queued.get(i, []) if t >= after]
        return min(times) if times else None

    # --- the parts --------------------------------------------------------------------

    def _job(self) -> None:
        first = min(t for ts in self.queued.values() for t in ts)
        self.add(self.created, self.running, "orchestration", "job start: shard the dataset")
        self.add(self.running, first, "orchestration", "job start: ask trials, queue tasks")
        merged = [e["time"] for e in self._all("round_merged")]
        self.add(max(merged, default=first), self.finished, "orchestration", "job end: export")
        for e in self._all("trial_started"):
            if e["time"] <= first:
                continue
            ended = [f["time"] for f in self._all("trial_finished") if f["time"] <= e["time"]]
            ids = [
                i for (t, _), ids in self.by_round.items() if t == e["data"]["trial"] for i in ids
            ]
            self.add(
                max(ended, default=e["time"]),
                self._first_queued(ids),
                "orchestration",
                "reconciler: next trial asked and queued",
            )

    def _workers(self) -> None:
        queued = sorted(t for ts in self.queued.values() for t in ts)
        for log in self.logs:
            if log.started_at is None:
                continue
            launch = max((t for t in queued if t <= log.started_at), default=self.created)
            ready = log.enrolled_at or log.started_at
            first = min((task["got_at"] for task in log.tasks.values()), default=None)
            self.add(launch, ready, "waiting", "worker start-up: Ray actor, process, enroll")
            self.add(ready, first, "orchestration", "worker: first lease")
            self.workers.append(
                {
                    "name": log.name,
                    "launched_at": launch - self.created,
                    "start_up_s": ready - launch,
                    "tasks": len(log.tasks),
                    "warnings": log.warnings[:20],
                }
            )

    def _tasks(self) -> None:
        logged = {key: (log, entry) for log in self.logs for key, entry in log.tasks.items()}
        firsts = {
            (log.name, min(log.tasks.values(), key=lambda x: x["got_at"])["got_at"])
            for log in self.logs
            if log.tasks
        }
        records = {t["task_id"]: t for t in self.record["tasks"]}
        accepted = {
            (e["data"]["task_id"], e["data"]["attempt"]): e["time"]
            for e in self._all("task_accepted")
        }
        ended = {
            (e["data"]["task_id"], e["data"].get("attempt")): e["time"]
            for e in self.events
            if e["kind"] in ENDS
        }
        for e in self._all("task_leased"):
            task_id, attempt, leased = e["data"]["task_id"], int(e["data"]["attempt"]), e["time"]
            queued = max((t for t in self.queued.get(task_id, []) if t <= leased), default=None)
            self.later.append(
                Interval(queued or leased, leased, "orchestration", "task queued, not leased")
            )
            task = records.get(task_id, {})
            runtime = task.get("metrics", {}).get("train_runtime_s")
            done = accepted.get((task_id, attempt))
            log, entry = logged.get((task_id, attempt), (None, {}))
            row: dict[str, Any] = {
                "task_id": task_id,
                "attempt": attempt,
                "worker": log.name if log else None,
                "queued_at": None if queued is None else queued - self.created,
                "lease_wait_s": None if queued is None else leased - queued,
            }
            if done is None or runtime is None or task.get("attempt") != attempt:
                end = ended.get((task_id, attempt), entry.get("ended_at"))
                self.add(leased, end, "orchestration", "an attempt that did not complete")
                self.tasks.append({**row, "outcome": "not completed"})
                continue
            inputs = entry.get("inputs_at", entry.get("got_at", leased))
            train_end = entry.get("upload_at", done)
            train_start = max(train_end - runtime, inputs)
            post_end = max(done, entry.get("ended_at", done))
            if not entry:
                self.notes.append(f"{task_id}: no worker log lines; timed from events only")
            first = log is not None and (log.name, entry.get("got_at")) in firsts
            setup = (
                "worker: first task setup (imports, build the model)"
                if first
                else "worker: task setup (load model and data)"
            )
            self.add(leased, inputs, "orchestration", "worker: lease answer, fetch inputs")
            self.add(inputs, train_start, "waiting", setup)
            self.add(train_start, train_end, "training", "worker: training steps")
            self.add(train_end, post_end, "orchestration", "worker: upload, complete")
            self.tasks.append(
                {
                    **row,
                    "outcome": "accepted",
                    "leased_at": leased - self.created,
                    "fetch_s": inputs - leased,
                    "setup_s": train_start - inputs,
                    "train_s": runtime,
                    "upload_complete_s": post_end - train_end,
                    "leased_to_done_s": post_end - leased,
                }
            )

    def _merges(self) -> None:
        durations = self._merge_durations()
        accepted = {e["data"]["task_id"]: e["time"] for e in self._all("task_accepted")}
        for m in sorted(self.record["merges"], key=lambda m: m["merged_at"]):
            where = (m["trial"], m["round"])
            ids = self.by_round.get(where, [])
            round_done = max((accepted[i] for i in ids if i in accepted), default=None)
            claimed = m["claimed_at"] or self.seen.claims.get(where) or round_done
            seen = self.seen.evals.get(where)
            end = (seen[0] + seen[1]) / 2 if seen else m["merged_at"]
            end = min(end, m["merged_at"])
            merge_s, eval_s, how = durations.get(where, (0.0, 0.0, "missing"))
            inner = min(m["evaluate_seconds"] or 0.0, eval_s)
            start = end - merge_s - eval_s
            if claimed is not None and start < claimed - 0.25:
                self.notes.append(
                    f"merge t{where[0]} r{where[1]}: its seconds start {claimed - start:.2f} s "
                    "before its claim; the claim is taken as the start"
                )
            next_ids = self.by_round.get((where[0], where[1] + 1), [])
            finish = self._all("trial_finished", trial=where[0])
            follow = self._first_queued(next_ids, m["merged_at"])
            if follow is None and finish:
                follow = finish[0]["time"]
            self.add(round_done, claimed, "orchestration", "reconciler: round complete, claim it")
            self.add(claimed, start, "orchestration", "Ray: schedule and start the merge task")
            self.add(start, start + merge_s, "merge", "merge: download, merge, upload")
            self.add(start + merge_s, end - inner, "evaluation", "evaluate: process start, imports")
            self.add(end - inner, end, "evaluation", "evaluate: load the model, score")
            self.add(end, m["merged_at"], "orchestration", "reconciler: poll and record the merge")
            self.add(
                m["merged_at"],
                follow,
                "orchestration",
                "reconciler: next round queued or trial ended",
            )
            self.merges.append(
                {
                    "trial": where[0],
                    "round": where[1],
                    "round_done_at": None if round_done is None else round_done - self.created,
                    "claim_after_s": None if round_done is None else claimed - round_done,
                    "dispatch_s": start - claimed if claimed is not None else None,
                    "merge_s": merge_s,
                    "eval_s": eval_s,
                    "evaluate_inner_s": inner,
                    "record_after_s": m["merged_at"] - end,
                    "next_after_s": None if follow is None else follow - m["merged_at"],
                    "durations_from": how,
                    "end_from": "eval.json seen by the sampler" if seen else "round_merged event",
                }
            )

    def _merge_durations(self) -> dict[tuple[int, int], tuple[float, float, str]]:
        """Each merge's (merge_s, eval_s, how known): the sampled histogram increments, given
        in order to the merges recorded by then; the rest of the histograms' sums shared
        evenly by merges no increment reached."""
        merges = sorted(self.record["merges"], key=lambda m: m["merged_at"])
        out: dict[tuple[int, int], tuple[float, float, str]] = {}
        waiting = list(merges)
        for _, at, count, merge_s, eval_s in self.seen.increments:
            ready = [m for m in waiting if m["merged_at"] <= at + 0.05][:count]
            for m in ready:
                how = "sampled" if count == 1 else f"sampled, shared by {count}"
                out[(m["trial"], m["round"])] = (merge_s / count, eval_s / count, how)
                waiting.remove(m)
        if waiting:
            totals = self.record["histograms"]
            merge_left = totals["merge"][1] - sum(v[0] for v in out.values())
            eval_left = totals["eval"][1] - sum(v[1] for v in out.values())
            n = len(waiting)
            for m in waiting:
                out[(m["trial"], m["round"])] = (
                    max(merge_left, 0.0) / n,
                    max(eval_left, 0.0) / n,
                    f"histogram sum shared by {n}",
                )
            self.notes.append(
                f"{n} merge(s) not sampled: their seconds are the histograms' rest, shared"
            )
        return out

    def _base_eval(self) -> None:
        inner = self.record["base_eval_seconds"] or 0.0
        seen = self.seen.base_eval
        if seen is not None:
            end, source = (seen[0] + seen[1]) / 2, "base_eval.json seen by the sampler"
        else:
            end, source = self.running + inner, "eval seconds only (not sampled)"
            self.notes.append("the base model's evaluation end was not sampled")
        self.add(self.running, end - inner, "evaluation", "base model: dispatch, process, imports")
        self.add(end - inner, end, "evaluation", "base model: load the model, score")
        self.base_eval = {"span_s": end - self.running, "inner_s": inner, "end_from": source}
