"""deploy/prometheus/ holds up: promtool accepts the config and the alert rules, and the rules'
unit tests (deploy/prometheus/tests/) pass. Every alert rule has a test there.

promtool comes with Prometheus (Debian: `apt-get install prometheus`, listed in
.ci/apt-packages); without it these tests skip, saying so.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus"
RULES = sorted((PROMETHEUS / "rules").glob("*.yml"))
RULE_TESTS = sorted((PROMETHEUS / "tests").glob("*.yml"))


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("promtool")
    if tool is None:
        pytest.skip("promtool is not installed (apt-get install prometheus; .ci/apt-packages)")
    return subprocess.run(
        [tool, *map(str, args)], capture_output=True, text=True, cwd=PROMETHEUS, timeout=120
    )


def test_the_config_is_valid() -> None:
    done = promtool("check", "config", "prometheus.yml")
    # Ray's service discovery file exists only while Ray runs: a warning, not an error.
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 1 rule files found" in done.stdout


def test_the_rules_are_valid() -> None:
    assert RULES, "no rule files under deploy/prometheus/rules/"
    done = promtool("check", "rules", *RULES)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_rules_pass_their_unit_tests() -> None:
    assert RULE_TESTS, "no rule tests under deploy/prometheus/tests/"
    done = promtool("test", "rules", *RULE_TESTS)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "FAILED" not in done.stdout + done.stderr


def test_every_alert_has_a_unit_test() -> None:
    alerts = {
        rule["alert"]
        for path in RULES
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
        if "alert" in rule
    }
    tested = {
        case["alertname"]
        for path in RULE_TESTS
        for test in yaml.safe_load(path.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
    }
    fired = {
        case["alertname"]
        for path in RULE_TESTS
        for test in yaml.safe_load(path.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert alerts == tested == fired, "each alert needs a test in which it fires"
    expected = {
        "CotuneCoordinatorDown",
        "CotuneRedisUnreachable",
        "CotuneNoWorkerOnline",
        "CotuneQueueNotDraining",
        "CotuneLeaseExpiryRateHigh",
        "CotuneRejectionRateHigh",
        "CotuneJobFailed",
        "CotuneObjectStoreErrors",
    }
    assert alerts == expected
