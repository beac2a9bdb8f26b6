"""The API as several server processes on one port (runtime/apiserver.py ApiProcesses,
COTUNE_API_PROCESSES, `cotune api --processes N`): the kernel spreads connections over
them, a worker's calls work whichever process answers, and /metrics sums every process's
request counts."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest
from cotune.orchestrator.protocol.wire import Capabilities, Hardware
from cotune.orchestrator.runtime.apiserver import ApiProcesses
from cotune.orchestrator.settings import Settings

pytestmark = pytest.mark.integration
ADMIN = "admin-token-for-the-api-processes-test"


def _settings(tmp_path: Path, redis_server: str, s3_server: Any) -> Settings:
    return Settings(
        home=tmp_path / "home",
        redis_url=redis_server,
        s3_endpoint=s3_server.endpoint,
        s3_bucket=s3_server.bucket,
        s3_access_key=s3_server.access_key,
        s3_secret_key=s3_server.secret_key,
        admin_token=ADMIN,
        api_processes=2,
    )


def _healthz_count(metrics: str) -> float:
    found = re.search(
        r'^cotune_api_request_duration_seconds_count\{method="GET",route="/healthz",'
        r'status="2xx"\} (\S+)$',
        metrics,
        re.MULTILINE,
    )
    return float(found.group(1)) if found else 0.0


def test_two_processes_share_the_port_and_their_metrics_add_up(
    tmp_path: Path, redis_server: str, redis_client: Any, s3_server: Any
) -> None:
    # redis_client: the session's Redis emptied first, so no other test's task is queued.
    servers = ApiProcesses(_settings(tmp_path, redis_server, s3_server), port=0).start()
    try:
        assert servers.running and servers.processes == 2
        for _ in range(40):  # a new connection each: the kernel picks a process for each
            assert httpx.get(servers.url + "/healthz", timeout=10).json() == {"ok": True}
        counts = {_healthz_count(httpx.get(servers.url + "/metrics", timeout=10).text)}
        counts.add(_healthz_count(httpx.get(servers.url + "/metrics", timeout=10).text))
        # Whichever process answered the scrape, it counts all 40, the other's included.
        assert counts == {40.0}, counts
        observed = list((tmp_path / "home" / "api" / "metrics").glob("histogram_*.db"))
        assert len(observed) == 2, f"both processes served requests: {observed}"

        # A worker's calls, spread over both processes, see one state.
        admin = {"Authorization": f"Bearer {ADMIN}"}
        made = httpx.post(
            servers.url + "/v1/tokens/join", json={"name": "p", "kind": "cluster"}, headers=admin
        )
        assert made.status_code == 201, made.text
        join = made.json()["token"]
        hardware = Hardware(cpu_count=2, memory_bytes=8 << 30, cotune_version="test")
        enrolled = httpx.post(
            servers.url + "/v1/workers/enroll",
            json={"join_token": join, "hardware": hardware.model_dump()},
        ).json()
        auth = {"Authorization": f"Bearer {enrolled['worker_token']}"}
        capabilities = Capabilities(memory_bytes=4 * 10**9, bf16=False).model_dump()
        for _ in range(10):
            answer = httpx.post(
                f"{servers.url}/v1/workers/{enrolled['worker_id']}/lease",
                json={"capabilities": capabilities},
                headers=auth,
            )
            assert answer.status_code == 200, answer.text
            assert answer.json()["task"] is None  # an empty queue: wait and ask again
        listed = httpx.get(servers.url + "/v1/workers", headers=admin).json()["workers"]
        assert enrolled["worker_id"] in {w["worker_id"] for w in listed}
    finally:
        servers.stop()
    assert not servers.running
    with pytest.raises(httpx.ConnectError):
        httpx.get(servers.url + "/healthz", timeout=2)


def test_cotune_api_without_external_services_says_what_is_missing(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("COTUNE_")}
    done = subprocess.run(
        [sys.executable, "-m", "cotune.orchestrator", "api", "--home", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "cotune api needs COTUNE_REDIS_URL and COTUNE_S3_ENDPOINT" in done.stdout
    assert not (tmp_path / "api").exists()  # nothing started, nothing written


def test_a_workers_connection_outlives_the_pause_between_its_heartbeats(
    tmp_path: Path, redis_server: str, s3_server: Any
) -> None:
    """uvicorn's default closed an idle keep-alive connection after 5 s, so every heartbeat
    (10 s apart by default) opened a new one; the API keeps it past two intervals."""
    import dataclasses
    import socket
    import time

    settings = dataclasses.replace(
        _settings(tmp_path, redis_server, s3_server), heartbeat_interval_s=10.0, api_processes=1
    )
    servers = ApiProcesses(settings, port=0).start()
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"

    def answer(conn: socket.socket) -> bytes:
        got = b""
        while not got.endswith(b'{"ok":true}'):
            chunk = conn.recv(4096)
            if not chunk:
                return got  # closed by the server
            got += chunk
        return got

    try:
        with socket.create_connection(("127.0.0.1", servers.port), timeout=10) as conn:
            conn.sendall(request)
            assert b"200 OK" in answer(conn)
            time.sleep(7)  # past uvicorn's default of 5 s
            conn.sendall(request)
            assert b"200 OK" in answer(conn), "the server closed the idle connection"
    finally:
        servers.stop()
