"""What `complete` checks of a result before taking it in (the cheap checks), what the task's
adapter must look like, and the credit it is worth.

The cheap checks run on the request path, so they read little: one ranged GET of each
artifact's first 64 KiB (data/signedread.py: no botocore on this path), which gives its size
(it must be the claimed one) and, for a file that small (the configs, a small adapter), all of
it, hashed against the claimed sha256 at once. A larger volunteer file is hashed where it is
downloaded anyway, by the heavy checks (pipeline/upload_checks.py: a sha256 that differs is
an issue of the result, with a strike), so nothing is merged or credited unhashed and a
completion reads a few KB, not the adapter; a trusted cluster worker's result skips the heavy
checks, so its large files are hashed here. Of the weights the safetensors header is read
from that prefix (a second ranged GET only for a header past 64 KiB), checked by
verify/header.py against the tensors the task implies: exactly the expected keys, each of its
expected shape (rank and modules from the task, the architecture from the base model's
config.json as the reconciler recorded it on the task, or the built-in model's). The worker's
adapter_config.json and metrics.json are stored as opaque files and never parsed: the
coordinator writes the adapter_config.json it uses (`adapter_config`). Values (NaN, scale,
direction) are the heavy checks' (pipeline/verification.py).

Where the coordinator cannot read the base model's config (a hub id) the header is still
checked, and every tensor must be a LoRA factor of the task's rank; the heavy checks and the
round review see the values.

    intake = Intake(state, store, strikes)
    judged = intake.judge(task, attempt, worker_id, body)   # outcome, answer, result
    problems = intake.problems(task, body, trusted=False)   # [] when it may be taken in
    tokens = task_tokens(train, rows)         # the credit, from the task (and its shard's rows)
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import struct
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cotune.orchestrator.control.checkpoints import verify_object
from cotune.orchestrator.control.quotas import model_config as base_model_config
from cotune.orchestrator.control.quotas import task_rows
from cotune.orchestrator.control.records import TaskResult, decode_hash
from cotune.orchestrator.protocol.memory import ModelShape
from cotune.orchestrator.protocol.task import TrainTask
from cotune.orchestrator.protocol.wire import ADAPTER_WEIGHTS, CompleteRequest, CompleteResponse
from cotune.orchestrator.verify.adapter import coordinator_config
from cotune.orchestrator.verify.expected import ExpectedAdapter, expected_adapter
from cotune.orchestrator.verify.header import MAX_HEADER_BYTES, Header, parse_header

if TYPE_CHECKING:
    from cotune.orchestrator.control.records import TaskRecord
    from cotune.orchestrator.control.state import State
    from cotune.orchestrator.control.strikes import Strikes
    from cotune.orchestrator.data.objectstore import ObjectStore

log = logging.getLogger(__name__)

#: Unexpected tensors named one by one before a header is refused as a whole.
EXTRA_TENSORS = 16
#: With no architecture known: at most this many tensors (a 100-layer model, 7 projections).
UNKNOWN_MAX_TENSORS = 1400
_SHOWN = 3  # names listed per kind of problem
#: Read of each artifact at complete: its size, the weights' header, and small files whole.
PREFIX_BYTES = 64 * 1024
_FACTOR = re.compile(r"^base_model\.model\..+\.lora_(?P<part>[AB])\.weight$")


@dataclass(frozen=True)
class Judged:
    """A completion judged by the cheap checks: what complete.lua records and answers.

    outcome: "accepted" (a trusted cluster worker's result, credited now), "verifying" (a
    volunteer's, credited if the heavy checks accept it) or "rejected".
    """

    outcome: str
    answer: CompleteResponse
    result: TaskResult
    trusted: bool

    @property
    def credit(self) -> float:
        return self.result.tokens if self.outcome == "accepted" else 0.0


class Intake:
    """The cheap checks of a completion (module docstring)."""

    def __init__(self, state: State, store: ObjectStore, strikes: Strikes) -> None:
        self.state = state
        self.store = store
        self.strikes = strikes

    def judge(
        self, task: TaskRecord, attempt: int, worker_id: str, body: CompleteRequest
    ) -> Judged:
        """The outcome of a completion whose files are the ones issued to its lease."""
        worker = decode_hash(self.state.redis.hgetall(self.state.keys.worker(worker_id)))
        trusted = worker.get("kind") == "cluster"
        problems = self.problems(task, body, trusted=trusted)
        train = TrainTask.model_validate_json(task.task_json)
        rows = task_rows(train, task, lambda: self.state.get_job(task.job_id).manifest_json)
        result = TaskResult(
            attempt=attempt,
            worker_id=worker_id,
            artifacts=body.artifacts,
            metrics=body.metrics,
            tokens=task_tokens(train, rows),
            owner=worker.get("name") or worker_id,
        )
        if problems:
            answer = CompleteResponse(accepted=False, reason="; ".join(problems))
            return Judged("rejected", answer, result, trusted)
        if trusted:
            answer = CompleteResponse(accepted=True, credit=result.tokens)
            return Judged("accepted", answer, result, trusted)
        # Taken in, uncredited until the heavy checks accept it.
        return Judged("verifying", CompleteResponse(accepted=True, credit=0.0), result, trusted)

    def rejected(self, judged: Judged, task: TaskRecord) -> None:
        """After complete.lua recorded a rejection: a strike on a volunteer's owner (a
        cluster worker's rejection counted as a failed attempt instead), and the upload
        deleted from the store."""
        why = judged.answer.reason or ""
        if not judged.trusted:
            reason = f"result rejected at complete ({task.task_id}): {why}"
            once = f"complete:{task.task_id}:{judged.result.attempt}"
            self.strikes.add(judged.result.worker_id, reason, once=once)
        for ref in judged.result.artifacts.values():
            try:
                self.store.delete(ref.key)
            except Exception:  # the store's error family: a leftover costs space only
                log.warning("could not delete the rejected upload %s", ref.key, exc_info=True)

    def problems(self, task: TaskRecord, body: CompleteRequest, *, trusted: bool) -> list[str]:
        """What is wrong with an uploaded result, each naming its file; [] if nothing. The
        caller has checked that every artifact is at a key issued to its lease. `trusted`:
        a cluster worker's result, whose large files are hashed here (module docstring)."""
        problems, first = [], b""
        for name, ref in body.artifacts.items():
            read = self.store.read_prefix(ref.key, PREFIX_BYTES)
            problem = _read_problem(ref.key, ref.sha256, ref.bytes, read)
            if problem is None and trusted and ref.bytes > PREFIX_BYTES:
                problem = verify_object(self.store, ref.key, ref.sha256, ref.bytes)
            if problem is not None:
                problems.append(problem)
            elif name == ADAPTER_WEIGHTS and read is not None:
                first = read[1]
        if problems:
            return problems
        weights = body.artifacts[ADAPTER_WEIGHTS]
        issues = self.header_issues(task, weights.key, weights.bytes, first)
        if len(issues) > _SHOWN + 1:
            issues = [*issues[:_SHOWN], f"... and {len(issues) - _SHOWN} more issue(s)"]
        return [f"{ADAPTER_WEIGHTS}: " + "; ".join(issues)] if issues else []

    def header_issues(self, task: TaskRecord, key: str, size: int, first: bytes) -> list[str]:
        """The weights' header against the task's expected tensors (module docstring);
        `first`: the file's first bytes as already read (the rest of a long header is
        fetched)."""
        expected = expected_for(task)
        rank = int(adapter_config(task)["r"])
        head = first[:8]
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        wanted = min(size, 8 + length) if 0 < length <= MAX_HEADER_BYTES else len(head)
        data = first[:wanted]
        if wanted > len(data):
            data += self.store.get_range(key, len(data), wanted - len(data))
        with tempfile.TemporaryDirectory(prefix="cotune-header-") as tmp:
            # The header bytes at their place in a sparse file of the upload's size:
            # parse_header checks the tensors' offsets against the real length, and no
            # tensor data is read or stored.
            path = Path(tmp) / ADAPTER_WEIGHTS
            with path.open("wb") as out:
                out.write(data)
                out.truncate(size)
            bound = len(expected.shapes) + EXTRA_TENSORS if expected else UNKNOWN_MAX_TENSORS
            parsed = parse_header(path, max_tensors=bound, max_header_bytes=MAX_HEADER_BYTES)
        if parsed.header is None:
            return [str(issue) for issue in parsed.issues]
        if expected is None:
            return _factor_issues(parsed.header, rank)
        return layout_issues(parsed.header, expected)


def _read_problem(key: str, sha256: str, size: int, read: tuple[int, bytes] | None) -> str | None:
    """What the prefix read shows wrong with a claimed file (hashed when read whole)."""
    if read is None:
        return f"{key}: nothing was uploaded there"
    stored, first = read
    if stored != size:
        return f"{key}: {stored} bytes stored, {size} claimed"
    if stored <= len(first):
        got = hashlib.sha256(first).hexdigest()
        if got != sha256:
            return f"{key}: sha256 {got}, {sha256} claimed"
    return None


def layout_issues(header: Header, expected: ExpectedAdapter) -> list[str]:
    """Exactly the expected tensor keys, each of its expected shape."""
    shapes = expected.shapes
    missing = [k for k in shapes if k not in header.tensors]
    extra = sorted(k for k in header.tensors if k not in shapes)
    wrong = [
        (k, entry.shape)
        for k, entry in header.tensors.items()
        if k in shapes and entry.shape != shapes[k]
    ]
    issues = []
    if missing:
        issues.append(
            f"{len(missing)} tensor(s) the task implies are missing: {_names(missing)} (the "
            f"task adapts {len(expected.modules)} modules at rank {expected.rank})"
        )
    if extra:
        issues.append(f"{len(extra)} tensor(s) the task implies no such factor: {_names(extra)}")
    for key, got in wrong[:_SHOWN]:
        want = shapes[key]
        message = f"{key}: shape {list(got)}, expected {list(want)}"
        axis = 0 if key.endswith(".lora_A.weight") else 1
        if len(got) == 2 and got[axis] != expected.rank:
            message += f" (rank {got[axis]}, but the task's r is {expected.rank})"
        issues.append(message)
    if len(wrong) > _SHOWN:
        issues.append(f"... and {len(wrong) - _SHOWN} more tensor(s) of the wrong shape")
    return issues


def _factor_issues(header: Header, rank: int) -> list[str]:
    """With no architecture known: each tensor is a 2-D LoRA factor of rank `rank`."""
    bad = []
    for key, entry in header.tensors.items():
        match = _FACTOR.match(key)
        axis = 0 if match and match["part"] == "A" else 1
        if not match or len(entry.shape) != 2 or entry.shape[axis] != rank:
            bad.append(key)
    if not header.tensors:
        return ["no tensors"]
    if bad:
        return [f"{len(bad)} tensor(s) are not LoRA factors of rank {rank}: {_names(bad)}"]
    return []


def _names(keys: list[str]) -> str:
    shown = ", ".join(repr(k) for k in keys[:_SHOWN])
    return shown + (f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else "")


# --- what the task implies --------------------------------------------------------------------


def model_config(task: TaskRecord) -> Mapping[str, Any] | None:
    """The base model's config.json as the reconciler recorded it (pipeline/placement.py),
    else as control/quotas.py finds it (a built-in model, a local folder); None when the
    coordinator cannot know it (a hub id)."""
    if task.model_json:
        config: dict[str, Any] = json.loads(task.model_json)
        return config
    return base_model_config(TrainTask.model_validate_json(task.task_json).base_model)


def adapter_config(task: TaskRecord) -> dict[str, Any]:
    """The adapter_config.json of this task's uploads, as the coordinator writes it: recorded
    by the reconciler (after round 0 its rank and scale are the start adapter's, which the
    worker trains on), else written from the task."""
    if task.adapter_config_json:
        config: dict[str, Any] = json.loads(task.adapter_config_json)
        return config
    train = TrainTask.model_validate_json(task.task_json)
    return coordinator_config(train, train.base_model)


def expected_for(task: TaskRecord) -> ExpectedAdapter | None:
    """Every tensor key and shape an upload of `task` must have; None if the architecture is
    unknown."""
    config = model_config(task)
    if config is None:
        return None
    train = TrainTask.model_validate_json(task.task_json)
    lora = train.lora.model_copy(update={"r": int(adapter_config(task)["r"])})
    return expected_adapter(ModelShape.from_config(config), lora)


def task_tokens(train: TrainTask, rows: int | None) -> float:
    """The tokens a task trains, from the task alone: max_steps x micro_batch x grad_accum x
    sequence_len, or (by epochs) the shard's rows x epochs x sequence_len (an upper bound:
    padding is counted). Never a worker's count. 0 when training by epochs with no rows.

    `rows`: control/quotas.py `shard_rows` of the job's manifest."""
    if train.max_steps is not None:
        return float(
            train.max_steps
            * train.micro_batch_size
            * train.gradient_accumulation_steps
            * train.sequence_len
        )
    if rows is None:
        return 0.0
    return float(math.ceil(train.num_epochs * rows) * train.sequence_len)
