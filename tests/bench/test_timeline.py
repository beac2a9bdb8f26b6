"""The per-instant split behind bench/endtoend.py (bench/_timeline.py) and the worker-log
reader it times tasks with (bench/_sweep_record.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench._sweep_record import parse_worker_log
from bench._timeline import UNCOVERED, Interval, split

PRIORITY = ("training", "merge", "waiting", "orchestration")


def test_each_instant_goes_to_the_highest_priority_category_and_the_parts_add_up() -> None:
    intervals = [
        Interval(1.0, 4.0, "merge", "merge"),
        Interval(2.0, 3.0, "training", "steps"),  # inside the merge: training wins there
        Interval(3.5, 6.0, "waiting", "setup"),  # overlaps the merge's end
        Interval(5.0, 8.0, "orchestration", "upload"),
        Interval(5.5, 9.0, "orchestration", "lease poll"),  # a later label: only past 8
        Interval(-5.0, 0.5, "training", "before"),  # clipped to the window
    ]
    parts = split(0.0, 10.0, intervals, PRIORITY)
    assert parts.seconds == pytest.approx(
        {"training": 1.5, "merge": 2.0, "waiting": 2.0, "orchestration": 4.5}
    )
    assert sum(parts.seconds.values()) == pytest.approx(parts.window_s) == 10.0
    assert parts.labels["orchestration"] == pytest.approx(
        {"upload": 2.0, "lease poll": 1.0, UNCOVERED: 1.5}  # 0.5-1 and 9-10 had nothing
    )
    assert parts.busy == pytest.approx(
        {"training": 1.5, "merge": 3.0, "waiting": 2.5, "orchestration": 4.0}
    )
    assert parts.overlap_s == pytest.approx(1.0 + 0.5 + 1.0)  # 2-3, 3.5-4, 5-6
    assert parts.segments[0] == (0.0, 0.5, "training", "before")
    assert parts.segments[-1] == (9.0, 10.0, "orchestration", UNCOVERED)
    assert [s[1] for s in parts.segments[:-1]] == [s[0] for s in parts.segments[1:]]


def test_an_unknown_category_is_refused() -> None:
    with pytest.raises(ValueError, match="'evaluation'"):
        split(0.0, 1.0, [Interval(0.0, 1.0, "evaluation")], PRIORITY)


LOG = """\
=== cotune starts cotune worker: python -m cotune.orchestrator worker --cpu
2026-12-02 14:15:49,869 INFO training on CPU (2 cores); work folder /tmp/w/cpu
2026-12-02 14:15:50,374 INFO enrolled with http://127.0.0.1:1 as worker w-1
2026-12-02 14:15:50,477 INFO task j.t0.r0.s0 attempt 1
2026-12-02 14:15:50,489 INFO download train[0]: 8.0 KiB
2026-12-02 14:15:50,490 INFO download train[0]: done, 8.0 KiB in 0.0 s (10.0 MiB/s)
Loading weights: 100%|##########| 21/21
2026-12-02 14:16:15,730 INFO checkpoint step 5: done, 390.0 KiB in 0.1 s (6.8 MiB/s)
2026-12-02 14:16:15,803 WARNING heartbeat failed (cannot reach the coordinator)
2026-12-02 14:16:16,727 INFO upload adapter_config.json: 1.6 KiB
2026-12-02 14:16:16,737 INFO upload adapter_config.json: done, 1.6 KiB in 0.0 s
2026-12-02 14:16:16,819 INFO task j.t0.r0.s0 accepted, credit 6144.0
2026-12-02 14:16:16,832 INFO task j.t0.r0.s0 attempt 1: completed
2026-12-02 14:16:16,920 INFO task j.t0.r1.s0 attempt 2, resuming at step 5
"""


def test_the_worker_log_gives_each_task_its_phase_times(tmp_path: Path) -> None:
    path = tmp_path / "agent-1.log"
    path.write_text(LOG)
    log = parse_worker_log(path)
    assert log.name == "agent-1"
    assert log.started_at is not None and log.enrolled_at is not None
    assert log.enrolled_at - log.started_at == pytest.approx(0.505, abs=1e-6)
    first = log.tasks[("j.t0.r0.s0", 1)]
    assert first["inputs_at"] - first["got_at"] == pytest.approx(0.013, abs=1e-6)
    assert first["upload_at"] - first["inputs_at"] == pytest.approx(26.237, abs=1e-6)
    assert first["ended_at"] - first["answered_at"] == pytest.approx(0.013, abs=1e-6)
    assert first["outcome"] == "completed"
    assert set(log.tasks[("j.t0.r1.s0", 2)]) == {"got_at"}  # a resumed attempt, still going
    assert log.warnings == [
        "2026-12-02 14:16:15,803 WARNING heartbeat failed (cannot reach the coordinator)"
    ]
