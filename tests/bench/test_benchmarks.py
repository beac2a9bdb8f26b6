"""The coordinator load benchmarks run end to end at their smallest, as `python -m bench NAME`
runs them (a real coordinator process on a fresh embedded Redis and SeaweedFS, simulated
workers in their own processes), and their JSON is checked: the fields are there, the
figures positive, and what the load generator counted agrees with itself and with the
coordinator's state. Timings are not asserted (docs/benchmarks.md): a missed target is a
figure, not a failure. Each takes a minute or two, most of it starting services.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(autouse=True)
def _services_installed() -> None:
    from cotune.orchestrator.runtime.services.redis_server import redis_server_binary
    from cotune.orchestrator.runtime.services.seaweed_server import weed_binary

    try:
        redis_server_binary()
        weed_binary()
    except FileNotFoundError as exc:
        pytest.skip(f"the embedded services are not installed here ({exc})")


def _bench(name: str, out: Path, *flags: str, timeout_s: float = 900) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "bench", name, *flags, f"--out={out}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "targets:" in done.stdout  # the table was printed
    figures: dict[str, Any] = json.loads(out.read_text())
    return figures


def _common(figures: dict[str, Any]) -> None:
    m = figures["machine"]
    assert m["cpus"] >= 1 and m["platform"]
    assert len(m["load_average_start"]) == 3 and len(m["load_average_end"]) == 3
    for target in figures["targets"].values():
        assert {"target", "reached", "ratio", "met", "at_most"} <= set(target)


def _coordinator(figures: dict[str, Any]) -> None:
    c = figures["coordinator"]
    assert c["mode"] in ("api", "coordinator")
    assert c["fallback"] == (c["requested"] == "auto" and c["mode"] == "coordinator")
    assert c["settings"]["COTUNE_WORKER_RATE_PER_S"] == "1000000"  # the limiter never refuses


def _profiled(coordinator: dict[str, Any]) -> None:
    """py-spy's profile of the coordinator under test (bench/load/profile.py): its API's
    loop ran, and the time it spent is named by function."""
    from bench.load.profile import py_spy

    if py_spy() is None:
        assert "not installed" in coordinator["profile"]["note"]
        return
    profile = coordinator["profile"]
    assert profile["samples"] > 0, profile
    # The API serves on its thread "cotune-api" (runtime/apiserver.py), "@<pid>" where py-spy
    # followed several processes.
    api = [t for name, t in profile["threads"].items() if name.split("@")[0] == "cotune-api"]
    assert api and api[0]["busy_pct"] > 0, profile["threads"]
    assert profile["self"] and all(0 < pct <= 100 for _, pct in profile["self"])


def test_dispatch(tmp_path: Path) -> None:
    figures = _bench(
        "dispatch",
        tmp_path / "dispatch.json",
        "--quick",
        "--workers=10",
        "--seconds=2",
        "--warmup=0.5",
        "--open-workers=20",
        "--open-rate=20",
        "--complete-workers=5",
        "--complete-tasks=150",
        "--ray-seconds=1",
    )
    _common(figures)
    _coordinator(figures)
    assert figures["ray"]["per_s"] > 0 and figures["ray"]["calls"] > 0
    cases = {(c["name"], c["workers"]): c for c in figures["cases"]}
    assert set(cases) == {
        ("noop (GET /healthz)", 10),
        ("lease+release closed", 10),
        ("lease+release open", 20),
        ("noop (GET /healthz)", 5),
        ("lease+complete closed", 5),
    }
    for case in figures["cases"]:
        assert case["per_s"] > 0, case["name"]
        assert case["errors"] == 0 and not case["errors_by_kind"], case["error_samples"]
        assert not case["setup_errors"]
        main = case["latency"]["healthz" if case["scenario"] == "noop" else "cycle"]
        assert main["count"] > 0 and 0 < main["p50_ms"] <= main["p99_ms"] <= main["max_ms"]
        assert main["per_s"] == case["per_s"]
    _profiled(cases[("lease+release closed", 10)]["resources"]["coordinator"])
    closed = cases[("lease+release closed", 10)]
    leases, cycles = closed["latency"]["lease"]["count"], closed["latency"]["cycle"]["count"]
    # Every counted lease led to a counted release, but for those at the window's edges.
    assert abs(leases - cycles - closed["counts"].get("empty", 0)) <= closed["workers"]
    assert closed["ceiling_per_s"] == closed["noop_per_s"] / 2
    assert closed["ratio_to_ceiling"] == pytest.approx(
        closed["per_s"] / closed["ceiling_per_s"], abs=1e-3
    )
    assert closed["ratio_to_ray"] == pytest.approx(
        closed["per_s"] / figures["ray"]["per_s"], abs=1e-3
    )
    open_ = cases[("lease+release open", 20)]
    assert open_["offered_per_s"] == 20 and open_["served_per_s"] > 0
    assert not open_["counts"].get("unserved")
    complete = cases[("lease+complete closed", 5)]
    consistency = complete["consistency"]
    assert consistency["accepted_answers"] == complete["counts"]["accepted"] > 0
    uploads, cycles = complete["latency"]["upload"]["count"], complete["latency"]["cycle"]["count"]
    assert uploads >= 3 * (cycles - complete["workers"])  # three files a cycle, edges aside
    # A volunteer's result waits in `verifying`; a reconciler, if one runs, may judge some.
    if figures["coordinator"]["mode"] == "api":
        assert consistency["tasks_verifying"] == consistency["accepted_answers"]
    else:
        assert 0 < consistency["tasks_verifying"] <= consistency["accepted_answers"]
    assert sum(consistency["tasks_by_state"].values()) == figures["job"]["tasks"]


def test_heartbeats(tmp_path: Path) -> None:
    workers, seconds, interval = 40, 6.0, 2.0
    figures = _bench(
        "heartbeats",
        tmp_path / "heartbeats.json",
        "--quick",
        f"--workers={workers}",
        f"--seconds={seconds}",
        f"--interval={interval}",
    )
    _common(figures)
    _coordinator(figures)
    assert figures["errors"] == 0 and not figures["errors_by_kind"], figures["error_samples"]
    assert not figures["setup_errors"]
    assert figures["leases_held_at_end"] == workers  # one each, all still held
    beats = figures["heartbeats"]
    # Evenly spread phases: every worker beats seconds / interval times, give or take one.
    assert abs(beats["count"] - workers * seconds / interval) <= workers
    assert figures["offered_per_s"] == workers / interval
    assert 0 < beats["p50_ms"] <= beats["p99_ms"] <= beats["max_ms"]
    assert figures["counts"].get("told_to_stop", 0) == 0
    coordinator = figures["resources"]["coordinator"]
    assert coordinator["cpu_mean_pct"] > 0 and coordinator["rss_max_mb"] > 0
    _profiled(coordinator)


def test_overhead(tmp_path: Path) -> None:
    trials, workers = 8, 4
    figures = _bench(
        "overhead",
        tmp_path / "overhead.json",
        "--quick",
        f"--trials={trials}",
        f"--workers={workers}",
    )
    _common(figures)
    assert figures["ideal_s"] == trials * 1.0 / workers
    assert figures["lower_bound_s"] == 2.0
    cotune = figures["cotune"]
    _coordinator(cotune)
    assert cotune["accepted"] == trials and cotune["tasks_by_state"] == {"accepted": trials}
    assert cotune["errors"] == 0, cotune["error_samples"]
    assert cotune["makespan_s"] >= figures["lower_bound_s"]
    assert cotune["over_ideal"] == pytest.approx(
        cotune["makespan_s"] / figures["ideal_s"], abs=1e-3
    )
    tune = figures["ray_tune"]
    # --quick runs Tune on as many trials as cotune; each side is held to its own ideal.
    assert figures["settings"]["tune_trials"] == trials and tune["ideal_s"] == figures["ideal_s"]
    assert tune["trials_done"] == trials and tune["errors"] == 0
    assert tune["makespan_s"] >= figures["lower_bound_s"] and tune["fit_s"] >= tune["makespan_s"]
