"""`cotune validate SPEC`: check a sweep spec and show what it implies, without running anything.

Runs on the submitter's base install (pydantic, PyYAML, rich) and writes nothing anywhere.
Exit 0: the resolved spec, its search space and the work it implies. Exit 2: every error as
`field.path: reason`, on stderr.

With `--tokenizer FOLDER` (a model or tokenizer folder; needs transformers, the worker
extra) it also renders the first `--rows` rows of the dataset as training will
(protocol/render.py) and shows their lengths in tokens and what `training.sequence_len`
keeps: rows whole, cut short, dropped (no trained token left). Past
`dataset.max_dropped_rows` or `max_cut_rows` the job would fail, so validate exits 2.

    cotune validate examples/tiny/sweep.yaml
    cotune validate my-sweep.yaml --tokenizer ~/models/llama-3.2-1b --rows 5000
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cotune.orchestrator.protocol.dataset_probe import sample_rows
from cotune.orchestrator.protocol.formats import row_checker
from cotune.orchestrator.protocol.render import Fit, RenderError, fit_problem, render
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
DEFAULT_FIT_ROWS = 10_000


class FitError(ValueError):
    """--tokenizer cannot measure: no transformers, no tokenizer there, unreadable data."""


def validate_command(
    path: Path, tokenizer: Path | None = None, rows: int = DEFAULT_FIT_ROWS
) -> int:
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
    if tokenizer is not None:
        try:
            fit = measure_fit(spec, tokenizer, rows)
        except FitError as exc:
            err.print(f"[red]--tokenizer: {escape(str(exc))}[/red]", soft_wrap=True)
            return EXIT_INVALID
        out.print(_fit_table(fit, tokenizer))
        why = fit_problem(
            rows=fit.rows,
            cut=fit.cut,
            dropped=fit.dropped,
            sequence_len=fit.sequence_len,
            max_dropped_rows=spec.dataset.max_dropped_rows,
            max_cut_rows=spec.dataset.max_cut_rows,
            where=f"the first {fit.rows} of the dataset",
        )
        if why is not None:
            err.print(f"[red]dataset: {escape(why)}[/red]", soft_wrap=True)
            return EXIT_INVALID
        if fit.warns:
            out.print(f"[yellow]warning:[/yellow] {escape(fit.summary())}", soft_wrap=True)
    out.print(f"[green]valid:[/green] {escape(str(path))}", soft_wrap=True)
    return 0


def measure_fit(spec: SweepSpec, tokenizer_dir: Path, limit: int) -> Fit:
    """Render the first `limit` rows of the spec's dataset with the tokenizer at
    `tokenizer_dir`, as training will; what training.sequence_len keeps of them."""
    location = spec.dataset.path
    if location.startswith("s3://"):
        raise FitError(f"dataset.path {location}: measure a local copy (s3:// is not read here)")
    try:
        from transformers import AutoTokenizer  # lazy: the worker extra
    except ImportError:
        raise FitError("needs transformers: pip install 'cotune[worker]'") from None
    if not tokenizer_dir.is_dir():
        raise FitError(f"{tokenizer_dir}: no such folder")
    try:
        tok: Any = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    except (OSError, ValueError) as exc:
        raise FitError(f"{tokenizer_dir}: no tokenizer loads from it ({exc})") from None
    try:
        rows = sample_rows(Path(location), limit)
    except ValueError as exc:
        raise FitError(f"dataset.path: {exc}") from None
    check, fmt = row_checker(spec.dataset.format), spec.dataset.format
    fit = Fit(spec.training.sequence_len, keep_lengths=True)
    for number, row in enumerate(rows, start=1):
        if check(row):
            continue  # the format check above has judged these
        try:
            fit.add(*render(row, fmt, tok, train_on_inputs=spec.training.train_on_inputs))
        except RenderError as exc:
            raise FitError(f"row {number}: {exc}") from None
    if not fit.rows:
        raise FitError(f"dataset.path {location}: no {fmt} row to measure")
    return fit


def _fit_table(fit: Fit, tokenizer: Path) -> Table:
    table = Table(
        title=f"sequence_len {fit.sequence_len} on the first {fit.rows:,} rows "
        f"(tokenizer {tokenizer.name})",
        title_justify="left",
        show_header=False,
    )
    table.add_column("what")
    table.add_column("rows", justify="right")
    whole = fit.rows - fit.cut - fit.dropped
    for label, count in (
        ("whole", whole),
        ("cut short (trained tokens lost at the end)", fit.cut),
        ("dropped (no trained token left)", fit.dropped),
    ):
        table.add_row(label, f"{count:,} ({fit.fraction(count):.1%})")
    lengths = fit.distribution()
    table.add_row(
        "row length in tokens: p50 / p90 / p99 / max",
        f"{lengths['p50']} / {lengths['p90']} / {lengths['p99']} / {lengths['max']}",
    )
    table.add_row("sequence_len keeping 99% whole", str(lengths["p99"]))
    table.add_row("sequence_len dropping none", str(lengths["none_dropped"]))
    return table


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
