"""`cotune validate SPEC`: check a sweep spec and show what it implies, without running anything.

Runs on the submitter's base install (pydantic, PyYAML, rich) and writes nothing anywhere.
Exit 0: the resolved spec, its search space and the work it implies. Exit 2: every error as
`field.path: reason`, on stderr.

    cotune validate examples/tiny/sweep.yaml
"""

from __future__ import annotations

from pathlib import Path

from cotune.orchestrator.protocol.spec import (
    Implied,
    SpecError,
    SpecIssue,
    SweepSpec,
    implied,
    inspect_spec,
)
from rich.console import Console
from rich.markup import escape
from rich.syntax import Syntax
from rich.table import Table

EXIT_INVALID = 2


def validate_command(path: Path) -> int:
    """Check the spec at `path`; print the result; return the exit code (0 valid, 2 not)."""
    out, err = Console(), Console(stderr=True)
    try:
        report = inspect_spec(path)
    except SpecError as exc:
        for issue in exc.errors:
            # soft_wrap: one error per line, whatever the terminal width, for people and grep.
            err.print(f"[red]{escape(str(issue))}[/red]", soft_wrap=True)
        count = len(exc.errors)
        err.print(
            f"{count} error{'s' if count != 1 else ''} in {escape(str(path))}", soft_wrap=True
        )
        return EXIT_INVALID
    spec = report.spec
    out.rule("resolved spec")
    out.print(Syntax(spec.to_yaml(), "yaml", background_color="default"), soft_wrap=True)
    out.print(_space_table(spec))
    what = implied(spec, report.dataset_rows)
    out.print(_implied_table(what, report.dataset_rows))
    for note in what.notes:
        out.print(f"  [dim]{escape(note)}[/dim]", soft_wrap=True)
    _print_issues(out, "warning", "yellow", report.warnings)
    _print_issues(out, "note", "cyan", report.notes)
    out.print(f"[green]valid:[/green] {escape(str(path))}", soft_wrap=True)
    return 0


def _space_table(spec: SweepSpec) -> Table:
    table = Table(title=f"search space ({spec.search.method})", title_justify="left")
    table.add_column("dimension", no_wrap=True)
    table.add_column("values")
    table.add_column("default")
    table.add_column("grid axis", justify="right")
    space = spec.search_space()
    for path, dim in space.items():
        axis = dim.grid_values()
        table.add_row(
            path,
            escape(dim.describe()),
            escape(_short(dim.default())),
            str(len(axis)) if axis is not None else "-",
        )
    if not space:
        table.add_row("(none: every field is a single value)", "", "", "")
    return table


def _short(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _implied_table(implied: Implied, rows: int | None) -> Table:
    table = Table(title="what it implies", title_justify="left", show_header=False)
    table.add_column("what")
    table.add_column("how many", justify="right")
    table.add_row("trials", str(implied.n_trials))
    table.add_row("rounds", str(implied.rounds))
    table.add_row("shards per round", str(implied.shards))
    table.add_row("shard tasks (trials x rounds x shards)", str(implied.shard_tasks))
    table.add_row("merges", str(implied.merge_steps))
    table.add_row("evaluations", str(implied.evaluations))
    table.add_row("dataset rows", "unknown" if rows is None else f"{rows:,}")
    tokens = implied.estimated_tokens
    table.add_row("estimated tokens (at most)", "unknown" if tokens is None else f"{tokens:,}")
    return table


def _print_issues(console: Console, label: str, colour: str, issues: list[SpecIssue]) -> None:
    for issue in issues:
        console.print(f"[{colour}]{label}:[/{colour}] {escape(str(issue))}", soft_wrap=True)
