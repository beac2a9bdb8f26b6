"""The `sharding` step off the reconciler's loop (pipeline/sharding_step.py), on the real loop,
Redis and SeaweedFS.

The fast tests hold each staging + sharding call in a local pool until the test lets it go
(then it runs for real, at the next poll): submitted once, polled while it runs, its result
applied, its failures, a cancel meanwhile. The slow one shards a 2 GB file as a real Ray task
while a second job's rounds are leased, completed and merged.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cotune.orchestrator.control.leases import Leases
from cotune.orchestrator.control.state import State
from cotune.orchestrator.control.tokens import JoinTokens
from cotune.orchestrator.control.workers import Workers
from cotune.orchestrator.data.layout import manifest_key
from cotune.orchestrator.data.shardstore import shard_to_store
from cotune.orchestrator.data.synthetic import generate_rows
from cotune.orchestrator.pipeline.reconciler import LoopTimes
from cotune.orchestrator.protocol.spec import parse_spec
from cotune.orchestrator.protocol.wire import Capabilities

from tests.integration.coordinator_kit import HARDWARE, result_of
from tests.integration.reconciler_kit import loop_setup, make_spec, reconciler, submit

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


@dataclass
class Held:
    """A call held by `HeldPool`: it runs (or fails with `error`) once released."""

    fn: Callable[..., Any]
    args: tuple[Any, ...]
    released: bool = False
    error: BaseException | None = None
    before_answer: Callable[[], Any] | None = None
    polls: int = 0


@dataclass
class HeldPool:
    """A local pool whose staging + sharding calls run only once the test releases them (at
    the next poll, in the pass); the base model's evaluation is started, never finished."""

    calls: list[Held] = field(default_factory=list)

    def submit_merge(self, request: Any) -> Any:
        raise AssertionError("no merge expected in this test")

    def submit_call(self, fn: Any, *args: Any) -> Any:
        return "base-eval"

    def submit_cpu_call(self, fn: Any, *args: Any) -> Any:
        self.calls.append(Held(fn, args))
        return self.calls[-1]

    def poll(self, handle: Any) -> tuple[bool, Any, BaseException | None]:
        if not isinstance(handle, Held):
            return False, None, None
        handle.polls += 1
        if not handle.released:
            return False, None, None
        if handle.before_answer is not None:
            handle.before_answer()
        if handle.error is not None:
            return True, None, handle.error
        try:
            return True, handle.fn(*handle.args), None
        except Exception as exc:
            return True, None, exc

    def follow_queue(self, demand: int) -> None:
        pass

    def of(self, job_id: str) -> list[Held]:
        return [c for c in self.calls if c.args[0].job_id == job_id]

    def release(self, job_id: str, **how: Any) -> None:
        held = self.of(job_id)[-1]
        held.released = True
        for name, value in how.items():
            setattr(held, name, value)


def kinds(state: State, job_id: str, kind: str) -> list[Any]:
    return [e for e in state.events.read(job_id, count=10_000) if e.kind == kind]


def test_sharding_is_submitted_once_polled_while_other_jobs_go_on_and_then_applied(
    setup: dict[str, Any],
) -> None:
    state, store, data = setup["state"], setup["store"], setup["data"]
    a = submit(setup, make_spec(data), "recon-a")
    b = submit(setup, make_spec(data), "recon-b")
    pool = HeldPool()
    loop = reconciler(setup, pool)
    loop.run(once=True)
    assert state.get_job(a).state == state.get_job(b).state == "sharding"
    pool.release(b)
    for _ in range(3):
        loop.run(once=True)
    # B went on while A's call runs: A's was submitted once and polled on every pass.
    assert state.get_job(b).state == "running" and len(state.tasks_of(b)) == 4
    assert state.get_job(a).state == "sharding" and state.tasks_of(a) == []
    [held] = pool.of(a)
    assert held.polls == 4
    [started] = kinds(state, a, "sharding_started")
    assert started.data == {"dataset": str(data), "shards": 2, "staging": None}

    pool.release(a)
    loop.run(once=True)
    job = state.get_job(a)
    assert job.state == "running" and len(state.tasks_of(a)) == 4
    assert job.manifest_json == store.get_bytes(manifest_key(a)).decode()
    # The same data and manifest as sharding in place gives (the manifest names no job).
    direct = shard_to_store(
        data, store=store, job_id="direct-1", fmt="alpaca", shards=2, eval_split=0.2, seed=0
    )
    assert job.manifest_json == direct.to_json()
    names = {o.key.rsplit("/", 1)[1]: o.sha256 for o in store.list(f"jobs/{a}/data/")}
    assert names == {o.key.rsplit("/", 1)[1]: o.sha256 for o in store.list("jobs/direct-1/data/")}
    [done] = kinds(state, a, "dataset_sharded")
    manifest = json.loads(job.manifest_json)
    assert done.data["rows"] == sum(s["rows"] for s in manifest["shards"]) > 0
    assert done.data["eval_rows"] == manifest["eval"]["rows"] > 0
    assert (done.data["shards"], done.data["reused"], done.data["bad_rows"]) == (2, False, 0)
    for _ in range(2):  # nothing more is submitted for either job
        loop.run(once=True)
    assert len(pool.calls) == 2 and len(kinds(state, a, "sharding_started")) == 1


def test_bad_data_fails_the_job_and_another_error_is_submitted_again(
    setup: dict[str, Any], tmp_path: Path
) -> None:
    state, data = setup["state"], setup["data"]
    bad_file = tmp_path / "bad.jsonl"
    bad_file.write_text('{"instruction": "x"}\n' * 50)  # no output field: not alpaca
    bad = submit(setup, make_spec(bad_file), "recon-bad")
    flaky = submit(setup, make_spec(data), "recon-flaky")
    pool = HeldPool()
    loop = reconciler(setup, pool)
    loop.run(once=True)
    pool.release(bad)
    pool.release(flaky, error=RuntimeError("the store is away"))
    loop.run(once=True)
    job = state.get_job(bad)
    assert job.state == "failed" and (job.error or "").startswith(f"sharding {bad_file}: ")
    assert kinds(state, bad, "coordinator_error") == []
    # Not the job's fault: logged, and the next pass submits the call again.
    [error] = kinds(state, flaky, "coordinator_error")
    assert error.data == {"error": "RuntimeError: the store is away"}
    assert state.get_job(flaky).state == "sharding" and len(pool.of(flaky)) == 1
    loop.run(once=True)
    assert len(pool.of(flaky)) == 2 and len(kinds(state, flaky, "sharding_started")) == 2
    pool.release(flaky)
    loop.run(once=True)
    assert state.get_job(flaky).state == "running"
    assert len(pool.of(bad)) == 1


def test_a_job_cancelled_while_sharding_is_not_moved_on_by_its_result(
    setup: dict[str, Any], tmp_path: Path
) -> None:
    state, store, data = setup["state"], setup["store"], setup["data"]
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}\n')
    (model / "model.safetensors").write_bytes(b"\0" * 1024)
    staged_spec = make_spec(data).model_copy(update={"base_model": str(model)})
    gone = submit(setup, staged_spec, "recon-gone")
    late = submit(setup, staged_spec, "recon-late")
    late_plain = submit(setup, make_spec(data), "recon-late-plain")
    pool = HeldPool()
    loop = reconciler(setup, pool)
    loop.run(once=True)
    assert kinds(state, gone, "sharding_started")[0].data["staging"] == str(model)

    # Cancelled between passes: the job's context goes, its call is never polled again.
    state.cancel_job(gone)
    pool.release(gone)
    # Cancelled while the result comes back (after the pass read the job as sharding): the
    # staged model is not recorded and the job is not moved (expect=sharding).
    for job_id in (late, late_plain):
        pool.release(job_id, before_answer=lambda job_id=job_id: state.cancel_job(job_id))
    for _ in range(2):
        loop.run(once=True)
    assert pool.of(gone)[0].polls == 1
    for job_id in (gone, late, late_plain):
        job = state.get_job(job_id)
        assert job.state == "cancelled" and not job.manifest_json, job_id
        assert job.staged_model() is None and state.tasks_of(job_id) == []
        assert kinds(state, job_id, "coordinator_error") == []
        assert kinds(state, job_id, "dataset_sharded") == []
    assert len(pool.calls) == 3
    # The late call did its work (the store keeps it for nobody, as a crash would).
    assert store.exists(manifest_key(late))


# --- a 2 GB dataset, sharded as a real Ray task -----------------------------------------------

BIG_BYTES = 2_000_000_000


def write_big_alpaca(path: Path, at_least: int) -> int:
    """Repeat a block of synthetic alpaca lines until the file holds `at_least` bytes; the
    number of rows written."""
    block_rows = 10_000
    rows = generate_rows("alpaca", block_rows, seed=7)
    lines = [json.dumps(row, separators=(",", ":")) for row in rows]
    block = ("\n".join(lines) + "\n").encode()
    repeats = -(-at_least // len(block))
    with path.open("wb") as f:
        for _ in range(repeats):
            f.write(block)
    assert path.stat().st_size >= at_least
    return repeats * block_rows


def one_trial(data: Path, *, rounds: int, eval_split: float | str) -> Any:
    """One trial of K=2 shards; a separate eval file keeps the big job's eval split small."""
    spec = make_spec(data, n_trials=1, max_concurrent_trials=1).model_dump(mode="json")
    spec["rounds"], spec["dataset"]["eval_split"] = rounds, eval_split
    return parse_spec(spec)


class ClusterWorker:
    """A trusted cluster worker (its results are accepted at once) that leases through the
    real Leases API and completes with an honest-looking adapter (coordinator_kit)."""

    def __init__(self, setup: dict[str, Any]) -> None:
        state = setup["state"]
        self.leases = Leases(state, setup["store"], setup["settings"])
        token, _ = JoinTokens(state.redis, state.keys).create("scripted", kind="cluster")
        self.worker_id = Workers(state).enroll(token, HARDWARE)[0].worker_id

    def take(self) -> Any:
        return self.leases.lease(self.worker_id, Capabilities(memory_bytes=8 << 30, bf16=False))

    def complete(self, lease: Any) -> None:
        assert self.leases.complete(self.worker_id, lease.lease_id, result_of(lease)).accepted


@pytest.mark.slow
@pytest.mark.timeout(1200)  # about 3 minutes on a quiet machine: 25 M rows, 2 CPUs
def test_a_2gb_dataset_shards_while_another_job_is_leased_merged_and_goes_on(
    setup: dict[str, Any], ray_cluster: str, tmp_path: Path, synthetic_jsonl: Any
) -> None:
    from cotune.orchestrator.runtime.raypool import RayPool

    if shutil.disk_usage(tmp_path).free < 2 * BIG_BYTES:
        pytest.skip(f"needs {2 * BIG_BYTES / 1e9:.0f} GB free in {tmp_path}")
    state, data = setup["state"], setup["data"]
    big = tmp_path / "big.jsonl"
    try:
        writing = time.monotonic()
        rows = write_big_alpaca(big, BIG_BYTES)
        written_s = time.monotonic() - writing
        eval_file = synthetic_jsonl("alpaca", 200, seed=9, name="eval.jsonl")
        a = submit(setup, one_trial(big, rounds=1, eval_split=str(eval_file)), "big-a")
        b = submit(setup, one_trial(data, rounds=2, eval_split=0.2), "small-b")
        loop = reconciler(setup, RayPool.connect(None))
        worker = ClusterWorker(setup)

        def sharding() -> bool:
            return state.get_job(a).state in ("pending", "sharding")

        leases, longest, during = 0, 0.0, {}
        started = time.monotonic()
        while sharding():
            assert time.monotonic() - started < 900, "sharding 2 GB took over 15 minutes"
            for job_id in (a, b):
                errors = kinds(state, job_id, "coordinator_error")
                assert not errors, f"{job_id}: {errors[-1].data}"
            begun = time.monotonic()
            loop.run(once=True)
            longest = max(longest, time.monotonic() - begun)
            while sharding() and (lease := worker.take()) is not None:
                assert lease.task_id.startswith(b + ".")
                worker.complete(lease)
                leases += 1
            if sharding():  # B's progress while A is still sharding
                during = {
                    "passes": loop.passes,
                    "leases": leases,
                    "merged": len(kinds(state, b, "round_merged")),
                    "b_state": state.get_job(b).state,
                    "b_tasks": len(state.tasks_of(b)),
                }
            time.sleep(0.2)
        sharding_s = time.monotonic() - started

        job = state.get_job(a)
        assert job.state == "running", job.error
        assert len(state.tasks_of(a)) == 2  # round 0 queued in the pass that took the result
        manifest = json.loads(job.manifest_json or "{}")
        assert sum(s["rows"] for s in manifest["shards"]) == rows
        [done] = kinds(state, a, "dataset_sharded")
        print(
            f"\nA: {big.stat().st_size / 1e9:.2f} GB, {rows} rows (written in {written_s:.1f} s), "
            f"sharding {sharding_s:.1f} s as seen by the loop, {done.data['seconds']:.1f} s in "
            f"the Ray task; meanwhile {during['passes']} reconciler passes (the longest "
            f"{longest:.2f} s), B: {during['leases']} tasks leased and completed, "
            f"{during['merged']} round(s) merged, {during['b_tasks']} tasks, "
            f"state {during['b_state']}"
        )
        # While A sharded, B's rounds went on: both round-0 tasks leased and completed, round
        # 0 merged and evaluated (a Ray task too), round 1 queued; no pass held the loop.
        assert during["leases"] >= 2 and during["merged"] >= 1 and during["b_tasks"] >= 4
        assert during["passes"] >= 10
        assert longest < LoopTimes().leader_ttl_s
    finally:
        big.unlink(missing_ok=True)
