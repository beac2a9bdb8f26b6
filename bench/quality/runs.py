"""The quality benchmark's runs, each one cotune's own command in a subprocess:

    federated   one `cotune up --home HOME --workers 2` for all of a model's settings (the
                embedded stack, the coordinator, two local workers), each setting a job by
                `cotune submit SPEC`, its results by `cotune download JOB`: K shards for R
                rounds, the merged adapter of each round scored by the coordinator on the
                eval file (results.json). The jobs share the stack so that one job's merges
                overlap another's training (one `cotune run` a setting spent most of its time
                starting and stopping services)
    central     `cotune train-local SPEC --data TRAIN --out OUT` (one schedule over all the
                steps), then `cotune evaluate --adapter OUT/adapter --eval EVAL`: the same
                scoring command the coordinator runs

Every run gets its own spec (`spec_for`), written next to its outputs, so a figure can be
reproduced from the folder alone.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

COTUNE = [sys.executable, "-m", "cotune.orchestrator"]
RUN_TIMEOUT_S = 1800


class RunFailed(RuntimeError):
    """A cotune command exited non-zero; the message carries its last lines."""


@dataclass(frozen=True)
class Budget:
    """The training every setting gets: `steps` optimizer steps of `micro_batch` rows in all
    (T), split as K shards x R rounds x T/(K R) steps a task for the federated runs."""

    steps: int = 192
    micro_batch: int = 8
    sequence_len: int = 64
    learning_rate: float = 3e-3
    warmup_ratio: float = 0.1
    lora_r: int = 8


@dataclass(frozen=True)
class Setting:
    """One federated configuration: K shards, R rounds, how rounds are merged."""

    shards: int
    rounds: int
    merge: str = "svd"
    span: str = "round"  # training.lr_schedule_span

    @property
    def name(self) -> str:
        span = ", one schedule" if self.span == "trial" else ""
        return f"K {self.shards}, R {self.rounds}, {self.merge}{span}"


@dataclass
class Outcome:
    """What one run gave: the eval loss after each round (one entry for a central run), the
    base model's, the optimizer steps on the critical path and the wall time."""

    name: str
    eval_losses: list[float]
    base_eval_loss: float | None
    steps_per_round: int
    merges: int
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def eval_loss(self) -> float:
        return self.eval_losses[-1]


def spec_for(
    base_model: str,
    train: Path,
    eval_file: Path,
    budget: Budget,
    *,
    shards: int = 1,
    rounds: int = 1,
    steps: int,
    micro_batch: int | None = None,
    accumulation: int = 1,
    merge: str = "svd",
    span: str = "round",
) -> dict[str, Any]:
    """The sweep spec of one run: one trial, no search, no volunteers."""
    return {
        "name": "quality",
        "base_model": base_model,
        "dataset": {
            "path": str(train),
            "format": "completion",
            "eval_split": str(eval_file),
            "shards": shards,
        },
        "training": {
            "sequence_len": budget.sequence_len,
            "micro_batch_size": micro_batch or budget.micro_batch,
            "gradient_accumulation_steps": accumulation,
            "learning_rate": budget.learning_rate,
            "lr_scheduler": "cosine",
            "lr_schedule_span": span,
            "warmup_ratio": budget.warmup_ratio,
            "max_steps": steps,
            "checkpoint_steps": 1000,
            "gradient_checkpointing": False,
            "seed": 0,
        },
        "lora": {"lora_r": budget.lora_r, "lora_alpha": 2 * budget.lora_r},
        "quantization": {"type": "nf4"},
        "rounds": rounds,
        "merge": {"method": merge},
        "trust": {"allow_volunteers": False, "redundancy": 0.0},
    }


def _run(argv: list[str], log: Path, env: dict[str, str] | None = None) -> None:
    with log.open("w") as out:
        proc = subprocess.run(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=RUN_TIMEOUT_S,
            check=False,
            env=env,
        )
    if proc.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-20:])
        raise RunFailed(f"{' '.join(argv[2:4])} exited with {proc.returncode}:\n{tail}")


class Stack:
    """`cotune up` on a home of its own, and the jobs submitted to it."""

    def __init__(self, home: Path, workers: int = 2) -> None:
        self.home = home
        home.mkdir(parents=True)
        self.env = {**os.environ, "COTUNE_HOME": str(home)}
        self.log = (home.parent / "up.log").open("w")
        self.proc = subprocess.Popen(
            [*COTUNE, "up", "--home", str(home), "--workers", str(workers)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,
        )
        self.started: dict[str, float] = {}
        self._client = self._connect()

    def _connect(self) -> Any:
        from cotune.orchestrator.cli.client import CotuneClient, discover_url
        from cotune.orchestrator.control.tokens import load_or_create_admin_token

        give_up = time.monotonic() + 180
        while (url := discover_url(self.home)) is None:
            if self.proc.poll() is not None or time.monotonic() > give_up:
                raise RunFailed(f"cotune up did not come up; see {self.log.name}")
            time.sleep(0.5)
        return CotuneClient(url, load_or_create_admin_token(self.home))

    def submit(self, spec_file: Path) -> str:
        """`cotune submit`: the job id it printed."""
        done = subprocess.run(
            [*COTUNE, "submit", str(spec_file)], capture_output=True, text=True, env=self.env
        )
        found = re.search(r"submitted (\S+?);", done.stdout)
        if done.returncode != 0 or found is None:
            raise RunFailed(f"cotune submit {spec_file}: {done.stdout}{done.stderr}")
        self.started[found.group(1)] = time.perf_counter()
        return found.group(1)

    def wait(self, job_ids: list[str], timeout_s: float = RUN_TIMEOUT_S) -> dict[str, float]:
        """Until every job has ended: each one's seconds from submission; RunFailed naming a
        job that did not succeed."""
        left, ended = set(job_ids), {}
        give_up = time.monotonic() + timeout_s
        while left:
            for job_id in sorted(left):
                job = self._client.job(job_id)
                if job.state in ("succeeded", "failed", "cancelled"):
                    if job.state != "succeeded":
                        raise RunFailed(f"job {job_id} {job.state}: {job.error}")
                    ended[job_id] = time.perf_counter() - self.started[job_id]
                    left.discard(job_id)
            if time.monotonic() > give_up:
                raise RunFailed(f"jobs {sorted(left)} still running after {timeout_s:.0f} s")
            time.sleep(1.0)
        return ended

    def results(self, job_id: str, out: Path) -> dict[str, Any]:
        """`cotune download`: the job's results.json."""
        _run(
            [*COTUNE, "download", job_id, "--out", str(out)],
            out.parent / f"{job_id}.log",
            env=self.env,
        )
        data: dict[str, Any] = json.loads((out / "results.json").read_text())
        return data

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)  # cotune up stops everything on Ctrl-C
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def federated_spec(
    work: Path, base_model: str, train: Path, eval_file: Path, budget: Budget, setting: Setting
) -> Path:
    """The spec file of one setting: K shards, R rounds, budget.steps / (K R) steps a task."""
    per_task, left = divmod(budget.steps, setting.shards * setting.rounds)
    if left or per_task < 1:
        raise ValueError(f"{setting.name}: {budget.steps} steps do not split into K x R tasks")
    work.mkdir(parents=True)
    spec = spec_for(
        base_model,
        train,
        eval_file,
        budget,
        shards=setting.shards,
        rounds=setting.rounds,
        steps=per_task,
        merge=setting.merge,
        span=setting.span,
    )
    spec_file = work / "sweep.yaml"
    spec_file.write_text(yaml.safe_dump(spec, sort_keys=False))
    return spec_file


def federated_outcome(
    setting: Setting, budget: Budget, results: dict[str, Any], seconds: float
) -> Outcome:
    (trial,) = results["trials"]
    return Outcome(
        name=setting.name,
        eval_losses=[float(x) for x in trial["eval_losses"]],
        base_eval_loss=results["base_eval_loss"],
        steps_per_round=budget.steps // (setting.shards * setting.rounds),
        merges=setting.rounds,
        seconds=seconds,
        extra={"data_fit": results["dataset"].get("fit")},
    )


def federated_all(
    work: Path,
    base_model: str,
    train: Path,
    eval_file: Path,
    budget: Budget,
    settings: tuple[Setting, ...],
    *,
    meanwhile: Any = None,
) -> list[Outcome]:
    """Every setting as a job of one `cotune up`; `meanwhile()` runs while they train (the
    central runs), so the machine's two cores stay busy."""
    stack = Stack(work / "home")
    try:
        jobs = []
        for setting in settings:
            spec = federated_spec(
                work / setting.name.replace(", ", "-").replace(" ", ""),
                base_model,
                train,
                eval_file,
                budget,
                setting,
            )
            jobs.append(stack.submit(spec))
        if meanwhile is not None:
            meanwhile()
        seconds = stack.wait(jobs)
        return [
            federated_outcome(
                setting, budget, stack.results(job, work / f"results-{job}"), seconds[job]
            )
            for setting, job in zip(settings, jobs, strict=True)
        ]
    finally:
        stack.stop()


def central(
    work: Path,
    base_model: str,
    train: Path,
    eval_file: Path,
    budget: Budget,
    *,
    name: str,
    steps: int,
    accumulation: int = 1,
) -> Outcome:
    """`cotune train-local` for `steps` optimizer steps of `accumulation` micro-batches, one
    schedule over them all, scored by `cotune evaluate` on the eval file."""
    from cotune.worker.train_local import build_task

    work.mkdir(parents=True)
    spec = spec_for(base_model, train, eval_file, budget, steps=steps, accumulation=accumulation)
    spec_file = work / "sweep.yaml"
    spec_file.write_text(yaml.safe_dump(spec, sort_keys=False))
    started = time.perf_counter()
    argv = [
        *COTUNE,
        "train-local",
        str(spec_file),
        "--data",
        str(train),
        "--out",
        str(work / "out"),
    ]
    _run(argv, work / "train.log")
    task_file = work / "task.json"
    task_file.write_text(build_task(spec_file, {}).model_dump_json())
    result = work / "eval.json"
    argv = [
        *COTUNE,
        "evaluate",
        "--task",
        str(task_file),
        "--adapter",
        str(work / "out" / "adapter"),
        "--eval",
        str(eval_file),
        "--out",
        str(result),
    ]
    _run(argv, work / "evaluate.log")
    scored = json.loads(result.read_text())
    return Outcome(
        name=name,
        eval_losses=[float(scored["eval_loss"])],
        base_eval_loss=None,
        steps_per_round=steps,
        merges=0,
        seconds=time.perf_counter() - started,
        extra={"accumulation": accumulation},
    )
