"""The heavy checks of uploaded adapters: what runs as Ray tasks (`pool.submit_call`) for the
verification step (pipeline/verification.py), on a coordinator-controlled node.

    check_upload(CheckRequest) -> CheckOutcome
        download the weights (sha256 checked against the completion: an object changed since
        is refused), verify/adapter.py `check_adapter` (exact keys and shapes, every value
        finite), the change from the start adapter not ~0 (the start, or an untrained init,
        sent back), no value moved further than the task's optimizer steps can move it
        (verify/bounds.py: catches scaled-up deltas and random factors), then the probe
        loss: `cotune evaluate` of the adapter, with the coordinator's adapter_config.json,
        on a probe slice of the eval split (its first rows; workers never receive it)
    review_uploads(ReviewRequest) -> dict[int, list[str]]
        verify/review.py `review_round` over a round's K uploads: flags by position
    compare_uploads(CompareRequest) -> float
        the cosine between two uploads' changes from their start (redundancy)

Each downloads what it needs into its own temporary folder; nothing is written to the store.
Hostile content never raises: it comes back as issues or flags. The requests are built on the
coordinator from a task's record (`weights_of`, `layout_of`, `start_of`; `check_fields` is
what the reconciler records on a new task for them).
"""

from __future__ import annotations

import io
import json
import math
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cotune.orchestrator.control.intake import adapter_config, expected_for
from cotune.orchestrator.control.quotas import max_steps, task_rows
from cotune.orchestrator.data.layout import merged_prefix
from cotune.orchestrator.data.s3errors import ChecksumMismatch
from cotune.orchestrator.pipeline.placement import ModelConfigUnavailable, model_config
from cotune.orchestrator.pipeline.roundmerge import (
    EvalSetup,
    MergeFailed,
    StoreConfig,
    StoredFile,
    evaluate_file,
    fetch_eval,
)
from cotune.orchestrator.protocol.task import TrainTask
from cotune.orchestrator.protocol.wire import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from cotune.orchestrator.verify.adapter import check_adapter, coordinator_config
from cotune.orchestrator.verify.bounds import StepBudget, overreach
from cotune.orchestrator.verify.deltas import change_cosine, change_norm
from cotune.orchestrator.verify.expected import (
    AdapterFactors,
    ExpectedAdapter,
    ExpectedModule,
)
from cotune.orchestrator.verify.header import parse_header
from cotune.orchestrator.verify.issues import VerifyError
from cotune.orchestrator.verify.review import Thresholds, review_round

if TYPE_CHECKING:
    from cotune.orchestrator.control.records import TaskRecord
    from cotune.orchestrator.data.objectstore import ObjectStore
    from cotune.orchestrator.protocol.spec import SweepSpec

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
#: A change this small next to the start's norm (or exactly 0 in round 0) is no work.
ZERO_CHANGE = Thresholds().replay_distance
_FACTOR = re.compile(r"^base_model\.model\.(?P<path>.+)\.lora_(?P<part>[AB])\.weight$")


@dataclass(frozen=True)
class Layout:
    """What an upload must look like: the expected tensors (None: the architecture is not
    known to the coordinator; then the upload's own LoRA pairs of the task's rank), the
    coordinator's adapter_config.json (JSON) and the task (JSON)."""

    expected: ExpectedAdapter | None
    rank: int
    adapter_config: str
    task_json: str


@dataclass(frozen=True)
class ProbeSetup:
    evaluation: EvalSetup  # the eval split, the models folder, the work folder
    rows: int


@dataclass(frozen=True)
class CheckRequest:
    weights: StoredFile
    layout: Layout
    start: StoredFile | None  # the start adapter's weights (the coordinator's merge); None: r0
    probe: ProbeSetup | None
    store: StoreConfig
    budget: StepBudget | None = None  # what the task's optimizer can do; None: not known


@dataclass(frozen=True)
class CheckOutcome:
    issues: tuple[str, ...]
    probe_loss: float | None = None
    change_norm: float | None = None


@dataclass(frozen=True)
class ReviewRequest:
    uploads: tuple[StoredFile, ...]
    layout: Layout
    start: StoredFile | None
    work_dir: str
    store: StoreConfig


@dataclass(frozen=True)
class CompareRequest:
    first: StoredFile
    second: StoredFile
    layout: Layout
    start: StoredFile | None
    work_dir: str
    store: StoreConfig


def check_upload(request: CheckRequest) -> CheckOutcome:
    """The heavy checks of one upload (module docstring)."""
    store = request.store.open()
    work = Path(request.probe.evaluation.work_dir) if request.probe else None
    if work is not None:
        work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="check-", dir=work) as tmp:
        folder = Path(tmp) / "upload"
        fetched = _fetch(store, request.weights, folder / WEIGHTS)
        if isinstance(fetched, str):
            return CheckOutcome((fetched,))
        factors = _factors(fetched, request.layout)
        if isinstance(factors, tuple):
            return CheckOutcome(factors)
        start = _start_factors(store, request.start, request.layout, Path(tmp) / "start")
        norm = change_norm(factors, start)
        scale = change_norm(start, None) if start is not None else 0.0
        if norm == 0 or norm <= ZERO_CHANGE * scale:
            issue = (
                f"no change from its start adapter (change norm {norm:.4g}, the start's "
                f"{scale:.4g}): the start adapter or an untrained init sent back"
            )
            return CheckOutcome((issue,), change_norm=norm)
        if request.budget is not None:
            try:
                found = overreach(factors, start, request.budget)
            except VerifyError as err:
                return CheckOutcome((f"its factors do not match its start's: {err}",))
            if found is not None:
                return CheckOutcome((found.message,), change_norm=norm)
        if request.probe is None:
            return CheckOutcome((), change_norm=norm)
        (folder / CONFIG).write_text(request.layout.adapter_config)
        try:
            loss = probe_loss(request.probe, store, folder)
        except MergeFailed as failed:
            if "not finite" not in str(failed):
                raise  # the evaluation failed for a reason of its own: try again later
            return CheckOutcome((f"the probe loss is not finite ({failed})",), change_norm=norm)
        return CheckOutcome((), probe_loss=loss, change_norm=norm)


def review_uploads(request: ReviewRequest) -> dict[int, list[str]]:
    """`review_round` over the uploads; the flags' messages by position (an upload that no
    longer checks out is flagged too)."""
    store = request.store.open()
    Path(request.work_dir).mkdir(parents=True, exist_ok=True)
    flags: dict[int, list[str]] = {}
    with tempfile.TemporaryDirectory(prefix="review-", dir=request.work_dir) as tmp:
        start = _start_factors(store, request.start, request.layout, Path(tmp) / "start")
        uploads: list[AdapterFactors] = []
        positions: list[int] = []
        for index, stored in enumerate(request.uploads):
            factors = _load(store, stored, request.layout, Path(tmp) / f"u{index}")
            if isinstance(factors, tuple):
                flags[index] = list(factors)
            else:
                uploads.append(factors)
                positions.append(index)
        if not uploads:
            return flags
        try:
            review = review_round(uploads, start)
        except VerifyError as err:  # layouts differ: only with an unknown architecture
            return {index: [f"its tensors differ from its peers': {err}"] for index in positions}
    for flag in review.flags:
        flags.setdefault(positions[flag.shard], []).append(f"{flag.kind}: {flag.message}")
    return flags


def compare_uploads(request: CompareRequest) -> float:
    """The cosine of two uploads' changes from their start (-2.0 if one no longer loads)."""
    store = request.store.open()
    Path(request.work_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="compare-", dir=request.work_dir) as tmp:
        start = _start_factors(store, request.start, request.layout, Path(tmp) / "start")
        first = _load(store, request.first, request.layout, Path(tmp) / "a")
        second = _load(store, request.second, request.layout, Path(tmp) / "b")
        if isinstance(first, tuple) or isinstance(second, tuple):
            return -2.0
        try:
            return change_cosine(first, second, start)
        except VerifyError:
            return -2.0


def probe_loss(probe: ProbeSetup, store: ObjectStore, adapter: Path) -> float:
    """`cotune evaluate` of `adapter` on the probe slice: its first `rows` eval rows."""
    whole = fetch_eval(probe.evaluation, store)
    slice_file = whole.with_name(f"{whole.name.split('.')[0]}-probe-{probe.rows}.jsonl")
    if not slice_file.is_file():
        _first_rows(whole, probe.rows, slice_file)
    result = evaluate_file(probe.evaluation, slice_file, adapter=adapter, store=store)
    loss = float(result["eval_loss"])
    if not math.isfinite(loss):
        raise MergeFailed(f"the eval loss is not finite ({loss})")
    return loss


def _first_rows(source: Path, rows: int, out: Path) -> None:
    """The first `rows` non-blank lines of a .jsonl(.zst) file, as a .jsonl file."""
    kept: list[str] = []
    with source.open("rb") as raw:
        stream: Any = raw
        if source.name.endswith(".zst"):
            import zstandard

            stream = zstandard.ZstdDecompressor().stream_reader(raw)
        for line in io.TextIOWrapper(stream, encoding="utf-8"):
            if line.strip():
                kept.append(line if line.endswith("\n") else line + "\n")
                if len(kept) == rows:
                    break
    partial = out.with_name(out.name + ".part")
    partial.write_text("".join(kept), encoding="utf-8")
    partial.replace(out)


def _fetch(store: ObjectStore, stored: StoredFile, path: Path) -> Path | str:
    """The object at `path`, or why it could not be had as completed. Its sha256 is checked
    here first for a file larger than complete read (control/intake.py PREFIX_BYTES)."""
    try:
        store.get_file(stored.key, path, expected_sha256=stored.sha256)
    except ChecksumMismatch:
        return f"{stored.key}: its sha256 is not the one claimed at complete"
    return path


def _load(
    store: ObjectStore, stored: StoredFile, layout: Layout, folder: Path
) -> AdapterFactors | tuple[str, ...]:
    fetched = _fetch(store, stored, folder / WEIGHTS)
    if isinstance(fetched, str):
        return (fetched,)
    return _factors(fetched, layout)


def _factors(path: Path, layout: Layout) -> AdapterFactors | tuple[str, ...]:
    """The upload's factors, or its issues (each naming the tensor or part at fault)."""
    expected = layout.expected or _from_header(path, layout.rank)
    if expected is None:
        return (f"{WEIGHTS}: not a LoRA adapter of rank {layout.rank}",)
    check = check_adapter(path, expected)
    if not check.ok or check.factors is None:
        return tuple(f"{WEIGHTS}: {issue}" for issue in check.issues)
    return check.factors


def _start_factors(
    store: ObjectStore, stored: StoredFile | None, layout: Layout, folder: Path
) -> AdapterFactors | None:
    """The start adapter's factors (None in round 0). It is the coordinator's own merge, so
    its rank is read from its header; a start that does not load is an error, not an issue."""
    if stored is None:
        return None
    path = folder / WEIGHTS
    store.get_file(stored.key, path, expected_sha256=stored.sha256)
    base = layout.expected or _from_header(path, None)
    header = parse_header(path, max_tensors=1 << 16).header
    if base is None or header is None or not base.modules:
        raise MergeFailed(f"the start adapter {stored.key} is not a LoRA adapter")
    first = header.tensors.get(base.modules[0].key_a)
    if first is None:
        raise MergeFailed(f"the start adapter {stored.key} lacks {base.modules[0].key_a}")
    check = check_adapter(path, ExpectedAdapter(rank=first.shape[0], modules=base.modules))
    if check.factors is None:
        raise MergeFailed(f"the start adapter {stored.key}: {'; '.join(map(str, check.issues))}")
    return check.factors


def _from_header(path: Path, rank: int | None) -> ExpectedAdapter | None:
    """With no architecture known: the LoRA pairs the file declares (of rank `rank`, or any
    one rank when None), as the expected layout."""
    header = parse_header(path, max_tensors=1 << 16).header
    if header is None:
        return None
    pairs: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, entry in header.tensors.items():
        match = _FACTOR.match(key)
        if match is None or len(entry.shape) != 2:
            return None
        pairs.setdefault(match["path"], {})[match["part"]] = entry.shape
    ranks = {p["A"][0] for p in pairs.values() if "A" in p}
    if not pairs or len(ranks) != 1 or (rank is not None and ranks != {rank}):
        return None
    modules = []
    for module, parts in sorted(pairs.items()):
        if set(parts) != {"A", "B"}:
            return None
        modules.append(ExpectedModule(path=module, d_in=parts["A"][1], d_out=parts["B"][0]))
    return ExpectedAdapter(rank=ranks.pop(), modules=tuple(modules))


# --- what a check of a task's upload needs (built by the coordinator) -------------------


def weights_of(task: TaskRecord) -> StoredFile:
    result = task.result()
    if result is None:
        raise RuntimeError(f"task {task.task_id} ({task.state}) has no result")
    ref = result.artifacts[ADAPTER_WEIGHTS]
    return StoredFile(ref.key, ref.sha256)


def layout_of(task: TaskRecord) -> Layout:
    config = adapter_config(task)
    return Layout(
        expected=expected_for(task),
        rank=int(config["r"]),
        adapter_config=json.dumps(config),
        task_json=task.task_json,
    )


def budget_of(task: TaskRecord, manifest_json: Callable[[], str | None]) -> StepBudget | None:
    """What the task's optimizer can do (verify/bounds.py): its AdamW steps, from the task (or,
    training by epochs, the shard's rows in the job's manifest); None when not known."""
    train = TrainTask.model_validate_json(task.task_json)
    steps = max_steps(train, task_rows(train, task, manifest_json))
    if steps is None:
        return None
    return StepBudget(
        learning_rate=train.learning_rate,
        lr_scheduler=train.lr_scheduler,
        steps=steps,
        warmup_steps=train.warmup_steps,
        warmup_ratio=train.warmup_ratio,
        weight_decay=train.weight_decay,
        optimizer=train.optimizer,
    )


def start_of(task: TaskRecord) -> StoredFile | None:
    start = task.inputs().start_adapter
    if not start or ADAPTER_WEIGHTS not in start:
        return None
    return StoredFile(start[ADAPTER_WEIGHTS].key, start[ADAPTER_WEIGHTS].sha256)


def check_fields(
    store: ObjectStore, spec: SweepSpec, job_id: str, trial: int, round: int
) -> dict[str, Any]:
    """What the checks of a round's uploads compare them with, for its TaskRecords
    (`model_json`, `adapter_config_json`): the base model's config.json where the
    coordinator can read it (pipeline/placement.py), and the adapter_config.json the
    coordinator writes for the uploads, from the task. After round 0 a worker trains the
    start adapter as loaded, so the uploads' rank and scale are the start's (the
    coordinator's own merge, read from the store)."""
    try:
        model: str | None = json.dumps(dict(model_config(spec, store)))
    except ModelConfigUnavailable:
        model = None
    task = TrainTask.from_spec(spec)
    config = coordinator_config(task, task.base_model)
    if round > 0:
        merged = merged_prefix(job_id, trial, round - 1) + ADAPTER_CONFIG
        start = json.loads(store.get_bytes(merged))
        config.update(r=start["r"], lora_alpha=start["lora_alpha"])
    return {"model_json": model, "adapter_config_json": json.dumps(config)}
