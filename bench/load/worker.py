"""Simulated workers: the wire protocol of docs/api.md spoken by asyncio tasks, many to a
process. This module runs in the load generator's child processes (bench/load/fleet.py
starts them), so it imports only the standard library, orjson and numpy.

A `SimWorker` holds one keep-alive connection to the coordinator and one to the object
store, enrolls with a join token, and then runs one scenario until the end of the run:

    noop            GET /healthz back to back (closed loop): the request path's ceiling
    lease_release   lease, release (the queue alone)
    lease_complete  lease, upload the adapter's files to the presigned POSTs, complete
    heartbeat       hold one lease (taken before the run) and heartbeat it
    train           lease, "train" (sleep train_s), upload, complete; an empty queue is
                    asked again after the answer's retry_after_s, as a real worker does

Closed loop: each worker starts its next cycle when the last one ended, until the parent
stops the run `duration_s` after every worker has finished its first cycle (bench/load/
fleet.py; `max_s` after the start at the latest). Open loop (cycles
and heartbeats): each worker has its own arrival times (Poisson, or evenly spaced; the
workers' phases spread evenly over the period), and a cycle's latency counts from its
scheduled start, so time spent queued behind the worker's previous cycle (or waiting for a
connection) is in the figure. Arrivals stop at the end of the run; the ones already due are
still served, up to `drain_s` after it (those left are counted `unserved`).

Every sample is (mark, latency): mark is when the request ended (closed loop) or was
scheduled (open loop), on time.monotonic(), which all processes of a machine share; the
parent keeps the samples whose mark is inside the measured window.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import time
from collections import Counter
from typing import Any

import numpy as np
import orjson

from bench.load.client import Connection, multipart

LEASE = "/v1/workers/{w}/lease"
RELEASE = "/v1/workers/{w}/leases/{l}/release"
COMPLETE = "/v1/workers/{w}/leases/{l}/complete"
HEARTBEAT = "/v1/workers/{w}/leases/{l}/heartbeat"
JSON = b"Content-Type: application/json\r\n"
ERROR_SAMPLES = 3  # messages kept per kind of error


class Failed(Exception):
    """A request answered with an error status (or not answered): counted by kind."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class Recorder:
    """Samples and counters of one process; `export()` is what it sends to the parent."""

    def __init__(self) -> None:
        self.marks: dict[str, list[float]] = {}
        self.latencies: dict[str, list[float]] = {}
        self.counts: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.samples: dict[str, list[str]] = {}
        self.events: dict[str, list[float]] = {}

    def add(self, name: str, mark: float, latency: float) -> None:
        self.marks.setdefault(name, []).append(mark)
        self.latencies.setdefault(name, []).append(latency)

    def error(self, mark: float, exc: BaseException) -> None:
        kind = exc.kind if isinstance(exc, Failed) else type(exc).__name__
        self.errors[kind] += 1
        self.marks.setdefault("error", []).append(mark)
        self.latencies.setdefault("error", []).append(0.0)
        kept = self.samples.setdefault(kind, [])
        if len(kept) < ERROR_SAMPLES:
            kept.append(str(exc)[:300])

    def event(self, name: str, at: float) -> None:
        self.events.setdefault(name, []).append(at)

    def export(self) -> dict[str, Any]:
        return {
            "samples": {
                name: (np.asarray(self.marks[name]), np.asarray(self.latencies[name]))
                for name in self.marks
            },
            "counts": dict(self.counts),
            "errors": dict(self.errors),
            "error_samples": self.samples,
            "events": {name: np.asarray(at) for name, at in self.events.items()},
        }


class SimWorker:
    """One simulated worker: its connections, its identity, its current lease."""

    def __init__(self, index: int, api_url: str, plan: dict[str, Any]) -> None:
        self.index = index
        self.api = Connection.to(api_url, timeout_s=plan.get("request_timeout_s", 120.0))
        self.stores: dict[str, Connection] = {}
        self.plan = plan
        self.worker_id = ""
        self.auth = b""
        self.lease: dict[str, Any] | None = None
        self.wait = 0.0  # the last empty lease answer's retry_after_s
        self.beats = 0

    async def call(self, what: str, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else orjson.dumps(body)
        try:
            status, answer = await self.api.request(method, path, data, self.auth + JSON)
        except (TimeoutError, OSError, asyncio.IncompleteReadError) as exc:
            raise Failed(f"{what} {type(exc).__name__}", f"{what}: {exc!r}") from None
        if status >= 400:
            code = ""
            with contextlib.suppress(Exception):
                code = orjson.loads(answer)["error"]["code"]
            raise Failed(f"{what} {status} {code}".rstrip(), f"{what}: {answer[:300]!r}")
        return orjson.loads(answer) if answer else None

    async def enroll(self, join_token: str) -> None:
        answer = await self.call(
            "enroll",
            "POST",
            "/v1/workers/enroll",
            {"join_token": join_token, "hardware": self.plan["hardware"]},
        )
        self.worker_id = answer["worker_id"]
        self.auth = b"Authorization: Bearer %s\r\n" % answer["worker_token"].encode()

    async def take_lease(self) -> dict[str, Any] | None:
        """The lease answer's task, or None (and the answer's retry_after_s in self.wait)."""
        answer = await self.call(
            "lease",
            "POST",
            LEASE.format(w=self.worker_id),
            {"capabilities": self.plan["capabilities"]},
        )
        self.wait = float(answer.get("retry_after_s") or 0.0)
        self.lease = answer.get("task")
        self.beats = 0
        return self.lease

    async def release(self, lease: dict[str, Any]) -> None:
        path = RELEASE.format(w=self.worker_id, l=lease["lease_id"])
        await self.call("release", "POST", path, {"reason": "load benchmark"})

    async def upload(self, rec: Recorder, lease: dict[str, Any]) -> dict[str, Any]:
        """Each adapter file to its presigned POST; the artifacts to report."""
        files: dict[str, bytes] = self.plan["files"]
        digests: dict[str, str] = self.plan["digests"]
        artifacts = {}
        for name, data in files.items():
            post = lease["outputs"]["adapter"][name]
            conn = self._store(post["url"])
            body, content_type = multipart(post["fields"], data)
            began = time.monotonic()
            try:
                status, answer = await conn.request("POST", _path(post["url"]), body, content_type)
            except (TimeoutError, OSError, asyncio.IncompleteReadError) as exc:
                raise Failed(f"upload {type(exc).__name__}", f"upload: {exc!r}") from None
            if status not in (200, 201, 204):
                raise Failed(f"upload {status}", f"upload {name}: {answer[:300]!r}")
            done = time.monotonic()
            rec.add("upload", done, done - began)
            artifacts[name] = {"key": post["key"], "sha256": digests[name], "bytes": len(data)}
        return artifacts

    async def complete(self, lease: dict[str, Any], artifacts: dict[str, Any]) -> dict[str, Any]:
        path = COMPLETE.format(w=self.worker_id, l=lease["lease_id"])
        body = {
            "artifacts": artifacts,
            "metrics": {"tokens": 512, "steps": lease["task"]["max_steps"]},
        }
        answer: dict[str, Any] = await self.call("complete", "POST", path, body)
        return answer

    async def heartbeat(self) -> dict[str, Any]:
        assert self.lease is not None
        lease = self.lease
        max_steps = int(lease["task"]["max_steps"])
        before, self.beats = min(self.beats, max_steps), self.beats + 1
        step = min(self.beats, max_steps)
        body = {
            "phase": "training",
            "step": step,
            "max_steps": max_steps,
            "loss": 2.0,
            "learning_rate": 1e-4,
            "tokens_per_s": 900.0,
            "tokens_seen": 128 * step,
            "memory_bytes": 1 << 30,
            "losses": [{"step": s, "loss": 2.0} for s in range(before + 1, step + 1)],
        }
        path = HEARTBEAT.format(w=self.worker_id, l=lease["lease_id"])
        answer: dict[str, Any] = await self.call("heartbeat", "POST", path, body)
        return answer

    async def close(self) -> None:
        await self.api.close()
        for conn in self.stores.values():
            await conn.close()

    def _store(self, url: str) -> Connection:
        where = url.split("/", 3)[2]
        if where not in self.stores:
            self.stores[where] = Connection.to(url, timeout_s=self.api.timeout_s)
        return self.stores[where]


def _path(url: str) -> str:
    rest = url.split("/", 3)
    return "/" + (rest[3] if len(rest) > 3 else "")


# --- one cycle of each scenario -------------------------------------------------------------


async def _noop(w: SimWorker, rec: Recorder, began: float, mark_done: bool) -> None:
    try:
        status, _ = await w.api.request("GET", "/healthz")
    except (TimeoutError, OSError, asyncio.IncompleteReadError) as exc:
        raise Failed(f"healthz {type(exc).__name__}", repr(exc)) from None
    if status != 200:
        raise Failed(f"healthz {status}", f"healthz answered {status}")
    done = time.monotonic()
    rec.add("healthz", done if mark_done else began, done - began)


async def _leased(
    w: SimWorker, rec: Recorder, began: float, mark_done: bool
) -> tuple[dict[str, Any] | None, float]:
    """A cycle's lease, timed, and when it came; None when the queue had nothing for it."""
    lease = await w.take_lease()
    leased = time.monotonic()
    rec.add("lease", leased if mark_done else began, leased - began)
    if lease is None:
        rec.counts["empty"] += 1
    return lease, leased


async def _lease_release(w: SimWorker, rec: Recorder, began: float, mark_done: bool) -> None:
    lease, leased = await _leased(w, rec, began, mark_done)
    if lease is None:
        return
    await w.release(lease)
    done = time.monotonic()
    rec.add("release", done if mark_done else began, done - leased)
    rec.add("cycle", done if mark_done else began, done - began)


async def _lease_complete(w: SimWorker, rec: Recorder, began: float, mark_done: bool) -> None:
    lease, _ = await _leased(w, rec, began, mark_done)
    if lease is None:
        return
    artifacts = await w.upload(rec, lease)
    uploaded = time.monotonic()
    answer = await w.complete(lease, artifacts)
    done = time.monotonic()
    rec.add("complete", done if mark_done else began, done - uploaded)
    if not answer.get("accepted"):
        raise Failed("complete not accepted", str(answer.get("reason"))[:300])
    rec.counts["accepted"] += 1
    rec.add("cycle", done if mark_done else began, done - began)


async def _heartbeat(w: SimWorker, rec: Recorder, began: float, mark_done: bool) -> None:
    answer = await w.heartbeat()
    done = time.monotonic()
    rec.add("heartbeat", done if mark_done else began, done - began)
    if answer.get("action") != "continue":
        rec.counts["told_to_stop"] += 1


CYCLES = {
    "noop": _noop,
    "lease_release": _lease_release,
    "lease_complete": _lease_complete,
    "heartbeat": _heartbeat,
}


# --- loops -------------------------------------------------------------------------------------


async def closed_loop(
    w: SimWorker, rec: Recorder, plan: dict[str, Any], stop: Any, settled: Any, end: float
) -> None:
    """Cycle after cycle until the parent says stop (or `end`); the worker counts itself
    settled once its first cycle is over, so the parent can start measuring when all are
    (the first cycles of many workers all start at once: a burst, not the steady state)."""
    cycle = CYCLES[plan["scenario"]]
    first = True
    while not stop.is_set() and (began := time.monotonic()) < end:
        try:
            await cycle(w, rec, began, True)
        except Failed as exc:
            rec.error(time.monotonic(), exc)
            await asyncio.sleep(0.05)  # an error answer must not turn into a busy loop
        if first:
            first = False
            with settled.get_lock():
                settled.value += 1


async def open_loop(
    w: SimWorker, rec: Recorder, plan: dict[str, Any], start: float, end: float
) -> None:
    """Arrivals at the worker's own rate; latency from each arrival's scheduled time."""
    cycle = CYCLES[plan["scenario"]]
    period = plan["total"] / plan["rate"]  # seconds between one worker's arrivals, on average
    rng = random.Random(plan["seed"] * 1_000_003 + w.index)
    poisson = plan["arrivals"] == "poisson"
    if poisson:  # memoryless: the first arrival is as far from the start as any other gap
        at = start + rng.expovariate(1 / period)
    else:  # the phases spread evenly: a random point in each worker's own slot of the period
        at = start + (w.index + rng.random()) * period / plan["total"]
    give_up = end + plan["drain_s"]
    while at < end:
        now = time.monotonic()
        if now < at:
            await asyncio.sleep(at - now)
        elif now > give_up:
            rec.counts["unserved"] += 1
            at += rng.expovariate(1 / period) if poisson else period
            continue
        try:
            await cycle(w, rec, at, False)
            rec.event("served", time.monotonic())
        except Failed as exc:
            rec.error(at, exc)
        at += rng.expovariate(1 / period) if poisson else period


async def train_loop(w: SimWorker, rec: Recorder, plan: dict[str, Any], stop: Any) -> None:
    """The overhead benchmark's worker: lease, sleep train_s, upload, complete, until stopped."""
    deadline = time.monotonic() + plan["duration_s"]
    while not stop.is_set() and time.monotonic() < deadline:
        began = time.monotonic()
        try:
            lease = await w.take_lease()
            if lease is None:
                rec.counts["empty"] += 1
                await asyncio.sleep(max(min(w.wait, 2.0), 0.05))
                continue
            leased = time.monotonic()
            rec.add("lease", leased, leased - began)
            rec.event("leased", began)
            await asyncio.sleep(plan["train_s"])
            artifacts = await w.upload(rec, lease)
            uploaded = time.monotonic()
            answer = await w.complete(lease, artifacts)
            rec.add("complete", time.monotonic(), time.monotonic() - uploaded)
        except Failed as exc:
            rec.error(time.monotonic(), exc)
            await asyncio.sleep(0.5)
            continue
        done = time.monotonic()
        rec.add("cycle", done, done - began)
        if answer.get("accepted"):
            rec.counts["accepted"] += 1
            rec.event("accepted", done)
        else:
            rec.counts["not_accepted"] += 1


# --- the process ---------------------------------------------------------------------------------


async def _setup(workers: list[SimWorker], plan: dict[str, Any], rec: Recorder) -> dict[str, Any]:
    began = time.monotonic()
    gate = asyncio.Semaphore(plan["setup_concurrency"])

    async def one(w: SimWorker) -> None:
        async with gate:
            for attempt in range(5):
                try:
                    if not w.worker_id:
                        await w.enroll(plan["join_token"])
                    wants_lease = plan["scenario"] == "heartbeat" and w.lease is None
                    if wants_lease and await w.take_lease() is None:
                        rec.counts["setup_no_task"] += 1
                    return
                except Failed as exc:
                    if attempt == 4:
                        rec.error(time.monotonic(), exc)
                        return
                    await asyncio.sleep(0.5 * (attempt + 1))

    if plan["scenario"] != "noop":
        await asyncio.gather(*(one(w) for w in workers))
    return {"setup_s": time.monotonic() - began, "connections": sum(w.api.opened for w in workers)}


async def _run(plan: dict[str, Any], pipe: Any, stop: Any, settled: Any) -> None:
    loop = asyncio.get_running_loop()
    first, count = plan["first"], plan["count"]
    workers = [SimWorker(first + i, plan["api_url"], plan) for i in range(count)]
    setup_rec = Recorder()
    info = await _setup(workers, plan, setup_rec)
    info["setup"] = setup_rec.export()
    pipe.send(("ready", info))
    message, start = await loop.run_in_executor(None, pipe.recv)
    if message != "go":
        return
    rec = Recorder()
    end = start + plan["duration_s"]
    now = time.monotonic()
    if now < start:
        await asyncio.sleep(start - now)
    if plan["scenario"] == "train":
        runs = [train_loop(w, rec, plan, stop) for w in workers]
    elif plan["loop"] == "open":
        runs = [open_loop(w, rec, plan, start, end) for w in workers]
    else:
        cap = start + plan["max_s"]
        runs = [closed_loop(w, rec, plan, stop, settled, cap) for w in workers]
    await asyncio.gather(*runs)
    rec.counts["connections_opened"] = sum(w.api.opened for w in workers) - info["connections"]
    result = rec.export()
    await asyncio.gather(*(w.close() for w in workers))
    pipe.send(("done", result))


def process_main(plan: dict[str, Any], pipe: Any, stop: Any, settled: Any) -> None:
    """A child process's entry (multiprocessing, spawn): its share of the workers."""
    plan = dict(plan)
    plan["digests"] = {
        name: hashlib.sha256(data).hexdigest() for name, data in plan["files"].items()
    }
    try:
        asyncio.run(_run(plan, pipe, stop, settled))
    except BaseException as exc:
        pipe.send(("failed", f"{type(exc).__name__}: {exc}"))
        raise
