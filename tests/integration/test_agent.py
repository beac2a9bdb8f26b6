"""The worker agent against the real coordinator (ApiContext on the test's Redis and SeaweedFS,
served on a loopback port: tests/integration/served_coordinator.py), with real training of
the tiny model on CPU.

Agents run in this process (the real loop, `once=True`) where a test watches or disturbs the
coordinator around them, and as `cotune worker` processes where a test sends signals or
kills them. What happened is read from the coordinator's state: task and lease records, the
job's events, the object store (and the heartbeats it accepted, for per-step losses).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cotune.orchestrator.protocol.task import TrainTask
from cotune.orchestrator.protocol.wire import (
    ADAPTER_CONFIG,
    ADAPTER_FILES,
    ADAPTER_WEIGHTS,
    HEARTBEAT_PATH,
    ArtifactRef,
    CompleteRequest,
    EnrollRequest,
    ErrorBody,
    HeartbeatRequest,
    LeaseRequest,
)

from tests.integration.coordinator_kit import CPU, HARDWARE, Clock, snapshot
from tests.integration.served_coordinator import ServedCoordinator

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
# A resumed run sees the same batches with the same RNG and optimizer state, so its losses
# are the uninterrupted run's; on CPU they agree exactly (measured max |diff| 0.0), the
# tolerance only allows for a different summation order on other hardware.
LOSS_ATOL = 1e-6


def tiny_task(model_dir: Path, **overrides: object) -> TrainTask:
    """A short CPU run of the tiny Llama: unquantized (the agent, not QLoRA, is under test)."""
    fields: dict[str, object] = {
        "base_model": str(model_dir),
        "max_steps": 12,
        "checkpoint_steps": 4,
        "micro_batch_size": 2,
        "sequence_len": 128,
        "learning_rate": 1e-3,
        "lr_scheduler": "linear",
        "warmup_steps": 2,
        "gradient_checkpointing": False,
        "seed": 7,
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "quantization": {"type": "none"},
    }
    fields.update(overrides)
    return TrainTask.model_validate(fields)


@pytest.fixture
def coordinator_factory(
    redis_client: Any, object_store: Any, tmp_path: Path
) -> Iterator[Callable[..., ServedCoordinator]]:
    """Factory: `coordinator_factory(lease_ttl_s=5)` -> the real coordinator, serving."""
    started: list[ServedCoordinator] = []

    def make(**options: Any) -> ServedCoordinator:
        coordinator = ServedCoordinator(
            redis_client, object_store, tmp_path / "coordinator", **options
        )
        coordinator.start()
        started.append(coordinator)
        return coordinator

    yield make
    for coordinator in started:
        coordinator.stop()


@pytest.fixture
def coordinator(coordinator_factory: Callable[..., ServedCoordinator]) -> ServedCoordinator:
    """The real coordinator with 30 s leases and 1 s heartbeats."""
    return coordinator_factory()


@pytest.fixture
def train_file(synthetic_jsonl: Callable[..., Path]) -> Path:
    return synthetic_jsonl("alpaca", 120, seed=3, name="shard-00000.jsonl")


def agent_for(coordinator: ServedCoordinator, work_dir: Path, **config: object) -> object:
    from cotune.worker.agent import Agent, AgentConfig
    from cotune.worker.hardware import detect_hardware

    options: dict[str, object] = {"once": True, "wait_for_work_s": 30.0, **config}
    return Agent(
        AgentConfig(
            coordinator=coordinator.url,
            join_token=coordinator.join_token,
            work_dir=work_dir,
            **options,  # type: ignore[arg-type]
        ),
        detect_hardware(),
    )


def run_agent(coordinator: ServedCoordinator, work_dir: Path, **config: object) -> int:
    agent = agent_for(coordinator, work_dir, **config)
    try:
        return agent.run()  # type: ignore[attr-defined, no-any-return]
    finally:
        agent.close()  # type: ignore[attr-defined]


def run_agent_in_thread(
    coordinator: ServedCoordinator, work_dir: Path
) -> tuple[threading.Thread, list[int]]:
    """A started thread running one agent task; the list gets its exit code."""
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(run_agent(coordinator, work_dir)))
    thread.start()
    return thread, result


class WorkerProcess:
    """`cotune worker --cpu --once` as a child process, its output in a log file."""

    def __init__(self, coordinator: ServedCoordinator, work_dir: Path, log: Path) -> None:
        self.log = log
        self._out = log.open("wb")
        env = {**os.environ, "COTUNE_HOME": str(work_dir / "home"), "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from cotune.orchestrator.cli.app import main; main()",
                "worker",
                "--coordinator",
                coordinator.url,
                "--join-token",
                coordinator.join_token,
                "--cpu",
                "--once",
                "--wait",
                "60",
                "--work-dir",
                str(work_dir),
            ],
            cwd=ROOT,
            env=env,
            stdout=self._out,
            stderr=subprocess.STDOUT,
        )

    def output(self) -> str:
        self._out.flush()
        return self.log.read_text(errors="replace")

    def wait(self, timeout_s: float) -> int:
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"worker did not exit within {timeout_s} s:\n{self.output()[-4000:]}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._out.close()


@pytest.fixture
def worker_process(
    tmp_path: Path,
) -> Iterator[Callable[[ServedCoordinator, str], WorkerProcess]]:
    started: list[WorkerProcess] = []

    def start(coordinator: ServedCoordinator, name: str) -> WorkerProcess:
        process = WorkerProcess(coordinator, tmp_path / name, tmp_path / f"{name}.log")
        started.append(process)
        return process

    yield start
    for process in started:
        process.close()


# --- the protocol, as the real coordinator serves it ------------------------------------


def test_expired_lease_is_leased_again_and_stale_reports_are_refused(
    coordinator_factory: Callable[..., ServedCoordinator],
    redis_client: Any,
    tiny_model_dir: Path,
    train_file: Path,
) -> None:
    from cotune.worker.client import CoordinatorClient, LeaseGone, Refused

    # The coordinator's clock is the test's: the lease expires when the test says so.
    clock = Clock(time.time())
    coordinator = coordinator_factory(lease_ttl_s=30.0, clock=clock)
    task_id = coordinator.add_task(tiny_task(tiny_model_dir), [train_file])
    client = CoordinatorClient(coordinator.url)
    enroll = EnrollRequest(join_token=coordinator.join_token, hardware=HARDWARE)
    hello = client.enroll(enroll, retry_for_s=0)
    request = LeaseRequest(capabilities=CPU)
    first = client.lease(hello.worker_id, request, retry_for_s=0).task
    assert first is not None and first.attempt == 1 and first.task_id == task_id
    assert first.inputs.train[0].name == "shard-00000.jsonl"

    beat = HeartbeatRequest(step=0, max_steps=12)
    client.heartbeat(hello.worker_id, first.lease_id, beat)
    clock.advance(31.0)
    coordinator.wait_for(
        "the lease to expire", lambda: "lease_expired" in coordinator.transitions(task_id), 10
    )
    expired = snapshot(redis_client)
    with pytest.raises(LeaseGone, match="lease_expired"):
        client.heartbeat(hello.worker_id, first.lease_id, beat)

    # A result for the expired attempt is refused, whatever it claims.
    stale = CompleteRequest(
        artifacts={
            name: ArtifactRef(key=target.key, sha256="0" * 64, bytes=1)
            for name, target in first.outputs.adapter.items()
        }
    )
    with pytest.raises(LeaseGone, match="lease_expired"):
        client.complete(hello.worker_id, first.lease_id, stale, retry_for_s=0)
    assert snapshot(redis_client) == expired  # the refusals changed nothing

    second = client.lease(hello.worker_id, request, retry_for_s=0).task
    assert second is not None and second.attempt == 2 and second.lease_id != first.lease_id
    # Output keys are unique to (task, attempt).
    assert second.outputs.checkpoint.key != first.outputs.checkpoint.key
    assert {p.key for p in second.outputs.adapter.values()}.isdisjoint(
        p.key for p in first.outputs.adapter.values()
    )

    # A bad body names the field; a wrong token is refused; both change nothing.
    leased = snapshot(redis_client)
    raw = httpx.post(
        coordinator.url
        + HEARTBEAT_PATH.format(worker_id=hello.worker_id, lease_id=second.lease_id),
        json={"step": -1, "max_steps": 12},
        headers={"Authorization": f"Bearer {hello.worker_token}"},
    )
    assert raw.status_code == 422
    error = ErrorBody.model_validate_json(raw.content).error
    assert error.code == "invalid_request" and error.field == "step"
    intruder = CoordinatorClient(coordinator.url)
    intruder.token = "not-the-token-of-this-worker"
    with pytest.raises(Refused):
        intruder.heartbeat(hello.worker_id, second.lease_id, beat)
    assert snapshot(redis_client) == leased
    assert [(h.attempt, h.body) for h in coordinator.leases.heard(task_id)] == [(1, beat)]


# --- the agent loop -----------------------------------------------------------------


def test_task_runs_uploads_and_completes(
    coordinator: ServedCoordinator,
    object_store: Any,
    tiny_model_dir: Path,
    train_file: Path,
    tmp_path: Path,
) -> None:
    task_id = coordinator.add_task(tiny_task(tiny_model_dir, max_steps=6), [train_file])

    assert run_agent(coordinator, tmp_path / "w") == 0

    task = coordinator.task(task_id)
    result = task.result()
    assert task.state == "accepted" and result is not None
    assert result.attempt == 1 and set(result.artifacts) == set(ADAPTER_FILES)
    # Every step's loss reached the coordinator.
    assert sorted(coordinator.leases.losses(task_id, 1)) == list(range(1, 7))
    assert result.metrics["steps"] == 6 and result.metrics["tokens"] > 0
    config = json.loads(object_store.get_bytes(result.artifacts[ADAPTER_CONFIG].key))
    assert config["r"] == 4 and config["peft_type"] == "LORA"
    assert object_store.head(result.artifacts[ADAPTER_WEIGHTS].key).size > 0
    # A checkpoint was uploaded at step 4 and reported, to a key of attempt 1; the only one.
    checkpoint = task.checkpoint()
    assert checkpoint is not None and (checkpoint.step, checkpoint.attempt) == (4, 1)
    assert "/a1/ckpt/" in checkpoint.key
    uploaded = [o.key for o in object_store.list(f"jobs/{task.job_id}/") if "/ckpt/" in o.key]
    assert uploaded == [checkpoint.key]
    assert not (tmp_path / "w" / "tasks").exists() or not any((tmp_path / "w" / "tasks").iterdir())


def test_a_staged_base_model_archive_is_downloaded_and_used(
    coordinator: ServedCoordinator, tiny_model_dir: Path, train_file: Path, tmp_path: Path
) -> None:
    archive = tmp_path / "tiny-llama.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(tiny_model_dir, arcname="tiny-llama")
    # The spec's s3:// name cannot be loaded by a worker: only the staged archive can.
    task = tiny_task(tiny_model_dir, base_model="s3://models/tiny-llama", max_steps=2)
    task_id = coordinator.add_task(task, [train_file], base_model_archive=archive)

    assert run_agent(coordinator, tmp_path / "w") == 0

    task_record = coordinator.task(task_id)
    assert task_record.state == "accepted" and task_record.result() is not None
    cached = list((tmp_path / "w" / "models").glob("*/tiny-llama/config.json"))
    assert len(cached) == 1  # kept, by sha256, for the next task on the same model


def test_stop_answer_ends_training_within_one_step(
    coordinator_factory: Callable[..., ServedCoordinator],
    tiny_model_dir: Path,
    train_file: Path,
    tmp_path: Path,
) -> None:
    # Quick heartbeats, so the trial is pruned a step or two after step 3; no periodic
    # checkpoints, so the one recorded can only be the stop's.
    coordinator = coordinator_factory(heartbeat_interval_s=0.25)
    task = tiny_task(tiny_model_dir, max_steps=200, checkpoint_steps=None)
    task_id = coordinator.add_task(task, [train_file])
    thread, result = run_agent_in_thread(coordinator, tmp_path / "w")
    coordinator.wait_for("step 3", lambda: coordinator.step(task_id, 1) >= 3, 120)
    # A pruned trial's tasks are answered `stop` at their next heartbeat.
    coordinator.state.finish_trial(coordinator.task(task_id).job_id, 0, "pruned")
    thread.join(120)
    assert result == [0]

    record = coordinator.task(task_id)
    assert record.state == "cancelled" and record.result() is None
    [release] = coordinator.events(task_id, "task_released")
    assert "stop" in release.data["reason"]
    stops = [h.body.step for h in coordinator.leases.heard(task_id, 1) if h.action == "stop"]
    assert stops and stops[0] >= 3
    stop_seen = stops[0]
    last = max(coordinator.leases.losses(task_id, 1))
    # The answer takes one round trip, during which at most one more step may end; the next
    # step report returns False and training stops there, saving a checkpoint at that step.
    assert last <= stop_seen + 2, (stop_seen, last)
    checkpoint = record.checkpoint()
    assert checkpoint is not None and (checkpoint.step, checkpoint.attempt) == (last, 1)
    assert last < 200


def test_corrupted_download_is_retried_then_failed(
    coordinator: ServedCoordinator,
    object_store: Any,
    tiny_model_dir: Path,
    train_file: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    task_id = coordinator.add_task(tiny_task(tiny_model_dir), [train_file])
    stored = coordinator.task(task_id).inputs().train[0]
    data = bytearray(train_file.read_bytes())
    data[100] ^= 0x01  # same size, one bit off: only the sha256 can tell
    object_store.put_bytes(stored.key, bytes(data))

    with caplog.at_level(logging.WARNING):
        assert run_agent(coordinator, tmp_path / "w") == 1

    [failure] = coordinator.events(task_id, "task_attempt_failed")
    reason = failure.data["reason"]
    assert "train[0]" in reason and "sha256 mismatch" in reason
    assert "after 4 attempts" in reason
    retries = [r for r in caplog.records if "retrying" in r.getMessage()]
    assert len(retries) == 3
    # Reported as retryable: the task is queued for another attempt (a failure counted).
    record = coordinator.task(task_id)
    assert record.state == "queued" and record.failures == 1
    assert coordinator.events(task_id, "progress")  # the lease was kept alive meanwhile


@pytest.mark.slow
def test_unreachable_coordinator_training_goes_on_and_completes(
    coordinator_factory: Callable[..., ServedCoordinator],
    tiny_model_dir: Path,
    train_file: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    coordinator = coordinator_factory(lease_ttl_s=40.0, heartbeat_interval_s=0.5)
    task_id = coordinator.add_task(tiny_task(tiny_model_dir, max_steps=16), [train_file])
    with caplog.at_level(logging.WARNING):
        thread, result = run_agent_in_thread(coordinator, tmp_path / "w")
        coordinator.wait_for("step 2", lambda: coordinator.step(task_id, 1) >= 2, 120)
        coordinator.pause()
        heard = len(coordinator.leases.heard(task_id, 1))
        before = coordinator.step(task_id, 1)
        time.sleep(6.0)
        coordinator.resume()
        thread.join(180)
    assert result == [0]
    record = coordinator.task(task_id)
    assert record.state == "accepted" and record.result() is not None
    # Never re-leased.
    assert coordinator.transitions(task_id) == ["task_queued", "task_leased", "task_accepted"]
    # The first heartbeat after the outage reports steps trained while it lasted ...
    assert coordinator.leases.heard(task_id, 1)[heard].body.step > before
    # Losses of the steps trained during the outage arrived afterwards: none is missing.
    assert sorted(coordinator.leases.losses(task_id, 1)) == list(range(1, 17))
    assert any("heartbeat failed" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_an_outage_past_the_deadline_loses_the_lease_and_drops_the_task(
    coordinator_factory: Callable[..., ServedCoordinator],
    tiny_model_dir: Path,
    train_file: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    coordinator = coordinator_factory(lease_ttl_s=6.0, heartbeat_interval_s=0.5)
    task = tiny_task(tiny_model_dir, max_steps=400, checkpoint_steps=None)
    task_id = coordinator.add_task(task, [train_file])
    with caplog.at_level(logging.WARNING):
        thread, result = run_agent_in_thread(coordinator, tmp_path / "w")
        coordinator.wait_for("step 1", lambda: coordinator.step(task_id, 1) >= 1, 120)
        coordinator.pause()
        thread.join(60)  # the agent gives up once the deadline has passed
        coordinator.resume()
    assert not thread.is_alive() and result == [1]
    assert "no answer from the coordinator before the lease deadline" in caplog.text
    coordinator.wait_for(
        "the expiry", lambda: "lease_expired" in coordinator.transitions(task_id), 10
    )
    # Nothing was reported for the lost attempt (no release, failure or result): it simply
    # expired, and the task is queued for another worker.
    assert coordinator.transitions(task_id) == [
        "task_queued",
        "task_leased",
        "lease_expired",
        "task_queued",
    ]
    record = coordinator.task(task_id)
    assert record.state == "queued" and record.result() is None


# --- signals and kills: real `cotune worker` processes ------------------------------------


@pytest.mark.slow
def test_sigterm_uploads_checkpoint_releases_and_exits_0(
    coordinator: ServedCoordinator,
    object_store: Any,
    tiny_model_dir: Path,
    train_file: Path,
    worker_process: Callable[[ServedCoordinator, str], WorkerProcess],
) -> None:
    # No periodic checkpoints: the one released can only come from the SIGTERM path.
    task = tiny_task(tiny_model_dir, max_steps=200, checkpoint_steps=None)
    task_id = coordinator.add_task(task, [train_file])
    worker = worker_process(coordinator, "w")
    coordinator.wait_for("step 2", lambda: coordinator.step(task_id, 1) >= 2, 180)

    sent = time.monotonic()
    worker.proc.send_signal(signal.SIGTERM)
    code = worker.wait(60)
    took = time.monotonic() - sent

    print(f"SIGTERM to exit: {took:.1f} s")
    assert code == 0, worker.output()[-4000:]
    assert took < 30, f"exit took {took:.1f} s"
    [release] = coordinator.events(task_id, "task_released")
    assert release.data["attempt"] == 1
    record = coordinator.task(task_id)
    checkpoint = record.checkpoint()
    assert checkpoint is not None, worker.output()[-4000:]
    assert checkpoint.step >= 2 and checkpoint.attempt == 1
    # The coordinator checked the archive against the store before recording it.
    stored = object_store.head(checkpoint.key)
    assert stored is not None and stored.size == checkpoint.bytes
    assert record.state == "queued"  # given back, ready for the next worker


@pytest.mark.slow
def test_second_signal_quits_at_once(
    coordinator: ServedCoordinator,
    tiny_model_dir: Path,
    train_file: Path,
    worker_process: Callable[[ServedCoordinator, str], WorkerProcess],
) -> None:
    task = tiny_task(tiny_model_dir, max_steps=200, checkpoint_steps=None)
    task_id = coordinator.add_task(task, [train_file])
    worker = worker_process(coordinator, "w")
    coordinator.wait_for("step 1", lambda: coordinator.step(task_id, 1) >= 1, 180)

    # Two different signals, so the kernel cannot merge them into one pending signal.
    worker.proc.send_signal(signal.SIGINT)
    worker.proc.send_signal(signal.SIGTERM)

    assert worker.wait(10) == 130, worker.output()[-4000:]
    # Gone without a word: no release, the lease is left to expire.
    assert coordinator.events(task_id, "task_released") == []
    assert coordinator.lease(task_id, 1)["state"] == "active"


@pytest.mark.slow
def test_kill_9_then_a_new_worker_resumes_from_the_last_checkpoint(
    coordinator_factory: Callable[..., ServedCoordinator],
    tiny_model_dir: Path,
    train_file: Path,
    tmp_path: Path,
    worker_process: Callable[[ServedCoordinator, str], WorkerProcess],
) -> None:
    coordinator = coordinator_factory(lease_ttl_s=8.0, heartbeat_interval_s=0.5)
    task = tiny_task(tiny_model_dir, max_steps=16, checkpoint_steps=4)
    reference_id = coordinator.add_task(task, [train_file])
    assert run_agent(coordinator, tmp_path / "reference") == 0
    reference = coordinator.leases.losses(reference_id, 1)
    assert sorted(reference) == list(range(1, 17))

    task_id = coordinator.add_task(task, [train_file])
    first = worker_process(coordinator, "first")
    coordinator.wait_for(
        "a checkpoint", lambda: coordinator.task(task_id).checkpoint() is not None, 180
    )
    first.proc.send_signal(signal.SIGKILL)
    first.wait(10)
    saved = coordinator.task(task_id).checkpoint()
    assert saved is not None and saved.attempt == 1 and saved.step % 4 == 0
    coordinator.wait_for(
        "the lease to expire", lambda: "lease_expired" in coordinator.transitions(task_id), 30
    )

    second = worker_process(coordinator, "second")
    assert second.wait(240) == 0, second.output()[-4000:]

    record = coordinator.task(task_id)
    result = record.result()
    assert record.state == "accepted" and result is not None
    assert result.attempt == 2
    resumed = coordinator.leases.losses(task_id, 2)
    # It started at the checkpoint's step, not at 0 ...
    assert min(resumed) == saved.step + 1 and max(resumed) == 16
    assert f"resuming at step {saved.step}" in second.output()
    # ... and continued the same run: the remaining losses are the uninterrupted run's.
    diffs = {step: abs(resumed[step] - reference[step]) for step in resumed}
    print(f"resumed at step {saved.step}: max |loss - reference| = {max(diffs.values()):.2e}")
    assert max(diffs.values()) <= LOSS_ATOL, diffs


# --- the command line ---------------------------------------------------------------------


def _cli(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-c",
            "from cotune.orchestrator.cli.app import main; main()",
            "worker",
            *args,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def test_cli_bad_url_is_a_usage_error() -> None:
    done = _cli("--coordinator", "ftp://example.org", "--join-token", "t")
    assert done.returncode == 2
    assert "--coordinator 'ftp://example.org'" in done.stderr


def test_cli_refused_join_token(coordinator: ServedCoordinator, tmp_path: Path) -> None:
    done = _cli(
        "--coordinator",
        coordinator.url,
        "--join-token",
        "wrong",
        "--cpu",
        "--work-dir",
        str(tmp_path),
    )
    assert done.returncode == 1
    assert "refused the join token" in done.stderr
    assert coordinator.context.workers.all() == []  # nobody enrolled


def test_cli_once_without_work_exits_3(coordinator: ServedCoordinator, tmp_path: Path) -> None:
    done = _cli(
        "--coordinator",
        coordinator.url,
        "--join-token",
        coordinator.join_token,
        "--cpu",
        "--once",
        "--wait",
        "2",
        "--work-dir",
        str(tmp_path),
    )
    assert done.returncode == 3, done.stderr
    assert "no work offered by the coordinator within 2 s" in done.stderr


def test_unreachable_coordinator_at_enroll_is_an_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from cotune.orchestrator.runtime.services.ports import free_port
    from cotune.worker.agent import Agent, AgentConfig
    from cotune.worker.hardware import detect_hardware

    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    agent = Agent(
        AgentConfig(coordinator=url, join_token="t", work_dir=tmp_path, enroll_retry_s=1.0),
        detect_hardware(),
    )
    with caplog.at_level(logging.ERROR):
        assert agent.run() == 1
    assert f"cannot enroll with the coordinator at {url}" in caplog.text
    assert "cannot reach the coordinator" in caplog.text
