"""The worker agent against the minimal coordinator (tests/fixtures/coordinator.py), with the
real SeaweedFS S3 server and real training of the tiny model on CPU.

Agents run in this process (the real loop, `once=True`) where a test watches or disturbs the
coordinator around them, and as `cotune worker` processes where a test sends signals or
kills them.
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

import httpx
import pytest

from orchestrator.protocol.task import TrainTask
from orchestrator.protocol.wire import (
    ADAPTER_CONFIG,
    ADAPTER_FILES,
    ADAPTER_WEIGHTS,
    HEARTBEAT_PATH,
    ArtifactRef,
    Capabilities,
    CompleteRequest,
    EnrollRequest,
    ErrorBody,
    Hardware,
    HeartbeatRequest,
    LeaseRequest,
)
from tests.fixtures.coordinator import JOIN_TOKEN, MiniCoordinator

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
def train_file(synthetic_jsonl: Callable[..., Path]) -> Path:
    return synthetic_jsonl("alpaca", 120, seed=3, name="shard-00000.jsonl")


def agent_for(coordinator: MiniCoordinator, work_dir: Path, **config: object) -> object:
    from worker.agent import Agent, AgentConfig
    from worker.hardware import detect_hardware

    options: dict[str, object] = {"once": True, "wait_for_work_s": 30.0, **config}
    return Agent(
        AgentConfig(
            coordinator=coordinator.url,
            join_token=JOIN_TOKEN,
            work_dir=work_dir,
            **options,  # type: ignore[arg-type]
        ),
        detect_hardware(),
    )


def run_agent(coordinator: MiniCoordinator, work_dir: Path, **config: object) -> int:
    agent = agent_for(coordinator, work_dir, **config)
    try:
        return agent.run()  # type: ignore[attr-defined, no-any-return]
    finally:
        agent.close()  # type: ignore[attr-defined]


class WorkerProcess:
    """`cotune worker --cpu --once` as a child process, its output in a log file."""

    def __init__(self, coordinator: MiniCoordinator, work_dir: Path, log: Path) -> None:
        self.log = log
        self._out = log.open("wb")
        env = {**os.environ, "COTUNE_HOME": str(work_dir / "home"), "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from orchestrator.cli import main; main()",
                "worker",
                "--coordinator",
                coordinator.url,
                "--join-token",
                JOIN_TOKEN,
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
def worker_process(tmp_path: Path) -> Iterator[Callable[[MiniCoordinator, str], WorkerProcess]]:
    started: list[WorkerProcess] = []

    def start(coordinator: MiniCoordinator, name: str) -> WorkerProcess:
        process = WorkerProcess(coordinator, tmp_path / name, tmp_path / f"{name}.log")
        started.append(process)
        return process

    yield start
    for process in started:
        process.close()


def steps_reported(coordinator: MiniCoordinator, task_id: str, attempt: int) -> int:
    beats = [hb.step for a, hb in coordinator.task(task_id).heartbeats if a == attempt]
    return max(beats, default=0)


# --- the protocol, as the fixture serves it (the contract for the real coordinator) -----


def test_expired_lease_is_leased_again_and_stale_reports_are_refused(
    coordinator_factory: Callable[..., MiniCoordinator], tiny_model_dir: Path, train_file: Path
) -> None:
    from worker.client import CoordinatorClient, LeaseGone, Refused

    coordinator = coordinator_factory(lease_ttl_s=1.0)
    task_id = coordinator.add_task(tiny_task(tiny_model_dir), [train_file])
    client = CoordinatorClient(coordinator.url)
    hardware = Hardware(cpu_count=2, memory_bytes=1 << 30, cotune_version="test")
    hello = client.enroll(EnrollRequest(join_token=JOIN_TOKEN, hardware=hardware), retry_for_s=0)
    request = LeaseRequest(capabilities=Capabilities(memory_bytes=1 << 30, bf16=False))
    first = client.lease(hello.worker_id, request, retry_for_s=0).task
    assert first is not None and first.attempt == 1 and first.task_id == task_id
    assert first.inputs.train[0].name == "shard-00000.jsonl"

    beat = HeartbeatRequest(step=0, max_steps=12)
    client.heartbeat(hello.worker_id, first.lease_id, beat)
    coordinator.wait_for(
        "the lease to expire", lambda: "expired" in coordinator.task(task_id).event_names(), 10
    )
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

    second = client.lease(hello.worker_id, request, retry_for_s=0).task
    assert second is not None and second.attempt == 2 and second.lease_id != first.lease_id
    # Output keys are unique to (task, attempt).
    assert second.outputs.checkpoint.key != first.outputs.checkpoint.key
    assert {p.key for p in second.outputs.adapter.values()}.isdisjoint(
        p.key for p in first.outputs.adapter.values()
    )

    # A bad body names the field; a wrong token is refused; both change nothing.
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
    assert coordinator.task(task_id).heartbeats == [(1, beat)]


# --- the agent loop -----------------------------------------------------------------


def test_task_runs_uploads_and_completes(
    coordinator: MiniCoordinator,
    object_store: object,
    tiny_model_dir: Path,
    train_file: Path,
    tmp_path: Path,
) -> None:
    task_id = coordinator.add_task(tiny_task(tiny_model_dir, max_steps=6), [train_file])

    assert run_agent(coordinator, tmp_path / "w") == 0

    record = coordinator.task(task_id)
    assert record.state == "done" and record.completion is not None
    attempt, result = record.completion
    assert attempt == 1 and set(result.artifacts) == set(ADAPTER_FILES)
    assert sorted(record.losses[1]) == list(range(1, 7))  # every step's loss reached it
    assert result.metrics["steps"] == 6 and result.metrics["tokens"] > 0
    config = json.loads(object_store.get_bytes(result.artifacts[ADAPTER_CONFIG].key))  # type: ignore[attr-defined]
    assert config["r"] == 4 and config["peft_type"] == "LORA"
    assert object_store.head(result.artifacts[ADAPTER_WEIGHTS].key).size > 0  # type: ignore[attr-defined]
    # A checkpoint was uploaded at step 4 and reported, to a key of attempt 1.
    assert [c.step for c in record.checkpoints] == [4]
    assert "/a1/ckpt/" in record.checkpoints[0].key
    assert not (tmp_path / "w" / "tasks").exists() or not any((tmp_path / "w" / "tasks").iterdir())


def test_a_staged_base_model_archive_is_downloaded_and_used(
    coordinator: MiniCoordinator, tiny_model_dir: Path, train_file: Path, tmp_path: Path
) -> None:
    archive = tmp_path / "tiny-llama.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(tiny_model_dir, arcname="tiny-llama")
    # The spec's s3:// name cannot be loaded by a worker: only the staged archive can.
    task = tiny_task(tiny_model_dir, base_model="s3://models/tiny-llama", max_steps=2)
    task_id = coordinator.add_task(task, [train_file], base_model_archive=archive)

    assert run_agent(coordinator, tmp_path / "w") == 0

    record = coordinator.task(task_id)
    assert record.state == "done" and record.completion is not None
    cached = list((tmp_path / "w" / "models").glob("*/tiny-llama/config.json"))
    assert len(cached) == 1  # kept, by sha256, for the next task on the same model


def test_stop_answer_ends_training_within_one_step(
    coordinator: MiniCoordinator, tiny_model_dir: Path, train_file: Path, tmp_path: Path
) -> None:
    task_id = coordinator.add_task(tiny_task(tiny_model_dir, max_steps=40), [train_file])
    coordinator.stop_task(task_id, at_step=3)

    assert run_agent(coordinator, tmp_path / "w") == 0

    record = coordinator.task(task_id)
    assert record.state == "cancelled" and record.completion is None
    [(_, release)] = record.releases
    assert release.checkpoint is not None and "stop" in release.reason
    stop_seen = record.stop_sent_at_step
    assert stop_seen is not None and stop_seen >= 3
    last = max(record.losses[1])
    # The answer takes one round trip, during which at most one more step may end; the next
    # step report returns False and training stops there, saving a checkpoint at that step.
    assert last <= stop_seen + 2, (stop_seen, last)
    assert release.checkpoint.step == last
    assert last < 40


def test_corrupted_download_is_retried_then_failed(
    coordinator: MiniCoordinator,
    object_store: object,
    tiny_model_dir: Path,
    train_file: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    task_id = coordinator.add_task(tiny_task(tiny_model_dir), [train_file])
    stored = coordinator.task(task_id).train[0]
    data = bytearray(train_file.read_bytes())
    data[100] ^= 0x01  # same size, one bit off: only the sha256 can tell
    object_store.put_bytes(stored.key, bytes(data))  # type: ignore[attr-defined]

    with caplog.at_level(logging.WARNING):
        assert run_agent(coordinator, tmp_path / "w") == 1

    record = coordinator.task(task_id)
    [(_, failure)] = record.fails
    assert "train[0]" in failure.reason and "sha256 mismatch" in failure.reason
    assert "after 4 attempts" in failure.reason and failure.retryable
    retries = [r for r in caplog.records if "retrying" in r.getMessage()]
    assert len(retries) == 3
    assert record.state == "queued" and record.heartbeats  # the lease was kept alive meanwhile


@pytest.mark.slow
def test_unreachable_coordinator_training_goes_on_and_completes(
    coordinator_factory: Callable[..., MiniCoordinator],
    tiny_model_dir: Path,
    train_file: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    coordinator = coordinator_factory(lease_ttl_s=40.0, heartbeat_interval_s=0.5)
    task_id = coordinator.add_task(tiny_task(tiny_model_dir, max_steps=16), [train_file])
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(run_agent(coordinator, tmp_path / "w")))
    with caplog.at_level(logging.WARNING):
        thread.start()
        coordinator.wait_for("step 2", lambda: steps_reported(coordinator, task_id, 1) >= 2, 120)
        coordinator.pause()
        heard = len(coordinator.task(task_id).heartbeats)
        before = steps_reported(coordinator, task_id, 1)
        time.sleep(6.0)
        coordinator.resume()
        thread.join(180)
    assert result == [0]
    record = coordinator.task(task_id)
    assert record.state == "done" and record.completion is not None
    assert record.event_names() == ["queued", "leased", "completed"]  # never re-leased
    # The first heartbeat after the outage reports steps trained while it lasted ...
    assert record.heartbeats[heard][1].step > before
    # Losses of the steps trained during the outage arrived afterwards: none is missing.
    assert sorted(record.losses[1]) == list(range(1, 17))
    assert any("heartbeat failed" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_an_outage_past_the_deadline_loses_the_lease_and_drops_the_task(
    coordinator_factory: Callable[..., MiniCoordinator],
    tiny_model_dir: Path,
    train_file: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    coordinator = coordinator_factory(lease_ttl_s=6.0, heartbeat_interval_s=0.5)
    task = tiny_task(tiny_model_dir, max_steps=400, checkpoint_steps=None)
    task_id = coordinator.add_task(task, [train_file])
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(run_agent(coordinator, tmp_path / "w")))
    with caplog.at_level(logging.WARNING):
        thread.start()
        coordinator.wait_for("step 1", lambda: steps_reported(coordinator, task_id, 1) >= 1, 120)
        coordinator.pause()
        thread.join(60)  # the agent gives up once the deadline has passed
        coordinator.resume()
    assert not thread.is_alive() and result == [1]
    assert "no answer from the coordinator before the lease deadline" in caplog.text
    record = coordinator.task(task_id)
    coordinator.wait_for("the expiry", lambda: "expired" in record.event_names(), 10)
    # Nothing was reported for the lost attempt: it simply expired, for another worker.
    assert record.releases == [] and record.fails == [] and record.completion is None
    assert record.state == "queued"


# --- signals and kills: real `cotune worker` processes ------------------------------------


@pytest.mark.slow
def test_sigterm_uploads_checkpoint_releases_and_exits_0(
    coordinator: MiniCoordinator,
    tiny_model_dir: Path,
    train_file: Path,
    worker_process: Callable[[MiniCoordinator, str], WorkerProcess],
) -> None:
    # No periodic checkpoints: the one released can only come from the SIGTERM path.
    task = tiny_task(tiny_model_dir, max_steps=200, checkpoint_steps=None)
    task_id = coordinator.add_task(task, [train_file])
    worker = worker_process(coordinator, "w")
    coordinator.wait_for("step 2", lambda: steps_reported(coordinator, task_id, 1) >= 2, 180)

    sent = time.monotonic()
    worker.proc.send_signal(signal.SIGTERM)
    code = worker.wait(60)
    took = time.monotonic() - sent

    print(f"SIGTERM to exit: {took:.1f} s")
    assert code == 0, worker.output()[-4000:]
    assert took < 30, f"exit took {took:.1f} s"
    record = coordinator.task(task_id)
    [(_, release)] = record.releases
    assert release.checkpoint is not None, worker.output()[-4000:]
    assert release.checkpoint.step >= 2
    # The coordinator checked the archive against the store before recording it.
    assert record.checkpoint is not None and record.checkpoint.key == release.checkpoint.archive.key
    assert record.state == "queued"  # given back, ready for the next worker


@pytest.mark.slow
def test_second_signal_quits_at_once(
    coordinator: MiniCoordinator,
    tiny_model_dir: Path,
    train_file: Path,
    worker_process: Callable[[MiniCoordinator, str], WorkerProcess],
) -> None:
    task = tiny_task(tiny_model_dir, max_steps=200, checkpoint_steps=None)
    task_id = coordinator.add_task(task, [train_file])
    worker = worker_process(coordinator, "w")
    coordinator.wait_for("step 1", lambda: steps_reported(coordinator, task_id, 1) >= 1, 180)

    # Two different signals, so the kernel cannot merge them into one pending signal.
    worker.proc.send_signal(signal.SIGINT)
    worker.proc.send_signal(signal.SIGTERM)

    assert worker.wait(10) == 130, worker.output()[-4000:]
    assert coordinator.task(task_id).releases == []  # gone without a word: the lease expires


@pytest.mark.slow
def test_kill_9_then_a_new_worker_resumes_from_the_last_checkpoint(
    coordinator_factory: Callable[..., MiniCoordinator],
    tiny_model_dir: Path,
    train_file: Path,
    tmp_path: Path,
    worker_process: Callable[[MiniCoordinator, str], WorkerProcess],
) -> None:
    coordinator = coordinator_factory(lease_ttl_s=8.0, heartbeat_interval_s=0.5)
    task = tiny_task(tiny_model_dir, max_steps=16, checkpoint_steps=4)
    reference_id = coordinator.add_task(task, [train_file])
    assert run_agent(coordinator, tmp_path / "reference") == 0
    reference = coordinator.task(reference_id).losses[1]
    assert sorted(reference) == list(range(1, 17))

    task_id = coordinator.add_task(task, [train_file])
    first = worker_process(coordinator, "first")
    coordinator.wait_for(
        "a checkpoint", lambda: coordinator.task(task_id).checkpoint is not None, 180
    )
    first.proc.send_signal(signal.SIGKILL)
    first.wait(10)
    saved = coordinator.task(task_id).checkpoint
    assert saved is not None and saved.attempt == 1 and saved.step % 4 == 0
    coordinator.wait_for(
        "the lease to expire", lambda: "expired" in coordinator.task(task_id).event_names(), 30
    )

    second = worker_process(coordinator, "second")
    assert second.wait(240) == 0, second.output()[-4000:]

    record = coordinator.task(task_id)
    assert record.state == "done" and record.completion is not None
    assert record.completion[0] == 2
    resumed = record.losses[2]
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
        [sys.executable, "-c", "from orchestrator.cli import main; main()", "worker", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def test_cli_bad_url_is_a_usage_error() -> None:
    done = _cli("--coordinator", "ftp://example.org", "--join-token", "t")
    assert done.returncode == 2
    assert "--coordinator 'ftp://example.org'" in done.stderr


def test_cli_refused_join_token(coordinator: MiniCoordinator, tmp_path: Path) -> None:
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
    assert coordinator.workers == {}


def test_cli_once_without_work_exits_3(coordinator: MiniCoordinator, tmp_path: Path) -> None:
    done = _cli(
        "--coordinator",
        coordinator.url,
        "--join-token",
        JOIN_TOKEN,
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
    from orchestrator.services.ports import free_port
    from worker.agent import Agent, AgentConfig
    from worker.hardware import detect_hardware

    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    agent = Agent(
        AgentConfig(coordinator=url, join_token="t", work_dir=tmp_path, enroll_retry_s=1.0),
        detect_hardware(),
    )
    with caplog.at_level(logging.ERROR):
        assert agent.run() == 1
    assert f"cannot enroll with the coordinator at {url}" in caplog.text
    assert "cannot reach the coordinator" in caplog.text
