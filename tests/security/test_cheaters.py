"""The Trust issue's acceptance test: cheating volunteers against a live coordinator, while
honest volunteers finish the job.

The real coordinator (CoordinatorService: Ray, the API on uvicorn, the reconciler; the
session's Redis and SeaweedFS) runs a small sweep: 1 trial x 2 shards x 2 rounds of 8 steps,
every volunteer task trained twice by different owners (`trust.redundancy: 1.0`, so pairs
form and every plausible fake is compared with an honest run, whichever tasks a job id's
hash would pick at a lower fraction). Thirteen cheaters (tests/security/cheats.py, kinds a-m,
each its own owner; m has two accounts) start first and have the job to themselves until
every one that breaks a rule is quarantined (at most CHEATERS_ALONE_S); then two honest
`cotune worker --cpu` processes, each of its own owner, join and finish the job. Then
the same spec runs again with the honest workers alone, for the loss comparison.

Asserted: the job succeeds with no trial failed; every accepted result (the merge's only
inputs) is an honest worker's; no cheater is credited; every cheater owner is quarantined,
except two that break no rule the coordinator can see, for which what does hold is asserted:
(h) trains honestly and lies only in its metrics, which the coordinator never reads, so its
results are accepted and credited exactly the coordinator's count; (k) holds leases, and is
capped at its GPUs' count and cut off at the lease age limit. The merged result equals the
honest-only run's: the seed of a task is derived from the job id (protocol/task.py
`seed_for`), so the two jobs' runs differ in their LoRA init and data order, and the per-round
eval losses are compared within LOSS_TOLERANCE nats rather than exactly.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cotune.orchestrator.cli.client import CotuneClient
from cotune.orchestrator.control.intake import task_tokens
from cotune.orchestrator.control.records import TaskRecord, text
from cotune.orchestrator.control.state import State
from cotune.orchestrator.control.strikes import Strikes
from cotune.orchestrator.data.layout import base_eval_key
from cotune.orchestrator.data.objectstore import ObjectStore
from cotune.orchestrator.protocol.spec import load_spec
from cotune.orchestrator.protocol.task import TrainTask
from cotune.orchestrator.runtime.coordinator import CoordinatorService
from cotune.worker.basemodel import ensure_tiny_llama

from tests.e2e.sweep_stack import (
    WorkerProcess,
    service_settings,
    wait_for,
    wait_for_job,
    write_spec,
)
from tests.security.cheaters import Crew
from tests.security.cheats import CHEATS, MEDDLER_REASON

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.integration]

HONEST = ("honest-1", "honest-2")
# Kinds whose owner the coordinator cannot fault (module docstring): all others end quarantined.
NOT_STRUCK = ("h", "k")
# The age limit is well above an honest task's time on two busy cores (loading the model
# included, up to a minute or two when the machine is shared): only (k) should reach it.
LEASE_TTL_S, HEARTBEAT_S, LEASE_MAX_AGE_S = 20.0, 1.0, 120.0
JOB_S, HONEST_JOB_S = 600, 300
CHEATERS_ALONE_S = 300
# Two honest runs of the sweep differ in their seeds (the job id is part of each task's), so
# their merged eval losses differ too: by up to 0.21 nats (round 0) in the runs seen here.
# The strong check is structural (every accepted result is an honest owner's or h's, whose
# training is honest); this one says the merged result is of the same quality.
LOSS_TOLERANCE = 0.3
OUTVOTED = re.compile(r"outvot|redundan|disagree|majority|duplicate", re.IGNORECASE)


def owner(kind: str) -> str:
    return f"cheater-{kind}"


def foreign_leases(state: State, me: str) -> list[str]:
    """Active leases held by other workers: what (i) pretends to have overheard."""
    ids = [text(i) for i in state.redis.zrange(state.keys.deadlines(), 0, -1)]
    return [i for i in ids if text(state.redis.hget(state.keys.lease(i), "worker_id") or "") != me]


def leases_by(state: State, job_id: str, workers: set[str]) -> int:
    events = state.events.read(job_id, count=100_000)
    return sum(e.kind == "task_leased" and e.data.get("worker_id") in workers for e in events)


def last_state(client: CotuneClient, job_id: str, timeout_s: float) -> Any:
    """The job once it has finished, or as it stands after `timeout_s`."""
    give_up_at = time.monotonic() + timeout_s
    job = client.job(job_id)
    while job.state not in ("succeeded", "failed", "cancelled") and time.monotonic() < give_up_at:
        time.sleep(1.0)
        job = client.job(job_id)
    return job


@dataclass(frozen=True)
class Outcome:
    """What the coordinator made of the first job, read from its state after the job."""

    job: Any
    tasks: list[TaskRecord]
    events: list[Any]
    credit: dict[str, float]  # owner -> leaderboard tokens
    strikes: dict[str, float]
    quarantined: set[str]
    owners: dict[str, str]  # worker id -> owner

    @classmethod
    def read(cls, client: CotuneClient, state: State, job_id: str) -> Outcome:
        strikes = Strikes(state)
        workers = client.workers()
        return cls(
            job=client.job(job_id),
            tasks=state.tasks_of(job_id),
            events=state.events.read(job_id, count=100_000),
            credit={e.name: e.tokens for e in client.leaderboard(1000)},
            strikes={w.name: strikes.count(w.name) for w in workers},
            quarantined=set(strikes.quarantined()),
            owners={w.worker_id: w.name for w in workers},
        )

    def accepted(self, owner: str | None = None) -> list[TaskRecord]:
        tasks = [t for t in self.tasks if t.state == "accepted"]
        return [t for t in tasks if owner is None or _owner(t) == owner]

    def rejections(self, owner: str) -> Counter[str]:
        """This owner's rejected results: at complete, after verification, outvoted."""
        verifying = {
            (e.data["task_id"], e.data["attempt"])
            for e in self.events
            if e.kind == "task_verifying"
        }
        counts = Counter[str]()
        for e in self.events:
            if e.kind != "task_rejected" or self.owners.get(e.data.get("worker_id")) != owner:
                continue
            if (e.data["task_id"], e.data["attempt"]) not in verifying:
                counts["at_complete"] += 1
            elif OUTVOTED.search(str(e.data.get("reason", ""))):
                counts["outvoted"] += 1
            else:
                counts["verified"] += 1
        return counts


def _adopted(task: TaskRecord) -> bool:
    result = task.result()
    return result is not None and result.adopted_from is not None


def _owner(task: TaskRecord) -> str | None:
    result = task.result()
    return result.owner if result is not None else None


def problems_of(kind: str, crew: Crew, seen: Outcome, per_task: float) -> list[str]:
    """What went wrong with one cheat kind ([] when it was refused, outvoted, uncredited and
    its owner quarantined, or for h and k, what the module docstring says holds instead)."""
    name, tally = owner(kind), crew.tallies[kind]
    problems = [f"answered with an error, not a refusal: {e}" for e in tally.server_errors]
    accepted = seen.accepted(name)
    credit = seen.credit.get(name, 0.0)
    if kind == "h":
        # An outvoted original that took h's duplicate result is that result: credited once.
        own = [t for t in accepted if not _adopted(t)]
        if credit != per_task * len(own):
            problems.append(f"credit {credit}, not {len(own)} x {per_task} (its tasks)")
    else:
        if accepted:
            problems.append(f"results accepted: {[t.task_id for t in accepted]}")
        if credit:
            problems.append(f"credited {credit} tokens")
    if kind in NOT_STRUCK:
        if name in seen.quarantined or seen.strikes.get(name):
            problems.append(f"struck {seen.strikes.get(name)} (nothing it did is a strike)")
    elif name not in seen.quarantined:
        problems.append(f"not quarantined ({seen.strikes.get(name, 0):g} strikes)")
    elif not tally.quarantined:
        problems.append("never told it is quarantined (403 on lease)")
    if kind == "i":
        if not tally.victims:
            problems.append("never found another worker's lease to call on")
        ended = [e.kind for e in seen.events if MEDDLER_REASON in str(e.data.get("reason", ""))]
        if ended:
            problems.append(f"ended other workers' leases: {ended}")
    if kind == "k":
        if not 1 <= tally.most_held <= CHEATS["k"].gpus:
            problems.append(f"held {tally.most_held} leases at once (cap {CHEATS['k'].gpus})")
        if tally.most_held == CHEATS["k"].gpus and not tally.capped:
            problems.append("held its cap and was never told so")
        if not tally.held_for_s:
            problems.append("its kept-alive lease was never ended")
        late = [s for s in tally.held_for_s if s > LEASE_MAX_AGE_S + LEASE_TTL_S + 15]
        if late:
            problems.append(f"kept-alive leases lived {late} s (max age {LEASE_MAX_AGE_S} s)")
    return problems


def one_owner_twice(seen: Outcome) -> list[str]:
    """Runs of one task (the original and its duplicates) leased to one owner twice while
    the other run was in flight or in hand, or accepted from one owner twice (an outvoted
    original that took a duplicate's result is that result, not a second one)."""
    found = []
    families: dict[str, list[TaskRecord]] = {}
    for t in seen.tasks:
        families.setdefault(t.duplicate_of or t.task_id, []).append(t)
    for original, runs in families.items():
        holders = [
            _owner(t) for t in runs if t.state in ("verifying", "accepted") and not _adopted(t)
        ]
        holders = [h for h in holders if h is not None]
        accepted = [_owner(t) for t in runs if t.state == "accepted" and not _adopted(t)]
        if len(holders) != len(set(holders)):
            found.append(f"{original}: runs in hand from one owner twice: {holders}")
        if len(accepted) != len(set(accepted)):
            found.append(f"{original}: accepted twice from one owner: {accepted}")
    return found


VERDICTS = ("task_rejected", "task_accepted", "lease_revoked", "lease_expired")


def print_evidence(seen: Outcome) -> None:
    """Every task's result and check record, then every verdict and lease end, in order."""
    for t in seen.tasks:
        check = t.check()
        found = f"probe {check.probe_loss} norm {check.change_norm} {check.issues}" if check else ""
        who = _owner(t) or seen.owners.get(t.worker_id or "", "")
        print(f"  {t.task_id} {t.state} attempt {t.attempt} {who} {found}")
    last, repeats = "", 0
    for e in seen.events:
        if e.kind in VERDICTS or e.kind.startswith("redundancy"):
            who = seen.owners.get(e.data.get("worker_id", ""), "")
            why = str(e.data.get("reason", ""))[:240]
            line = f"  {e.kind} {e.data.get('task_id')} {e.data.get('attempt')} {who}: {why}"
            if line == last:  # an event a pass of the reconciler repeats
                repeats += 1
                continue
            if repeats:
                print(f"  (the line above {repeats} more times)")
            print(line)
            last, repeats = line, 0
    if repeats:
        print(f"  (the line above {repeats} more times)")


def print_table(crew: Crew, seen: Outcome, problems: dict[str, list[str]]) -> None:
    """Per cheat kind: attempts, refused at once, rejected after verification, outvoted,
    strikes, quarantined, credit, and what went wrong; then the honest workers."""
    head = [
        "kind",
        "cheat",
        "tries",
        "refused",
        "rejected",
        "outvoted",
        "strikes",
        "quar.",
        "credit",
    ]
    rows = [head]
    for kind, cheat in CHEATS.items():
        tally, name = crew.tallies[kind], owner(kind)
        counts = seen.rejections(name)
        rows.append(
            [
                kind,
                cheat.summary,
                str(tally.attempts),
                str(tally.refused),
                str(counts["verified"]),
                str(counts["outvoted"]),
                f"{seen.strikes.get(name, 0):g}",
                "yes" if name in seen.quarantined else "no",
                f"{seen.credit.get(name, 0):g}",
            ]
        )
    for name in HONEST:
        counts = seen.rejections(name)
        rows.append(
            [
                name,
                f"honest: {len(seen.accepted(name))} accepted",
                "",
                "",
                str(counts["verified"]),
                str(counts["outvoted"]),
                f"{seen.strikes.get(name, 0):g}",
                "yes" if name in seen.quarantined else "no",
                f"{seen.credit.get(name, 0):g}",
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
    for kind in CHEATS:
        verdict = "; ".join(problems[kind]) or "as expected"
        print(f"({kind}) {verdict}\n      " + "\n      ".join(crew.tallies[kind].notes[-5:]))


@pytest.mark.timeout(CHEATERS_ALONE_S + JOB_S + HONEST_JOB_S + 300)
def test_cheaters_are_refused_outvoted_and_quarantined_while_honest_workers_finish_the_job(
    tmp_path: Path,
    redis_client: Any,
    redis_server: str,
    s3_server: Any,
    ray_cluster: str,
    alpaca_dataset: Path,
) -> None:
    home = tmp_path / "home"
    settings = service_settings(
        home,
        redis_server,
        s3_server,
        lease_ttl_s=LEASE_TTL_S,
        heartbeat_interval_s=HEARTBEAT_S,
        lease_max_age_s=LEASE_MAX_AGE_S,
    )
    spec_path = write_spec(
        tmp_path,
        alpaca_dataset,
        name="cheaters",
        training={"max_steps": 8},
        trust={"redundancy": 1.0, "probe_rows": 32},
    )
    per_task = task_tokens(TrainTask.from_spec(load_spec(spec_path).with_params({})), None)
    store = ObjectStore.from_settings(settings)
    ensure_tiny_llama(home / "models")  # built once here, not by every worker's first task
    honest_trials: list[Any] = []
    with (
        CoordinatorService(settings, workers=0, api_port=0) as service,
        CotuneClient(service.url, service.admin_token) as client,
    ):
        state = service.api_context.state
        tokens = {kind: client.create_join_token(owner(kind)).token for kind in CHEATS}
        honest_tokens = {name: client.create_join_token(name).token for name in HONEST}
        crew = Crew(
            service.url,
            CHEATS,
            tokens,
            tmp_path / "cheaters",
            store,
            lambda me: foreign_leases(state, me),
            home / "models",
        )
        workers: list[WorkerProcess] = []
        try:
            crew.start()
            job_id = client.submit(spec_path)
            wait_for(
                "the cheaters' enrollment",
                lambda: sum(map(len, crew.workers().values())) == len(crew.cheaters),
                60,
            )
            cheater_ids = {w for ids in crew.workers().values() for w in ids}
            wait_for(
                "the cheaters' first leases",
                lambda: leases_by(state, job_id, cheater_ids) >= 2,
                120,
            )
            # The cheaters alone for a while: each strikable one gets the leases it needs to reach
            # the strike limit before honest workers finish the job (a kind still free after
            # CHEATERS_ALONE_S fails below, on its own line).
            strikes = Strikes(state)
            # (m is outvoted, which takes honest runs: it is left out of the wait.)
            struck = {owner(kind) for kind in CHEATS if kind not in (*NOT_STRUCK, "m")}
            alone_until = time.monotonic() + CHEATERS_ALONE_S
            while time.monotonic() < alone_until and not struck <= set(strikes.quarantined()):
                time.sleep(2.0)
            print(f"cheaters alone: {set(strikes.quarantined()) & struck} quarantined")
            workers = [WorkerProcess(service.url, honest_tokens[n], home, n) for n in HONEST]
            last_state(client, job_id, JOB_S)
            crew.stop()
            seen = Outcome.read(client, state, job_id)
            problems = {kind: problems_of(kind, crew, seen, per_task) for kind in CHEATS}
            print(f"\njob {job_id}: {seen.job.state} {seen.job.error or ''}")
            print_table(crew, seen, problems)
            print_evidence(seen)
            if store.exists(base_eval_key(job_id)):
                print(f"base eval loss {json.loads(store.get_bytes(base_eval_key(job_id)))}")
            trials = client.trials(job_id)
            if seen.job.state == "succeeded":
                # The same spec again, honest workers alone: the loss comparison.
                honest_job = client.submit(spec_path)
                honest_done = wait_for_job(client, honest_job, HONEST_JOB_S, workers)
                assert honest_done.state == "succeeded", honest_done.error
                honest_trials = client.trials(honest_job)
            else:
                tails = "\n".join(f"--- {w.log_path}\n{w.log()[-2000:]}" for w in workers)
                print(f"the job did not succeed; the honest workers' logs:\n{tails}")
        finally:
            crew.stopping.set()
            for worker in workers:
                worker.stop()

    assert not crew.errors, "a cheater broke down:\n" + "\n".join(crew.errors)
    # The job survived its cheaters.
    assert seen.job.state == "succeeded", seen.job.error
    assert [t.state for t in trials] == ["complete"], [(t.state, t.error) for t in trials]
    # The merge's inputs (the accepted originals) and every accepted duplicate are honest
    # work: the honest workers' or h's.
    originals = [t for t in seen.accepted() if t.duplicate_of is None]
    assert len(originals) == 2 * 2, [(t.task_id, t.state) for t in seen.tasks]
    owners = Counter(_owner(t) for t in seen.accepted())
    assert set(owners) <= {*HONEST, owner("h")}, owners
    # Each kind: refused or outvoted, uncredited, quarantined (h and k: the docstring).
    failing = {kind: p for kind, p in problems.items() if p}
    assert not failing, f"cheat kinds that got through: {failing}"
    # Honest workers are never struck.
    struck = {
        n: seen.strikes.get(n) for n in HONEST if seen.strikes.get(n) or n in seen.quarantined
    }
    assert not struck, f"honest owners struck: {struck}"
    # Redundancy ran: pairs formed, never with one owner on two sides (m's two accounts, or
    # one account taking two duplicates of a task).
    duplicates = [t for t in seen.tasks if t.duplicate_of is not None]
    assert any(t.state == "accepted" for t in duplicates), [
        (t.task_id, t.state) for t in duplicates
    ]
    sides = one_owner_twice(seen)
    assert not sides, f"one owner on two sides of a vote: {sides}"
    # The merged result equals the honest-only run's (within the seeds' difference).
    [ours], [theirs] = trials, honest_trials
    print(f"eval losses: with cheaters {ours.eval_losses}, honest only {theirs.eval_losses}")
    assert len(ours.eval_losses) == len(theirs.eval_losses) == 2
    assert ours.eval_losses == pytest.approx(theirs.eval_losses, abs=LOSS_TOLERANCE)
