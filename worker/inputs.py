"""A leased task's inputs, fetched to local disk: data, start adapter, checkpoint, base model.

Every file comes from a presigned GET and is kept only if its size and sha256 match what
the coordinator announced (worker/transfer.py). A resume checkpoint arrives as a tar archive
and is unpacked with the safe "data" filter (worker/checkpoint_sync.py); a staged base model
is one too, unpacked and cached by its sha256 under the models folder with the code the
coordinator's evaluation uses (orchestrator/protocol/modelarchive.py `cached_model`), so
the next task on the same model skips the download.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import httpx
from cotune.orchestrator.protocol.modelarchive import cached_model
from cotune.orchestrator.protocol.task import TrainTask
from cotune.orchestrator.protocol.wire import PresignedGet, TaskLease
from cotune.worker.checkpoint import check_checkpoint
from cotune.worker.checkpoint_sync import unpack_archive
from cotune.worker.transfer import Transfers


@dataclass(frozen=True)
class TaskFiles:
    """What `run_training` takes besides the task (whose base_model may now be local)."""

    task: TrainTask
    train_files: list[Path]
    eval_file: Path | None
    start_adapter: Path | None
    resume_from: Path | None


def fetch_inputs(
    lease: TaskLease,
    task_dir: Path,
    transfers: Transfers,
    *,
    models: Path,
    cancel: threading.Event,
) -> TaskFiles:
    """Download (and check) every input of `lease` under `task_dir`; base models go to
    `models`. Raises TransferError (TransferCancelled once `cancel` is set) or ValueError
    (an archive or checkpoint that is not what it should be), naming the input."""

    def get(src: PresignedGet, dest: Path, label: str) -> Path:
        return transfers.download(src, dest, label=f"download {label}", cancel=cancel)

    inputs, task = lease.inputs, lease.task
    if isinstance(inputs.base_model, PresignedGet):
        folder = _staged_model(inputs.base_model, models, get)
        task = task.model_copy(update={"base_model": str(folder)})
    elif inputs.base_model != task.base_model:
        task = task.model_copy(update={"base_model": inputs.base_model})
    data = task_dir / "data"
    # An index prefix keeps two shards of the same name apart; the extension tells the format.
    train_files = [
        get(src, data / f"{i:05d}-{_name_of(src, 'train.jsonl')}", f"train[{i}]")
        for i, src in enumerate(inputs.train)
    ]
    eval_file = None
    if inputs.eval is not None:
        eval_file = get(inputs.eval, data / f"eval-{_name_of(inputs.eval, 'eval.jsonl')}", "eval")
    start_adapter = None
    if inputs.start_adapter:
        start_adapter = task_dir / "start_adapter"
        for name, src in inputs.start_adapter.items():
            get(src, start_adapter / name, f"start_adapter {name}")
    resume_from = None
    if inputs.resume_checkpoint is not None:
        step = inputs.resume_checkpoint.step
        archive = get(
            inputs.resume_checkpoint.archive, task_dir / "resume.tar", f"checkpoint {step}"
        )
        resume_from = unpack_archive(archive, task_dir / "resume" / f"checkpoint-{step}")
        archive.unlink()
        info = check_checkpoint(resume_from)  # CheckpointError is a ValueError
        if info.step != step:
            raise ValueError(f"resume checkpoint: announced step {step}, holds step {info.step}")
    return TaskFiles(task, train_files, eval_file, start_adapter, resume_from)


def _staged_model(
    src: PresignedGet, models: Path, get: Callable[[PresignedGet, Path, str], Path]
) -> Path:
    """The Hugging Face folder of a staged base model archive, cached by its sha256
    (ModelArchiveError, a ValueError, for an archive without one)."""
    return cached_model(models, src.sha256, lambda dest: get(src, dest, "base model"))


def _name_of(src: PresignedGet, default: str) -> str:
    """The file name to store an input under: as announced, else the URL's last segment."""
    if src.name:
        return src.name
    name = PurePosixPath(httpx.URL(src.url).path).name
    return name if name and not name.startswith(".") else default
