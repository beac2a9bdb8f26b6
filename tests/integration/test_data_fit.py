"""Rows that do not fit training.sequence_len are counted by the coordinator, recorded on the
job once, warned about, and fail the job past dataset.max_dropped_rows.

Real Redis, real SeaweedFS, the real reconciler passes and real `cotune evaluate`
subprocesses of the tiny model (the base evaluation is where the coordinator counts).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cotune.orchestrator.control.datafit import data_fit_of
from cotune.orchestrator.data.synthetic import generate_rows, write_jsonl
from cotune.orchestrator.protocol.spec import parse_spec

from tests.integration.reconciler_kit import CallPool, loop_setup, reconciler, submit

pytestmark = pytest.mark.integration


@pytest.fixture
def setup(
    tmp_path: Path, redis_client: Any, redis_server: str, s3_server: Any, object_store: Any
) -> dict[str, Any]:
    return loop_setup(tmp_path, redis_client, redis_server, s3_server, object_store)


def spec_for(data: Path, sequence_len: int, **dataset: Any) -> Any:
    return parse_spec(
        {
            "name": "fit",
            "base_model": "cotune://tiny-llama",
            "dataset": {"path": str(data), "format": "alpaca", "eval_split": 0.25, **dataset},
            "training": {"max_steps": 2, "sequence_len": sequence_len},
            "lora": {"lora_r": 4, "lora_alpha": 8},
        }
    )


def passes(setup: dict[str, Any], job_id: str, until: set[str], most: int = 10) -> Any:
    loop = reconciler(setup, CallPool())
    for _ in range(most):
        loop.run(once=True)
        job = setup["state"].get_job(job_id)
        if job.data_fit_json is not None and job.state in until:
            return job
    return setup["state"].get_job(job_id)


def long_prompt_rows(tmp_path: Path, n: int) -> Path:
    """Alpaca rows whose instruction alone is longer than 64 tokens of the tiny tokenizer
    (each its own, since the eval split is chosen by row hash)."""
    path = tmp_path / "long.jsonl"
    rows = [
        {"instruction": " ".join(["describe the colour of the sea"] * 12), "output": f"blue {i}"}
        for i in range(n)
    ]
    write_jsonl(path, rows)
    return path


def mixed_rows(tmp_path: Path) -> Path:
    """Half short synthetic rows, half rows whose answer a sequence_len of 64 cuts away."""
    data = tmp_path / "mixed.jsonl"
    short = list(generate_rows("alpaca", 60, seed=3))
    write_jsonl(data, short + _rows(long_prompt_rows(tmp_path, 60)))
    return data


def test_a_job_whose_rows_lose_their_answers_fails_naming_the_counts(
    setup: dict[str, Any], tmp_path: Path
) -> None:
    data = mixed_rows(tmp_path)
    job_id = submit(setup, spec_for(data, 64))
    job = passes(setup, job_id, {"failed"})
    assert job.state == "failed", job
    fit = data_fit_of(job)
    assert fit is not None and fit.measured_on == "eval split" and fit.sequence_len == 64
    assert fit.rows_dropped > 0.05 * fit.rows and fit.warning
    assert f"{fit.rows_dropped} of {fit.rows} rows of the eval split" in (job.error or "")
    assert "more than dataset.max_dropped_rows 0.05" in (job.error or "")
    assert "raise training.sequence_len" in (job.error or "")
    events = [e for e in setup["state"].events.read(job_id, count=1000) if e.kind == "data_fit"]
    assert len(events) == 1 and events[0].data["rows_dropped"] == fit.rows_dropped


def test_a_threshold_the_spec_raises_lets_the_job_run_with_a_warning(
    setup: dict[str, Any], tmp_path: Path
) -> None:
    data = mixed_rows(tmp_path)
    job_id = submit(setup, spec_for(data, 64, max_dropped_rows=0.9))
    job = passes(setup, job_id, {"running"})
    assert job.state == "running" and job.error is None
    fit = data_fit_of(job)
    assert fit is not None and fit.rows_dropped > 0 and fit.warning
    assert "lost every trained token" in fit.warning
    # A second coordinator measuring again records nothing new: one event, the same fit.
    passes(setup, job_id, {"running"}, most=2)
    events = [e for e in setup["state"].events.read(job_id, count=1000) if e.kind == "data_fit"]
    assert len(events) == 1


def test_rows_that_all_fit_are_recorded_without_a_warning(
    setup: dict[str, Any], tmp_path: Path
) -> None:
    data = tmp_path / "short.jsonl"
    write_jsonl(data, generate_rows("alpaca", 80, seed=4))
    job_id = submit(setup, spec_for(data, 512))
    job = passes(setup, job_id, {"running"})
    fit = data_fit_of(job)
    assert job.state == "running" and job.manifest_json is not None
    eval_rows = json.loads(job.manifest_json)["eval"]["rows"]
    assert fit is not None and fit.rows == eval_rows > 0 and fit.rows_cut == fit.rows_dropped == 0
    assert fit.warning is None


def test_every_eval_row_dropped_fails_the_job_with_the_evaluations_reason(
    setup: dict[str, Any], tmp_path: Path
) -> None:
    job_id = submit(setup, spec_for(long_prompt_rows(tmp_path, 40), 16))
    loop = reconciler(setup, CallPool())
    for _ in range(10):
        loop.run(once=True)
        if setup["state"].get_job(job_id).state == "failed":
            break
    job = setup["state"].get_job(job_id)
    assert job.state == "failed" and job.manifest_json is not None
    eval_rows = json.loads(job.manifest_json)["eval"]["rows"]
    assert job.error is not None and job.error.startswith("dataset: ")
    assert f"every one of its {eval_rows} rows lost all its trained tokens at sequence_len 16" in (
        job.error
    )


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]
