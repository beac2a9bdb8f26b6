"""The metrics table (orchestrator/control/metrics.py) holds: names follow Prometheus
conventions, the Lua scripts count only what it declares, labels stay bounded, and a scrape
with Redis away still answers (`cotune_state_up 0`). The scrape of a real Redis is
tests/integration/test_metrics.py's."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest
from cotune.orchestrator.control import metrics, scrape
from cotune.orchestrator.control.state import State
from prometheus_client.parser import text_string_to_metric_families

LUA = Path(metrics.__file__).parent / "lua"
SNAKE = re.compile(r"^[a-z][a-z0-9_]*$")
# Labels that would grow without bound (one series per worker, lease, task, owner, path...).
FORBIDDEN_LABELS = {
    "worker",
    "worker_id",
    "lease",
    "lease_id",
    "task",
    "task_id",
    "owner",
    "name",
    "path",
    "url",
    "attempt",
}


def lua_calls(function: str) -> list[tuple[str, ...]]:
    """(name,) or (name, label value) of every call of `function` in the Lua sources that
    names its series with a string literal; a label passed as a variable is left out (the
    integration test counts those), and so are lib.lua's definitions."""
    pattern = re.compile(rf"\b{function}\(\s*'([^']*)'(?:\s*,\s*'([^']*)'\s*[,)])?")
    calls = []
    for path in sorted(LUA.glob("*.lua")):
        for match in pattern.finditer(path.read_text()):
            calls.append(tuple(g for g in match.groups() if g is not None))
    return calls


def test_names_follow_prometheus_conventions() -> None:
    for c in metrics.COUNTERS:
        assert SNAKE.match(c.name) and not c.name.endswith("_total"), c.name
        assert c.help.endswith("."), c.name
        assert bool(c.label) == bool(c.values), f"{c.name}: a label needs its values"
        if c.label:
            assert c.label not in FORBIDDEN_LABELS and SNAKE.match(c.label)
            assert all(":" not in v for v in c.values), f"{c.name}: ':' splits the field"
    for h in metrics.HISTOGRAMS:
        assert SNAKE.match(h.name) and h.name.endswith("_seconds"), h.name
        assert list(h.buckets) == sorted(set(h.buckets)) and h.buckets[0] > 0, h.name
    for g in metrics.GAUGES:
        assert SNAKE.match(g.name) and not g.name.endswith("_total"), g.name
        assert g.help.endswith("."), g.name
        # `name` would be a contributor's: bounded here (the top ten), so it is spelled out
        assert not set(g.labels) & FORBIDDEN_LABELS, g.name
        assert "job" not in g.labels, f"{g.name}: Prometheus owns `job` (use job_id)"
    names = [c.name for c in metrics.COUNTERS] + [h.name for h in metrics.HISTOGRAMS]
    names += [g.name for g in metrics.GAUGES]
    assert len(names) == len(set(names))


def test_the_lua_scripts_count_only_declared_series() -> None:
    counters = {c.name: c for c in metrics.COUNTERS}
    by_label = lua_calls("tally_by")
    plain = lua_calls("tally")
    observed = lua_calls("observe")
    assert by_label and plain and observed, "the scripts count nothing?"
    for args in by_label:
        name = args[0]
        assert name in counters and counters[name].label, f"tally_by{args}: undeclared"
        if len(args) > 1:
            assert args[1] in counters[name].values, f"tally_by{args}: undeclared value"
    for args in plain:
        assert args[0] in counters and not counters[args[0]].label, f"tally{args}: undeclared"
    histograms = {h.name for h in metrics.HISTOGRAMS}
    for args in observed:
        assert args[0] in histograms, f"observe{args}: undeclared"
    # Each declared series is counted somewhere.
    counted = {a[0] for a in by_label + plain}
    assert counted == set(counters)
    assert {a[0] for a in observed} == histograms


def test_request_labels_stay_bounded() -> None:
    before = metrics.API_REQUEST_DURATION.collect()[0].samples
    metrics.observe_request(None, "BREW", 999, 0.01)  # no route, a made-up method and status
    metrics.observe_request("/v1/jobs/{job_id}", "get", 404, 0.02)
    after = metrics.API_REQUEST_DURATION.collect()[0].samples
    labels = {tuple(sorted(s.labels.items())) for s in after if s.name.endswith("_count")}
    assert (("method", "other"), ("route", "unmatched"), ("status", "other")) in labels
    assert (("method", "GET"), ("route", "/v1/jobs/{job_id}"), ("status", "4xx")) in labels
    assert len(after) > len(before)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_scrape_without_redis_answers_state_up_0_and_counts_the_error() -> None:
    redis = pytest.importorskip("redis")
    client = redis.Redis(host="127.0.0.1", port=closed_port(), socket_connect_timeout=1)
    state = State(client)
    collector = scrape.StateCollector(state.scripts, state.clock, online_window_s=60)
    errors = metrics.PROCESS.get_sample_value("cotune_redis_errors_total")
    families = {
        f.name: f for f in text_string_to_metric_families(scrape.render(collector).decode())
    }
    assert families["cotune_state_up"].samples[0].value == 0
    assert "cotune_jobs" not in families  # nothing is made up while Redis is away
    assert metrics.PROCESS.get_sample_value("cotune_redis_errors_total") == errors + 1
    assert "cotune_build_info" in families and "cotune_redis_errors" in families


def test_a_request_that_finds_redis_away_counts_as_5xx_and_a_redis_error(tmp_path: Path) -> None:
    """Through the app: the latency middleware sees the exception the app's last-resort
    handler answers (503), and that handler counts the Redis error."""
    redis = pytest.importorskip("redis")
    from cotune.orchestrator.api import ApiContext, create_app
    from cotune.orchestrator.data.objectstore import ObjectStore
    from cotune.orchestrator.settings import Settings
    from fastapi.testclient import TestClient

    client = redis.Redis(host="127.0.0.1", port=closed_port(), socket_connect_timeout=1)
    store = ObjectStore("http://127.0.0.1:9", "nowhere", "key", "secret")  # never reached
    context = ApiContext.create(Settings(home=tmp_path), client, store, "admin-token")
    api = TestClient(create_app(context), raise_server_exceptions=False)
    errors = metrics.PROCESS.get_sample_value("cotune_redis_errors_total") or 0.0
    labels = {"route": "/v1/jobs", "method": "GET", "status": "5xx"}
    seen = metrics.PROCESS.get_sample_value("cotune_api_request_duration_seconds_count", labels)
    answer = api.get("/v1/jobs", headers={"Authorization": "Bearer admin-token"})
    assert answer.status_code == 503 and "Redis" in answer.text
    assert metrics.PROCESS.get_sample_value("cotune_redis_errors_total") == errors + 1
    after = metrics.PROCESS.get_sample_value("cotune_api_request_duration_seconds_count", labels)
    assert after == (seen or 0.0) + 1


def test_the_fast_exposition_writes_what_prometheus_client_writes() -> None:
    """render() writes the cluster-wide families itself (scrape.render says why): the same
    families, samples and values as generate_latest, label values escaped alike."""
    import json

    import prometheus_client

    odd = 'a "quoted" \\ back\nslash'
    snap = {
        "jobs": {"running": 2},
        "trials": {"pruned": 1},
        "tasks": {"queued": 3},
        "queue": {"cpu": 3},
        "workers": {"cluster:busy": 1},
        "quarantined": 0,
        "losses": [["job-1", 0, "2.5", 1]],
        "per_job": [["job-1", "task", "queued", 3]],
        "progress": [["job-1", 0.25, 1700000000.5]],
        "training": {"cluster": [10.5, 2**30, 3, 8]},
        "contributors": [odd, "1e+300", "plain", "0.1"],
        "counters": ["task_attempts:accepted", "7", "tasks_failed", "1.5"],
        "histograms": {"task_duration_seconds": ["1", "2", "12", "3", "sum", "99.25"]},
    }

    def scripts(name: str, *args: object) -> str:
        return json.dumps(snap)

    collector = scrape.StateCollector(scripts, lambda: 0.0, online_window_s=30)
    ours = scrape._text(collector.collect())
    theirs = prometheus_client.generate_latest(collector).decode()

    def families(text: str) -> dict[str, object]:
        return {
            f.name: (
                f.type,
                f.documentation,
                sorted((s.name, sorted(s.labels.items()), s.value) for s in f.samples),
            )
            for f in text_string_to_metric_families(text)
        }

    assert families(ours) == families(theirs)
    assert f'contributor="{odd}"' not in ours  # escaped, not raw
