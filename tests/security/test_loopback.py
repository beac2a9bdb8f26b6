"""In embedded mode nothing listens beyond this machine: `cotune up` binds Redis, SeaweedFS
(every internal port), Ray (GCS, raylets, workers, agents) and the API to loopback only. The
test lists the listening sockets of every process of the stack's process tree."""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from cotune.orchestrator.runtime.services.ports import free_port

from tests.e2e.sweep_stack import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def listening(root: psutil.Process) -> list[tuple[str, int, str]]:
    found = []
    for proc in [root, *root.children(recursive=True)]:
        try:
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    found.append((conn.laddr.ip, conn.laddr.port, proc.name()))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return sorted(set(found))


def test_the_embedded_stack_listens_on_loopback_only(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COTUNE_")}
    env.pop("RAY_ADDRESS", None)
    env.update(COTUNE_API_PORT=str(free_port()), PYTHONUNBUFFERED="1")
    log = tmp_path / "up.log"
    with log.open("wb") as sink:
        up = subprocess.Popen(
            [sys.executable, "-m", "cotune.orchestrator", "up", "--home", str(tmp_path / "h")],
            cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        give_up_at = time.monotonic() + 90
        while "Ctrl-C or SIGTERM stops it" not in log.read_text(errors="replace"):
            assert up.poll() is None and time.monotonic() < give_up_at, log.read_text()
            time.sleep(0.5)
        time.sleep(3)  # Ray's agents come up a little after the driver
        sockets = listening(psutil.Process(up.pid))
        names = {name for _, _, name in sockets}
        print(f"{len(sockets)} listening sockets in {len(names)} programs: {sorted(names)}")
        for ip, port, name in sockets:
            print(f"  {ip}:{port}  {name}")
        assert {"redis-server", "weed", "gcs_server", "raylet"} <= names
        exposed = [s for s in sockets if not is_loopback(s[0])]
        assert exposed == []
    finally:
        up.send_signal(signal.SIGTERM)
        try:
            up.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait(10)
