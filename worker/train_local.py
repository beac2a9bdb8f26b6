"""`cotune train-local`: one training task on this machine, without a coordinator.

The spec's concrete values (`SweepSpec.with_params`: each search dimension at the given
`--param` or its default) become a TrainTask, trained on `--data` into `--out` (adapter/ and
metrics.json), with a progress bar on a terminal and plain log lines otherwise.

Example:
    cotune train-local examples/tiny/sweep.yaml --data examples/tiny/data/train.jsonl \\
        --out out/local --param training.learning_rate=3e-3 --param lora.lora_r=8
"""

from __future__ import annotations

import json
import shutil
import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from cotune.orchestrator.protocol.spec import SpecError, parse_spec
from cotune.orchestrator.protocol.spec.files import read_spec_file, resolve_paths
from cotune.orchestrator.protocol.task import TrainTask
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(ValueError):
    """Bad command-line input; the message names the flag or file."""


@dataclass(frozen=True)
class TrainLocalOptions:
    spec: Path
    data: Path
    out: Path
    params: tuple[str, ...] = ()
    eval_file: Path | None = None
    resume: Path | None = None
    models_dir: Path | None = None


def parse_params(items: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """`key=value` pairs; values are JSON where they parse (numbers, lists), else strings."""
    params: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(
                f"--param {item!r}: expected key=value, e.g. training.learning_rate=3e-3"
            )
        if key in params:
            raise UsageError(f"--param {key}: given twice")
        try:
            params[key] = json.loads(raw)
        except json.JSONDecodeError:
            params[key] = raw
    return params


def build_task(spec_path: Path, params: dict[str, Any]) -> TrainTask:
    """The TrainTask of the spec at `spec_path` with `params`; SpecError on any problem."""
    data = resolve_paths(read_spec_file(spec_path), spec_path.resolve().parent)
    spec = parse_spec(data).with_params(params)
    return TrainTask.from_spec(spec)


def _check_paths(options: TrainLocalOptions) -> None:
    for flag, path in (("--data", options.data), ("--eval", options.eval_file)):
        if path is not None and not Path(path).is_file():
            raise UsageError(f"{flag} {path}: no such file")
    out = options.out
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a folder")
    if options.resume is None and out.is_dir() and any(out.iterdir()):
        raise UsageError(f"--out {out}: folder is not empty; pick a new one (or --resume)")


class _Display:
    """TrainingHooks for a person: a rich bar on a terminal, log lines elsewhere; Ctrl-C stops."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.stop_requested = False
        self.bar: Progress | None = None
        self.bar_task: Any = None
        self.last_line = 0.0
        if console.is_terminal:
            self.bar = Progress(
                TextColumn("training"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
                console=console,
            )

    def __enter__(self) -> _Display:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()

    def on_progress(self, progress: Any) -> bool:
        loss = "-" if progress.loss is None else f"{progress.loss:.4f}"
        info = f"loss {loss}  lr {progress.learning_rate:.2e}  {progress.tokens_per_s:,.0f} tok/s"
        if self.bar is not None:
            if self.bar_task is None:
                self.bar_task = self.bar.add_task("train", total=progress.max_steps, info="")
            self.bar.update(self.bar_task, completed=progress.step, info=info)
        else:
            self.console.print(
                f"step {progress.step}/{progress.max_steps}  {info}", highlight=False
            )
        return not self.stop_requested

    def on_checkpoint(self, checkpoint_dir: Path, step: int) -> None:
        self.console.print(f"checkpoint at step {step}: {checkpoint_dir}", highlight=False)

    def interrupt(self, signum: int, frame: FrameType | None) -> None:
        if self.stop_requested:
            raise KeyboardInterrupt
        self.stop_requested = True
        self.console.print("stopping after this step (Ctrl-C again to quit at once)")


def _quiet_libraries() -> None:
    # Library chatter (per-step dicts, load bars, CPU-fallback warnings) drowns the progress.
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


def train_local_command(options: TrainLocalOptions) -> int:
    """Run `cotune train-local`; returns the exit code."""
    # soft_wrap: long paths stay on one line when output goes to a file or pipe.
    out, err = Console(soft_wrap=True), Console(stderr=True, soft_wrap=True)
    try:
        task = build_task(options.spec, parse_params(options.params))
        _check_paths(options)
    except SpecError as e:
        err.print(f"[red]error[/red]: {options.spec} is not usable:")
        for issue in e.errors:
            err.print(f"  {issue}", highlight=False, markup=False)
        return EXIT_USAGE
    except UsageError as e:
        err.print(f"[red]error[/red]: {e}", highlight=False)
        return EXIT_USAGE

    from cotune.worker.basemodel import BaseModelError
    from cotune.worker.checkpoint import CheckpointError
    from cotune.worker.data import DataError
    from cotune.worker.training import TrainingError, run_training

    _quiet_libraries()
    created = not options.out.exists()
    display = _Display(out)
    previous = signal.signal(signal.SIGINT, display.interrupt)
    started = time.perf_counter()
    try:
        with display:
            result = run_training(
                task,
                options.out,
                train_files=[options.data],
                eval_file=options.eval_file,
                resume_from=options.resume,
                hooks=display,
                models_dir=options.models_dir,
            )
    except (DataError, CheckpointError, BaseModelError, TrainingError) as e:
        if created:
            shutil.rmtree(options.out, ignore_errors=True)  # bad input leaves nothing behind
        err.print(f"[red]error[/red]: {e}", highlight=False)
        return EXIT_USAGE
    except KeyboardInterrupt:
        err.print("interrupted")
        return EXIT_INTERRUPTED
    finally:
        signal.signal(signal.SIGINT, previous)

    metrics = result.metrics
    summary = ", ".join(
        f"{k} {metrics[k]:.4f}" if isinstance(metrics[k], float) else f"{k} {metrics[k]}"
        for k in ("steps", "tokens", "train_loss", "eval_loss")
        if k in metrics
    )
    out.print(f"{summary} in {time.perf_counter() - started:.1f}s", highlight=False)
    out.print(f"adapter: {result.adapter_dir}", highlight=False)
    if result.stopped:
        checkpoints = options.out / "checkpoints"
        out.print(
            f"stopped early; resume with --resume {checkpoints}/checkpoint-{metrics['steps']}"
        )
        return EXIT_INTERRUPTED
    return EXIT_OK
