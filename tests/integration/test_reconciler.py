"""The reconciler's real loop, one pass at a time (`run(once=True)` / `run_once()`).

Real Redis, real SeaweedFS, real Ray for the merges, real `cotune evaluate` subprocesses.
Where a test needs accepted shard tasks it completes them through the real Leases API with
a real PEFT adapter of the tiny model (randomly initialised rather than trained: what the
reconciler does with it does not depend on how it was trained, and training is covered by
the e2e tests).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from cotune.orchestrator.control.leases import Leases
from cotune.orchestrator.control.records import task_id_for
from cotune.orchestrator.control.state import State
from cotune.orchestrator.control.tiers import CPU_TIER
from cotune.orchestrator.control.tokens import JoinTokens
from cotune.orchestrator.control.workers import Workers
from cotune.orchestrator.pipeline.reconciler import Reconciler
from cotune.orchestrator.pipeline.study import JobStudy
from cotune.orchestrator.protocol.task import TrainTask, seed_for
from cotune.orchestrator.protocol.wire import (
    ADAPTER_FILES,
    ArtifactRef,
    Capabilities,
    CompleteRequest,
    FailRequest,
    Hardware,
)

from tests.integration.reconciler_kit import NoPool, loop_setup, make_spec, reconciler, submit

pytestmark = pytest.mark.integration


@pytest.fixture
def setup(
    tmp_path: Path,
    redis_client: Any,
    redis_server: str,
    s3_server: Any,
    object_store: Any,
    synthetic_jsonl: Any,
) -> dict[str, Any]:
    kit = loop_setup(tmp_path, redis_client, redis_server, s3_server, object_store)
    return {**kit, "data": synthetic_jsonl("alpaca", 120, seed=1)}


def snapshot(state: State, job_id: str) -> Any:
    return (
        state.get_job(job_id).state,
        [(t.number, t.params, t.state, t.eval_losses) for t in state.get_trials(job_id)],
        [(t.task_id, t.state, t.attempt) for t in state.tasks_of(job_id)],
    )


def test_a_job_is_sharded_its_trials_asked_and_round_0_queued_once(setup: dict[str, Any]) -> None:
    state, spec = setup["state"], make_spec(setup["data"])
    job_id = submit(setup, spec)
    pool = NoPool()
    loop = reconciler(setup, pool)
    loop.run(once=True)
    job = state.get_job(job_id)
    assert job.state == "running" and job.manifest_json
    manifest = json.loads(job.manifest_json)
    trials = state.get_trials(job_id)
    assert [t.number for t in trials] == [0, 1]
    tasks = state.tasks_of(job_id)
    assert [t.task_id for t in tasks] == [
        task_id_for(job_id, t, 0, s) for t in (0, 1) for s in (0, 1)
    ]
    for task in tasks:
        train = TrainTask.model_validate_json(task.task_json)
        trial = trials[task.trial]
        assert train.learning_rate == trial.params["training.learning_rate"]
        assert train.seed == seed_for(job_id, task.trial, 0, task.shard, 0)
        # Placed by the memory estimator: the tiny model fits the tier CPU workers take.
        assert task.tier == CPU_TIER and task.state == "queued"
        inputs = task.inputs()
        shard = manifest["shards"][task.shard]
        assert inputs.train[0].key == f"jobs/{job_id}/data/{shard['name']}"
        assert inputs.train[0].sha256 == shard["sha256"]
        assert inputs.start_adapter is None and inputs.base_model == "cotune://tiny-llama"
    assert pool.demand == 4  # the queue, as the cluster workers should follow it

    before = snapshot(state, job_id)
    events = len(state.events.read(job_id, count=10_000))
    for _ in range(3):  # passes with nothing new to do change nothing
        loop.run(once=True)
    assert snapshot(state, job_id) == before
    assert len(state.events.read(job_id, count=10_000)) == events
    study = JobStudy.open(setup["settings"].redis_url, state.keys.optuna(job_id), job_id, spec)
    assert study.asked() == 2


def test_a_trial_asked_by_a_coordinator_that_died_is_adopted_not_asked_again(
    setup: dict[str, Any],
) -> None:
    state, spec = setup["state"], make_spec(setup["data"], n_trials=3)
    job_id = submit(setup, spec)
    # The dead coordinator sharded the job and asked trial 0, then died before recording it.
    state.transition_job(job_id, "sharding", expect=["pending"])
    study = JobStudy.open(setup["settings"].redis_url, state.keys.optuna(job_id), job_id, spec)
    asked = study.ask()
    reconciler(setup, NoPool()).run(once=True)
    trials = state.get_trials(job_id)
    assert trials[0].params == asked.params
    assert [t.number for t in trials] == [0, 1]  # adopted 0, asked 1: two in flight
    assert study.asked() == 2


def test_only_the_leader_acts(setup: dict[str, Any]) -> None:
    state, spec = setup["state"], make_spec(setup["data"])
    job_id = submit(setup, spec)
    leader, other = reconciler(setup, NoPool()), reconciler(setup, NoPool(), identity="test-b")
    assert leader.run_once() is True
    before = snapshot(state, job_id)
    assert other.run_once() is False
    assert snapshot(state, job_id) == before
    state.release_leader("test-a")
    assert other.run_once() is True


def test_a_cancelled_job_is_left_alone(setup: dict[str, Any]) -> None:
    state, spec = setup["state"], make_spec(setup["data"])
    job_id = submit(setup, spec)
    loop = reconciler(setup, NoPool())
    loop.run(once=True)
    state.cancel_job(job_id)
    before = snapshot(state, job_id)
    assert before[0] == "cancelled"
    assert {s for _, s, _ in before[2]} == {"cancelled"}  # queued tasks were cancelled
    loop.run(once=True)
    assert snapshot(state, job_id) == before


def test_a_bad_dataset_fails_the_job_with_the_reason(setup: dict[str, Any], tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x"}\n' * 50)  # no output field: not alpaca
    job_id = submit(setup, make_spec(bad))
    reconciler(setup, NoPool()).run(once=True)
    job = setup["state"].get_job(job_id)
    assert job.state == "failed"
    assert "sharding" in (job.error or "") and str(bad) in (job.error or "")


def upload_folder(store: Any, folder: Path, prefix: str) -> str:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            store.put_file(prefix + path.relative_to(folder).as_posix(), path)
    return f"s3://{store.bucket}/{prefix}"


def test_an_s3_base_model_is_staged_once_and_every_task_downloads_it(
    setup: dict[str, Any], tiny_model_dir: Path
) -> None:
    state, store = setup["state"], setup["store"]
    url = upload_folder(store, tiny_model_dir, "uploads/tiny-llama/")
    spec = make_spec(setup["data"]).model_copy(update={"base_model": url})
    first, second = submit(setup, spec, "recon-1"), submit(setup, spec, "recon-2")
    loop = reconciler(setup, NoPool())
    for _ in range(3):
        loop.run(once=True)
    staged = state.get_job(first).staged_model()
    assert state.get_job(first).state == "running" and staged is not None
    assert staged.key == f"models/{staged.sha256}/model.tar"
    for task in state.tasks_of(first):
        assert task.inputs().base_model == staged  # a presigned GET at lease time
        # The task keeps the spec's name: a worker loads the folder it unpacks instead.
        assert TrainTask.model_validate_json(task.task_json).base_model == url
    events = [e for e in state.events.read(first, count=10_000) if e.kind == "base_model_staged"]
    assert [e.data["key"] for e in events] == [staged.key]
    # The second job on the same model has the same archive, and the store holds one.
    assert state.get_job(second).staged_model() == staged
    assert [o.key for o in store.list("models/")] == [staged.key]


def test_a_base_model_that_cannot_be_staged_fails_the_job_naming_it(setup: dict[str, Any]) -> None:
    state, store = setup["state"], setup["store"]
    store.put_bytes("uploads/weights-only/model.safetensors", b"x")
    url = f"s3://{store.bucket}/uploads/weights-only/"
    job_id = submit(setup, make_spec(setup["data"]).model_copy(update={"base_model": url}))
    reconciler(setup, NoPool()).run(once=True)
    job = state.get_job(job_id)
    assert job.state == "failed" and state.tasks_of(job_id) == []
    assert (job.error or "").startswith(f"base_model {url}: ")
    assert "has no config.json" in (job.error or "")
    [failed] = [e for e in state.events.read(job_id) if e.data.get("to") == "failed"]
    assert failed.data["error"] == job.error
    assert list(store.list("models/")) == []


# --- the whole lifecycle, with accepted tasks -----------------------------------------------


@pytest.fixture(scope="module")
def random_adapter(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A real PEFT adapter (rank 4, every linear layer) of the tiny model, B not zero."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("adapter")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(str(folder))
    (folder / "metrics.json").write_text(json.dumps({"tokens": 1000}))
    return folder


class ScriptedWorker:
    """Leases through the real Leases API and completes with the given adapter's files."""

    def __init__(self, setup: dict[str, Any], adapter: Path) -> None:
        state = setup["state"]
        self.leases = Leases(state, setup["store"], setup["settings"])
        self.store, self.adapter = setup["store"], adapter
        token, _ = JoinTokens(state.redis, state.keys).create("scripted", kind="cluster")
        hardware = Hardware(cpu_count=1, memory_bytes=8 << 30, cotune_version="0")
        worker, _ = Workers(state).enroll(token, hardware)
        self.worker_id = worker.worker_id

    def take(self) -> Any:
        return self.leases.lease(self.worker_id, Capabilities(memory_bytes=8 << 30, bf16=False))

    def complete(self, lease: Any) -> None:
        artifacts = {}
        for name in ADAPTER_FILES:
            key = lease.outputs.adapter[name].key
            info = self.store.put_file(key, self.adapter / name)
            artifacts[name] = ArtifactRef(key=key, sha256=info.sha256, bytes=info.size)
        body = CompleteRequest(artifacts=artifacts, metrics={"tokens": 1000})
        assert self.leases.complete(self.worker_id, lease.lease_id, body).accepted

    def fail(self, lease: Any) -> None:
        body = FailRequest(reason="scripted failure", retryable=True)
        self.leases.fail(self.worker_id, lease.lease_id, body)


def drive(
    loop: Reconciler, worker: ScriptedWorker, state: State, job_id: str, fail: set[str]
) -> None:
    """Passes, completing (or failing, for the task ids in `fail`) every task leased, until
    the job ends."""
    import time

    give_up_at = time.monotonic() + 300
    while state.get_job(job_id).state not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < give_up_at, snapshot(state, job_id)
        loop.run(once=True)
        while (lease := worker.take()) is not None:
            (worker.fail if lease.task_id in fail else worker.complete)(lease)
        time.sleep(0.2)


@pytest.mark.slow
def test_rounds_merge_evaluate_and_the_best_trial_is_exported(
    setup: dict[str, Any], ray_cluster: str, random_adapter: Path
) -> None:
    from cotune.orchestrator.runtime.raypool import RayPool

    state, store, spec = setup["state"], setup["store"], make_spec(setup["data"])
    job_id = submit(setup, spec)
    loop = reconciler(setup, RayPool.connect(None))
    worker = ScriptedWorker(setup, random_adapter)
    # Trial 1's shard 1 fails on every attempt (max_attempts 2): the trial fails, the job
    # goes on with trial 0.
    doomed = task_id_for(job_id, 1, 0, 1)
    drive(loop, worker, state, job_id, fail={doomed})

    job = state.get_job(job_id)
    assert job.state == "succeeded" and job.best_trial == 0
    trials = state.get_trials(job_id)
    assert [t.state for t in trials] == ["complete", "failed"]
    assert "failed (2 failed attempt(s)" in (trials[1].error or "")
    assert trials[0].rounds_done == 2
    for rnd, loss in enumerate(trials[0].eval_losses):
        merge = state.get_merge(job_id, 0, rnd)
        assert merge is not None and merge["eval_loss"] == loss
        assert store.exists(merge["merged_prefix"] + "adapter_model.safetensors")
    # Round 1 started from round 0's merge.
    r1 = state.tasks_for(job_id, 0, 1)[0].inputs()
    assert r1.start_adapter is not None
    assert (
        r1.start_adapter["adapter_config.json"].key
        == f"jobs/{job_id}/trials/0/r0/merged/adapter_config.json"
    )
    study = JobStudy.open(setup["settings"].redis_url, state.keys.optuna(job_id), job_id, spec)
    assert [study.state_of(n) for n in (0, 1)] == ["complete", "fail"]
    assert study.frozen(0).value == trials[0].eval_losses[-1]

    best = {info.key.rsplit("/", 1)[-1] for info in store.list(f"jobs/{job_id}/best/")}
    assert best == {"adapter_config.json", "adapter_model.safetensors", "README.md", "results.json"}
    results = json.loads(store.get_bytes(f"jobs/{job_id}/best/results.json"))
    assert results["best_trial"] == 0 and results["best_eval_loss"] == trials[0].eval_losses[-1]
    assert [t["state"] for t in results["trials"]] == ["complete", "failed"]
    assert results["base_eval_loss"] > 0 and results["workers"] == 1
    assert store.get_bytes(f"jobs/{job_id}/best/adapter_model.safetensors") == store.get_bytes(
        f"jobs/{job_id}/trials/0/r1/merged/adapter_model.safetensors"
    )
    events = state.events.read(job_id, count=10_000)
    merged = Counter((e.data["trial"], e.data["round"]) for e in events if e.kind == "round_merged")
    assert merged == {(0, 0): 1, (0, 1): 1}
