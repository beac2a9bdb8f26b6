"""Live progress of one job for `cotune run`: trials, rounds, losses, workers, a progress bar.

Fed by the API through `CotuneClient` (job, trials, workers, events). On a terminal it is a
rich Live view redrawn every second; elsewhere (CI logs, tests) it prints one line per
event that matters (a trial started, a round evaluated, a trial finished, a task failed).

    watch = JobWatch(client, job_id, rounds=2, n_trials=4)
    final = watch.run(console)    # returns the finished JobDetail
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cotune.orchestrator.protocol.states import TERMINAL_JOB_STATES
from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

if TYPE_CHECKING:
    from cotune.orchestrator.cli.client import CotuneClient
    from cotune.orchestrator.protocol.admin import EventBody, JobDetail, TrialView, WorkerView

TERMINAL = TERMINAL_JOB_STATES
SHOWN_EVENTS = {
    "job_state",
    "sharding_started",
    "base_model_staged",
    "dataset_sharded",
    "data_fit",
    "trial_started",
    "round_evaluated",
    "trial_finished",
    "task_failed",
    "lease_expired",
    "merge_failed",
    "coordinator_error",
}


def describe_event(event: EventBody) -> str:
    """One line for an event, as a person reads it."""
    d = event.data
    kind = event.kind
    if kind == "job_state":
        extra = f": {d['error']}" if d.get("error") else ""
        return f"job {d.get('from')} -> {d.get('to')}{extra}"
    if kind == "sharding_started":
        staging = f"staging {d['staging']}, then " if d.get("staging") else ""
        return f"{staging}sharding {d.get('dataset')} into {d.get('shards')} shard(s)"
    if kind == "dataset_sharded":
        how = "manifest reused" if d.get("reused") else f"{d.get('seconds', 0):.1f} s"
        return (
            f"dataset sharded: {d.get('rows')} training rows in {d.get('shards')} shard(s), "
            f"{d.get('eval_rows')} eval rows ({how})"
        )
    if kind == "data_fit":
        rows = d.get("rows") or 0
        line = (
            f"data fit at sequence_len {d.get('sequence_len')}: {d.get('rows_cut')} of {rows} "
            f"{d.get('measured_on')} rows cut, {d.get('rows_dropped')} dropped"
        )
        return line + (f" (warning: {d['warning']})" if d.get("warning") else "")
    if kind == "base_model_staged":
        return f"base model staged as {d.get('key')} ({d.get('bytes', 0) / 1e6:.1f} MB)"
    if kind == "trial_started":
        return f"trial {d.get('trial')} started: {format_params(d.get('params') or {})}"
    if kind == "round_evaluated":
        return f"trial {d.get('trial')} round {d.get('round')}: eval loss {d.get('eval_loss'):.4f}"
    if kind == "trial_finished":
        extra = f" ({d['error']})" if d.get("error") else ""
        return f"trial {d.get('trial')} {d.get('state')}{extra}"
    return f"{kind}: " + ", ".join(f"{k}={v}" for k, v in d.items())


def format_params(params: dict[str, Any]) -> str:
    """Search parameters in one short line: `lora_r=8 learning_rate=0.00859`."""
    parts = []
    for key, value in sorted(params.items()):
        short = key.split(".")[-1]
        shown = f"{value:.3g}" if isinstance(value, float) else json.dumps(value)
        parts.append(f"{short}={shown}")
    return " ".join(parts)


@dataclass
class JobWatch:
    client: CotuneClient
    job_id: str
    rounds: int
    n_trials: int
    interval_s: float = 1.0
    recent: list[str] = field(default_factory=list)
    _cursor: str | None = None

    def units_done(self, trials: list[TrialView]) -> int:
        """Rounds done, a finished trial counting all its rounds (pruning saves the rest)."""
        return sum(
            self.rounds if t.state != "running" else min(t.rounds_done, self.rounds) for t in trials
        )

    def _new_events(self) -> list[EventBody]:
        news = list(self.client.events(self.job_id, follow=False, after=self._cursor))
        if news:
            self._cursor = news[-1].id
        return [e for e in news if e.kind in SHOWN_EVENTS]

    def view(self, job: JobDetail, trials: list[TrialView], workers: list[WorkerView]) -> Group:
        table = Table(title=f"job {job.job_id}: {job.state}", title_justify="left", expand=False)
        for column in ("trial", "params", "state", "rounds", "eval loss per round", "tasks"):
            table.add_column(column)
        for t in trials:
            losses = " ".join(f"{x:.4f}" for x in t.eval_losses) or "-"
            tasks = " ".join(
                f"s{k.shard}{'+' if k.duplicate_of else ''}:{k.state}"
                + (f" {k.step}/{k.max_steps}" if k.state == "leased" else "")
                for k in t.tasks
            )
            table.add_row(
                str(t.number),
                escape(format_params(t.params)),
                t.state,
                f"{t.rounds_done}/{self.rounds}",
                losses,
                escape(tasks) if t.state == "running" else "",
            )
        bar = Progress(TextColumn("rounds"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        bar.add_task("rounds", total=self.rounds * self.n_trials, completed=self.units_done(trials))
        busy = sum(1 for w in workers if w.leases)
        names = ", ".join(sorted({w.name for w in workers})) or "none yet"
        lines = [f"workers: {len(workers)} enrolled ({busy} training): {escape(names)}"]
        lines += [f"  {escape(line)}" for line in self.recent[-5:]]
        return Group(table, bar, *lines)

    def run(self, console: Console) -> JobDetail:
        """Follow the job until it ends; its final JobDetail."""
        if not console.is_terminal:
            return self._run_plain(console)
        with Live(console=console, auto_refresh=False) as live:
            while True:
                job = self.client.job(self.job_id)
                trials = self.client.trials(self.job_id)
                workers = self.client.workers()
                self.recent += [describe_event(e) for e in self._new_events()]
                live.update(self.view(job, trials, workers), refresh=True)
                if job.state in TERMINAL:
                    return job
                time.sleep(self.interval_s)

    def _run_plain(self, console: Console) -> JobDetail:
        started = time.monotonic()
        while True:
            job = self.client.job(self.job_id)
            for event in self._new_events():
                console.print(
                    f"[{time.monotonic() - started:6.1f}s] {escape(describe_event(event))}"
                )
            if job.state in TERMINAL:
                return job
            time.sleep(self.interval_s)
