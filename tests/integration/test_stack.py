"""The embedded stack and `cotune up`: real redis-server and weed processes, started and stopped."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import redis
from cotune.orchestrator.data.objectstore import ObjectStore
from cotune.orchestrator.runtime.services.credentials import StackCredentials
from cotune.orchestrator.runtime.services.ports import LOOPBACK
from cotune.orchestrator.runtime.services.process import (
    ManagedProcess,
    ProcessId,
    ServiceError,
    ServiceExited,
)
from cotune.orchestrator.runtime.services.redis_server import RedisServer
from cotune.orchestrator.runtime.stack import EmbeddedStack, StackError, settings_for_stack

ROOT = Path(__file__).resolve().parents[2]
START_IN_CHILD = """
import sys, time
from pathlib import Path
from cotune.orchestrator.runtime.stack import EmbeddedStack
info = EmbeddedStack(Path(sys.argv[1])).start()
print("STACK", "ATTACHED" if info.attached else "STARTED", info.pids["redis"], flush=True)
time.sleep(600)
"""


def _env() -> dict[str, str]:
    # The stack must not see external endpoints a developer may have exported.
    return {k: v for k, v in os.environ.items() if not k.startswith("COTUNE_")}


def _spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _read_until(proc: subprocess.Popen[str], marker: str, timeout_s: float) -> str:
    """Output of `proc` up to and including the first line containing `marker`."""
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
            if marker in line:
                return
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    seen: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=deadline - time.monotonic())
        except queue.Empty:
            break
        if line is None:
            break
        seen.append(line)
        if marker in line:
            return "".join(seen)
    raise AssertionError(f"no {marker!r} within {timeout_s} s; output:\n{''.join(seen)}")


def _gone(pids: set[int], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        alive = [p for p in pids if psutil.pid_exists(p) and not _zombie(p)]
        if not alive:
            return True
        time.sleep(0.1)
    return False


def _zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _weed_sockets(home: Path) -> list[Path]:
    record = json.loads((home / "ports.json").read_text())
    return [
        sock for port in record["seaweed"].values() for sock in Path("/tmp").glob(f"*-{port}.sock")
    ]


@pytest.mark.integration
def test_stack_starts_both_services_answer_and_stop_leaves_nothing(tmp_path: Path) -> None:
    home = tmp_path / "home"
    stack = EmbeddedStack(home)
    with stack as info:
        print(f"embedded stack started in {info.startup_s:.2f} s")
        assert not info.attached
        client = redis.Redis.from_url(info.redis_url)
        client.set("k", "v")
        assert client.get("k") == b"v"
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("appendfsync") == {"appendfsync": "everysec"}
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host=LOOPBACK, port=client.connection_pool.connection_kwargs["port"]).get(
                "k"
            )
        store = ObjectStore.from_settings(settings_for_stack(info))
        store.put_bytes("jobs/x/spec.yaml", b"spec")
        assert store.get_bytes("jobs/x/spec.yaml") == b"spec"

        record = json.loads((home / "stack.json").read_text())
        assert record["owner"]["pid"] == os.getpid()
        assert {record["redis"]["process"]["pid"], record["s3"]["process"]["pid"]} == set(
            info.pids.values()
        )
        for secret in (
            home / "credentials.json",
            home / "redis" / "redis.conf",
            home / "seaweed" / "s3-identities.json",
        ):
            assert secret.stat().st_mode & 0o777 == 0o600, secret
        assert stack.dead_services() == []
        idents = [ProcessId.from_json(record[s]["process"]) for s in ("redis", "s3")]
    assert not any(ident.alive() for ident in idents)
    assert not (home / "stack.json").exists()
    assert _weed_sockets(home) == []


@pytest.mark.integration
def test_restart_keeps_data_and_endpoints(tmp_path: Path) -> None:
    home = tmp_path / "home"
    with EmbeddedStack(home) as first:
        redis.Redis.from_url(first.redis_url).set("kept", "yes")
        ObjectStore.from_settings(settings_for_stack(first)).put_bytes("kept/obj", b"data")
    with EmbeddedStack(home) as second:
        assert (second.redis_url, second.s3_endpoint) == (first.redis_url, first.s3_endpoint)
        assert second.pids != first.pids
        assert redis.Redis.from_url(second.redis_url).get("kept") == b"yes"
        assert (
            ObjectStore.from_settings(settings_for_stack(second)).get_bytes("kept/obj") == b"data"
        )


@pytest.mark.integration
def test_cotune_up_attach_then_sigterm_exits_0_and_leaves_no_process(tmp_path: Path) -> None:
    home = tmp_path / "home"
    proc = _spawn(
        "-c", "from cotune.orchestrator.cli.app import main; main()", "up", "--home", str(home)
    )
    try:  # generous waits: Ray starts slowly on a loaded 2-core machine
        out = _read_until(proc, "Ctrl-C or SIGTERM stops it", timeout_s=120)
        assert "cotune stack ready" in out
        redis_port = int(re.search(r"redis\s+redis://:\*\*\*@127\.0\.0\.1:(\d+)/0", out)[1])
        s3_endpoint = re.search(r"s3\s+(http://127\.0\.0\.1:\d+)\s+bucket cotune", out)[1]

        record = json.loads((home / "stack.json").read_text())
        assert record["owner"]["pid"] == proc.pid
        pids = {record["redis"]["process"]["pid"], record["s3"]["process"]["pid"]}
        children = psutil.Process(proc.pid).children(recursive=True)
        assert pids <= {c.pid for c in children}

        # A second stack on the same home attaches to the running one, and its stop
        # leaves that one running.
        with EmbeddedStack(home) as attached:
            assert attached.attached
            assert attached.owner_pid == proc.pid
            assert set(attached.pids.values()) == pids
            assert attached.s3_endpoint == s3_endpoint
            assert f":{redis_port}/" in attached.redis_url
            assert redis.Redis.from_url(attached.redis_url).ping()
            ObjectStore.from_settings(settings_for_stack(attached)).put_bytes("a/b", b"1")
        assert all(psutil.pid_exists(p) for p in pids)

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert proc.stdout is not None
        assert "stopped" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert _gone(pids | {c.pid for c in children})
    assert not (home / "stack.json").exists()
    assert _weed_sockets(home) == []


@pytest.mark.integration
def test_cotune_up_refuses_external_endpoints(tmp_path: Path) -> None:
    env = dict(_env(), COTUNE_REDIS_URL="redis://127.0.0.1:1/0")
    proc = subprocess.run(
        [sys.executable, "-c", "from cotune.orchestrator.cli.app import main; main()", "up"],
        cwd=ROOT,
        env=dict(env, COTUNE_HOME=str(tmp_path / "home")),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "COTUNE_REDIS_URL" in proc.stdout
    assert not (tmp_path / "home").exists()


@pytest.mark.integration
def test_services_die_with_a_killed_owner_and_the_stale_record_is_replaced(
    tmp_path: Path,
) -> None:
    home = tmp_path / "home"
    child = _spawn("-c", START_IN_CHILD, str(home))
    try:
        assert "STACK STARTED" in _read_until(child, "STACK ", timeout_s=120)
        record = json.loads((home / "stack.json").read_text())
        idents = [ProcessId.from_json(record[s]["process"]) for s in ("redis", "s3")]
        child.kill()  # SIGKILL: no cleanup code of the owner runs
        child.wait()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert _gone({i.pid for i in idents})  # the kernel's parent-death signal reached them
    assert (home / "stack.json").exists()  # left behind by the hard kill

    with EmbeddedStack(home) as info:
        assert not info.attached
        assert set(info.pids.values()).isdisjoint(i.pid for i in idents)
        assert redis.Redis.from_url(info.redis_url).ping()


@pytest.mark.integration
def test_two_racing_starts_on_one_home_make_one_stack(tmp_path: Path) -> None:
    home = tmp_path / "home"
    children = [_spawn("-c", START_IN_CHILD, str(home)) for _ in range(2)]
    try:
        outs = [_read_until(c, "STACK ", timeout_s=40).split("STACK ")[1] for c in children]
        assert sorted(o.split()[0] for o in outs) == ["ATTACHED", "STARTED"]
        assert outs[0].split()[1] == outs[1].split()[1]  # the same redis-server pid
    finally:
        for c in children:  # Ctrl-C: the owner's exit hooks stop the services it started
            c.send_signal(signal.SIGINT)
            # weed may need its SIGKILL grace; on two loaded cores a child took over 30 s.
            c.wait(timeout=90)
    assert _weed_sockets(home) == []


SEAWEED_PORT_NAMES = (
    "master",
    "master_grpc",
    "volume",
    "volume_grpc",
    "filer",
    "filer_grpc",
    "s3",
    "s3_grpc",
)


def _dead_process() -> ProcessId:
    proc = subprocess.Popen(["sleep", "30"])
    ident = ProcessId.of(proc.pid)
    proc.kill()
    proc.wait()
    return ident


@pytest.mark.integration
def test_leftovers_of_a_dead_owner_are_stopped(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    leftovers = [subprocess.Popen(["sleep", "600"], start_new_session=True) for _ in range(2)]
    idents = [ProcessId.of(p.pid).to_json() for p in leftovers]
    ports = dict.fromkeys(SEAWEED_PORT_NAMES, 1)
    record = {
        "format": 1,
        "owner": _dead_process().to_json(),
        "redis": {"port": 1, "process": idents[0]},
        "s3": {"bucket": "cotune", "ports": ports, "process": idents[1]},
    }
    (home / "stack.json").write_text(json.dumps(record))
    try:
        with EmbeddedStack(home) as info:
            assert not any(ProcessId.from_json(i).alive() for i in idents)
            assert not info.attached
            record = json.loads((home / "stack.json").read_text())
            assert record["owner"]["pid"] == os.getpid()
    finally:
        for p in leftovers:
            p.kill()
            p.wait()


def test_a_live_owner_with_dead_services_is_reported_not_killed(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    dead = _dead_process().to_json()
    record = {
        "format": 1,
        "owner": ProcessId.of(os.getpid()).to_json(),
        "redis": {"port": 1, "process": dead},
        "s3": {"bucket": "cotune", "ports": dict.fromkeys(SEAWEED_PORT_NAMES, 1), "process": dead},
    }
    (home / "stack.json").write_text(json.dumps(record))
    with pytest.raises(StackError, match=rf"started by pid {os.getpid()}\) is not answering"):
        EmbeddedStack(home).start()
    assert json.loads((home / "stack.json").read_text()) == record


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("stack.json", "{not json", r"stack.json is not valid JSON"),
        ("stack.json", '{"format": 1, "owner": {}}', r"stack.json is not a stack record"),
        ("credentials.json", '{"redis_password": ""}', r"field 'redis_password' is missing"),
    ],
)
def test_bad_files_in_home_are_named_and_start_nothing(
    tmp_path: Path, name: str, content: str, message: str
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / name).write_text(content)
    with pytest.raises(StackError, match=message):
        EmbeddedStack(home).start()
    assert not (home / "redis").exists()
    assert not (home / "seaweed").exists()


def test_home_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "home").write_text("")
    with pytest.raises(StackError, match="exists and is not a folder"):
        EmbeddedStack(tmp_path / "home").start()


def test_credentials_are_generated_once_and_private(tmp_path: Path) -> None:
    first = StackCredentials.load_or_create(tmp_path)
    assert (tmp_path / "credentials.json").stat().st_mode & 0o777 == 0o600
    assert StackCredentials.load_or_create(tmp_path) == first
    assert first.s3.secret_key not in repr(first)


@pytest.mark.integration
def test_redis_moves_off_a_taken_port_unless_told_not_to(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind((LOOPBACK, 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = RedisServer(tmp_path / "a", tmp_path / "a.log", port=port)
        server.start()
        try:
            assert server.port != port
            assert redis.Redis.from_url(server.url).ping()
        finally:
            server.stop()
        strict = RedisServer(tmp_path / "b", tmp_path / "b.log", port=port, strict_port=True)
        with pytest.raises(ServiceExited, match=r"(?i)address already in use"):
            strict.start()


def test_process_that_exits_while_starting_reports_its_log(tmp_path: Path) -> None:
    proc = ManagedProcess(
        "failing",
        [sys.executable, "-c", "print('bad flag'); raise SystemExit(3)"],
        tmp_path / "f.log",
    )
    proc.start()
    with pytest.raises(ServiceExited, match=r"(?s)exited with code 3 .*bad flag"):
        proc.wait_ready(lambda: False, timeout_s=10)


def test_process_never_ready_is_stopped_with_a_clear_error(tmp_path: Path) -> None:
    proc = ManagedProcess("sleepy", ["sleep", "60"], tmp_path / "s.log")
    ident = proc.start()

    def probe() -> bool:
        raise ConnectionRefusedError("nobody listens")

    with pytest.raises(ServiceError, match=r"not become ready within 0 s \(last probe: Conn"):
        proc.wait_ready(probe, timeout_s=0.3)
    assert not ident.alive()


def test_stop_escalates_to_sigkill_and_reaches_the_whole_group(tmp_path: Path) -> None:
    stubborn = (
        "import signal, subprocess, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "kid = subprocess.Popen(['sleep', '60'])\n"
        "print(kid.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = ManagedProcess(
        "stubborn", [sys.executable, "-c", stubborn], tmp_path / "x.log", stop_grace_s=0.5
    )
    ident = proc.start()
    proc.wait_ready(lambda: (tmp_path / "x.log").read_text().strip().split("\n")[-1].isdigit(), 10)
    grandchild = int(proc.log_tail().split()[-1])
    proc.stop()  # SIGTERM is ignored: only the SIGKILL that follows can end it
    assert not ident.alive()
    assert _gone({grandchild}, timeout_s=5)


def test_a_killed_multithreaded_service_starts_again_at_once(tmp_path: Path) -> None:
    """kill -9 then restart, as the durability tests do to Redis: a leader whose other
    threads are still exiting (here: busy in fsync) shows as a zombie that cannot be reaped
    yet, and a start right after the stop must not find the old run "still running"."""
    busy = (
        "import os, sys, threading, time\n"
        "def sync(path):\n"
        "    with open(path, 'wb') as f:\n"
        "        while True:\n"
        "            f.seek(0); f.write(os.urandom(1 << 20)); f.flush(); os.fsync(f.fileno())\n"
        "for i in range(4):\n"
        "    threading.Thread(target=sync, args=(f'{sys.argv[1]}/f{i}',), daemon=True).start()\n"
        "time.sleep(600)\n"
    )
    proc = ManagedProcess("busy", [sys.executable, "-c", busy, str(tmp_path)], tmp_path / "b.log")
    proc.start()
    try:
        for _ in range(10):
            time.sleep(0.2)
            os.kill(proc.ident.pid, signal.SIGKILL)
            proc.stop()
            proc.start()  # raised "busy is already running" before stop waited for the reap
    finally:
        proc.stop()
