"""The checks at `complete` on a real Redis and SeaweedFS: every kind of bad weights file a
volunteer may upload is rejected there, with the reason naming what was wrong, a strike on its
owner, no credit, the upload deleted and the task queued again with no failure counted; an
honest file with a lying adapter_config.json and forged metrics is taken in (the config and the
metrics are never read), credited the coordinator's count once verified."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from cotune.orchestrator.control.intake import adapter_config
from cotune.orchestrator.control.leases import Leases
from cotune.orchestrator.control.state import State
from cotune.orchestrator.control.strikes import Strikes
from cotune.orchestrator.control.tokens import JoinTokens
from cotune.orchestrator.control.workers import Workers
from cotune.orchestrator.protocol.wire import ADAPTER_CONFIG, ADAPTER_WEIGHTS, CompleteRequest
from cotune.orchestrator.settings import Settings

from tests.integration.coordinator_kit import (
    CPU,
    HARDWARE,
    Clock,
    new_job,
    new_task,
    result_of,
    train_task,
    upload,
)
from tests.security import adversary

pytestmark = pytest.mark.integration


@pytest.fixture
def state(redis_client: Any) -> State:
    return State(redis_client, clock=Clock())


@pytest.fixture
def leases(state: State, object_store: Any) -> Leases:
    return Leases(state, object_store, Settings(lease_ttl_s=30, heartbeat_interval_s=5))


def enroll(state: State, name: str, kind: str = "volunteer") -> str:
    token, _ = JoinTokens(state.redis, state.keys).create(name, kind=kind)  # type: ignore[arg-type]
    return Workers(state).enroll(token, HARDWARE)[0].worker_id


def honest_bytes(lease: Any) -> bytes:
    return adversary.encode(adversary.honest(lease.task, 0))


def wrong_rank(lease: Any) -> bytes:
    other = lease.task.model_copy(update={"lora": lease.task.lora.model_copy(update={"r": 16})})
    return adversary.encode(adversary.honest(other, 0))


def missing_module(lease: Any) -> bytes:
    tensors = adversary.honest(lease.task, 0)
    return adversary.encode({k: v for k, v in tensors.items() if ".layers.1.mlp." not in k})


def extra_tensor(lease: Any) -> bytes:
    tensors = adversary.honest(lease.task, 0)
    tensors["base_model.model.lm_head.lora_A.weight"] = np.zeros((8, 64), np.float32)
    return adversary.encode(tensors)


def float64(lease: Any) -> bytes:
    tensors = adversary.honest(lease.task, 0)
    return adversary.encode({k: v.astype(np.float64) for k, v in tensors.items()})


def truncated(lease: Any) -> bytes:
    return honest_bytes(lease)[:-100]


def header_bomb(lease: Any) -> bytes:
    return adversary.forged(b"{}", b"", length=1 << 40)


def torch_zip(lease: Any) -> bytes:  # what torch.save writes: a zip of pickles
    return b"PK\x03\x04" + b"\x00" * 200


def raw_pickle(lease: Any) -> bytes:  # an adapter_model.bin renamed
    import pickle

    return pickle.dumps({"weights": [1, 2, 3]}, protocol=4)


def garbage(lease: Any) -> bytes:
    return bytes(range(256)) * 8


BAD_FILES = {
    "pickle (torch zip)": (torch_zip, "a pickle, not safetensors"),
    "pickle (.bin)": (raw_pickle, "a pickle, not safetensors"),
    "truncated": (truncated, "truncated"),
    "garbage": (garbage, "header"),
    "header bomb": (header_bomb, "over the limit"),
    "wrong rank": (wrong_rank, "the task's r is 8"),
    "missing tensors": (missing_module, "tensor(s) the task implies are missing"),
    "unexpected tensor": (extra_tensor, "lm_head.lora_A.weight"),
    "wrong dtype": (float64, "dtype 'F64'"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_a_bad_weights_file_is_rejected_at_complete(
    case: str, state: State, leases: Leases, object_store: Any
) -> None:
    make, reason = BAD_FILES[case]
    new_job(state, "j-1")
    task = new_task(state, object_store, "j-1")
    owner = "mallory-" + case.split()[0]
    worker = enroll(state, owner)
    lease = leases.lease(worker, CPU)
    assert lease is not None
    body = result_of(lease, tokens=10**12, weights=make(lease))
    answer = leases.complete(worker, lease.lease_id, body)
    again = state.get_task(task.task_id)
    strikes = Strikes(state).count(owner)
    print(f"{case}: accepted {answer.accepted}, strikes {strikes}, reason: {answer.reason}")
    assert not answer.accepted and reason in (answer.reason or "")
    assert ADAPTER_WEIGHTS in (answer.reason or "")  # the reason names the file
    assert (again.state, again.failures, again.result_json) == ("queued", 0, None)
    assert strikes == 1.0
    assert Workers(state).leaderboard() == []
    for ref in body.artifacts.values():  # the rejected upload is gone from the store
        assert not object_store.exists(ref.key)
    events = [e.kind for e in state.events.read("j-1")]
    assert "task_rejected" in events and "task_accepted" not in events


def test_a_lying_config_and_forged_metrics_are_never_read(
    state: State, leases: Leases, object_store: Any
) -> None:
    new_job(state, "j-1")
    task = new_task(state, object_store, "j-1")
    worker = enroll(state, "eve")
    lease = leases.lease(worker, CPU)
    assert lease is not None
    body = result_of(lease, tokens=10**12, weights=honest_bytes(lease))
    lie = json.dumps({"peft_type": "LORA", "r": 64, "lora_alpha": 10**6}).encode()
    artifacts = dict(body.artifacts)
    artifacts[ADAPTER_CONFIG] = upload(lease.outputs.adapter[ADAPTER_CONFIG], lie)
    forged = CompleteRequest(artifacts=artifacts, metrics={"tokens": 10**12, "loss": 0.0})
    answer = leases.complete(worker, lease.lease_id, forged)
    waiting = state.get_task(task.task_id)
    result = waiting.result()
    print(f"answer {answer}, pending tokens {result.tokens if result else None}")
    assert (answer.accepted, answer.credit) == (True, 0.0)  # pending: credited once verified
    assert waiting.state == "verifying" and result is not None
    assert result.tokens == 4 * 2 * 64  # max_steps x micro_batch x grad_accum x sequence_len
    config = adapter_config(waiting)  # what the merge and the probe use: from the task
    assert (config["r"], config["lora_alpha"]) == (8, 16)
    assert Workers(state).leaderboard() == [] and Strikes(state).count("eve") == 0


def test_a_cluster_workers_bad_file_counts_against_the_task_and_strikes_no_one(
    state: State, leases: Leases, object_store: Any
) -> None:
    new_job(state, "j-1")
    task = new_task(state, object_store, "j-1")
    worker = enroll(state, "cluster", kind="cluster")
    lease = leases.lease(worker, CPU)
    assert lease is not None
    answer = leases.complete(worker, lease.lease_id, result_of(lease, weights=garbage(lease)))
    again = state.get_task(task.task_id)
    print(f"cluster: accepted {answer.accepted}, failures {again.failures}")
    assert not answer.accepted and (again.state, again.failures) == ("queued", 1)
    assert Strikes(state).count("cluster") == 0


def test_a_large_files_hash_is_checked_where_it_is_downloaded(
    state: State, leases: Leases, object_store: Any, tmp_path: Any
) -> None:
    """complete reads the first 64 KiB of each file (control/intake.py PREFIX_BYTES). A
    volunteer's larger adapter is hashed by the heavy checks as they download it, so a false
    sha256 is taken into `verifying` (uncredited) and then refused there; a cluster worker's,
    which skips the heavy checks, is hashed at complete and refused at once."""
    from cotune.orchestrator.control.intake import PREFIX_BYTES
    from cotune.orchestrator.pipeline.roundmerge import StoredFile
    from cotune.orchestrator.pipeline.upload_checks import _fetch

    wide = train_task(lora={"r": 16, "alpha": 32})  # 14 modules x 2 x 16 x 64 x 4 B = 114 KB
    new_job(state, "j-1")
    outcomes = {}
    for kind in ("volunteer", "cluster"):
        task = new_task(state, object_store, "j-1", shard=len(outcomes), task=wide)
        worker = enroll(state, f"{kind}-1", kind=kind)
        lease = leases.lease(worker, CPU)
        assert lease is not None and lease.task_id == task.task_id
        body = result_of(lease)
        weights = body.artifacts[ADAPTER_WEIGHTS]
        assert weights.bytes > PREFIX_BYTES
        body.artifacts[ADAPTER_WEIGHTS] = weights.model_copy(update={"sha256": "e" * 64})
        answer = leases.complete(worker, lease.lease_id, body)
        outcomes[kind] = (answer, state.get_task(task.task_id), weights)
        print(f"{kind}: accepted {answer.accepted}, credit {answer.credit}, {answer.reason}")

    answer, volunteer_task, weights = outcomes["volunteer"]
    assert answer.accepted and answer.credit == 0.0 and volunteer_task.state == "verifying"
    stored = StoredFile(key=weights.key, sha256="e" * 64)
    issue = _fetch(object_store, stored, tmp_path / "weights.safetensors")
    assert issue == f"{weights.key}: its sha256 is not the one claimed at complete"
    honest = StoredFile(key=weights.key, sha256=weights.sha256)
    assert _fetch(object_store, honest, tmp_path / "honest.safetensors") != issue

    answer, cluster_task, weights = outcomes["cluster"]
    assert not answer.accepted and f"sha256 {weights.sha256}, {'e' * 64} claimed" in (
        answer.reason or ""
    )
    assert (cluster_task.state, cluster_task.failures) == ("queued", 1)
