"""The base model's evaluation, once per job: its eval loss, and the job's data fit.

`cotune evaluate --base-only` on the job's eval rows (roundmerge.evaluate_base, a call on
the pool, polled like every other call) gives two things the reconciler needs:

    the eval loss    for the model card and round 0's probe baseline (verification.py);
                     kept at jobs/<id>/base_eval.json
    the data fit     what training.sequence_len kept of the rows it scored: how many were
                     cut short, how many lost every trained token (render.py `Fit`). The
                     eval split is a hash-chosen sample of the dataset, so its fractions are
                     the dataset's; it is the coordinator's own count, never a worker's.

The fit is recorded on the job once (control/datafit.py: the `data_fit` event, `cotune
status`, results.json), with a warning past 2% cut or dropped; past `dataset.max_dropped_rows`
(or `max_cut_rows`) the job fails with the counts and what to change, as it would past
`max_bad_rows`. A job whose every eval row is dropped fails the same way (`NoUsableRows`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from cotune.orchestrator.control.datafit import data_fit_of, record_data_fit
from cotune.orchestrator.data.layout import base_eval_key
from cotune.orchestrator.pipeline.roundmerge import (
    EvalSetup,
    NoUsableRows,
    StoreConfig,
    evaluate_base,
)
from cotune.orchestrator.protocol.admin import DataFit
from cotune.orchestrator.protocol.render import WARN_FRACTION
from cotune.orchestrator.protocol.render import fit_problem as rows_problem

if TYPE_CHECKING:
    from cotune.orchestrator.control.records import JobRecord
    from cotune.orchestrator.control.state import State
    from cotune.orchestrator.data.objectstore import ObjectStore
    from cotune.orchestrator.pipeline.pool import Pool
    from cotune.orchestrator.protocol.spec import SweepSpec

log = logging.getLogger(__name__)


def data_fit(result: dict[str, Any], spec: SweepSpec) -> DataFit | None:
    """The fit in a `cotune evaluate` result; None for a result without counts."""
    if not isinstance(result.get("rows"), int):
        return None
    rows, cut, dropped = int(result["rows"]), int(result["rows_cut"]), int(result["rows_dropped"])
    length = int(result.get("sequence_len") or spec.training.sequence_len)
    warning = None
    if rows and max(cut, dropped) / rows > WARN_FRACTION:
        warning = (
            f"at training.sequence_len {length}, {dropped} of {rows} eval rows "
            f"({dropped / rows:.1%}) lost every trained token and {cut} ({cut / rows:.1%}) were "
            "cut short; raise sequence_len or shorten the prompts (cotune validate "
            "--tokenizer shows the row lengths)"
        )
    return DataFit(
        measured_on="eval file" if isinstance(spec.dataset.eval_split, str) else "eval split",
        sequence_len=length,
        rows=rows,
        rows_cut=cut,
        rows_dropped=dropped,
        warning=warning,
    )


def fit_problem(fit: DataFit, spec: SweepSpec) -> str | None:
    """Why the job fails for its data fit (past max_dropped_rows or max_cut_rows), or None."""
    why = rows_problem(
        rows=fit.rows,
        cut=fit.rows_cut,
        dropped=fit.rows_dropped,
        sequence_len=fit.sequence_len,
        max_dropped_rows=spec.dataset.max_dropped_rows,
        max_cut_rows=spec.dataset.max_cut_rows,
        where=f"the {fit.measured_on}",
    )
    return f"dataset: {why}" if why else None


class BaseEval:
    """Start, poll and read the base evaluation of a job; check its data fit."""

    def __init__(self, state: State, store: ObjectStore, pool: Pool, store_config: StoreConfig):
        self.state = state
        self.store = store
        self.pool = pool
        self.store_config = store_config

    def start(self, job_id: str, ctx: Any, setup: Callable[[], EvalSetup]) -> None:
        """Submit the evaluation unless it runs, failed, or its result is stored."""
        if ctx.base_eval is not None or ctx.base_eval_failed:
            return
        key = base_eval_key(job_id)
        if self.store.exists(key):
            return
        ctx.base_eval = self.pool.submit_call(evaluate_base, setup(), self.store_config, key)

    def result(
        self, job_id: str, ctx: Any, setup: Callable[[], EvalSetup]
    ) -> tuple[bool, dict[str, Any] | None]:
        """(known yet, result): None when it could not be computed. A `NoUsableRows`
        failure is kept in `ctx.base_eval_error` for the fit check."""
        key = base_eval_key(job_id)
        if ctx.base_eval is None and not ctx.base_eval_failed and not self.store.exists(key):
            self.start(job_id, ctx, setup)
        if ctx.base_eval is not None:
            done, result, error = self.pool.poll(ctx.base_eval)
            if not done:
                return False, None
            ctx.base_eval = None
            if error is not None:
                log.warning("job %s: base model evaluation failed: %s", job_id, error)
                ctx.base_eval_failed = True
                if isinstance(error, NoUsableRows):
                    ctx.base_eval_error = str(error)
                return True, None
            return True, dict(result)
        if ctx.base_eval_failed:
            return True, None
        return True, json.loads(self.store.get_bytes(key))

    def loss(
        self, job_id: str, ctx: Any, setup: Callable[[], EvalSetup]
    ) -> tuple[bool, float | None]:
        """(known yet, loss): the base eval loss, or None if it could not be computed."""
        known, result = self.result(job_id, ctx, setup)
        return known, (float(result["eval_loss"]) if result is not None else None)

    def fit_problem(
        self, job: JobRecord, spec: SweepSpec, ctx: Any, setup: Callable[[], EvalSetup]
    ) -> str | None:
        """Once the evaluation is known: record the job's data fit, and the reason the job
        fails for it (None: it may go on, or the fit is not known yet)."""
        if ctx.base_eval_error:
            return f"dataset: {ctx.base_eval_error}"
        recorded = data_fit_of(job)
        if recorded is None and not ctx.fit_recorded:
            known, result = self.result(job.job_id, ctx, setup)
            if ctx.base_eval_error:
                return f"dataset: {ctx.base_eval_error}"
            if not known or result is None:
                return None
            fit = data_fit(result, spec)
            ctx.fit_recorded = True
            if fit is None:
                return None
            recorded = record_data_fit(self.state, job.job_id, fit)
        return fit_problem(recorded, spec) if recorded is not None else None
