"""Every state a job, trial, task or lease can be in: the one list the records, the reconciler,
the API models, the CLI and the Lua scripts (which receive it from Python) all use.

Job lifecycle: pending -> sharding -> running -> merging -> succeeded | failed | cancelled
(orchestrator/pipeline/reconciler.py explains each step). Task lifecycle: queued -> leased ->
accepted, through `verifying` for a volunteer's result (the coordinator's heavy checks,
orchestrator/pipeline/verification.py); a rejected result sends the task back to queued.
"""

from __future__ import annotations

from typing import Literal, get_args

JobState = Literal["pending", "sharding", "running", "merging", "succeeded", "failed", "cancelled"]
TrialState = Literal["running", "pruned", "complete", "failed"]
TaskState = Literal["queued", "leased", "verifying", "accepted", "failed", "cancelled"]
LeaseState = Literal["active", "completed", "failed", "released", "expired", "revoked"]

JOB_STATES: tuple[JobState, ...] = get_args(JobState)
TRIAL_STATES: tuple[TrialState, ...] = get_args(TrialState)
TASK_STATES: tuple[TaskState, ...] = get_args(TaskState)
LEASE_STATES: tuple[LeaseState, ...] = get_args(LeaseState)

TERMINAL_JOB_STATES: tuple[JobState, ...] = ("succeeded", "failed", "cancelled")
LIVE_JOB_STATES: tuple[JobState, ...] = tuple(s for s in JOB_STATES if s not in TERMINAL_JOB_STATES)
TERMINAL_TRIAL_STATES: tuple[TrialState, ...] = ("pruned", "complete", "failed")
ENDED_TASK_STATES: tuple[TaskState, ...] = ("failed", "cancelled")
