"""Worker-role commands (`cotune worker`, `cotune train-local`), plugged into `cotune`.

Kept light at import time: heavy modules load inside each command.
"""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    """Add the worker commands to the `cotune` app (entry point `cotune.commands`)."""
    app.command("worker")(worker)
    app.command("train-local")(train_local)
    app.command("evaluate")(evaluate)


def worker(
    coordinator: str = typer.Option(..., "--coordinator", help="The coordinator's URL."),
    join_token: str = typer.Option(..., "--join-token", help="Join token from its operator."),
    gpus: str | None = typer.Option(
        None, "--gpus", help="CUDA devices to train on, e.g. 0 or 0,1 (default: all)."
    ),
    max_memory_gb: float | None = typer.Option(
        None, "--max-memory-gb", help="Offer at most this much device memory per GPU (GiB)."
    ),
    cpu: bool = typer.Option(False, "--cpu", help="Train on the CPU even if a GPU is present."),
    once: bool = typer.Option(False, "--once", help="Run one task, then exit."),
    wait: float = typer.Option(
        300.0, "--wait", help="With --once: exit 3 if no work is offered within this many seconds."
    ),
    work_dir: Path | None = typer.Option(
        None,
        "--work-dir",
        help="Folder for inputs, checkpoints, caches and worker.log (default: "
        "$COTUNE_HOME/worker, or ~/.cotune/worker).",
    ),
    plain: bool = typer.Option(
        False,
        "--plain",
        envvar="COTUNE_WORKER_PLAIN",
        help="One log line per event even on a terminal (no live view).",
    ),
    agent_process: bool = typer.Option(False, "--agent-process", hidden=True),
) -> None:
    """Contribute this machine's GPUs (or CPU): take training tasks until Ctrl-C.

    On a terminal it shows a live view: the coordinator and its state, the task, step of
    max steps, loss, tokens/s, memory, tasks done and the credit the coordinator granted.
    Library warnings and progress bars then go to the log file in the work folder
    (worker.log, its path shown). With --plain (or COTUNE_WORKER_PLAIN=1), output piped or
    redirected, or several GPUs: one log line per event on stderr instead.

    Ctrl-C or SIGTERM: finish the step, upload a checkpoint, give the task back.
    A second Ctrl-C quits at once.

    Exit codes: 0 done or stopped, 1 error, 2 bad flags, 3 no work within --wait.

    Example: cotune worker --coordinator https://cotune.example.org --join-token $TOKEN
    """
    from cotune.worker.launcher import WorkerOptions, worker_command

    options = WorkerOptions(
        coordinator=coordinator,
        join_token=join_token,
        gpus=gpus,
        max_memory_gb=max_memory_gb,
        cpu=cpu,
        once=once,
        wait_s=wait,
        work_dir=work_dir,
        agent_process=agent_process,
        plain=plain,
    )
    raise typer.Exit(worker_command(options))


def train_local(
    spec: Path = typer.Argument(..., help="Sweep spec (YAML); its concrete values are used."),
    data: Path = typer.Option(..., "--data", help="Training rows (.jsonl or .jsonl.zst)."),
    out: Path = typer.Option(..., "--out", help="New folder for adapter/ and metrics.json."),
    param: list[str] = typer.Option(
        [], "--param", help="key=value for a search dimension, e.g. training.learning_rate=3e-3."
    ),
    eval_file: Path | None = typer.Option(None, "--eval", help="Held-out rows: eval_loss."),
    resume: Path | None = typer.Option(
        None, "--resume", help="A checkpoint folder (out/checkpoints/checkpoint-N) to continue."
    ),
    models_dir: Path | None = typer.Option(
        None, "--models-dir", help="Cache of built-in models (default: $COTUNE_HOME/models)."
    ),
) -> None:
    """Train one task on this machine, no coordinator: the spec's values, your data.

    Ctrl-C: save a checkpoint and stop (resume with --resume). Exit codes: 0 done,
    1 error, 2 bad input, 130 stopped.

    Example: cotune train-local examples/tiny/sweep.yaml --data examples/tiny/data/train.jsonl
    --out out/local --param training.learning_rate=3e-3 --param lora.lora_r=8
    """
    from cotune.worker.train_local import TrainLocalOptions, train_local_command

    options = TrainLocalOptions(
        spec=spec,
        data=data,
        out=out,
        params=tuple(param),
        eval_file=eval_file,
        resume=resume,
        models_dir=models_dir,
    )
    raise typer.Exit(train_local_command(options))


def evaluate(
    task: Path = typer.Option(..., "--task", help="TrainTask JSON: how to load the base model."),
    eval_file: Path = typer.Option(..., "--eval", help="Held-out rows (.jsonl or .jsonl.zst)."),
    out: Path = typer.Option(..., "--out", help="File that receives the result (JSON)."),
    adapter: Path | None = typer.Option(None, "--adapter", help="PEFT adapter folder to score."),
    base_only: bool = typer.Option(False, "--base-only", help="Score the base model alone."),
    models_dir: Path | None = typer.Option(
        None, "--models-dir", help="Cache of built-in models (default: $COTUNE_HOME/models)."
    ),
) -> None:
    """Eval loss of an adapter (or of the base model) on held-out rows, written as JSON.

    The coordinator's trusted evaluation runs this. Exit codes: 0 done, 1 failed, 2 bad input.

    Example: cotune evaluate --task task.json --adapter merged/ --eval eval.jsonl.zst
    --out result.json
    """
    from cotune.worker.evaluate import EvaluateOptions, evaluate_command

    options = EvaluateOptions(
        task=task,
        eval_file=eval_file,
        out=out,
        adapter=adapter,
        base_only=base_only,
        models_dir=models_dir,
    )
    raise typer.Exit(evaluate_command(options))
