"""The API over a real socket (uvicorn on a loopback port): CotuneClient, the job and owner
commands of the CLI, and the real worker agent training the tiny model through it."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cotune.orchestrator.api import ApiContext
from cotune.orchestrator.cli.app import app as cli_app
from cotune.orchestrator.cli.client import API_FILE, ApiError, CotuneClient, discover_url
from cotune.orchestrator.control.datafit import record_data_fit
from cotune.orchestrator.control.records import StoredObject, TaskInputs, TaskRecord
from cotune.orchestrator.control.tokens import load_or_create_admin_token
from cotune.orchestrator.protocol.admin import DataFit, EventBody
from cotune.orchestrator.runtime.apiserver import ApiServer, serve_api
from cotune.orchestrator.settings import Settings
from typer.testing import CliRunner

from tests.integration.coordinator_kit import HARDWARE, train_task

pytestmark = pytest.mark.integration


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def served(
    redis_client: Any, object_store: Any, home: Path
) -> Iterator[tuple[ApiContext, ApiServer]]:
    settings = Settings(home=home, lease_ttl_s=60, heartbeat_interval_s=1)
    admin = load_or_create_admin_token(home)  # as embedded mode does
    coordinator = ApiContext.create(
        settings, redis_client, object_store, admin, retry_after_s=0.2, reclaim_interval_s=0.2
    )
    server = serve_api(coordinator, "127.0.0.1", 0)
    try:
        yield coordinator, server
    finally:
        server.stop()


def write_spec(folder: Path, name: str = "tiny", data: str = "data/train.jsonl") -> Path:
    spec = folder / "sweep.yaml"
    spec.write_text(
        f"name: {name}\nbase_model: cotune://tiny-llama\n"
        f"dataset: {{path: {data}, format: alpaca}}\ntraining: {{max_steps: 4}}\n"
    )
    return spec


@pytest.fixture
def spec_file(tmp_path: Path, alpaca_dataset: Path) -> Path:
    folder = tmp_path / "project"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "train.jsonl").write_bytes(alpaca_dataset.read_bytes())
    return write_spec(folder)  # the dataset path is relative to the spec's folder


def test_the_client_over_a_real_socket(
    served: tuple[ApiContext, ApiServer],
    spec_file: Path,
    home: Path,
    object_store: Any,
    tmp_path: Path,
) -> None:
    coordinator, server = served
    assert discover_url(home) == server.url
    api = CotuneClient(server.url, load_or_create_admin_token(home))
    job_id = api.submit(spec_file)
    assert [j.job_id for j in api.jobs()] == [job_id]
    assert f"path: {spec_file.parent / 'data' / 'train.jsonl'}" in api.job(job_id).spec_yaml

    # Follow the events while the job runs and is cancelled: the stream ends by itself.
    seen: list[EventBody] = []
    follower = threading.Thread(target=lambda: seen.extend(api.events(job_id, follow=True)))
    follower.start()
    coordinator.state.transition_job(job_id, "running", expect=["pending"])
    coordinator.state.put_trial(job_id, 0, {"lora.lora_r": 4})
    assert api.cancel(job_id).state == "cancelled"
    follower.join(30)
    assert not follower.is_alive()
    assert [e.kind for e in seen] == ["job_created", "job_state", "trial_started", "job_state"]
    assert seen[-1].data == {"from": "running", "to": "cancelled", "error": "the job was cancelled"}
    assert [e.kind for e in api.events(job_id, follow=False, after=seen[1].id)] == [
        "trial_started",
        "job_state",
    ]
    assert api.trials(job_id)[0].state == "failed"

    with pytest.raises(ApiError) as refused:
        api.cancel(job_id)
    assert (refused.value.status, refused.value.code, refused.value.field) == (
        409,
        "conflict",
        "job_id",
    )
    with pytest.raises(ApiError) as missing:
        api.job("nope-1")
    assert (missing.value.status, missing.value.code) == (404, "not_found")
    with pytest.raises(ApiError, match="wrong admin token"):
        CotuneClient(server.url, "guess").jobs()

    # The best adapter of a succeeded job, fetched and checked.
    done = api.submit(spec_file)
    files = {
        "adapter_config.json": b'{"r": 4}',
        "adapter_model.safetensors": bytes(range(256)) * 64,
    }
    for name, data in files.items():
        object_store.put_bytes(f"jobs/{done}/best/{name}", data)
    coordinator.state.transition_job(done, "succeeded", expect=["pending"])
    written = api.download(done, tmp_path / "best")
    assert {p.name: p.read_bytes() for p in written} == files

    token = api.create_join_token(name="alice", ttl_s=3600)
    assert token.name == "alice" and token.expires_at is not None and token.token.startswith("ctj_")
    assert api.leaderboard() == [] and api.workers() == []
    api.close()
    server.stop()
    assert not (home / API_FILE).exists() and discover_url(home) is None
    with pytest.raises(ApiError) as down:
        CotuneClient(server.url, "x").jobs()
    assert (down.value.status, down.value.code) == (0, "unavailable")


def test_the_job_commands(
    served: tuple[ApiContext, ApiServer],
    spec_file: Path,
    home: Path,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    coordinator, server = served
    for name in ("COTUNE_COORDINATOR", "COTUNE_ADMIN_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("COTUNE_HOME", str(home))  # found through api.json and admin-token
    runner = CliRunner()

    def cotune(*args: str) -> Any:
        return runner.invoke(cli_app, list(args))

    submitted = cotune("submit", str(spec_file))
    assert submitted.exit_code == 0, submitted.output
    job_id = submitted.output.split()[1].rstrip(";")
    assert coordinator.state.get_job(job_id).state == "pending"
    coordinator.state.transition_job(job_id, "running", expect=["pending"])
    coordinator.state.put_trial(job_id, 0, {"training.learning_rate": 0.002})
    coordinator.state.record_round(job_id, 0, 0, 1.75)
    status = cotune("status", job_id)
    assert status.exit_code == 0 and "running" in status.output and "1.7500" in status.output
    assert "learning_rate=0.002" in status.output
    assert "data at sequence_len" not in status.output  # not measured yet
    fit = DataFit(
        measured_on="eval split",
        sequence_len=64,
        rows=200,
        rows_cut=9,
        rows_dropped=1,
        warning="at training.sequence_len 64, 1 of 200 eval rows ...",
    )
    record_data_fit(coordinator.state, job_id, fit)
    status = cotune("status", job_id)
    line = "data at sequence_len 64: of 200 rows of the eval split, 190 whole, 9 cut, 1 dropped"
    shown = " ".join(status.output.split())  # rich wraps long lines at the terminal's width
    assert line in shown and "warning: at training.sequence_len 64, 1 of 200 eval rows" in shown
    served_fit = CotuneClient(server.url, load_or_create_admin_token(home)).job(job_id).data_fit
    assert served_fit == fit
    results = cotune("results", job_id)
    assert results.exit_code == 0 and "1.7500" in results.output
    listed = cotune("jobs")
    assert listed.exit_code == 0 and job_id in listed.output
    made = cotune("token", "create", "--join", "--name", "alice")
    assert made.exit_code == 0 and "cotune worker --coordinator" in made.output
    assert cotune("token", "create").exit_code == 2
    assert cotune("leaderboard").exit_code == 0
    assert cotune("workers").exit_code == 0
    not_yet = cotune("download", job_id, "--out", str(tmp_path / "out"))
    assert not_yet.exit_code == 1 and "ready once the job succeeded" in not_yet.output
    cancelled = cotune("cancel", job_id)
    assert cancelled.exit_code == 0 and "cancelled" in cancelled.output
    again = cotune("cancel", job_id)
    assert again.exit_code == 1 and "already finished" in again.output
    # --watch on a finished job draws once and ends (1: it did not succeed).
    watched = cotune("status", job_id, "--watch", "--interval", "0.1")
    assert watched.exit_code == 1 and "cancelled" in watched.output

    refused = cotune("submit", str(write_spec(tmp_path, name="Bad")))
    assert refused.exit_code == 2 and "name: use lowercase letters" in refused.output
    refused = cotune("submit", str(write_spec(tmp_path, data="/nonexistent.jsonl")))
    assert refused.exit_code == 2 and "dataset.path: no such file" in refused.output
    assert cotune("status", "nope-1").exit_code == 1

    monkeypatch.setenv("COTUNE_HOME", str(tmp_path / "elsewhere"))
    lost = cotune("jobs")
    assert lost.exit_code == 1 and "no coordinator" in lost.output
    wrong = cotune("jobs", "--coordinator", server.url, "--token", "guess")
    assert wrong.exit_code == 1 and "wrong admin token" in wrong.output


def test_the_owner_commands(
    served: tuple[ApiContext, ApiServer], home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    coordinator, server = served
    for name in ("COTUNE_COORDINATOR", "COTUNE_ADMIN_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("COTUNE_HOME", str(home))
    runner = CliRunner()

    def cotune(*args: str) -> Any:
        return runner.invoke(cli_app, list(args))

    join, _ = coordinator.workers.join_tokens.create("mallory")
    worker, _ = coordinator.workers.enroll(join, HARDWARE)
    coordinator.strikes.add(worker.worker_id, "result rejected (a test)")
    listed = cotune("owner", "list")
    assert listed.exit_code == 0, listed.output
    assert "quarantined at 3 strikes" in listed.output
    rows = [line.split("│")[1:5] for line in listed.output.splitlines() if "mallory" in line]
    assert [[cell.strip() for cell in row] for row in rows] == [["mallory", "1", "no", "1"]]

    done = cotune("owner", "quarantine", "mallory")
    assert done.exit_code == 0, done.output
    assert "quarantined mallory (3 strikes)" in done.output and "0 active lease(s)" in done.output
    assert coordinator.strikes.is_quarantined("mallory")
    assert "yes" in cotune("owner", "list").output
    pardoned = cotune("owner", "pardon", "mallory")
    assert pardoned.exit_code == 0, pardoned.output
    assert "3 strike(s) cleared, quarantine lifted" in pardoned.output
    assert not coordinator.strikes.is_quarantined("mallory")
    assert coordinator.strikes.count("mallory") == 0

    again = cotune("owner", "pardon", "mallory")
    assert again.exit_code == 1 and "not quarantined and has no strikes" in again.output
    bad = cotune("owner", "quarantine", "mallory/2")
    assert bad.exit_code == 2 and "bad owner name 'mallory/2'" in bad.output, bad.output
    assert "(field name)" in bad.output and coordinator.strikes.quarantined() == []
    wrong = cotune("owner", "list", "--coordinator", server.url, "--token", "guess")
    assert wrong.exit_code == 1 and "wrong admin token" in wrong.output


def test_the_worker_agent_trains_through_the_real_api(
    served: tuple[ApiContext, ApiServer],
    object_store: Any,
    tiny_model_dir: Path,
    synthetic_jsonl: Callable[..., Path],
    tmp_path: Path,
) -> None:
    from cotune.worker.agent import Agent, AgentConfig
    from cotune.worker.hardware import detect_hardware

    coordinator, server = served
    state = coordinator.state
    state.create_job("tiny-00000001", "tiny", "name: tiny\n")
    state.transition_job("tiny-00000001", "running", expect=["pending"])
    state.put_trial("tiny-00000001", 0, {})
    data = synthetic_jsonl("alpaca", 120, seed=3).read_bytes()
    info = object_store.put_bytes("jobs/tiny-00000001/data/shard-00000.jsonl", data)
    task = train_task(
        base_model=str(tiny_model_dir),
        max_steps=6,
        checkpoint_steps=3,
        sequence_len=128,
        learning_rate=1e-3,
        gradient_checkpointing=False,
        lora={"r": 4, "alpha": 8, "dropout": 0.0},
    )
    train = StoredObject(
        key=info.key, sha256=info.sha256, bytes=info.size, name="shard-00000.jsonl"
    )
    record = TaskRecord.new(
        job_id="tiny-00000001", trial=0, round=0, shard=0, tier="cpu", task=task,
        inputs=TaskInputs(base_model=str(tiny_model_dir), train=[train]),
    )  # fmt: skip
    assert state.enqueue_task(record)
    join, _ = coordinator.workers.join_tokens.create("carol")
    agent = Agent(
        AgentConfig(
            coordinator=server.url,
            join_token=join,
            work_dir=tmp_path / "w",
            once=True,
            wait_for_work_s=30,
        ),
        detect_hardware(),
    )
    try:
        assert agent.run() == 0
    finally:
        agent.close()

    done = state.get_task(record.task_id)
    # A volunteer's result passed the checks at `complete` and waits, uncredited, for the
    # heavy checks (pipeline/verification.py), which no reconciler runs here.
    assert (done.state, done.attempt, done.failures) == ("verifying", 1, 0)
    result = done.result()
    assert result is not None and result.metrics["steps"] == 6
    for ref in result.artifacts.values():  # what was accepted is what the store holds
        assert hashlib.sha256(object_store.get_bytes(ref.key)).hexdigest() == ref.sha256
    assert "/s0/a1/adapter/" in result.artifacts["adapter_model.safetensors"].key
    checkpoint = done.checkpoint()
    # Checkpoints at steps 3 and 6, each to a fresh key of attempt 1; the latest reported
    # counts. A finished task abandons its last checkpoint's upload (worker/agent.py), so
    # whether step 6 arrived before the completion depends on timing: either is correct.
    assert checkpoint is not None and (checkpoint.step, checkpoint.attempt) in {(3, 1), (6, 1)}
    index = {3: "0000", 6: "0001"}[checkpoint.step]
    assert checkpoint.key.endswith(f"/a1/ckpt/{index}/checkpoint.tar")
    # Nothing is credited before the heavy checks accept it; the tokens it will be credited
    # are the coordinator's count from the task, not the worker's.
    from cotune.orchestrator.control.intake import task_tokens

    assert coordinator.workers.leaderboard() == []
    assert result.tokens == task_tokens(task, None) > 0
    kinds = [e.kind for e in state.events.read("tiny-00000001")]
    assert kinds.index("task_leased") < kinds.index("progress") < kinds.index("task_verifying")
