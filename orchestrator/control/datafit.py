"""A job's data fit in Redis: recorded once (lua/record_data_fit.lua), read back as DataFit.

The fit is measured by the coordinator (pipeline/baseeval.py), so the job record, the
`data_fit` event and `cotune status` show the coordinator's count, never a worker's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cotune.orchestrator.control.records import text
from cotune.orchestrator.protocol.admin import DataFit
from cotune.orchestrator.protocol.problems import NotFound

if TYPE_CHECKING:
    from cotune.orchestrator.control.records import JobRecord
    from cotune.orchestrator.control.state import State


def record_data_fit(state: State, job_id: str, fit: DataFit) -> DataFit:
    """Keep the job's data fit (the first one recorded stays, and is answered)."""
    answer = state.scripts("record_data_fit", job_id, fit.model_dump_json(), state.clock())
    status, value = text(answer[0]), text(answer[1])
    if status != "ok":
        raise NotFound(value, "job_id")
    return DataFit.model_validate_json(value)


def data_fit_of(job: JobRecord) -> DataFit | None:
    """The job's recorded data fit; None before its base model was evaluated."""
    return DataFit.model_validate_json(job.data_fit_json) if job.data_fit_json else None
