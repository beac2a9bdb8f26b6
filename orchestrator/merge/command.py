"""`cotune merge`: merge users' own PEFT LoRA adapters from the command line.

Example: cotune merge run1/ run2/ run3/ --method svd --rank 16 --out merged/
"""

from __future__ import annotations

import shlex
from pathlib import Path

from cotune.orchestrator.merge.base import MergeError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

EXIT_BAD_INPUT = 2


def merge_command(
    adapters: list[Path],
    out: Path,
    *,
    method: str,
    rank: int | None,
    weights: str | None,
    density: float | None,
    seed: int,
) -> int:
    """Run a merge with a progress bar over modules; 0 on success, 2 on bad input."""
    err = Console(stderr=True)
    console = Console()
    try:
        from cotune.orchestrator.merge.merger import execute_merge, plan_merge
    except ImportError as missing:
        err.print(
            f"[red]error:[/] cotune merge needs torch and safetensors ({missing}); install "
            "them with: pip install 'cotune[worker]'",
            highlight=False,
            soft_wrap=True,
        )
        return EXIT_BAD_INPUT
    try:
        plan = plan_merge(
            adapters, method=method, rank=rank, weights=weights, density=density, seed=seed
        )
        for warning in plan.warnings:
            err.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
        with Progress(
            TextColumn("merging ({task.fields[method]})"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[module]}"),
            console=err,
            transient=True,
        ) as bar:
            task = bar.add_task("merge", total=len(plan.modules), method=method, module="")

            def advance(done: int, total: int, module: str) -> None:
                bar.update(task, completed=done, module=module)

            report = execute_merge(
                plan,
                out,
                progress=advance,
                command=_command_line(adapters, out, method, rank, weights, density, seed),
            )
    except MergeError as error:
        err.print(f"[red]error:[/] {error}", highlight=False, soft_wrap=True)
        return EXIT_BAD_INPUT
    table = Table(show_edge=False)
    table.add_column("#", justify="right")
    table.add_column("adapter", overflow="fold")
    table.add_column("r", justify="right")
    table.add_column("tokens", justify="right")
    table.add_column("weight", justify="right")
    for index, (adapter, weight) in enumerate(zip(plan.adapters, plan.weights.values, strict=True)):
        tokens = "-" if adapter.tokens is None else f"{adapter.tokens:,}"
        table.add_row(str(index), str(adapter.path), str(adapter.config.r), tokens, f"{weight:.4g}")
    console.print(table)
    kind = "exact" if report.summary.exact else "approximate"
    console.print(
        f"method {method} ({kind}), rank {report.summary.rank}, {report.summary.modules} "
        f"modules, weights from {report.summary.weight_source}, {report.seconds:.1f} s",
        highlight=False,
        soft_wrap=True,
    )
    console.print(
        f"merged {len(adapters)} adapter(s) -> {report.out}", highlight=False, soft_wrap=True
    )
    return 0


def _command_line(
    adapters: list[Path],
    out: Path,
    method: str,
    rank: int | None,
    weights: str | None,
    density: float | None,
    seed: int,
) -> str:
    args = ["cotune", "merge", *map(str, adapters), "--method", method]
    if rank is not None:
        args += ["--rank", str(rank)]
    if weights is not None:
        args += ["--weights", weights]
    if density is not None:
        args += ["--density", str(density)]
    if method == "dare" or (method == "ties" and seed):
        args += ["--seed", str(seed)]
    return shlex.join([*args, "--out", str(out)])
