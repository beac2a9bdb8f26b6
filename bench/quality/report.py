"""The quality benchmark's tables and plot, from its report (bench/quality/__main__.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

ROW = "| {} | {} | {} | {} | {} | {} | {} | {} |"
HEAD = (
    ROW.format(
        "setting",
        "steps a task",
        "eval loss",
        "vs (a)",
        "vs (b)",
        "recovered of (a)",
        "recovered of (b)",
        "critical path to (b)'s loss",
    )
    + "\n"
    + ROW.format(*["---"] + ["---:"] * 7)
)


def _pct(x: float, ref: float) -> str:
    return f"{(x / ref - 1) * 100:+.1f}%"


def _recovered(x: float, ref: float, base: float | None) -> str:
    if base is None or base == ref:
        return "-"
    return f"{(base - x) / (base - ref):.2f}"


def critical_path(run: dict[str, Any], target: float) -> tuple[int, int] | None:
    """(optimizer steps, merges) on the run's critical path until its first round at or below
    `target`; None if no round got there."""
    for r, loss in enumerate(run["eval_losses"]):
        if loss <= target:
            return (r + 1) * run["steps_per_round"], r + 1
    return None


def rows(runs: dict[str, Any], T: int) -> list[str]:
    """The table's rows for one model: (b), each (a), then every federated setting."""
    base = runs["base_eval_loss"]
    one = runs["one_worker"]["eval_losses"][-1]
    out = [ROW.format("(b) one worker", T, f"{one:.3f}", "", "", "", "1.00", f"{T} steps")]
    for k, sync in runs["sync"].items():
        loss = sync["eval_losses"][-1]
        out.append(
            ROW.format(
                f"(a) sync, batch x{k}",
                sync["steps_per_round"],
                f"{loss:.3f}",
                "",
                _pct(loss, one),
                "1.00",
                _recovered(loss, one, base),
                "",
            )
        )
    for fed in runs["federated"]:
        loss = fed["eval_losses"][-1]
        sync = runs["sync"][str(fed["shards"])]["eval_losses"][-1]
        path = critical_path(fed, one)
        where = (
            f"{path[0]} steps + {path[1]} merges ({path[0] / T:.2f} T)" if path else "not reached"
        )
        out.append(
            ROW.format(
                fed["name"],
                fed["steps_per_round"],
                f"{loss:.3f}",
                _pct(loss, sync),
                _pct(loss, one),
                _recovered(loss, sync, base),
                _recovered(loss, one, base),
                where,
            )
        )
    return out


def table(runs: dict[str, Any], T: int) -> str:
    base = runs["base_eval_loss"]
    head = f"base model eval loss: {base:.3f}" if base is not None else "base model: not scored"
    return "\n".join([head, "", HEAD, *rows(runs, T)])


def _tokens(steps: int, budget: dict[str, Any], accumulation: int = 1) -> int:
    """cotune's count of a run's tokens (control/intake.py task_tokens: padding counted)."""
    return steps * budget["micro_batch"] * accumulation * budget["sequence_len"]


def plot(report: dict[str, Any], path: Path) -> None:
    """Eval loss against trained tokens: (b)'s curve, (a)'s points, each federated svd
    setting's rounds, one panel a model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budget, models = report["budget"], report["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.8), squeeze=False)
    for ax, (label, runs) in zip(axes[0], models.items(), strict=True):
        T = budget["steps"]
        curve = sorted(
            [(c["steps_per_round"], c["eval_losses"][-1]) for c in runs["one_worker_curve"]]
            + [(T, runs["one_worker"]["eval_losses"][-1])]
        )
        ax.plot(
            [_tokens(s, budget) for s, _ in curve],
            [x for _, x in curve],
            "k-o",
            linewidth=2.5,
            label="(b) one worker, one schedule",
        )
        for k, sync in runs["sync"].items():
            ax.plot(
                _tokens(sync["steps_per_round"], budget, int(k)),
                sync["eval_losses"][-1],
                "x",
                markersize=10,
                label=f"(a) sync, batch x{k}",
            )
        for fed in runs["federated"]:
            if fed["merge"] != "svd":
                continue
            per_round = _tokens(fed["steps_per_round"], budget) * fed["shards"]
            xs = [per_round * (r + 1) for r in range(len(fed["eval_losses"]))]
            ax.plot(
                xs, fed["eval_losses"], "--.", label=f"cotune K {fed['shards']}, R {fed['rounds']}"
            )
        if runs["base_eval_loss"] is not None:
            ax.axhline(runs["base_eval_loss"], color="grey", linestyle=":", label="base model")
        ax.set_title(f"{label} model")
        ax.set_xlabel("trained tokens (steps x batch x sequence_len)")
        ax.set_ylabel("eval loss (cotune evaluate, held-out file)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def rewrite_doc(report: dict[str, Any], doc: Path, begin: str, end: str) -> None:
    """Put the tables between the markers of `doc` (the rest is prose, written by hand)."""
    T = report["budget"]["steps"]
    parts = [
        f"Produced by `make bench-quality` in {report['seconds'] / 60:.0f} min "
        f"(budget T = {T} steps of {report['budget']['micro_batch']} rows).",
        "",
    ]
    for label, runs in report["models"].items():
        parts += [f"**{label} model**", "", table(runs, T), ""]
    parts += ["![eval loss against trained tokens](images/quality.png)", ""]
    text = doc.read_text()
    start, stop = text.index(begin) + len(begin), text.index(end)
    doc.write_text(text[:start] + "\n" + "\n".join(parts) + text[stop:])
