"""The metrics, dashboards and alert rules against the real tools: a real Prometheus (the
Debian binary, loopback only) scrapes a coordinator through a tiny sweep on one worker
process.

- `promtool check metrics` on a live scrape, taken while a task trains, reports nothing;
- an alert fires on real scraped data: the job is submitted before any worker joins, so
  work is queued and no worker is online (CotuneNoWorkerOnline, its `for:` shortened from
  10 minutes to 3 s: the expression is deploy/prometheus's); once the worker joins it stops
  firing; every other rule evaluates without error;
- every panel query of every dashboard (deploy/grafana/dashboards.py) parses and returns at
  least one series over the sweep; the test names every panel that does not.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
from cotune.orchestrator.cli.client import CotuneClient
from cotune.orchestrator.runtime.coordinator import CoordinatorService

from tests.e2e.prometheus import PrometheusServer, prometheus_binary, rules_with_short_for
from tests.e2e.sweep_stack import (
    WorkerProcess,
    service_settings,
    wait_for,
    wait_for_job,
    write_spec,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]
ALERT = "CotuneNoWorkerOnline"


def dashboards_module() -> ModuleType:
    path = ROOT / "deploy" / "grafana" / "dashboards.py"
    spec = importlib.util.spec_from_file_location("cotune_grafana_dashboards", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def firing(prom: PrometheusServer, name: str) -> bool:
    return any(a["labels"]["alertname"] == name and a["state"] == "firing" for a in prom.alerts())


def lint_live_scrape(url: str) -> None:
    tool = shutil.which("promtool")
    if tool is None:
        pytest.skip("promtool is not installed (apt-get install prometheus; .ci/apt-packages)")
    body = httpx.get(url + "/metrics", timeout=30).text
    assert "cotune_state_up 1.0" in body
    lint = subprocess.run(
        [tool, "check", "metrics"], input=body, capture_output=True, text=True, timeout=60
    )
    assert lint.returncode == 0 and not (lint.stdout + lint.stderr).strip(), (
        lint.stdout + lint.stderr
    )


@pytest.mark.timeout(1500)  # about 4 minutes on a quiet machine
def test_prometheus_scrapes_a_sweep_every_panel_has_data_and_an_alert_fires(
    tmp_path: Path,
    redis_client: Any,
    redis_server: str,
    s3_server: Any,
    ray_cluster: str,
    alpaca_dataset: Path,
) -> None:
    prometheus_binary()  # skips, saying why, where Prometheus is not installed
    boards = dashboards_module()
    home = tmp_path / "home"
    # A worker counts as online for one lease TTL after it last called in.
    settings = service_settings(home, redis_server, s3_server, lease_ttl_s=15.0)
    spec_path = write_spec(
        tmp_path,
        alpaca_dataset,
        name="e2e-observed",
        training={"learning_rate": [5.0e-3, 1.0e-3], "max_steps": 6},
        search={"method": "grid", "n_trials": 2, "max_concurrent_trials": 2},
    )
    rules = rules_with_short_for({ALERT: "3s"})
    with (
        CoordinatorService(settings, workers=0, api_port=0) as service,
        CotuneClient(service.url, service.admin_token) as client,
        PrometheusServer(tmp_path / "prometheus", service.url.split("//", 1)[1], rules) as prom,
    ):
        start = time.time()
        wait_for("Prometheus to scrape the coordinator", prom.targets_up, 60)

        # Work queued, nobody online: the alert fires on what Prometheus scraped.
        job_id = client.submit(spec_path)
        wait_for(f"{ALERT} to fire", lambda: firing(prom, ALERT), 120, every_s=1.0)

        token = client.create_join_token("observers").token
        worker = WorkerProcess(service.url, token, home, "worker-0")
        try:
            wait_for(
                "a task in training",
                lambda: any(
                    t.state == "leased" and t.step > 0
                    for trial in client.trials(job_id)
                    for t in trial.tasks
                ),
                300,
            )
            lint_live_scrape(service.url)
            wait_for(f"{ALERT} to stop", lambda: not firing(prom, ALERT), 60, every_s=1.0)
            job = wait_for_job(client, job_id, 900, [worker])
            assert job.state == "succeeded", job.error
        finally:
            worker.stop()
        time.sleep(3)  # the last scrapes after the job's end
        end = time.time()

        # Every rule evaluated against the real series without an error.
        broken = [(r["name"], r.get("lastError")) for r in prom.rules() if r["health"] != "ok"]
        assert broken == [], broken

        span = f"{max(int(end - start), 60)}s"
        step = max((end - start) / 100, 2.0)  # about 100 points a query
        empty, failed = [], []
        queries = boards.panel_queries(job_id, rate_interval="15s", time_range=span)
        for q in queries:
            try:
                series = prom.query_range(q.expr, start, end, step=step)
            except AssertionError as exc:
                failed.append(f"{q.dashboard} / {q.panel}: {exc}")
                continue
            if not series:
                empty.append(f"{q.dashboard} / {q.panel}: {q.expr}")
        assert failed == [], "panel queries that did not parse:\n" + "\n".join(failed)
        assert empty == [], "panels without data over the sweep:\n" + "\n".join(empty)
        assert len(queries) >= 30
