"""The `cotune` command line: `cotune --help` lists the commands.

Every command imports its implementation lazily, so `cotune --help` and `cotune validate`
stay light on a submitter's install (no torch, ray or redis). Worker-role commands plug in
through the `cotune.commands` entry-point group (see pyproject.toml).
"""

from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path

import typer

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="cotune: distributed community fine-tuning (QLoRA sweeps, exact adapter merging).",
)

HomeOption = typer.Option(
    None, "--home", help="State folder of the embedded stack [default: ~/.cotune, or $COTUNE_HOME]."
)


@app.command()
def validate(
    spec: Path = typer.Argument(..., help="Sweep spec (YAML) to check."),
) -> None:
    """Check a sweep spec: print the resolved spec and what it implies, or every error (exit 2)."""
    from orchestrator.validate import validate_command

    raise typer.Exit(validate_command(spec))


@app.command()
def up(home: Path | None = HomeOption) -> None:
    """Run the embedded stack (Redis, S3) in the foreground until Ctrl-C or SIGTERM.

    Example: cotune up --home /tmp/cotune
    """
    from orchestrator.settings import Settings
    from orchestrator.stack import run_up

    raise typer.Exit(run_up(Settings.from_env(home=home)))


@app.command()
def run(
    spec: Path = typer.Argument(..., help="Sweep spec (YAML)."),
    out: Path = typer.Option(Path("out"), "--out", help="Folder that receives the results."),
    home: Path | None = HomeOption,
) -> None:
    """Run a sweep on this machine with the embedded stack, then stop it.

    Example: cotune run examples/tiny/sweep.yaml --out out/tiny
    """
    from orchestrator.runner import run_command
    from orchestrator.settings import Settings

    raise typer.Exit(run_command(spec, out, Settings.from_env(home=home)))


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
    from orchestrator.merge.command import merge_command

    raise typer.Exit(
        merge_command(
            adapters, out, method=method, rank=rank, weights=weights, density=density, seed=seed
        )
    )


def _load_plugins() -> None:
    for ep in entry_points(group="cotune.commands"):
        ep.load()(app)


def main() -> None:
    _load_plugins()
    app()
