"""The cheats of tests/security/test_cheaters.py, one per kind (a-m): what a `Cheater`
(tests/security/cheaters.py) does with each lease it gets. `CHEATS` maps a kind to its
`Cheat`; each kind cycles through its variants lease by lease (`Cheater.turn`).

Every refused or rejected try leaves the lease to `Cheater.let_go` (a release: never counted
against the task), so no cheat fails a task by walking away from it; only (k), whose cheat
is holding leases, lets the coordinator end them. The cheats whose results wait for the heavy
checks (or that train) start LATE_START_S after the others: the cheap ones take their turns
on the first tasks while those are still queued rather than held in verification.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import tarfile
import time
from pathlib import Path

import numpy as np
from cotune.orchestrator.data.s3errors import ObjectNotFound
from cotune.orchestrator.protocol.wire import (
    ADAPTER_CONFIG,
    ADAPTER_FILES,
    ADAPTER_WEIGHTS,
    ArtifactRef,
    CheckpointRef,
    CompleteRequest,
    FailRequest,
    HeartbeatRequest,
    ReleaseRequest,
    TaskLease,
    TaskOutputs,
)

from tests.security import forgeries as forge
from tests.security.cheaters import Cheat, Cheater, KeepAlive

#: The reason (i) gives on other workers' leases: no event may ever carry it.
MEDDLER_REASON = "cheater-i: ending another worker's lease"
#: How long (k) tries to fill its lease cap before it settles on keeping one lease alive.
HOG_FILL_S = 5.0
#: Forged metrics of (h): what a worker would claim to be paid more.
FORGED_METRICS = {"tokens": 1e15, "train_loss": 0.0, "eval_loss": 0.0, "steps": 10}
#: When the cheats held up by the heavy checks (or training) start (module docstring).
LATE_START_S = 15.0
_ATTEMPT = re.compile(r"/a(\d+)/")


# --- shared pieces -------------------------------------------------------------------------


def template(c: Cheater, lease: TaskLease) -> forge.Tensors:
    """The tensors an upload of this lease must have: the start adapter's (round >= 1), or a
    fresh init of the task's layout (round 0)."""
    start = lease.inputs.start_adapter
    if start and ADAPTER_WEIGHTS in start:
        return forge.load(c.download(start[ADAPTER_WEIGHTS], ADAPTER_WEIGHTS))
    return forge.fresh_init(forge.expected_shapes(lease.task), seed=lease.task.seed)


def config_of(c: Cheater, lease: TaskLease) -> bytes:
    """A truthful adapter_config.json: the start adapter's, or one written from the task."""
    start = lease.inputs.start_adapter
    if start and ADAPTER_CONFIG in start:
        return c.download(start[ADAPTER_CONFIG], ADAPTER_CONFIG).read_bytes()
    return forge.adapter_config(lease.task)


def forged(
    c: Cheater, lease: TaskLease, weights: bytes | Path, what: str, config: bytes | None = None
) -> None:
    """Upload `weights` (and a truthful config unless `config` is given), then complete."""
    refs = c.upload(lease.outputs, weights, config or config_of(c, lease))
    c.complete(lease, refs, what)


def trained(
    c: Cheater, lease: TaskLease, *, resume: bool = True, **changes: object
) -> tuple[Path, TaskOutputs] | None:
    """Train the lease's task for real (heartbeats keep the lease meanwhile): the adapter
    folder and the latest upload targets; None if the lease ended while training."""
    folder = c.work / "train" / f"{lease.task_id}-a{lease.attempt}"
    shutil.rmtree(folder, ignore_errors=True)
    keep = KeepAlive(c, lease)
    try:
        adapter = c.crew.training.train(
            lease, folder, c.transfers, changes=changes or None, resume=resume
        )
    finally:
        keep.close()
    if keep.ended is not None:
        c.tally.note(f"{lease.task_id}: the lease ended while training: {keep.ended}")
        return None
    return adapter, keep.outputs


def checkpoint_tar(step: int) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        state = f'{{"global_step": {step}}}'.encode()
        info = tarfile.TarInfo(f"checkpoint-{step}/trainer_state.json")
        info.size = len(state)
        tar.addfile(info, io.BytesIO(state))
    return buffer.getvalue()


# --- the cheats ----------------------------------------------------------------------------


def pickles(c: Cheater, lease: TaskLease) -> None:
    """(a) torch.save bytes as the weights: claimed from a key issued for something else
    (the checkpoint target), beside the adapter as adapter_model.bin, then at the weights key."""
    blob = forge.pickle_bytes(forge.trained_looking(template(c, lease), seed=c.turn))
    refs = c.upload(lease.outputs, blob, config_of(c, lease))
    elsewhere = c.put(lease.outputs.checkpoint, blob)
    c.complete(lease, {**refs, ADAPTER_WEIGHTS: elsewhere}, "a pickle at the checkpoint key")
    c.complete(lease, {**refs, "adapter_model.bin": elsewhere}, "adapter_model.bin beside it")
    c.complete(lease, refs, "torch.save bytes as adapter_model.safetensors")


def broken(c: Cheater, lease: TaskLease) -> None:
    """(b) a truncated file, random bytes, a header claiming 1 TiB, a header of megabytes."""
    good = forge.safetensors_bytes(forge.trained_looking(template(c, lease), seed=c.turn))
    variants = [
        ("truncated safetensors", forge.truncated(good)),
        ("random bytes", forge.garbage(len(good), seed=c.turn)),
        ("a header claiming 1 TiB", forge.header_claims_a_terabyte()),
        ("a header of megabytes", forge.header_of_megabytes()),
    ]
    what, data = variants[(c.turn - 1) % len(variants)]
    forged(c, lease, data, what)


def layout(c: Cheater, lease: TaskLease) -> None:
    """(c) another model's keys (and a config naming its modules), rank 64 (and a config
    saying r=64), I32 and F64 values, transposed factors."""
    task = lease.task
    base = forge.trained_looking(template(c, lease), seed=c.turn)
    foreign = list(forge.FOREIGN_MODULES)
    variants = [
        (
            "another model's keys, and a config naming its modules",
            forge.safetensors_bytes(forge.foreign_keys(base)),
            forge.adapter_config(task, target_modules=[m.split(".")[-1] for m in foreign]),
        ),
        (
            "rank 64, and a config saying r=64",
            forge.safetensors_bytes(forge.of_rank(forge.expected_shapes(task, 64), c.turn)),
            forge.adapter_config(task, r=64),
        ),
        ("I32 values", forge.safetensors_bytes(base, np.int32), None),
        ("F64 values", forge.safetensors_bytes(base, np.float64), None),
        ("transposed factors", forge.safetensors_bytes(forge.transposed(base)), None),
    ]
    what, data, config = variants[(c.turn - 1) % len(variants)]
    forged(c, lease, data, what, config)


def non_finite(c: Cheater, lease: TaskLease) -> None:
    """(d) one NaN, or one Inf, in an otherwise plausible adapter."""
    value = [float("nan"), float("inf")][(c.turn - 1) % 2]
    tensors = forge.with_value(forge.trained_looking(template(c, lease), seed=c.turn), value)
    forged(c, lease, forge.safetensors_bytes(tensors), f"a {value} value")


def inflated(c: Cheater, lease: TaskLease) -> None:
    """(e) an honest adapter, trained for real, its delta scaled x10 or x1000."""
    out = trained(c, lease)
    if out is None:
        return
    adapter, outputs = out
    factor = [10.0, 1000.0][(c.turn - 1) % 2]
    tensors = forge.scaled(forge.load(adapter / ADAPTER_WEIGHTS), factor)
    refs = c.upload(outputs, forge.safetensors_bytes(tensors), adapter / ADAPTER_CONFIG)
    c.complete(lease, refs, f"an honest delta x{factor:g}")


def noise(c: Cheater, lease: TaskLease) -> None:
    """(f) random factors: N(0, 1) everywhere, or camouflaged at a trained adapter's size."""
    camouflaged = c.turn % 2 == 0
    tensors = forge.random_like(template(c, lease), seed=c.turn, camouflaged=camouflaged)
    what = "random weights, camouflaged" if camouflaged else "random weights, N(0, 1)"
    forged(c, lease, forge.safetensors_bytes(tensors), what)


def replays(c: Cheater, lease: TaskLease) -> None:
    """(g) the start adapter sent back (a fresh init in round 0), or another task's upload
    copied from the store."""
    if c.turn % 2 == 0:
        other = _another_tasks_upload(c, lease)
        try:
            copied = c.crew.store.get_bytes(other) if other is not None else None
        except ObjectNotFound:  # a rejected upload, deleted since it was listed
            copied = None
        if copied is not None:
            forged(c, lease, copied, f"another task's adapter ({other})")
            return
    start = lease.inputs.start_adapter
    if start and ADAPTER_WEIGHTS in start:
        forged(c, lease, c.download(start[ADAPTER_WEIGHTS], ADAPTER_WEIGHTS), "the start adapter")
    else:
        forged(c, lease, forge.safetensors_bytes(template(c, lease)), "a fresh init")


def _another_tasks_upload(c: Cheater, lease: TaskLease) -> str | None:
    """The weights key of another task's upload of the same job, if there is one yet."""
    key = lease.outputs.adapter[ADAPTER_WEIGHTS].key
    job = "/".join(key.split("/")[:3]) + "/"  # jobs/<job>/trials/
    mine = key[: _ATTEMPT.search(key).start()]  # type: ignore[union-attr]  # .../s<shard>
    for info in c.crew.store.list(job):
        if info.key.endswith("/adapter/" + ADAPTER_WEIGHTS) and not info.key.startswith(mine):
            return str(info.key)
    return None


def liar(c: Cheater, lease: TaskLease) -> None:
    """(h) an honest adapter, trained for real, with metrics claiming 1e15 tokens and loss 0."""
    out = trained(c, lease)
    if out is None:
        return
    adapter, outputs = out
    metrics = (json.dumps(FORGED_METRICS) + "\n").encode()
    refs = c.upload(outputs, adapter / ADAPTER_WEIGHTS, adapter / ADAPTER_CONFIG, metrics)
    c.complete(lease, refs, "an honest adapter, forged metrics", metrics=FORGED_METRICS)


def meddle(c: Cheater) -> None:
    """(i) heartbeat, complete, fail and release on a lease held by another worker (its id
    leaked to this cheater: the test reads it from the coordinator's state)."""
    victims = c.crew.foreign_leases(c.worker_id)
    if not victims:
        c.crew.stopping.wait(0.5)
        return
    lease_id = victims[0]
    c.tally.victims.append(lease_id)
    me, client = c.worker_id, c.client
    fake = ArtifactRef(key="x", sha256="0" * 64, bytes=1)
    complete = CompleteRequest(artifacts={name: fake for name in ADAPTER_FILES})
    fail = FailRequest(reason=MEDDLER_REASON, retryable=False)
    release = ReleaseRequest(reason=MEDDLER_REASON)
    c.heartbeat(lease_id, HeartbeatRequest(step=1, max_steps=1), "another worker's lease")
    c.attempt("complete another's", lambda: client.complete(me, lease_id, complete, retry_for_s=10))
    c.attempt("fail another's", lambda: client.fail(me, lease_id, fail, retry_for_s=10))
    c.attempt("release another's", lambda: client.release(me, lease_id, release, retry_for_s=10))
    c.crew.stopping.wait(1.0)


def foreign_keys(c: Cheater, lease: TaskLease) -> None:
    """(j) the result claimed at a traversal key, another job's key and a key issued to
    another lease; a checkpoint claimed at traversal and foreign-job keys."""
    tensors = forge.trained_looking(template(c, lease), seed=c.turn)
    refs = c.upload(lease.outputs, forge.safetensors_bytes(tensors), config_of(c, lease))
    issued = refs[ADAPTER_WEIGHTS]
    n = int(_ATTEMPT.search(issued.key).group(1))  # type: ignore[union-attr]
    other = n - 1 if n > 1 else n + 1
    keys = {
        "a traversal key": issued.key.replace("/adapter/", "/adapter/../../../../../../x/"),
        "another job's key": f"jobs/another-job/trials/0/r0/s0/a1/adapter/{ADAPTER_WEIGHTS}",
        "a key issued to another lease": _ATTEMPT.sub(f"/a{other}/", issued.key, count=1),
    }
    for what, key in keys.items():
        claim = issued.model_copy(update={"key": key})
        c.complete(lease, {**refs, ADAPTER_WEIGHTS: claim}, what)
    archive = c.put(lease.outputs.checkpoint, checkpoint_tar(1))
    for what, key in {
        "a traversal key": archive.key.replace("/ckpt/", "/ckpt/../../../../"),
        "another job's key": "jobs/another-job/trials/0/r0/s0/a1/ckpt/0000/checkpoint.tar",
    }.items():
        ref = CheckpointRef(step=1, archive=archive.model_copy(update={"key": key}))
        body = HeartbeatRequest(step=1, max_steps=lease.task.max_steps or 0, checkpoint=ref)
        c.heartbeat(lease.lease_id, body, f"a checkpoint at {what}")


def hog(c: Cheater, first: TaskLease) -> None:
    """(k) lease as many tasks as allowed (one: it claims one GPU) and then more; the first
    lease it gets it keeps alive with heartbeats for as long as the coordinator lets it.
    Once that lease was cut off, later ones only probe the cap: holding every task it gets
    until the age limit again would show nothing new and only slow the honest job down."""
    started = time.monotonic()
    held, keeps = [first], [KeepAlive(c, first)]
    try:
        while time.monotonic() - started < HOG_FILL_S and not c.crew.stopping.is_set():
            answer = c.attempt("one lease more", c.ask)
            if answer is None:
                continue
            if answer.task is not None:
                held.append(answer.task)
                keeps.append(KeepAlive(c, answer.task))
                continue
            if answer.reason:
                with c.tally.lock:
                    c.tally.capped += 1
                    c.tally.refused += 1
                c.tally.note(f"lease capped: {answer.reason}")
                break
            c.crew.stopping.wait(answer.retry_after_s or 1.0)
        with c.tally.lock:
            c.tally.most_held = max(c.tally.most_held, len(held))
    finally:
        for lease, keep in zip(held[1:], keeps[1:], strict=True):
            keep.close()
            c.let_go(lease)
    keep = keeps[0]
    try:
        while not c.tally.held_for_s and keep.ended is None and not c.crew.stopping.wait(0.5):
            pass
    finally:
        keep.close()
    if keep.ended is not None:
        c.tally.held_for_s.append(time.monotonic() - started)
        c.tally.note(f"kept-alive lease ended: {keep.ended}")


def forged_checkpoint(c: Cheater, lease: TaskLease) -> None:
    """(l) a checkpoint claiming step 1e9, then one step past the task's max_steps."""
    max_steps = lease.task.max_steps or 0
    for step in (10**9, max_steps + 1):
        archive = c.put(lease.outputs.checkpoint, checkpoint_tar(step))
        ref = CheckpointRef(step=step, archive=archive)
        body = HeartbeatRequest(step=1, max_steps=max_steps, checkpoint=ref)
        c.heartbeat(lease.lease_id, body, f"a checkpoint claiming step {step}")


def twins(c: Cheater, lease: TaskLease) -> None:
    """(m) two accounts of one owner, one lazy run (2 of the task's steps, claimed as all of
    them) uploaded by both for a task and for its redundancy duplicate, to confirm it."""
    original = lease.task_id.split(".dup")[0]
    if original != lease.task_id:
        c.tally.duplicates.append(lease.task_id)
    with c.crew.shared_lock:
        fake = c.crew.shared.get(original)
    outputs = lease.outputs
    if fake is None:
        out = trained(c, lease, resume=False, max_steps=2)
        if out is None:
            return
        adapter, outputs = out
        with c.crew.shared_lock:
            fake = c.crew.shared.setdefault(original, adapter)
    refs = c.upload(outputs, fake / ADAPTER_WEIGHTS, fake / ADAPTER_CONFIG, b"{}\n")
    c.complete(lease, refs, "a lazy run, shared by two accounts")


CHEATS: dict[str, Cheat] = {
    "a": Cheat("pickle (torch.save) weights, and at foreign keys", on_lease=pickles),
    "b": Cheat("truncated, random, header-bomb safetensors", on_lease=broken),
    "c": Cheat("wrong keys/rank/dtype/shapes, lying adapter_config", on_lease=layout),
    "d": Cheat("NaN and Inf values", on_lease=non_finite, start_after_s=LATE_START_S),
    "e": Cheat("honest delta scaled x10 and x1000", on_lease=inflated, start_after_s=LATE_START_S),
    "f": Cheat("random weights of the right shapes", on_lease=noise, start_after_s=LATE_START_S),
    "g": Cheat(
        "start adapter / fresh init / another task's adapter",
        on_lease=replays,
        start_after_s=LATE_START_S,
    ),
    "h": Cheat(
        "honest adapter, metrics claim 1e15 tokens, loss 0",
        on_lease=liar,
        start_after_s=LATE_START_S,
    ),
    "i": Cheat("calls on another worker's lease", between=meddle),
    "j": Cheat("artifact and checkpoint refs at foreign keys", on_lease=foreign_keys),
    "k": Cheat("more leases than allowed, one kept alive forever", on_lease=hog, gpus=1),
    "l": Cheat("checkpoint claiming step 1e9 or past max_steps", on_lease=forged_checkpoint),
    "m": Cheat(
        "two accounts of one owner after one redundancy pair",
        on_lease=twins,
        accounts=2,
        start_after_s=LATE_START_S,
    ),
}
