"""The `cotune` command line: `cotune --help` lists the commands.

Every command imports its implementation lazily, so `cotune --help` and `cotune validate`
stay light on a submitter's install (no torch, ray or redis). Worker-role commands plug in
through the `cotune.commands` entry-point group (see pyproject.toml).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, entry_points, version
from pathlib import Path
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from cotune.orchestrator.cli.jobs import Connection

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="cotune: distributed community fine-tuning (QLoRA sweeps, exact adapter merging).",
)


def _print_version(given: bool) -> None:
    if given:
        try:
            typer.echo(f"cotune {version('cotune')}")
        except PackageNotFoundError:  # run from a source tree that was never installed
            typer.echo("cotune 0+unknown (not installed: pip install -e .)")
        raise typer.Exit()


@app.callback()
def _main(
    show_version: bool = typer.Option(
        False,
        "--version",
        callback=_print_version,
        is_eager=True,
        help="Print the installed cotune version and exit.",
    ),
) -> None:
    """Options before the command: --version."""


HomeOption = typer.Option(
    None, "--home", help="State folder of the embedded stack [default: ~/.cotune, or $COTUNE_HOME]."
)


@app.command()
def validate(
    spec: Path = typer.Argument(..., help="Sweep spec (YAML) to check."),
    tokenizer: Path | None = typer.Option(
        None,
        "--tokenizer",
        help="A model or tokenizer folder: also show the rows' lengths in tokens and what "
        "training.sequence_len keeps of them (needs the worker extra).",
    ),
    rows: int = typer.Option(10_000, "--rows", min=1, help="Rows measured with --tokenizer."),
) -> None:
    """Check a sweep spec: print the resolved spec and what it implies, or every error (exit 2)."""
    from cotune.orchestrator.cli.validate import validate_command

    raise typer.Exit(validate_command(spec, tokenizer, rows))


WorkersOption = typer.Option(
    None,
    "--workers",
    min=0,
    help="Local workers, started as work arrives [default: one per GPU, or one CPU worker].",
)


@app.command()
def up(
    home: Path | None = HomeOption,
    workers: int | None = WorkersOption,
    stack_only: bool = typer.Option(
        False,
        "--stack-only",
        help="Run only Redis and S3 (restarted if they die); run `cotune coordinator` apart.",
    ),
) -> None:
    """Run the embedded stack (Redis, S3), Ray, the API and local workers until Ctrl-C.

    A Redis or S3 server that dies is restarted from its data on the same port.

    Example: cotune up --home /tmp/cotune --workers 2
    """
    from cotune.orchestrator.runtime.up import run_up
    from cotune.orchestrator.settings import Settings

    raise typer.Exit(run_up(Settings.from_env(home=home), workers, coordinator=not stack_only))


@app.command()
def coordinator(home: Path | None = HomeOption, workers: int | None = WorkersOption) -> None:
    """Run the coordinator alone against external Redis and S3 (COTUNE_REDIS_URL, ...).

    Example: COTUNE_REDIS_URL=redis://... COTUNE_S3_ENDPOINT=https://... cotune coordinator
    """
    from cotune.orchestrator.runtime.coordinator import run_coordinator
    from cotune.orchestrator.settings import Settings

    raise typer.Exit(run_coordinator(Settings.from_env(home=home), workers))


@app.command()
def api(
    home: Path | None = HomeOption,
    processes: int = typer.Option(
        None,
        "--processes",
        min=1,
        help="Server processes sharing the port [default: $COTUNE_API_PROCESSES, or 1].",
    ),
    host: str | None = typer.Option(None, "--host", help="[default: $COTUNE_API_HOST]"),
    port: int | None = typer.Option(
        None, "--port", min=0, max=65535, help="[default: $COTUNE_API_PORT; 0: a free one]"
    ),
) -> None:
    """Run the HTTP API alone (no reconciler) against external Redis and S3: more API
    capacity beside a `cotune coordinator`, as several processes on one port.

    Example: COTUNE_REDIS_URL=redis://... COTUNE_S3_ENDPOINT=https://... cotune api --processes 4
    """
    from cotune.orchestrator.runtime.apiserver import run_api
    from cotune.orchestrator.settings import Settings

    settings = Settings.from_env(home=home)
    raise typer.Exit(run_api(settings, processes or settings.api_processes, host, port))


@app.command()
def run(
    spec: Path = typer.Argument(..., help="Sweep spec (YAML)."),
    out: Path = typer.Option(Path("out"), "--out", help="Folder that receives the results."),
    home: Path | None = HomeOption,
    workers: int | None = WorkersOption,
) -> None:
    """Run a sweep on this machine with the embedded stack, then stop it.

    Shows live progress; the best adapter, its model card and results.json land in --out.

    Example: cotune run examples/tiny/sweep.yaml --out out/tiny
    """
    from cotune.orchestrator.cli.run import run_command
    from cotune.orchestrator.settings import Settings

    raise typer.Exit(run_command(spec, out, Settings.from_env(home=home), workers=workers))


@app.command()
def merge(
    adapters: list[Path] = typer.Argument(..., help="PEFT adapter folders to merge."),
    out: Path = typer.Option(..., "--out", help="Folder for the merged PEFT adapter."),
    method: str = typer.Option("svd", "--method", help="svd | cat | linear | ties | dare"),
    rank: int | None = typer.Option(
        None, "--rank", help="Output rank [default: the inputs' rank]."
    ),
    weights: str | None = typer.Option(
        None, "--weights", help="Comma-separated weights [default: each adapter's trained tokens]."
    ),
    density: float | None = typer.Option(None, "--density", help="ties/dare: fraction kept."),
    seed: int = typer.Option(0, "--seed", help="dare: random seed."),
) -> None:
    """Merge LoRA adapters exactly (svd, cat) or as PEFT does (linear, ties, dare).

    Example: cotune merge a/ b/ --method svd --out merged/
    """
    from cotune.orchestrator.merge.command import merge_command

    raise typer.Exit(
        merge_command(
            adapters, out, method=method, rank=rank, weights=weights, density=density, seed=seed
        )
    )


# --- job commands: they talk to a coordinator's API (orchestrator/cli/jobs.py) -------------

CoordinatorOption = typer.Option(
    None,
    "--coordinator",
    help="Coordinator URL [default: $COTUNE_COORDINATOR, or the `cotune up` of --home].",
)
TokenOption = typer.Option(
    None, "--token", help="Admin token [default: $COTUNE_ADMIN_TOKEN, or <home>/admin-token]."
)


def _conn(coordinator: str | None, token: str | None, home: Path | None) -> Connection:
    from cotune.orchestrator.cli.jobs import Connection

    return Connection(coordinator=coordinator, token=token, home=home)


@app.command()
def submit(
    spec: Path = typer.Argument(..., help="Sweep spec (YAML); its relative paths are resolved."),
    coordinator: str | None = CoordinatorOption,
    token: str | None = TokenOption,
    home: Path | None = HomeOption,
) -> None:
    """Submit a sweep to the coordinator; prints the job id.

    Example: cotune submit examples/tiny/sweep.yaml
    """
    from cotune.orchestrator.cli.jobs import submit_command

    raise typer.Exit(submit_command(spec, _conn(coordinator, token, home)))


@app.command()
def status(
    job: str = typer.Argument(..., help="Job id."),
    watch: bool = typer.Option(False, "--watch", help="Keep it updated until the job ends."),
    interval: float = typer.Option(2.0, "--interval", help="Seconds between updates (--watch)."),
    coordinator: str | None = CoordinatorOption,
    token: str | None = TokenOption,
    home: Path | None = HomeOption,
) -> None:
    """A job's state, trials, rounds, eval losses and progress.

    Example: cotune status tiny-1a2b3c4d --watch
    """
    from cotune.orchestrator.cli.jobs import status_command

    conn = _conn(coordinator, token, home)
    raise typer.Exit(status_command(job, conn, watch, interval))


@app.command()
def results(
    job: str = typer.Argument(..., help="Job id."),
    coordinator: str | None = CoordinatorOption,
    token: str | None = TokenOption,
    home: Path | None = HomeOption,
) -> None:
    """The job's trials ranked by eval loss."""
    from cotune.orchestrator.cli.jobs import results_command

    raise typer.Exit(results_command(job, _conn(coordinator, token, home)))


@app.command()
def download(
    job: str = typer.Argument(..., help="Job id (a succeeded one)."),
    out: Path = typer.Option(..., "--out", help="Folder for the best adapter's files."),
    coordinator: str | None = CoordinatorOption,
    token: str | None = TokenOption,
    home: Path | None = HomeOption,
) -> None:
    """Fetch the best merged adapter (PEFT format, with its model card), sha256 checked.

    Example: cotune download tiny-1a2b3c4d --out best/
    """
    from cotune.orchestrator.cli.jobs import download_command

    conn = _conn(coordinator, token, home)
    raise typer.Exit(download_command(job, out, conn))


@app.command()
def cancel(
    job: str = typer.Argument(..., help="Job id."),
    coordinator: str | None = CoordinatorOption,
    token: str | None = TokenOption,
    home: Path | None = HomeOption,
) -> None:
    """Cancel a job: queued tasks are dropped, running ones stop at their next heartbeat."""
    from cotune.orchestrator.cli.jobs import cancel_command

    raise typer.Exit(cancel_command(job, _conn(coordinator, token, home)))


@app.command()
def jobs(
    coordinator: str | None = CoordinatorOption,
    token: str | None = TokenOption,
    home: Path | None = HomeOption,
) -> None:
    """Every job on the coordinator."""
    from cotune.orchestrator.cli.jobs import jobs_command

    raise typer.Exit(jobs_command(_conn(coordinator, token, home)))


@app.command()
def workers(
    coordinator: str | None = CoordinatorOption,
    token: str | None = TokenOption,
    home: Path | None = HomeOption,
) -> None:
    """Enrolled workers: hardware, last heartbeat, credit, tasks, leases."""
    from cotune.orchestrator.cli.jobs import workers_command

    raise typer.Exit(workers_command(_conn(coordinator, token, home)))


@app.command()
def leaderboard(
    coordinator: str | None = CoordinatorOption,
    token: str | None = TokenOption,
    home: Path | None = HomeOption,
) -> None:
    """Contributors ranked by accepted training tokens."""
    from cotune.orchestrator.cli.jobs import leaderboard_command

    raise typer.Exit(leaderboard_command(_conn(coordinator, token, home)))


token_app = typer.Typer(
    no_args_is_help=True, help="Join tokens for volunteers: create, list, revoke."
)
app.add_typer(token_app, name="token")


@token_app.command("create")
def token_create(
    join: bool = typer.Option(False, "--join", help="A join token, for `cotune worker`."),
    name: str = typer.Option("volunteer", "--name", help="Contributor credited for the work."),
    kind: str = typer.Option("volunteer", "--kind", help="volunteer | cluster"),
    ttl: float | None = typer.Option(None, "--ttl", help="Seconds until it expires [never]."),
    max_uses: int | None = typer.Option(
        None, "--max-uses", min=1, help="Workers it may enroll at most [no limit]."
    ),
    coordinator: str | None = CoordinatorOption,
    token: str | None = TokenOption,
    home: Path | None = HomeOption,
) -> None:
    """Create a join token; the volunteer's command line is printed with it.

    Example: cotune token create --join --name alice --ttl 86400 --max-uses 4
    """
    from cotune.orchestrator.cli.jobs import token_create_command

    conn = _conn(coordinator, token, home)
    raise typer.Exit(token_create_command(conn, join, name, kind, ttl, max_uses))


@token_app.command("list")
def token_list(
    coordinator: str | None = CoordinatorOption,
    token: str | None = TokenOption,
    home: Path | None = HomeOption,
) -> None:
    """Every join token: name, kind, created, expiry, uses, revoked (never the token)."""
    from cotune.orchestrator.cli.jobs import token_list_command

    raise typer.Exit(token_list_command(_conn(coordinator, token, home)))


@token_app.command("revoke")
def token_revoke(
    name: str = typer.Argument(..., help="The contributor name the tokens were created for."),
    coordinator: str | None = CoordinatorOption,
    token: str | None = TokenOption,
    home: Path | None = HomeOption,
) -> None:
    """Revoke every join token of NAME and the worker tokens enrolled with them: those
    workers are refused from their next call and their leases go back to the queue.

    Example: cotune token revoke alice
    """
    from cotune.orchestrator.cli.jobs import token_revoke_command

    raise typer.Exit(token_revoke_command(_conn(coordinator, token, home), name))


owner_app = typer.Typer(
    no_args_is_help=True,
    help="Owners (join token names) and their strikes: list, quarantine, pardon.",
)
app.add_typer(owner_app, name="owner")
OwnerName = typer.Argument(..., help="The owner: the name its join tokens were created for.")


@owner_app.command("list")
def owner_list(
    coordinator: str | None = CoordinatorOption,
    token: str | None = TokenOption,
    home: Path | None = HomeOption,
) -> None:
    """Every owner with a worker, a strike or a quarantine: strikes, quarantined, workers."""
    from cotune.orchestrator.cli.owners import owner_list_command

    raise typer.Exit(owner_list_command(_conn(coordinator, token, home)))


@owner_app.command("quarantine")
def owner_quarantine(
    name: str = OwnerName,
    coordinator: str | None = CoordinatorOption,
    token: str | None = TokenOption,
    home: Path | None = HomeOption,
) -> None:
    """Quarantine NAME now: its workers get no more work and their active leases go back to
    the queue. A name no join token has yet is banned in advance.

    Example: cotune owner quarantine mallory
    """
    from cotune.orchestrator.cli.owners import owner_quarantine_command

    raise typer.Exit(owner_quarantine_command(_conn(coordinator, token, home), name))


@owner_app.command("pardon")
def owner_pardon(
    name: str = OwnerName,
    coordinator: str | None = CoordinatorOption,
    token: str | None = TokenOption,
    home: Path | None = HomeOption,
) -> None:
    """Clear NAME's strikes and lift its quarantine: its workers may lease again at once.

    Example: cotune owner pardon mallory
    """
    from cotune.orchestrator.cli.owners import owner_pardon_command

    raise typer.Exit(owner_pardon_command(_conn(coordinator, token, home), name))


def _load_plugins() -> None:
    for ep in entry_points(group="cotune.commands"):
        ep.load()(app)


def main() -> None:
    _load_plugins()
    app()
