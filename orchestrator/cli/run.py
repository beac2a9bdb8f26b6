"""`cotune run`: the main job on one machine, with everything embedded.

    cotune run examples/tiny/sweep.yaml --out out/tiny [--workers N]

It validates the spec, brings the embedded stack up (Redis, S3) and the coordinator with
it (Ray, the API, the reconciler, N local workers: orchestrator/runtime/coordinator.py), submits
the spec through the API like `cotune submit` would, shows live progress (trials, rounds,
losses, workers), downloads the best adapter folder (adapter_config.json,
adapter_model.safetensors, README.md, results.json) into --out and stops everything.

When a `cotune up` already serves this home, `cotune run` submits to it and leaves it
running. Ctrl-C stops the run; the job stays in the home's Redis, and the next `cotune up`
on that home carries on with it.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from pathlib import Path

from cotune.orchestrator.protocol.spec import SpecError, SweepSpec, load_spec
from cotune.orchestrator.settings import Settings
from rich.console import Console
from rich.markup import escape
from rich.table import Table

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_INTERRUPTED = 0, 1, 2, 130


def run_command(
    spec_path: Path, out: Path, settings: Settings, *, workers: int | None = None
) -> int:
    """Run the sweep at `spec_path`; return the process exit code."""
    console, err = Console(highlight=False), Console(stderr=True)
    try:
        spec = load_spec(spec_path)
    except SpecError as exc:
        for issue in exc.errors:
            err.print(f"[red]{escape(str(issue))}[/red]", soft_wrap=True)
        err.print(f"{len(exc.errors)} error(s) in {escape(str(spec_path))}; nothing was run")
        return EXIT_INVALID
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        err.print(f"[red]--out {escape(str(out))} exists and is not an empty folder[/red]")
        return EXIT_INVALID
    try:
        return _run(spec_path, spec, out, settings, workers, console)
    except KeyboardInterrupt:
        err.print(
            f"stopped. The job stays in {escape(str(settings.home))}: `cotune up --home "
            f"{escape(str(settings.home))}` carries on with it"
        )
        return EXIT_INTERRUPTED


def _run(
    spec_path: Path,
    spec: SweepSpec,
    out: Path,
    settings: Settings,
    workers: int | None,
    console: Console,
) -> int:
    # Heavy modules load only once the input is known to be good.
    from cotune.orchestrator.cli.client import ApiError, CotuneClient, discover_url
    from cotune.orchestrator.cli.progress import JobWatch
    from cotune.orchestrator.control.tokens import load_or_create_admin_token
    from cotune.orchestrator.protocol.spec.checks import effective_trials
    from cotune.orchestrator.runtime.coordinator import status_page_hint
    from cotune.orchestrator.runtime.stack import StackError

    began = time.monotonic()
    err = Console(stderr=True)
    with ExitStack() as running:
        try:
            url = discover_url(settings.home) if settings.embedded else None
            if url is not None:
                console.print(f"using the coordinator already running at {url}")
                token = settings.admin_token or load_or_create_admin_token(settings.home)
            else:
                url, token = _start(settings, workers, console, running)
            console.print(f"status page {escape(status_page_hint(url, settings))}", soft_wrap=True)
            client = running.enter_context(CotuneClient(url, token))
            job_id = client.submit(spec_path)
            console.print(f"submitted job [bold]{job_id}[/]")
            watch = JobWatch(client, job_id, rounds=spec.rounds, n_trials=effective_trials(spec))
            job = watch.run(console)
            if job.state != "succeeded":
                err.print(f"[red]job {job_id} {job.state}[/]: {escape(job.error or '')}")
                return EXIT_FAILED
            files = client.download(job_id, out)
            trials = client.trials(job_id)
        except (ApiError, StackError, RuntimeError, OSError) as exc:
            err.print(f"[red]error:[/] {escape(str(exc))}", soft_wrap=True)
            return EXIT_FAILED
        console.print("stopping ...")
    _print_summary(console, job_id, trials, job.best_trial, files, time.monotonic() - began)
    return EXIT_OK


def _start(
    settings: Settings, workers: int | None, console: Console, running: ExitStack
) -> tuple[str, str]:
    """Bring up the stack (when embedded) and the coordinator; their URL and admin token."""
    from cotune.orchestrator.runtime.coordinator import CoordinatorService
    from cotune.orchestrator.runtime.stack import EmbeddedStack, settings_for_stack

    if settings.embedded:
        console.print(f"starting the embedded stack under {escape(str(settings.home))} ...")
        info = running.enter_context(EmbeddedStack(settings.home, settings.s3_bucket))
        settings = settings_for_stack(info, settings)
        console.print(f"stack ready in {info.startup_s:.1f} s: s3 {info.s3_endpoint}")
    console.print("starting the coordinator (Ray, API, workers) ...")
    service = running.enter_context(CoordinatorService(settings, workers=workers, api_port=0))
    count = service.pool.agent_cap()
    console.print(f"coordinator ready at {service.url} with up to {count} local worker(s)")
    return service.url, service.admin_token


def _print_summary(
    console: Console,
    job_id: str,
    trials: list,  # list[TrialView]
    best: int | None,
    files: list[Path],
    seconds: float,
) -> None:
    from cotune.orchestrator.cli.progress import format_params

    table = Table(title=f"job {job_id}: trials", title_justify="left")
    for column in ("trial", "state", "eval loss per round", "params"):
        table.add_column(column)
    for t in trials:
        mark = " (best)" if t.number == best else ""
        losses = " ".join(f"{x:.4f}" for x in t.eval_losses) or "-"
        table.add_row(f"{t.number}{mark}", t.state, losses, escape(format_params(t.params)))
    console.print(table)
    for path in files:
        console.print(f"  {escape(str(path))}  {path.stat().st_size:,} bytes")
    console.print(
        f"done in {seconds:.0f} s: the best adapter (trial {best}) is in {files[0].parent}"
    )
