"""The job commands of the CLI: submit, status, results, download, cancel, jobs, workers,
leaderboard, token create/list/revoke. Each talks to the coordinator's API through CotuneClient.

Where the coordinator is: --coordinator URL, else COTUNE_COORDINATOR, else the API serving
the embedded stack of the home (`<home>/api.json`, written by `cotune up`). The admin token:
--token, else COTUNE_ADMIN_TOKEN, else `<home>/admin-token`.

    cotune submit examples/tiny/sweep.yaml
    cotune status tiny-1a2b3c4d --watch
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cotune.orchestrator.cli.client import ApiError, CotuneClient, discover_url
from cotune.orchestrator.protocol.admin import EventBody, JobDetail, TrialView
from cotune.orchestrator.protocol.spec import SpecError
from cotune.orchestrator.protocol.states import TERMINAL_JOB_STATES
from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

EXIT_ERROR = 1
EXIT_INVALID = 2
TERMINAL = TERMINAL_JOB_STATES
_STATE_STYLE = {
    "succeeded": "green",
    "complete": "green",
    "accepted": "green",
    "failed": "red",
    "cancelled": "yellow",
    "pruned": "yellow",
    "running": "cyan",
    "leased": "cyan",
    "verifying": "magenta",
}


@dataclass(frozen=True)
class Connection:
    """The --coordinator, --token and --home options as given (None: not given)."""

    coordinator: str | None = None
    token: str | None = None
    home: Path | None = None


class CliError(Exception):
    """A problem before any request: the message says what to pass or set."""


def connect(conn: Connection) -> CotuneClient:
    from cotune.orchestrator.control.tokens import read_admin_token
    from cotune.orchestrator.settings import Settings

    try:
        settings = Settings.from_env(home=conn.home)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    url = conn.coordinator or settings.coordinator_url or discover_url(settings.home)
    if not url:
        raise CliError(
            "no coordinator: pass --coordinator URL or set COTUNE_COORDINATOR "
            f"(no running `cotune up` found under {settings.home})"
        )
    token = conn.token or settings.admin_token or read_admin_token(settings.home)
    if not token:
        raise CliError(
            "no admin token: pass --token or set COTUNE_ADMIN_TOKEN "
            f"(no {settings.home / 'admin-token'} either)"
        )
    return CotuneClient(url, token)


def run(conn: Connection, action: Callable[[CotuneClient, Console], int]) -> int:
    """Connect, run `action`, and turn every failure into a message and an exit code."""
    err = Console(stderr=True, soft_wrap=True, highlight=False)
    try:
        with connect(conn) as client:
            return action(client, Console(soft_wrap=True, highlight=False))
    except CliError as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}")
        return EXIT_ERROR
    except SpecError as exc:
        for issue in exc.errors:
            err.print(f"[red]{escape(str(issue))}[/]")
        return EXIT_INVALID
    except ApiError as exc:
        for field, message in exc.issues:
            err.print(f"[red]{escape(field)}: {escape(message)}[/]")
        if not exc.issues:
            err.print(f"[red]error:[/] {escape(str(exc))}")
        else:
            err.print(f"{len(exc.issues)} problem(s); nothing was submitted")
        return EXIT_INVALID if exc.code == "invalid_request" else EXIT_ERROR


# --- commands -----------------------------------------------------------------------------


def submit_command(spec: Path, conn: Connection) -> int:
    def action(client: CotuneClient, out: Console) -> int:
        job_id = client.submit(spec)
        out.print(f"submitted [bold]{job_id}[/]; follow it with: cotune status {job_id} --watch")
        return 0

    return run(conn, action)


def status_command(job_id: str, conn: Connection, watch: bool, interval_s: float = 2.0) -> int:
    def action(client: CotuneClient, out: Console) -> int:
        if not watch:
            out.print(status_view(client.job(job_id), client.trials(job_id), []))
            return 0
        return _watch(client, out, job_id, interval_s)

    return run(conn, action)


def _watch(client: CotuneClient, out: Console, job_id: str, interval_s: float) -> int:
    recent: list[EventBody] = []
    cursor: str | None = None
    with Live(console=out, auto_refresh=False, transient=False) as live:
        try:
            while True:
                job, trials = client.job(job_id), client.trials(job_id)
                news = [e for e in client.events(job_id, follow=False, after=cursor)]
                if news:
                    cursor = news[-1].id
                    recent = (recent + [e for e in news if e.kind != "progress"])[-6:]
                live.update(status_view(job, trials, recent), refresh=True)
                if job.state in TERMINAL:
                    return 0 if job.state == "succeeded" else EXIT_ERROR
                time.sleep(interval_s)
        except KeyboardInterrupt:
            return 0


def results_command(job_id: str, conn: Connection) -> int:
    def action(client: CotuneClient, out: Console) -> int:
        out.print(results_table(job_id, client.trials(job_id)))
        return 0

    return run(conn, action)


def download_command(job_id: str, out_dir: Path, conn: Connection) -> int:
    def action(client: CotuneClient, out: Console) -> int:
        files = client.download(job_id, out_dir)
        for path in files:
            out.print(f"  {escape(str(path))}  {path.stat().st_size:,} bytes")
        out.print(f"downloaded {len(files)} file(s) of the best adapter of {job_id}")
        return 0

    return run(conn, action)


def cancel_command(job_id: str, conn: Connection) -> int:
    def action(client: CotuneClient, out: Console) -> int:
        job = client.cancel(job_id)
        out.print(f"job {job.job_id} is {job.state}; running tasks stop at their next heartbeat")
        return 0

    return run(conn, action)


def jobs_command(conn: Connection) -> int:
    def action(client: CotuneClient, out: Console) -> int:
        table = Table(title="jobs", title_justify="left")
        for column in ("job", "state", "trials", "tasks done", "created", "error"):
            table.add_column(column)
        for job in client.jobs():
            table.add_row(
                job.job_id,
                _state(job.state),
                str(job.trials),
                f"{job.tasks.accepted}/{job.tasks.total}",
                _when(job.created_at),
                escape(job.error or ""),
            )
        out.print(table)
        return 0

    return run(conn, action)


def workers_command(conn: Connection) -> int:
    def action(client: CotuneClient, out: Console) -> int:
        table = Table(title="workers", title_justify="left")
        for column in (
            "worker",
            "name",
            "kind",
            "hardware",
            "last seen",
            "tokens",
            "tasks",
            "leases",
        ):
            table.add_column(column)
        now = time.time()
        for w in client.workers():
            gpus = ", ".join(f"{g.name} {g.memory_bytes / 1e9:.0f} GB" for g in w.gpus)
            table.add_row(
                w.worker_id,
                escape(w.name),
                w.kind,
                escape(gpus or f"CPU, {w.memory_bytes / 1e9:.0f} GB RAM"),
                f"{max(now - w.last_seen, 0):.0f} s ago",
                f"{w.tokens:,.0f}",
                f"{w.tasks_accepted} ok, {w.tasks_failed} failed, {w.tasks_expired} expired",
                str(len(w.leases)),
            )
        out.print(table)
        return 0

    return run(conn, action)


def leaderboard_command(conn: Connection) -> int:
    def action(client: CotuneClient, out: Console) -> int:
        table = Table(title="contributors", title_justify="left")
        for column in ("#", "name", "tokens trained", "tasks"):
            table.add_column(column, justify="right" if column != "name" else "left")
        for rank, entry in enumerate(client.leaderboard(), start=1):
            table.add_row(str(rank), escape(entry.name), f"{entry.tokens:,.0f}", str(entry.tasks))
        out.print(table)
        return 0

    return run(conn, action)


def token_create_command(
    conn: Connection,
    join: bool,
    name: str,
    kind: str,
    ttl_s: float | None,
    max_uses: int | None = None,
) -> int:
    if not join:
        Console(stderr=True).print("[red]error:[/] say which token: --join (the only kind today)")
        return EXIT_INVALID

    def action(client: CotuneClient, out: Console) -> int:
        made = client.create_join_token(name=name, kind=kind, ttl_s=ttl_s, max_uses=max_uses)
        expires = f", expires {_when(made.expires_at)}" if made.expires_at else ""
        if made.max_uses is not None:
            expires += f", enrolls at most {made.max_uses} worker(s)"
        out.print(f"join token for [bold]{escape(made.name)}[/] ({made.kind}{expires}):")
        out.print(made.token, markup=False)
        out.print(
            f"A volunteer runs: cotune worker --coordinator {client.url} --join-token {made.token}",
            markup=False,
        )
        return 0

    return run(conn, action)


def token_list_command(conn: Connection) -> int:
    def action(client: CotuneClient, out: Console) -> int:
        table = Table(title="join tokens", title_justify="left")
        for column in ("name", "kind", "created", "expires", "uses", "revoked"):
            table.add_column(column)
        now = time.time()
        for t in client.join_tokens():
            expires = _when(t.expires_at) if t.expires_at else "never"
            if t.expires_at is not None and t.expires_at < now:
                expires += " (expired)"
            uses = f"{t.uses}/{t.max_uses}" if t.max_uses is not None else str(t.uses)
            table.add_row(
                escape(t.name), t.kind, _when(t.created_at), expires, uses, _when(t.revoked_at)
            )
        out.print(table)
        return 0

    return run(conn, action)


def token_revoke_command(conn: Connection, name: str) -> int:
    def action(client: CotuneClient, out: Console) -> int:
        done = client.revoke_join_tokens(name)
        out.print(
            f"revoked {done.tokens} join token(s) named [bold]{escape(done.name)}[/], "
            f"{done.workers} worker token(s) enrolled with them and {done.leases} active "
            "lease(s) (their tasks are queued again)"
        )
        return 0

    return run(conn, action)


# --- views ----------------------------------------------------------------------------------


def fit_line(job: JobDetail, trials: list[TrialView]) -> Text | None:
    """What sequence_len keeps of the rows: the coordinator's count on the eval rows, and the
    counts the workers of the shown tasks reported for their shards."""
    fit = job.data_fit
    if fit is None:
        return None
    whole = fit.rows - fit.rows_cut - fit.rows_dropped
    line = (
        f"data at sequence_len {fit.sequence_len}: of {fit.rows} rows of the "
        f"{fit.measured_on}, {whole} whole, {fit.rows_cut} cut, {fit.rows_dropped} dropped"
    )
    tasks = [t for trial in trials for t in trial.tasks if t.rows_cut is not None]
    if tasks:
        cut = sum(t.rows_cut or 0 for t in tasks)
        dropped = sum(t.rows_dropped or 0 for t in tasks)
        line += f"; {len(tasks)} task(s) report {cut} cut, {dropped} dropped"
    if fit.warning:
        return Text(f"{line}\nwarning: {fit.warning}", style="yellow")
    return Text(line, style="dim")


def status_view(job: JobDetail, trials: list[TrialView], recent: list[EventBody]) -> Group:
    t = job.tasks
    head = Text.from_markup(
        f"job [bold]{job.job_id}[/]  {_state(job.state)}  trials {len(trials)}  tasks: "
        f"{t.accepted} accepted, {t.verifying} verifying, {t.leased} running, {t.queued} queued, "
        f"{t.failed} failed"
        + (f"  best trial {job.best_trial}" if job.best_trial is not None else "")
    )
    parts: list[object] = [head]
    if job.error:
        parts.append(Text(f"error: {job.error}", style="red"))
    fit = fit_line(job, trials)
    if fit is not None:
        parts.append(fit)
    table = Table(title_justify="left", expand=False)
    for column in ("trial", "state", "rounds", "eval loss", "now", "params"):
        table.add_column(column)
    for trial in trials:
        table.add_row(
            str(trial.number),
            _state(trial.state),
            str(trial.rounds_done),
            _losses(trial.eval_losses),
            escape(_progress(trial)),
            escape(_params(trial.params)),
        )
    parts.append(table)
    for event in recent:
        parts.append(Text(f"{_when(event.time)}  {event.kind}  {_brief(event.data)}", style="dim"))
    return Group(*parts)  # type: ignore[arg-type]


def results_table(job_id: str, trials: list[TrialView]) -> Table:
    """Trials ranked by their best eval loss (trials without one last)."""
    table = Table(title=f"job {job_id}: trials by eval loss", title_justify="left")
    for column in ("#", "trial", "state", "best eval loss", "rounds", "params"):
        table.add_column(column)
    ranked = sorted(trials, key=lambda t: (min(t.eval_losses, default=float("inf")), t.number))
    for rank, trial in enumerate(ranked, start=1):
        best = f"{min(trial.eval_losses):.4f}" if trial.eval_losses else "-"
        table.add_row(
            str(rank),
            str(trial.number),
            _state(trial.state),
            best,
            str(trial.rounds_done),
            escape(_params(trial.params)),
        )
    return table


def _state(state: str) -> str:
    style = _STATE_STYLE.get(state)
    return f"[{style}]{state}[/]" if style else state


def _losses(losses: list[float]) -> str:
    shown = [f"{x:.4f}" for x in losses[-3:]]
    return ("... " if len(losses) > 3 else "") + " -> ".join(shown) if shown else "-"


def _progress(trial: TrialView) -> str:
    if not trial.tasks:
        return trial.error or ""
    shards = [t for t in trial.tasks if t.duplicate_of is None]
    done = sum(t.state == "accepted" for t in shards)
    running = [t for t in trial.tasks if t.state == "leased"]
    text = f"round {trial.tasks[0].round}: {done}/{len(shards)} shards"
    verifying = sum(t.state == "verifying" for t in trial.tasks)
    if verifying:
        text += f", {verifying} verifying"
    if running:
        step = sum(t.step for t in running)
        total = sum(t.max_steps for t in running) or 1
        losses = [t.loss for t in running if t.loss is not None]
        text += f", step {step}/{total}" + (f", loss {losses[-1]:.3f}" if losses else "")
    return text


def _params(params: dict[str, object]) -> str:
    return ", ".join(
        f"{k.split('.')[-1]}={v:.3g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
        for k, v in params.items()
    )


def _brief(data: dict[str, object]) -> str:
    return " ".join(f"{k}={v}" for k, v in data.items() if k not in ("params",))[:160]


def _when(stamp: float | None) -> str:
    return datetime.fromtimestamp(stamp).strftime("%Y-%m-%d %H:%M:%S") if stamp else "-"
