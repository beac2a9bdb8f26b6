"""The sweep spec's cross-field checks, in one place, and the checks of the files it names.

`errors` and `warnings` see a structurally valid spec (pydantic already checked each field)
and name every field involved. `check_files` reads local data just enough to count rows and
sample the format; s3:// locations are left to the coordinator, with a note.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from cotune.orchestrator.protocol.dataset_probe import probe
from cotune.orchestrator.protocol.search_space import SearchDim
from cotune.orchestrator.protocol.spec.errors import SpecIssue
from cotune.orchestrator.protocol.spec.model import SweepSpec

TPE_STARTUP_TRIALS = 10  # optuna.samplers.TPESampler(n_startup_trials=10)


@dataclass(frozen=True)
class Implied:
    """What a spec asks of the cluster, counted before it runs (upper bounds)."""

    n_trials: int
    rounds: int
    shards: int
    shard_tasks: int
    merge_steps: int
    evaluations: int
    estimated_tokens: int | None
    notes: tuple[str, ...]


@dataclass
class FileReport:
    errors: list[SpecIssue] = field(default_factory=list)
    notes: list[SpecIssue] = field(default_factory=list)
    dataset_rows: int | None = None


def effective_trials(spec: SweepSpec) -> int:
    """How many trials the job runs: search.n_trials, capped by the grid for method grid (the
    one definition: `cotune validate`, the study and the progress view all use it)."""
    grid, asked = spec.grid_size(), spec.search.n_trials
    if grid is not None:
        return min(grid, asked) if asked else max(grid, 1)
    return asked or 1


def errors(spec: SweepSpec, dataset_rows: int | None) -> list[SpecIssue]:
    """Every contradiction between fields; each message names the fields involved."""
    out: list[SpecIssue] = []
    t, s, m = spec.training, spec.search, spec.merge
    if t.max_steps is not None and t.num_epochs is not None:
        out.append(_both("training.max_steps", "training.num_epochs"))
    if t.max_steps is None and t.num_epochs is None:
        out.append(
            SpecIssue("training.max_steps", "set one of training.max_steps or training.num_epochs")
        )
    if t.warmup_steps is not None and t.warmup_ratio is not None:
        out.append(_both("training.warmup_steps", "training.warmup_ratio"))
    if t.lr_schedule_span == "trial" and t.max_steps is None:
        out.append(
            SpecIssue(
                "training.lr_schedule_span",
                "trial spans rounds x training.max_steps: set max_steps, not num_epochs",
            )
        )
    if m.density is not None and m.method not in ("ties", "dare"):
        out.append(
            SpecIssue("merge.density", f"only ties and dare take it (merge.method: {m.method})")
        )
    if m.rank is not None and m.method in ("cat", "linear"):
        why = "is exact at rank shards * lora_r" if m.method == "cat" else "keeps the inputs' rank"
        out.append(SpecIssue("merge.rank", f"merge.method {m.method} {why}; it takes no rank"))
    if spec.base_model_revision is not None:
        if spec.base_model_kind != "hf":
            out.append(SpecIssue("base_model_revision", "only a Hugging Face base_model has one"))
        elif not spec.base_model_revision.strip() or any(
            c.isspace() for c in spec.base_model_revision
        ):
            out.append(SpecIssue("base_model_revision", "expected a commit sha or tag"))
    out += _search_errors(spec)
    if s.direction == "maximize" and s.metric == "eval_loss":
        out.append(
            SpecIssue("search.direction", "maximize would pick the worst search.metric eval_loss")
        )
    if dataset_rows is not None:
        out += _row_errors(spec, dataset_rows)
    return out


def _search_errors(spec: SweepSpec) -> list[SpecIssue]:
    out: list[SpecIssue] = []
    s, space = spec.search, spec.search_space()
    if s.method == "grid":
        for path, dim in space.items():
            if dim.grid_values() is None:
                out.append(
                    SpecIssue(
                        path,
                        f"{dim.describe()} is not a grid axis under search.method: "
                        "grid; use a list of values (or a linear {int: [lo, hi]})",
                    )
                )
    elif space and s.n_trials is None:
        out.append(
            SpecIssue("search.n_trials", f"required: method {s.method} searches {', '.join(space)}")
        )
    if not space and (s.n_trials or 1) > 1:
        out.append(
            SpecIssue(
                "search.n_trials",
                f"{s.n_trials} trials of one configuration (no field is searched) would train "
                "the same thing; add a search dimension or set n_trials: 1",
            )
        )
    if s.max_concurrent_trials is not None and s.max_concurrent_trials > effective_trials(spec):
        out.append(
            SpecIssue(
                "search.max_concurrent_trials",
                f"{s.max_concurrent_trials} is above the {effective_trials(spec)} trials of "
                "search.n_trials",
            )
        )
    p = s.pruner
    if p.type == "hyperband":
        top = spec.rounds if p.max_resource == "auto" else p.max_resource
        if p.max_resource != "auto" and p.max_resource > spec.rounds:
            out.append(
                SpecIssue(
                    "search.pruner.max_resource",
                    f"{p.max_resource} is above rounds ({spec.rounds}): a trial reports at most "
                    "once per round",
                )
            )
        if p.min_resource > top:
            out.append(
                SpecIssue(
                    "search.pruner.min_resource", f"{p.min_resource} is above max_resource ({top})"
                )
            )
    return out


def _row_errors(spec: SweepSpec, rows: int) -> list[SpecIssue]:
    d = spec.dataset
    if rows == 0:
        return [SpecIssue("dataset.path", "no rows")]
    out = []
    eval_rows = math.floor(rows * d.eval_split) if isinstance(d.eval_split, float) else 0
    if isinstance(d.eval_split, float) and eval_rows == 0:
        out.append(
            SpecIssue(
                "dataset.eval_split", f"{d.eval_split:g} of {rows} rows is no row to evaluate on"
            )
        )
    train_rows = rows - eval_rows
    if d.shards > train_rows:
        out.append(
            SpecIssue(
                "dataset.shards",
                f"{d.shards} shards but dataset.path has only {train_rows} training rows "
                f"({rows} rows, {eval_rows} held out by dataset.eval_split)",
            )
        )
    return out


def warnings(spec: SweepSpec) -> list[SpecIssue]:
    """Legal settings that are probably not what the submitter meant."""
    out: list[SpecIssue] = []
    t, s, p, space = spec.training, spec.search, spec.search.pruner, spec.search_space()
    if spec.base_model_kind == "hf":
        rev = spec.base_model_revision
        if rev is None:
            out.append(
                SpecIssue(
                    "base_model_revision", "not pinned: workers take 'main' as of submit time"
                )
            )
        elif not (len(rev) == 40 and all(c in "0123456789abcdef" for c in rev)):
            out.append(SpecIssue("base_model_revision", f"{rev!r} can move; a commit sha cannot"))
    if s.method == "tpe" and space and effective_trials(spec) <= TPE_STARTUP_TRIALS:
        out.append(
            SpecIssue(
                "search.method",
                f"TPE samples at random for its first {TPE_STARTUP_TRIALS} trials; with "
                f"{effective_trials(spec)} trials this is a random search",
            )
        )
    grid = spec.grid_size()
    if s.method == "grid" and not space:
        out.append(SpecIssue("search.method", "grid over no search dimension: one trial"))
    if grid is not None and s.n_trials is not None and s.n_trials > grid:
        out.append(SpecIssue("search.n_trials", f"{s.n_trials} is above the grid's {grid} points"))
    if p.type == "median" and p.n_startup_trials >= effective_trials(spec):
        out.append(
            SpecIssue(
                "search.pruner.n_startup_trials",
                f"{p.n_startup_trials} of {effective_trials(spec)} trials finish before the "
                "median pruner may act: nothing is pruned",
            )
        )
    first = _first_prune(spec)
    if first is not None and first >= spec.rounds:
        out.append(
            SpecIssue(
                "search.pruner",
                f"{p.type} decides after round {first} at the earliest, but rounds is "
                f"{spec.rounds}: nothing is pruned",
            )
        )
    if "double_quant" in spec.quantization.model_fields_set and spec.quantization.type in (
        "int8",
        "none",
    ):
        out.append(
            SpecIssue(
                "quantization.double_quant",
                f"ignored with quantization.type {spec.quantization.type}",
            )
        )
    if not spec.trust.allow_volunteers and "redundancy" in spec.trust.model_fields_set:
        out.append(
            SpecIssue(
                "trust.redundancy", "applies to volunteer tasks; trust.allow_volunteers is false"
            )
        )
    if spec.dataset.shards == 1 and "merge" in spec.model_fields_set:
        out.append(SpecIssue("merge", "dataset.shards is 1: there is nothing to merge"))
    r = _upper(spec.lora.lora_r)
    if spec.merge.rank is not None and spec.merge.rank > r * spec.dataset.shards:
        out.append(
            SpecIssue(
                "merge.rank", f"above shards * lora_r ({r * spec.dataset.shards}), the exact rank"
            )
        )
    if (
        isinstance(t.max_steps, int)
        and "checkpoint_steps" in t.model_fields_set
        and t.checkpoint_steps >= t.max_steps
    ):
        out.append(
            SpecIssue(
                "training.checkpoint_steps",
                f">= training.max_steps ({t.max_steps}): no checkpoint mid-task",
            )
        )
    if (
        isinstance(t.max_steps, int)
        and isinstance(t.warmup_steps, int)
        and t.warmup_steps >= t.max_steps
    ):
        out.append(
            SpecIssue(
                "training.warmup_steps", f">= training.max_steps ({t.max_steps}): warmup never ends"
            )
        )
    return out


def _first_prune(spec: SweepSpec) -> int | None:
    """The first round after which the pruner may stop a trial (None: no pruner).

    Trials report after each round with step = rounds done, so a prune after the last round
    saves nothing.
    """
    p = spec.search.pruner
    if p.type == "median":
        return max(p.n_warmup_steps, 1)
    if p.type == "successive_halving":
        return p.min_resource * p.reduction_factor**p.min_early_stopping_rate
    if p.type == "hyperband":
        return p.min_resource
    return None


def implied(spec: SweepSpec, dataset_rows: int | None = None) -> Implied:
    """Counts of the work a spec implies; tokens are an upper bound (see notes)."""
    t, d = spec.training, spec.dataset
    trials = effective_trials(spec)
    tasks = trials * spec.rounds * d.shards
    notes = ["upper bound: no trial is pruned"]
    tokens: int | None
    if t.max_steps is not None:
        per_step = _upper(t.micro_batch_size) * _upper(t.gradient_accumulation_steps)
        tokens = tasks * _upper(t.max_steps) * per_step * t.sequence_len
        searched = [k for k in spec.search_space() if k.split(".")[1] in _TOKEN_FIELDS]
        if searched:
            notes.append(f"upper bound: the largest {', '.join(searched)}")
        notes.append("every sequence counted at full training.sequence_len")
    elif dataset_rows is not None and t.num_epochs is not None:
        held = math.floor(dataset_rows * d.eval_split) if isinstance(d.eval_split, float) else 0
        per_shard = math.ceil((dataset_rows - held) / d.shards)
        tokens = tasks * math.ceil(t.num_epochs * per_shard) * t.sequence_len
        notes.append("num_epochs: every row counted at full training.sequence_len")
    else:
        tokens = None
        notes.append("tokens unknown: num_epochs needs the dataset's row count")
    return Implied(
        n_trials=trials,
        rounds=spec.rounds,
        shards=d.shards,
        shard_tasks=tasks,
        merge_steps=trials * spec.rounds if d.shards > 1 else 0,
        evaluations=trials * spec.rounds,
        estimated_tokens=tokens,
        notes=tuple(notes),
    )


_TOKEN_FIELDS = ("micro_batch_size", "gradient_accumulation_steps", "max_steps")


def _upper(value: int | SearchDim) -> int:
    return value if isinstance(value, int) else int(value.upper())


def _both(a: str, b: str) -> SpecIssue:
    return SpecIssue(a, f"Can't set both {a} and {b}; keep one")


# ----- the files a spec names ----------------------------------------------------------------


def check_files(spec: SweepSpec) -> FileReport:
    """Local files exist and fit; rows counted (None when any part could not be counted)."""
    report = FileReport()
    d = spec.dataset
    report.dataset_rows = _probe("dataset.path", d.path, spec, report)
    split = d.eval_split
    if isinstance(split, str) and _probe("dataset.eval_split", split, spec, report) == 0:
        report.errors.append(SpecIssue("dataset.eval_split", "the eval file has no rows"))
    if spec.base_model_kind == "local":
        folder = Path(spec.base_model)
        if not folder.is_dir():
            report.errors.append(SpecIssue("base_model", f"no such folder: {folder}"))
        elif not (folder / "config.json").is_file():
            report.errors.append(
                SpecIssue("base_model", f"{folder} has no config.json (not a Hugging Face model)")
            )
    return report


def _probe(key: str, location: str, spec: SweepSpec, report: FileReport) -> int | None:
    if location.startswith("s3://"):
        report.notes.append(SpecIssue(key, "s3:// data is counted when the job is sharded"))
        return None
    found = probe(Path(location), spec.dataset.format, spec.dataset.max_bad_rows)
    report.errors += [SpecIssue(key, e) for e in found.errors]
    report.errors += [SpecIssue("dataset.format", e) for e in found.format_errors]
    report.notes += [SpecIssue(key, n) for n in found.notes]
    return found.rows
