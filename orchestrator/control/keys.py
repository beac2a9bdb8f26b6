"""Every Redis key cotune uses, in one table: the names, their types, what they hold.

Python code asks `Keys` for a key (`keys.task("t1")`); the Lua scripts (orchestrator/
scripts.py) get the same table, prefixed, and build keys with `string.format`, so no key
name is spelled anywhere else. Ids never contain ':' (see `check_id`), so no two templates
can produce the same key.

    key                                  type    holds
    job:<job>                            hash    a job (JobRecord fields)
    jobs                                 zset    job ids by creation time
    job:<job>:tasks                      set     every task id of the job
    job:<job>:task_states                hash    task state -> how many of the job's tasks
    job:<job>:trials                     zset    trial numbers
    job:<job>:events                     stream  the job's events (capped), read by SSE
    trial:<job>:<n>                      hash    a trial (TrialRecord fields)
    trial:<job>:<n>:losses               hash    round -> merged adapter's eval loss
    task:<task>                          hash    a task (TaskRecord fields)
    tasks:<job>:<trial>:<round>          set     the shard tasks of one round
    queue:<tier>:<job>                   list    queued task ids of one job in one tier
    rotation:<tier>                      list    jobs with queued work in the tier (round robin)
    lease:<lease>                        hash    a lease (kept 7 days after it ends)
    leases:deadlines                     zset    active lease ids by deadline (unix time)
    worker:<worker>                      hash    an enrolled worker and its counters
    worker:<worker>:leases               set     its active lease ids
    workers                              zset    worker ids by enrollment time
    workers:seen:<kind>                  zset    workers of a kind by when they last called in
    token:join:<sha256>                  hash    a join token (name, kind, expiry, uses, revoked)
    tokens:join                          zset    join token hashes by creation time
    leaderboard                          zset    contributor name -> accepted tokens
    leaderboard:tasks                    zset    contributor name -> accepted tasks
    merge:<job>:<trial>:<round>          hash    a round's merged adapter (prefix, eval loss)
    merge:<job>:<trial>:<round>:claim    string  who merges that round (SET NX, with a TTL)
    leader                               string  the active coordinator (SET NX, with a TTL)
    optuna:<job>                         -       prefix of the job's Optuna journal
    owners:strikes                       hash    owner (join token name) -> strikes
    owners:strikes:log                   stream  every strike: owner, worker, reason (capped)
    owners:strikes:seen                  zset    offense ids struck in the last day -> time
    owners:quarantined                   set     owners whose workers get no work
    owner:<owner>:workers                set     the worker ids enrolled under an owner
    rate:worker:<worker>                 hash    its request token bucket (tokens, at; expiring)
    metrics:counters                     hash    event counters (control/metrics.py COUNTERS)
    metrics:histogram:<name>             hash    one histogram's bucket counts and sum
    metrics:training                     hash    '<kind>:<figure>' -> sum over active leases
    metrics:training:memory:<kind>       zset    active lease id -> memory its worker reports
"""

from __future__ import annotations

import re

PREFIX = "cotune:"

# name -> template (printf style, so Lua's string.format reads the same text).
TEMPLATES: dict[str, str] = {
    "job": "job:%s",
    "jobs": "jobs",
    "job_tasks": "job:%s:tasks",
    "job_task_states": "job:%s:task_states",
    "job_trials": "job:%s:trials",
    "events": "job:%s:events",
    "trial": "trial:%s:%s",
    "trial_losses": "trial:%s:%s:losses",
    "task": "task:%s",
    "round_tasks": "tasks:%s:%s:%s",
    "queue": "queue:%s:%s",
    "rotation": "rotation:%s",
    "lease": "lease:%s",
    "deadlines": "leases:deadlines",
    "worker": "worker:%s",
    "worker_leases": "worker:%s:leases",
    "workers": "workers",
    "workers_seen": "workers:seen:%s",
    "join_token": "token:join:%s",
    "join_tokens": "tokens:join",
    "leaderboard": "leaderboard",
    "leaderboard_tasks": "leaderboard:tasks",
    "merge": "merge:%s:%s:%s",
    "merge_claim": "merge:%s:%s:%s:claim",
    "leader": "leader",
    "optuna": "optuna:%s",
    "strikes": "owners:strikes",
    "strike_log": "owners:strikes:log",
    "strike_seen": "owners:strikes:seen",
    "quarantined": "owners:quarantined",
    "owner_workers": "owner:%s:workers",
    "rate": "rate:worker:%s",
    "metrics": "metrics:counters",
    "metric_histogram": "metrics:histogram:%s",
    "metric_training": "metrics:training",
    "metric_memory": "metrics:training:memory:%s",
}

_ID = re.compile(r"^[A-Za-z0-9_.\-]{1,160}$")


def check_id(value: str, what: str) -> str:
    """`value` if it can be part of a key (no ':' or spaces), else ValueError naming `what`."""
    if not isinstance(value, str) or not _ID.match(value):
        raise ValueError(f"{what} {value!r}: use 1-160 letters, digits, '_', '.' or '-'")
    return value


class Keys:
    """The keys under one prefix (`cotune:` unless tests or a shared Redis need another)."""

    def __init__(self, prefix: str = PREFIX) -> None:
        if not prefix or "%" in prefix:
            raise ValueError(f"a key prefix must be non-empty and hold no '%', got {prefix!r}")
        self.prefix = prefix

    def templates(self) -> dict[str, str]:
        """Every template with the prefix, for the Lua scripts."""
        return {name: self.prefix + template for name, template in TEMPLATES.items()}

    def _key(self, name: str, *parts: object) -> str:
        return self.prefix + TEMPLATES[name] % parts

    def pattern(self) -> str:
        """A SCAN pattern matching every key under the prefix."""
        return self.prefix.replace("*", r"\*").replace("?", r"\?") + "*"

    def job(self, job_id: str) -> str:
        return self._key("job", job_id)

    def jobs(self) -> str:
        return self._key("jobs")

    def job_tasks(self, job_id: str) -> str:
        return self._key("job_tasks", job_id)

    def job_task_states(self, job_id: str) -> str:
        return self._key("job_task_states", job_id)

    def job_trials(self, job_id: str) -> str:
        return self._key("job_trials", job_id)

    def events(self, job_id: str) -> str:
        return self._key("events", job_id)

    def trial(self, job_id: str, number: int) -> str:
        return self._key("trial", job_id, number)

    def trial_losses(self, job_id: str, number: int) -> str:
        return self._key("trial_losses", job_id, number)

    def task(self, task_id: str) -> str:
        return self._key("task", task_id)

    def round_tasks(self, job_id: str, trial: int, round: int) -> str:
        return self._key("round_tasks", job_id, trial, round)

    def queue(self, tier: str, job_id: str) -> str:
        return self._key("queue", tier, job_id)

    def rotation(self, tier: str) -> str:
        return self._key("rotation", tier)

    def lease(self, lease_id: str) -> str:
        return self._key("lease", lease_id)

    def deadlines(self) -> str:
        return self._key("deadlines")

    def worker(self, worker_id: str) -> str:
        return self._key("worker", worker_id)

    def worker_leases(self, worker_id: str) -> str:
        return self._key("worker_leases", worker_id)

    def workers(self) -> str:
        return self._key("workers")

    def workers_seen(self, kind: str) -> str:
        return self._key("workers_seen", kind)

    def join_token(self, token_sha256: str) -> str:
        return self._key("join_token", token_sha256)

    def join_tokens(self) -> str:
        return self._key("join_tokens")

    def leaderboard(self) -> str:
        return self._key("leaderboard")

    def leaderboard_tasks(self) -> str:
        return self._key("leaderboard_tasks")

    def merge(self, job_id: str, trial: int, round: int) -> str:
        return self._key("merge", job_id, trial, round)

    def merge_claim(self, job_id: str, trial: int, round: int) -> str:
        return self._key("merge_claim", job_id, trial, round)

    def leader(self) -> str:
        return self._key("leader")

    def strikes(self) -> str:
        return self._key("strikes")

    def strike_log(self) -> str:
        return self._key("strike_log")

    def strike_seen(self) -> str:
        return self._key("strike_seen")

    def quarantined(self) -> str:
        return self._key("quarantined")

    def owner_workers(self, owner: str) -> str:
        """Owners are join token names (checked by control/tokens.py: never ':' or '%')."""
        return self._key("owner_workers", owner)

    def rate(self, worker_id: str) -> str:
        return self._key("rate", worker_id)

    def metrics(self) -> str:
        return self._key("metrics")

    def metric_histogram(self, name: str) -> str:
        return self._key("metric_histogram", name)

    def metric_training(self) -> str:
        return self._key("metric_training")

    def metric_memory(self, kind: str) -> str:
        return self._key("metric_memory", kind)

    def optuna(self, job_id: str) -> str:
        """The prefix under which a job's Optuna journal lives (its own keys below it)."""
        return self._key("optuna", job_id)
