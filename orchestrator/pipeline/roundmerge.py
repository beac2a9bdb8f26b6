"""The trusted step after a round: merge the K accepted shard adapters, evaluate the merge.

`merge_and_evaluate(MergeRequest)` runs as a Ray task (orchestrator/runtime/raypool.py) on a
coordinator-controlled node. It is idempotent and resumable, because a coordinator may die
at any instant and its successor runs it again:

    1. jobs/<job>/trials/<t>/r<round>/merged/eval.json exists -> the round is done: return it
    2. merged/adapter_config.json exists -> the merge was uploaded: download it, go to 4
    3. download the K adapters' weights (sha256 checked) and write beside each the
       adapter_config.json the coordinator derived from the task (never the worker's, whose
       adapter_config.json and metrics.json are not read), `merge_adapters` (the merge
       library) with explicit weights: the shards' rows from the manifest (never a worker's
       token count); evaluate it locally, then upload weights and card first and
       adapter_config.json last (its presence means the upload is whole), naming as its base
       model the folder the evaluation loaded (the built-in model's, on this node), or the
       spec's s3:// prefix or folder for a staged base model
    4. evaluate on the job's eval split with `cotune evaluate` in a subprocess, upload
       eval.json (the marker that the round is done)

Evaluation runs the worker role's command rather than importing worker/ (orchestrator/
never imports worker/): the command line is the contract between the roles, and the
subprocess frees the model's memory when it exits. `evaluate_base` scores the base model
alone the same way, once per job (jobs/<job>/base_eval.json), for the model card.

A staged base model (an s3:// or local-folder one: pipeline/modelstage.py) is evaluated from
its archive in the store, unpacked once per node under the models folder by its sha256
(protocol/modelarchive.py `cached_model`, the cache workers use too), so the coordinator
scores exactly what workers train on, wherever Ray runs the step.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cotune.orchestrator.data.objectstore import ObjectStore
from cotune.orchestrator.protocol.modelarchive import cached_model
from cotune.orchestrator.protocol.task import TrainTask

EVAL_FILE = "eval.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MERGE_UPLOAD_ORDER = (WEIGHTS_FILE, "metrics.json", "README.md")
MERGE_COMPLETE_FILE = "adapter_config.json"  # uploaded last
EVALUATE_TIMEOUT_S = 4 * 3600.0


class MergeFailed(RuntimeError):
    """The merge or its evaluation failed; the message says which and why."""


class NoUsableRows(MergeFailed):
    """`cotune evaluate` found no eval row to score: every one dropped at the task's
    sequence_len (exit code 3); the message is the command's."""


EXIT_NO_ROWS = 3  # worker/evaluate.py's exit code for it


@dataclass(frozen=True)
class StoreConfig:
    """How a Ray task reaches the object store (Ray runs on a trusted network)."""

    endpoint: str | None
    bucket: str
    access_key: str | None
    secret_key: str | None = field(repr=False)
    region: str = "us-east-1"

    def open(self) -> ObjectStore:
        return ObjectStore(
            self.endpoint, self.bucket, self.access_key, self.secret_key, self.region
        )


@dataclass(frozen=True)
class StoredFile:
    key: str
    sha256: str


@dataclass(frozen=True)
class EvalSetup:
    """What evaluation needs: how to load the base (a TrainTask, and the archive of a staged
    base model) and the eval split."""

    task_json: str
    eval_file: StoredFile
    models_dir: str | None
    work_dir: str
    base_archive: StoredFile | None = None


@dataclass(frozen=True)
class MergeRequest:
    job_id: str
    trial: int
    round: int
    adapters: tuple[StoredFile, ...]  # per shard: its adapter_model.safetensors
    weights: tuple[float, ...]  # per shard: its rows (the manifest's)
    adapter_config: str  # JSON: the adapter_config.json of every shard's upload
    out_prefix: str
    method: str
    rank: int | None
    density: float | None
    seed: int
    evaluation: EvalSetup
    store: StoreConfig


@dataclass(frozen=True)
class MergeOutcome:
    job_id: str
    trial: int
    round: int
    merged_prefix: str
    eval_loss: float
    eval_tokens: int
    merged_now: bool  # False when an earlier run had uploaded the merge already
    seconds: float
    merge_s: float | None = None  # download, merge and upload, when this run merged
    eval_s: float | None = None  # the evaluation, when this run evaluated


def merge_and_evaluate(request: MergeRequest) -> MergeOutcome:
    """Steps 1-4 of the module docstring."""
    started = time.perf_counter()
    store = request.store.open()
    prefix = request.out_prefix
    done = _read_json(store, prefix + EVAL_FILE)
    if done is not None:
        return _outcome(request, done, merged_now=False, started=started)
    work = Path(request.evaluation.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(
        prefix=f"merge-{request.trial}-{request.round}-", dir=work
    ) as tmp:
        merged = Path(tmp) / "merged"
        merged_now = not store.exists(prefix + MERGE_COMPLETE_FILE)
        clock = time.perf_counter  # the durations go to the merge and evaluation histograms
        merge_s: float | None = None
        if merged_now:
            merging = clock()
            _merge(request, store, Path(tmp), merged)
            evaluating = clock()
            result = run_evaluate(request.evaluation, store, adapter=merged)
            uploading = clock()
            _name_base(merged, result, request.evaluation)
            _upload_merged(store, prefix, merged)
            merge_s = (evaluating - merging) + (clock() - uploading)
            eval_s = uploading - evaluating
        else:
            _download_merged(store, prefix, merged)
            evaluating = clock()
            result = run_evaluate(request.evaluation, store, adapter=merged)
            eval_s = clock() - evaluating
    store.put_bytes(prefix + EVAL_FILE, (json.dumps(result, indent=2) + "\n").encode())
    return _outcome(
        request, result, merged_now=merged_now, started=started, merge_s=merge_s, eval_s=eval_s
    )


def evaluate_base(setup: EvalSetup, store_config: StoreConfig, key: str) -> dict[str, Any]:
    """The base model's `cotune evaluate` result (eval loss, and what sequence_len kept of
    the eval rows), computed once and kept at `key`."""
    store = store_config.open()
    done = _read_json(store, key)
    if done is None:
        done = run_evaluate(setup, store, adapter=None)
        store.put_bytes(key, (json.dumps(done, indent=2) + "\n").encode())
    return done


def _merge(request: MergeRequest, store: ObjectStore, tmp: Path, merged: Path) -> None:
    from cotune.orchestrator.merge.base import MergeError
    from cotune.orchestrator.merge.merger import merge_adapters

    inputs = []
    for shard, stored in enumerate(request.adapters):
        folder = tmp / f"shard-{shard}"
        store.get_file(stored.key, folder / WEIGHTS_FILE, expected_sha256=stored.sha256)
        (folder / MERGE_COMPLETE_FILE).write_text(request.adapter_config)
        inputs.append(folder)
    try:
        merge_adapters(
            inputs,
            merged,
            method=request.method,
            rank=request.rank,
            weights=list(request.weights),
            density=request.density,
            seed=request.seed,
        )
    except MergeError as exc:
        raise MergeFailed(
            f"merging trial {request.trial} round {request.round} of {request.job_id}: {exc}"
        ) from exc


def _name_base(merged: Path, result: dict[str, Any], setup: EvalSetup) -> None:
    """The merged config names as its base the folder `cotune evaluate` loaded, where it
    says (a built-in model's is built on this node), so the adapter loads from its config;
    a staged base model by the spec's name for it (its s3:// prefix or folder), since the
    folder loaded is this node's cache."""
    staged = setup.base_archive is not None
    base = TrainTask.model_validate_json(setup.task_json).base_model if staged else None
    base = base or result.get("base_model")
    if not base:
        return
    config_file = merged / MERGE_COMPLETE_FILE
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = str(base)
    config_file.write_text(json.dumps(config, indent=2) + "\n")


def _upload_merged(store: ObjectStore, prefix: str, merged: Path) -> None:
    names = [n for n in MERGE_UPLOAD_ORDER if (merged / n).is_file()]
    others = sorted(
        p.name
        for p in merged.iterdir()
        if p.is_file() and p.name not in (*MERGE_UPLOAD_ORDER, MERGE_COMPLETE_FILE)
    )
    for name in [*names, *others, MERGE_COMPLETE_FILE]:
        store.put_file(prefix + name, merged / name)


def _download_merged(store: ObjectStore, prefix: str, folder: Path) -> None:
    for info in store.list(prefix):
        name = info.key.removeprefix(prefix)
        if "/" not in name and name != EVAL_FILE:
            store.get_file(info.key, folder / name)


def run_evaluate(setup: EvalSetup, store: ObjectStore, *, adapter: Path | None) -> dict[str, Any]:
    """`cotune evaluate` in a subprocess: its result mapping (eval_loss, eval_tokens, ...)."""
    return evaluate_file(setup, fetch_eval(setup, store), adapter=adapter, store=store)


def fetch_eval(setup: EvalSetup, store: ObjectStore) -> Path:
    """The eval split in the work folder (downloaded once, sha256 checked)."""
    eval_file = (
        Path(setup.work_dir)
        / "eval"
        / (f"{setup.eval_file.sha256}-{Path(setup.eval_file.key).name}")
    )
    if not eval_file.is_file():
        store.get_file(setup.eval_file.key, eval_file, expected_sha256=setup.eval_file.sha256)
    return eval_file


def evaluate_file(
    setup: EvalSetup, eval_file: Path, *, adapter: Path | None, store: ObjectStore
) -> dict[str, Any]:
    """`cotune evaluate` of the task in `setup` on the local `eval_file`."""
    work = Path(setup.work_dir)
    task_json = setup.task_json
    if setup.base_archive is not None:
        task = TrainTask.model_validate_json(task_json)
        folder = staged_base(setup, store)
        task_json = task.model_copy(update={"base_model": str(folder)}).model_dump_json()
    with tempfile.TemporaryDirectory(prefix="evaluate-", dir=work) as tmp:
        task_file = Path(tmp) / "task.json"
        task_file.write_text(task_json)
        out = Path(tmp) / "result.json"
        argv = [sys.executable, "-m", "cotune.orchestrator", "evaluate", "--task", str(task_file)]
        argv += ["--eval", str(eval_file), "--out", str(out)]
        argv += ["--adapter", str(adapter)] if adapter is not None else ["--base-only"]
        if setup.models_dir:
            argv += ["--models-dir", setup.models_dir]
        try:
            proc = subprocess.run(
                argv, capture_output=True, text=True, timeout=EVALUATE_TIMEOUT_S, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise MergeFailed(f"cotune evaluate ran past {EVALUATE_TIMEOUT_S:.0f} s") from exc
        if proc.returncode == EXIT_NO_ROWS:
            last = (proc.stderr or "").strip().splitlines()[-1:] or ["no usable eval rows"]
            raise NoUsableRows(last[0].removeprefix("error: "))
        if proc.returncode != 0 or not out.is_file():
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
            raise MergeFailed(f"cotune evaluate exited with {proc.returncode}: {tail}")
        result: dict[str, Any] = json.loads(out.read_text())
    return result


def staged_base(setup: EvalSetup, store: ObjectStore) -> Path:
    """The staged base model's folder on this node: `<models>/<sha256>/`, downloaded
    (sha256 checked) and unpacked on first use."""
    archive = setup.base_archive
    assert archive is not None
    models = Path(setup.models_dir) if setup.models_dir else Path(setup.work_dir) / "models"

    def fetch(dest: Path) -> None:
        store.get_file(archive.key, dest, expected_sha256=archive.sha256)

    return cached_model(models, archive.sha256, fetch)


def _read_json(store: ObjectStore, key: str) -> dict[str, Any] | None:
    if not store.exists(key):
        return None
    data: dict[str, Any] = json.loads(store.get_bytes(key))
    return data


def _outcome(
    request: MergeRequest,
    result: dict[str, Any],
    *,
    merged_now: bool,
    started: float,
    merge_s: float | None = None,
    eval_s: float | None = None,
) -> MergeOutcome:
    return MergeOutcome(
        job_id=request.job_id,
        trial=request.trial,
        round=request.round,
        merged_prefix=request.out_prefix,
        eval_loss=float(result["eval_loss"]),
        eval_tokens=int(result.get("eval_tokens", 0)),
        merged_now=merged_now,
        seconds=time.perf_counter() - started,
        merge_s=merge_s,
        eval_s=eval_s,
    )
