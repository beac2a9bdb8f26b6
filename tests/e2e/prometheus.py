"""A real Prometheus (Debian's binary) for the tests: loopback only, a temp config derived
from deploy/prometheus/ (the same scrape job and the same alert rules), scraping fast.

    with PrometheusServer(tmp_path, target="127.0.0.1:8470", rules=rules_text) as prom:
        prom.query_range('max by (state) (cotune_jobs)', start, end)   # -> [series, ...]
        prom.alerts()                                                # -> the firing/pending
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from cotune.orchestrator.runtime.services.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "prometheus"
SCRAPE_JOB = "cotune-coordinator"


def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        pytest.skip("prometheus is not installed (apt-get install prometheus; .ci/apt-packages)")
    return found


def rules_with_short_for(overrides: dict[str, str]) -> str:
    """deploy/prometheus/rules/cotune.yml, the `for:` of the named alerts replaced (the
    expressions untouched): a test cannot wait the ten minutes an operator would."""
    rules = yaml.safe_load((DEPLOY / "rules" / "cotune.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") in overrides:
                rule["for"] = overrides[rule["alert"]]
    missing = set(overrides) - {
        r.get("alert") for g in rules["groups"] for r in g["rules"] if r.get("alert")
    }
    assert not missing, f"no such alerts: {missing}"
    return yaml.safe_dump(rules, sort_keys=False)


class PrometheusServer:
    """Prometheus scraping `target` every `interval`, with `rules` (a rules file's text)."""

    def __init__(self, folder: Path, target: str, rules: str, interval: str = "1s") -> None:
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
        config["global"].update(scrape_interval=interval, evaluation_interval=interval)
        config["global"]["scrape_timeout"] = interval
        (folder / "rules.yml").write_text(rules)
        config["rule_files"] = [str(folder / "rules.yml")]
        jobs = [j for j in config["scrape_configs"] if j["job_name"] == SCRAPE_JOB]
        assert jobs, f"deploy/prometheus/prometheus.yml has no {SCRAPE_JOB} job"
        # The test's own target in place of the file the job reads (targets/coordinator.yml).
        jobs[0].pop("file_sd_configs", None)
        jobs[0]["static_configs"] = [{"targets": [target]}]
        config["scrape_configs"] = jobs  # Ray's job: its discovery file is not this test's
        (folder / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = folder / "prometheus.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> PrometheusServer:
        argv = [
            prometheus_binary(),
            f"--config.file={self.folder / 'prometheus.yml'}",
            f"--storage.tsdb.path={self.folder / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--storage.tsdb.retention.time=1d",
        ]
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        give_up_at = time.monotonic() + 60
        while time.monotonic() < give_up_at:
            if self._proc.poll() is not None:
                pytest.fail(f"prometheus exited {self._proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/-/ready", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        pytest.fail(f"prometheus did not become ready:\n{self.log()}")

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(20)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(10)

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def _api(self, path: str, **params: Any) -> Any:
        answer = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=30)
        body = answer.json()
        if body.get("status") != "success":
            raise AssertionError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._api("query", query=expr)["result"]
        return result

    def query_range(self, expr: str, start: float, end: float, step: float = 1.0) -> list[Any]:
        data = self._api("query_range", query=expr, start=start, end=end, step=step)
        result: list[Any] = data["result"]
        return result

    def alerts(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self._api("alerts")["alerts"]
        return found

    def rules(self) -> list[dict[str, Any]]:
        return [r for g in self._api("rules")["groups"] for r in g["rules"]]

    def targets_up(self) -> bool:
        active = self._api("targets")["activeTargets"]
        return bool(active) and all(t["health"] == "up" for t in active)
