"""The heavy checks and the round review on a whole job (real reconciler, Ray, `cotune
evaluate`, Redis, SeaweedFS): volunteers' results wait in `verifying`; NaN, random weights,
a scaled-up change, the start adapter sent back and one adapter uploaded for two tasks are
each rejected before any merge, with a strike and no credit, while the honest volunteers'
job completes; credit and merge weights are the coordinator's, whatever the workers claimed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cotune.orchestrator.control.records import task_id_for
from cotune.orchestrator.control.state import State
from cotune.orchestrator.control.strikes import Strikes
from cotune.orchestrator.control.workers import Workers
from cotune.orchestrator.data.layout import merged_prefix
from cotune.orchestrator.data.manifest import Manifest

from tests.security import adversary
from tests.security.job_kit import (
    JOB,
    Volunteer,
    drive,
    make_settings,
    reconciler,
    rejections,
    submit,
    task,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]
TOKENS = 4 * 1 * 1 * 64  # max_steps x micro_batch x grad_accum x sequence_len


def merge_of(store: Any, tmp: Path, uploads: list[bytes], config: str, rows: list[int]) -> bytes:
    """The merge the coordinator should have made: the uploads' weights, its own config,
    the shards' rows as weights."""
    from cotune.orchestrator.merge.merger import merge_adapters

    folders = []
    for n, weights in enumerate(uploads):
        folder = tmp / f"in-{n}"
        folder.mkdir(parents=True)
        (folder / "adapter_model.safetensors").write_bytes(weights)
        (folder / "adapter_config.json").write_text(config)
        folders.append(folder)
    merge_adapters(folders, tmp / "out", method="svd", weights=[float(r) for r in rows])
    return (tmp / "out" / "adapter_model.safetensors").read_bytes()


def products(weights: bytes) -> dict[str, np.ndarray]:
    """Each module's B @ A: what a merged adapter adds (its factors' signs are arbitrary)."""
    tensors = adversary.load(weights)
    return {
        k.removesuffix(".lora_A.weight"): tensors[k.replace("lora_A", "lora_B")] @ tensors[k]
        for k in tensors
        if k.endswith(".lora_A.weight")
    }


@pytest.mark.timeout(1500)
def test_bad_results_are_rejected_before_the_merge_and_the_honest_job_completes(
    tmp_path: Path,
    redis_client: Any,
    redis_server: str,
    s3_server: Any,
    object_store: Any,
    synthetic_jsonl: Any,
    ray_cluster: str,
) -> None:
    from cotune.orchestrator.runtime.raypool import RayPool

    state, store = State(redis_client), object_store
    settings = make_settings(tmp_path, redis_server, s3_server, store)
    data = synthetic_jsonl("alpaca", 150, seed=3)
    submit(state, data, shards=3, rounds=1, trust={"redundancy": 0})
    loop = reconciler(state, store, settings, RayPool.connect(None))
    people = {n: Volunteer(state, store, settings, n) for n in ("alice", "bob", "carol")}
    mallory = Volunteer(state, store, settings, "mallory")
    drive(loop, state, lambda: state.get_job(JOB).state == "running", "sharding")
    s = [task_id_for(JOB, 0, 0, k) for k in range(3)]

    # --- round 0 ---------------------------------------------------------------------------
    a, b = people["alice"].must_take(), people["bob"].must_take()
    uploads = {a.task_id: adversary.honest(a.task, 0), b.task_id: adversary.honest(b.task, 1)}
    claims = {a.task_id: 1e12, b.task_id: 1.0}  # forged token counts: never read
    for who, lease in (("alice", a), ("bob", b)):
        answer = people[who].complete(lease, uploads[lease.task_id], tokens=claims[lease.task_id])
        assert (answer.accepted, answer.credit) == (True, 0.0)
    m = mallory.must_take()
    assert m.task_id == s[2]
    # Random weights do not hurt the tiny random-init model's loss (it starts worse than
    # uniform): the step bound (verify/bounds.py) catches them and the scaled delta by how far
    # they moved from the start; the round review would by size and direction.
    attacks = [
        ("NaN", adversary.with_nan(adversary.honest(m.task, 2)), ("NaN",)),
        ("random", adversary.random_weights(m.task), ("optimizer steps", "norm_high", "direction")),
        ("scaled x10", adversary.scaled(adversary.honest(m.task, 2), 10.0), ("optimizer steps",)),
    ]
    for n, (kind, tensors, why) in enumerate(attacks):
        if n:
            m = mallory.must_take()
            assert m.task_id == s[2]  # rejected results go back to the front, not counted
        assert mallory.complete(m, tensors).accepted  # the cheap checks pass: it looks right
        drive(loop, state, lambda n=n: len(rejections(state, s[2])) > n, f"{kind} rejected")
        reason = rejections(state, s[2])[n]
        print(f"{kind}: rejected: {reason[:160]}")
        assert any(w in reason for w in why), reason
        assert task(state, s[2]).failures == 0
        # No merge meanwhile: the honest results wait (until a review passes them).
        assert state.get_merge(JOB, 0, 0) is None
        assert {task(state, t).state for t in s[:2]} <= {"verifying", "accepted"}
    assert Strikes(state).is_quarantined("mallory")  # three strikes
    c = people["carol"].must_take()
    uploads[c.task_id] = adversary.honest(c.task, 2)
    people["carol"].complete(c, uploads[c.task_id], tokens=5.0)
    drive(loop, state, lambda: state.get_job(JOB).state == "succeeded", "the job succeeded")
    board = {name: tokens for name, tokens, _ in Workers(state).leaderboard()}
    print(f"leaderboard after round 0: {board}")
    assert board == {"alice": TOKENS, "bob": TOKENS, "carol": TOKENS}
    # The merge: the shards' rows as weights and the coordinator's config, not the claims.
    manifest = Manifest.from_json(state.get_job(JOB).manifest_json or "")
    rows = [manifest.shards[k].rows for k in range(3)]
    config = json.loads(task(state, s[0]).adapter_config_json or "")
    expected = merge_of(
        store,
        tmp_path / "merge",
        [adversary.encode(uploads[t]) for t in s],
        json.dumps(config),
        rows,
    )
    merged = merged_prefix(JOB, 0, 0)
    got = products(store.get_bytes(merged + "adapter_model.safetensors"))
    want = products(expected)
    assert got.keys() == want.keys()
    assert all(np.allclose(got[k], want[k], rtol=1e-4, atol=1e-7) for k in want)
    assert Strikes(state).count("mallory") == 3.0
    results = json.loads(store.get_bytes(f"jobs/{JOB}/best/results.json"))
    done = results["trials"][0]["tasks"]
    assert [r["tokens"] for r in done] == [TOKENS] * 3 and results["trials"][0][
        "tokens"
    ] == 3 * TOKENS


@pytest.mark.timeout(1500)
def test_the_start_adapter_sent_back_and_one_adapter_for_two_tasks_are_rejected(
    tmp_path: Path,
    redis_client: Any,
    redis_server: str,
    s3_server: Any,
    object_store: Any,
    synthetic_jsonl: Any,
    ray_cluster: str,
) -> None:
    from cotune.orchestrator.runtime.raypool import RayPool

    state, store = State(redis_client), object_store
    settings = make_settings(tmp_path, redis_server, s3_server, store)
    submit(
        state, synthetic_jsonl("alpaca", 100, seed=5), shards=2, rounds=2, trust={"redundancy": 0}
    )
    loop = reconciler(state, store, settings, RayPool.connect(None))
    alice, bob, dave = (Volunteer(state, store, settings, n) for n in ("alice", "bob", "dave"))
    eves = [Volunteer(state, store, settings, "eve") for _ in range(2)]  # one owner
    drive(loop, state, lambda: state.get_job(JOB).state == "running", "sharding")
    for who in (alice, bob):
        lease = who.must_take()
        who.complete(lease, adversary.honest(lease.task, int(lease.task_id[-1])))
    drive(loop, state, lambda: len(state.tasks_for(JOB, 0, 1)) == 2, "round 1 queued")
    merged = merged_prefix(JOB, 0, 0)
    start_bytes = store.get_bytes(merged + "adapter_model.safetensors")
    start = adversary.load(start_bytes)
    # eve sends one adapter for both tasks of the round (from two accounts)
    e0, e1 = eves[0].must_take(), eves[1].must_take()
    copy = adversary.honest(e0.task, 0, start=start)
    eves[0].complete(e0, copy)
    eves[1].complete(e1, copy)
    drive(
        loop,
        state,
        lambda: all(rejections(state, t) for t in (e0.task_id, e1.task_id)),
        "both copies rejected",
    )
    for t in (e0.task_id, e1.task_id):
        print(f"copy {t}: rejected: {rejections(state, t)[0][:160]}")
        assert "replay" in rejections(state, t)[0]
    # dave sends the start adapter back
    d = dave.must_take()
    before = len(rejections(state, d.task_id))  # eve's copy was rejected there already
    dave.complete(d, start_bytes)
    drive(loop, state, lambda: len(rejections(state, d.task_id)) > before, "start replay rejected")
    print(f"start replay: rejected: {rejections(state, d.task_id)[-1][:160]}")
    assert "no change from its start adapter" in rejections(state, d.task_id)[-1]
    for who in (alice, bob):
        lease = who.must_take()
        who.complete(lease, adversary.honest(lease.task, int(lease.task_id[-1]), start=start))
    drive(loop, state, lambda: state.get_job(JOB).state == "succeeded", "the job succeeded")
    trial = state.get_trials(JOB)[0]
    strikes = {o: Strikes(state).count(o) for o in ("dave", "eve", "alice", "bob")}
    print(f"trial {trial.state}, losses {trial.eval_losses}, strikes {strikes}")
    assert trial.state == "complete" and trial.rounds_done == 2
    assert strikes == {"dave": 1.0, "eve": 2.0, "alice": 0.0, "bob": 0.0}
    board = {name: tokens for name, tokens, _ in Workers(state).leaderboard()}
    assert board == {"alice": 2 * TOKENS, "bob": 2 * TOKENS}
