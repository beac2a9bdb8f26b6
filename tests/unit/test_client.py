"""CotuneClient without a server: its SSE parsing, and that it stays light (the submitter's
install runs the job commands without redis, boto3, fastapi or torch)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from cotune.orchestrator.cli.client import _sse, discover_url

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "ray", "redis", "boto3", "botocore", "fastapi", "uvicorn", "transformers")


def test_event_stream_parsing() -> None:
    body = {"id": "1-0", "kind": "job_state", "time": 1.5, "data": {"to": "running"}}
    lines = [
        ": ping",
        "event: job_state",
        f"data: {json.dumps(body)}",
        "id: 1-0",
        "",
        "",
        f"data: {json.dumps({**body, 'id': '2-0'})}",
    ]
    events = list(_sse(iter(lines)))
    assert [e.id for e in events] == ["1-0", "2-0"]
    assert events[0].data == {"to": "running"}


def test_the_job_commands_are_light() -> None:
    code = (
        "import cotune.orchestrator.cli.jobs, cotune.orchestrator.cli.client, sys, json;"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT
    ).stdout
    assert sorted(set(json.loads(out)) & set(HEAVY)) == []


def test_discovery_needs_a_live_process(tmp_path: Path) -> None:
    assert discover_url(tmp_path) is None
    (tmp_path / "api.json").write_text(json.dumps({"url": "http://127.0.0.1:1", "pid": 2**22 + 7}))
    assert discover_url(tmp_path) is None  # no such process
    (tmp_path / "api.json").write_text(json.dumps({"url": "http://127.0.0.1:1", "pid": 1}))
    assert discover_url(tmp_path) == "http://127.0.0.1:1"
    (tmp_path / "api.json").write_text("{not json")
    assert discover_url(tmp_path) is None
