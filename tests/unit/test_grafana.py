"""deploy/grafana/ holds up: the committed dashboards are exactly what dashboards.py generates,
their uids are fixed, every panel queries the provisioned Prometheus datasource for metrics
the coordinator exports, and promtool parses every query.

promtool comes with Prometheus (Debian: `apt-get install prometheus`, listed in
.ci/apt-packages); without it the parse test skips, saying so.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from cotune.orchestrator.control import metrics, scrape

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "deploy" / "grafana"
UIDS = {
    "overview.json": "cotune-overview",
    "job.json": "cotune-job",
    "community.json": "cotune-community",
}
METRIC = re.compile(r"\b(?:cotune|process)_[a-z_]+\b")


def load_generator() -> ModuleType:
    """deploy/grafana/dashboards.py (a script, not in a package)."""
    spec = importlib.util.spec_from_file_location("grafana_dashboards", GRAFANA / "dashboards.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # NamedTuple and dataclass lookups want it registered
    spec.loader.exec_module(module)
    return module


generator = load_generator()


def committed() -> dict[str, dict[str, Any]]:
    return {name: json.loads((GRAFANA / "dashboards" / name).read_text()) for name in UIDS}


def panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    """The panels that show data (rows only group them)."""
    return [p for p in board["panels"] if p["type"] != "row"]


def provisioned_uid() -> str:
    config = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())
    (source,) = config["datasources"]
    assert source["type"] == "prometheus"
    return str(source["uid"])


class _Empty(dict[str, Any]):
    """A Redis snapshot in which every field is empty: a mapping with nothing in it, not a
    list (so `_list` makes it []), 0 as a number. Fed it, the collector still yields every
    family it declares, each with its name and type."""

    def __missing__(self, key: str) -> _Empty:
        return _Empty()

    def __float__(self) -> float:
        return 0.0

    def __int__(self) -> int:
        return 0


def exported_names() -> set[str]:
    """Every series name the coordinator's /metrics may serve, from what metrics.py's
    collectors yield: gauges by their name, counters with `_total`, histograms with
    `_bucket`, `_sum` and `_count`; and Prometheus's own `up`."""
    collector = scrape.StateCollector(lambda *_: None, lambda: 0.0, online_window_s=1.0)
    collector.snapshot = lambda: _Empty()  # type: ignore[method-assign]
    state = list(collector.collect())
    assert state[0].samples[0].value == 1, "the collector refused an empty snapshot"
    names = {"up"}
    for family in [*state, *metrics.PROCESS.collect()]:
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names |= {family.name + suffix for suffix in ("_bucket", "_sum", "_count")}
        else:
            names.add(family.name)
    return names


def test_the_generator_reproduces_the_committed_files() -> None:
    assert set(generator.DASHBOARDS) == set(UIDS)
    for name, make in generator.DASHBOARDS.items():
        path = GRAFANA / "dashboards" / name
        assert path.read_bytes() == generator.render(make()).encode(), (
            f"{path} is stale: run .venv/bin/python deploy/grafana/dashboards.py"
        )
    assert generator.main(["--check"]) == 0


def test_check_mode_names_a_stale_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(generator, "OUT_DIR", tmp_path)
    assert generator.main([]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(UIDS)
    (tmp_path / "job.json").write_text("{}\n")
    assert generator.main(["--check"]) == 1
    err = capsys.readouterr().err
    assert "job.json" in err and "overview.json" not in err


def test_uids_are_fixed_and_unique() -> None:
    boards = committed()
    assert {name: board["uid"] for name, board in boards.items()} == UIDS
    assert len({board["title"] for board in boards.values()}) == len(boards)


def test_every_panel_queries_the_provisioned_datasource() -> None:
    uid = provisioned_uid()
    assert uid == generator.DATASOURCE_UID
    for name, board in committed().items():
        for variable in board.get("templating", {}).get("list", []):
            assert variable["datasource"]["uid"] == uid, f"{name}: ${variable['name']}"
        assert panels(board), f"{name} has no panels"
        for panel in panels(board):
            where = f"{name}: panel {panel['title']!r}"
            assert panel["description"], f"{where} has no description"
            assert panel["fieldConfig"]["defaults"].get("unit"), f"{where} has no unit"
            assert panel["datasource"]["uid"] == uid, where
            assert panel["targets"], f"{where} has no query"
            for target in panel["targets"]:
                assert target["expr"].strip(), f"{where}: an empty query"
                assert target["datasource"]["uid"] == uid, where
            ref_ids = [t["refId"] for t in panel["targets"]]
            assert all(ref_ids) and len(set(ref_ids)) == len(ref_ids), where


def test_the_dashboard_provider_loads_a_folder_of_files() -> None:
    config = yaml.safe_load((GRAFANA / "provisioning/dashboards/cotune.yml").read_text())
    (provider,) = config["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"].startswith("/")


def test_the_job_dashboard_chooses_its_job() -> None:
    board = committed()["job.json"]
    (variable,) = board["templating"]["list"]
    assert variable["name"] == "job" and variable["type"] == "query"
    assert variable["query"] == "label_values(cotune_job_progress_ratio, job_id)"
    for panel in panels(board):
        for target in panel["targets"]:
            assert 'job_id="$job"' in target["expr"], f"job.json: {panel['title']!r}"


def test_every_metric_is_one_the_coordinator_exports() -> None:
    exported = exported_names()
    unknown: dict[str, set[str]] = {}
    for name, board in committed().items():
        exprs = [(f"${v['name']}", v["query"]) for v in board.get("templating", {}).get("list", [])]
        exprs += [(p["title"], t["expr"]) for p in panels(board) for t in p["targets"]]
        assert exprs, name
        for where, expr in exprs:
            for metric in set(METRIC.findall(expr)) - exported:
                unknown.setdefault(metric, set()).add(f"{name}: {where}")
    assert not unknown, "not exported by orchestrator/control/metrics.py: " + "; ".join(
        f"{metric} (in {', '.join(sorted(used))})" for metric, used in sorted(unknown.items())
    )


def test_panel_queries_fill_in_every_variable() -> None:
    found = generator.panel_queries("job-1234", rate_interval="30s", time_range="10m")
    targets = [(b["uid"], p["title"]) for b in committed().values() for p in panels(b)]
    assert len(found) == sum(len(p["targets"]) for b in committed().values() for p in panels(b))
    assert {(q.dashboard, q.panel) for q in found} == set(targets)
    for q in found:
        assert "$" not in q.expr, q
    job_exprs = [q.expr for q in found if q.dashboard == "cotune-job"]
    assert job_exprs and all('job_id="job-1234"' in e for e in job_exprs)
    assert any("[30s]" in q.expr for q in found) and any("[10m]" in q.expr for q in found)


def test_every_query_parses(tmp_path: Path) -> None:
    tool = shutil.which("promtool")
    if tool is None:
        pytest.skip("promtool is not installed (apt-get install prometheus; .ci/apt-packages)")
    # promtool parses arbitrary PromQL as the expressions of recording rules.
    queries = generator.panel_queries("job-1234")
    records = {f"{q.dashboard.replace('-', '_')}:query_{i}": q for i, q in enumerate(queries)}
    rules = {
        "groups": [
            {"name": "panels", "rules": [{"record": r, "expr": q.expr} for r, q in records.items()]}
        ]
    }
    path = tmp_path / "panels.yml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    done = subprocess.run(
        [tool, "check", "rules", str(path)], capture_output=True, text=True, timeout=120
    )
    legend = "\n".join(f"{r}: {q.dashboard} / {q.panel}" for r, q in records.items())
    assert done.returncode == 0, f"{done.stdout}{done.stderr}\nwhich is which:\n{legend}"
    assert f"SUCCESS: {len(records)} rules found" in done.stdout
