"""Serving the API: uvicorn on a thread of this process, or several server processes on one
port; and `<home>/api.json` saying where.

    server = serve_api(coordinator, "127.0.0.1", 0)   # port 0: a free one
    print(server.url)
    server.stop()

    servers = ApiProcesses(settings, processes=4).start()   # COTUNE_API_PROCESSES=4
    servers.stop()

`cotune up` starts it next to the embedded stack; the job commands find it through
api.json ({"url", "pid"}; removed on stop) and the admin token in `<home>/admin-token`.

**Several processes.** One Python process serves about as many requests as one core allows
(the GIL). With COTUNE_API_PROCESSES > 1 (or `cotune api --processes N`) the API runs as N
child processes (`python -m cotune.orchestrator.runtime.apiserver`), each binding the same
port with SO_REUSEPORT so the kernel spreads connections over them, beside the one
reconciler. Every route works on Redis and S3 alone, so the processes share nothing else:
leases, rate buckets and metrics counted in Redis are the same whichever answers. The first
child runs the lease reclaimer; the others leave it out. Their per-process Prometheus series
are summed across them (control/metrics.py `process_exposition`). A child that dies is
reported by `running` (the coordinator then stops, as for a dead API thread).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cotune.orchestrator.api.app import create_app
from cotune.orchestrator.api.context import ApiContext
from cotune.orchestrator.protocol.admin import API_FILE
from cotune.orchestrator.settings import ENV_PREFIX, Settings

_START_TIMEOUT_S = 15.0


@dataclass
class ApiServer:
    """A running API server; `stop()` ends it (and removes api.json if it wrote one)."""

    url: str
    host: str
    port: int
    api_file: Path | None
    _server: Any = field(repr=False)
    _thread: threading.Thread = field(repr=False)

    def stop(self, timeout_s: float = 10.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout_s)
        if self.api_file is not None:
            with contextlib.suppress(OSError, ValueError):
                if json.loads(self.api_file.read_text()).get("pid") == os.getpid():
                    self.api_file.unlink()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()


def serve_api(
    coordinator: ApiContext,
    host: str | None = None,
    port: int | None = None,
    *,
    write_api_file: bool = True,
    log_level: str = "warning",
    reuse_port: bool = False,
    reclaim: bool = True,
) -> ApiServer:
    """Start the API on a daemon thread; return once it accepts connections.

    Host and port default to the settings (COTUNE_API_HOST/PORT); port 0 picks a free one.
    `reuse_port`: share the port with other processes (SO_REUSEPORT); `reclaim` False: no
    lease reclaimer (api/app.py).
    """
    import uvicorn
    from cotune.orchestrator.runtime.services.ports import free_port

    settings = coordinator.settings
    host = host or settings.api_host
    port = settings.api_port if port is None else port
    if port == 0:
        port = free_port(host)
    config = uvicorn.Config(
        create_app(coordinator, reclaim=reclaim),
        host=host,
        port=port,
        log_level=log_level,
        lifespan="on",
        timeout_graceful_shutdown=2,
        # A worker's connection stays open between its heartbeats (uvicorn's default of 5 s
        # made every beat a new TCP connection).
        timeout_keep_alive=keep_alive_s(settings),
    )
    server = uvicorn.Server(config)
    try:
        sockets = [listen_socket(host, port, reuse_port=reuse_port)]
    except OSError as exc:
        raise RuntimeError(f"the API cannot listen on {host}:{port}: {exc}") from exc
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": sockets}, name="cotune-api", daemon=True
    )
    thread.start()
    give_up_at = time.monotonic() + _START_TIMEOUT_S
    while not server.started:
        if not thread.is_alive() or time.monotonic() > give_up_at:
            server.should_exit = True
            raise RuntimeError(
                f"the API did not start on {host}:{port} (is the port taken? see the log above)"
            )
        time.sleep(0.02)
    url = _url(host, port)
    api_file = _write_api_file(settings.home, url) if write_api_file else None
    return ApiServer(url, host, port, api_file, server, thread)


def keep_alive_s(settings: Settings) -> int:
    """How long an idle keep-alive connection stays open: past two heartbeat intervals."""
    return int(max(2 * settings.heartbeat_interval_s + 5, 30))


def listen_socket(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A listening TCP socket for uvicorn; `reuse_port`: other processes may bind it too.

    The protocol is named (IPPROTO_TCP, not 0): asyncio sets TCP_NODELAY only on sockets whose
    `proto` says TCP, and accepted sockets inherit it. Without it every answer written in two
    parts (uvicorn writes the head, then the body) waited on the client's delayed ACK: 44 ms
    a request on one keep-alive connection."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


def _url(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
    return f"http://{shown}:{port}"


def _write_api_file(home: Path, url: str) -> Path:
    api_file = home / API_FILE
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    partial = api_file.with_name(API_FILE + ".part")
    partial.write_text(json.dumps({"url": url, "pid": os.getpid()}, indent=2) + "\n")
    os.replace(partial, api_file)
    return api_file


# --- several processes ----------------------------------------------------------------------

READY_LINE = "cotune api process ready"


def child_env(settings: Settings, admin_token: str) -> dict[str, str]:
    """The environment that gives a child process these settings (Settings.from_env reads
    it back): the child of an embedded stack has no COTUNE_* of its own. It is the child's
    alone (readable by this user only, like the files the secrets came from)."""
    values: dict[str, object | None] = {
        "HOME": settings.home,
        "REDIS_URL": settings.redis_url,
        "S3_ENDPOINT": settings.s3_endpoint,
        "S3_BUCKET": settings.s3_bucket,
        "S3_ACCESS_KEY": settings.s3_access_key,
        "S3_SECRET_KEY": settings.s3_secret_key,
        "S3_REGION": settings.s3_region,
        "ADMIN_TOKEN": admin_token,
        "LEASE_TTL_S": settings.lease_ttl_s,
        "HEARTBEAT_INTERVAL_S": settings.heartbeat_interval_s,
        "MAX_ATTEMPTS": settings.max_attempts,
        "LEASE_MAX_AGE_S": settings.lease_max_age_s,
        "WORKER_TOKEN_TTL_S": settings.worker_token_ttl_s,
        "WORKER_RATE_PER_S": settings.worker_rate_per_s,
        "WORKER_RATE_BURST": settings.worker_rate_burst,
        "MAX_STRIKES": settings.max_strikes,
    }
    # Resolved values only: a secret read from a file (COTUNE_*_FILE) is passed as its value,
    # since COTUNE_REDIS_URL already holds the password COTUNE_REDIS_PASSWORD_FILE gave it.
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    for name, value in values.items():
        if value is not None:
            env[ENV_PREFIX + name] = str(value)
    return env


class ApiProcesses:
    """N API server processes on one port (module docstring); the interface of ApiServer."""

    def __init__(
        self,
        settings: Settings,
        processes: int | None = None,
        host: str | None = None,
        port: int | None = None,
        *,
        admin_token: str | None = None,
        write_api_file: bool = True,
        start_timeout_s: float = 60.0,
    ) -> None:
        from cotune.orchestrator.control.tokens import load_or_create_admin_token

        self.settings = settings
        self.processes = processes or settings.api_processes
        self.host = host or settings.api_host
        self.port = settings.api_port if port is None else port
        self._admin_token = (
            admin_token or settings.admin_token or load_or_create_admin_token(settings.home)
        )
        self._write_api_file = write_api_file
        self._start_timeout_s = start_timeout_s
        self._children: list[Any] = []
        self.api_file: Path | None = None
        self.url = ""

    def start(self) -> ApiProcesses:
        from cotune.orchestrator.control.metrics import MULTIPROCESS_DIR_ENV
        from cotune.orchestrator.runtime.services.ports import free_port
        from cotune.orchestrator.runtime.services.process import ManagedProcess

        if self.port == 0:
            self.port = free_port(self.host)
        run_dir = self.settings.home / "api"
        metrics_dir = run_dir / "metrics"
        shutil.rmtree(metrics_dir, ignore_errors=True)  # the last run's series are not ours
        metrics_dir.mkdir(parents=True, mode=0o700)
        env = child_env(self.settings, self._admin_token)
        env[MULTIPROCESS_DIR_ENV] = str(metrics_dir)
        try:
            for i in range(self.processes):
                argv = [
                    sys.executable,
                    "-m",
                    __name__,
                    "--host",
                    self.host,
                    "--port",
                    str(self.port),
                ]
                if i > 0:
                    argv.append("--no-reclaim")
                child = ManagedProcess(f"api-{i}", argv, run_dir / f"api-{i}.log", env=env)
                child.start()
                self._children.append(child)
            for child in self._children:
                child.wait_ready(
                    lambda c=child: READY_LINE in c.log_tail(200), self._start_timeout_s
                )
        except BaseException:
            self.stop()
            raise
        self.url = _url(self.host, self.port)
        if self._write_api_file:
            self.api_file = _write_api_file(self.settings.home, self.url)
        return self

    @property
    def running(self) -> bool:
        return bool(self._children) and all(c.running() for c in self._children)

    def stop(self, timeout_s: float = 10.0) -> None:
        for child in self._children:
            child.stop()
        self._children = []
        if self.api_file is not None:
            with contextlib.suppress(OSError, ValueError):
                if json.loads(self.api_file.read_text()).get("pid") == os.getpid():
                    self.api_file.unlink()


def run_api(settings: Settings, processes: int, host: str | None, port: int | None) -> int:
    """`cotune api`: the HTTP API alone (no reconciler), `processes` server processes on one
    port, in the foreground until Ctrl-C or SIGTERM."""
    from rich.console import Console

    console = Console(soft_wrap=True, highlight=False)
    if settings.embedded:
        console.print(
            "[red]error:[/] cotune api needs COTUNE_REDIS_URL and COTUNE_S3_ENDPOINT (and the "
            "S3 keys); `cotune up` runs everything on this machine instead"
        )
        return 2
    stopping = threading.Event()

    def stop(signum: int, frame: object) -> None:
        stopping.set()

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    servers = ApiProcesses(settings, processes, host, port)
    try:
        servers.start()
        console.print(
            f"[bold green]cotune api ready[/] at {servers.url} ({processes} process(es), "
            f"pid {os.getpid()})"
        )
        console.file.flush()
        while not stopping.wait(0.5):
            if not servers.running:
                console.print("[red]error:[/] an API process stopped unexpectedly")
                return 1
        return 0
    except (RuntimeError, OSError, ValueError) as exc:
        console.print(f"[red]error:[/] {exc}")
        return 1
    finally:
        servers.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _child(argv: list[str]) -> int:
    """One API server process of ApiProcesses: serve until SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m " + __name__)
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--no-reclaim", action="store_true")
    args = parser.parse_args(argv)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    settings = Settings.from_env()
    server = serve_api(
        ApiContext.from_settings(settings),
        args.host,
        args.port,
        write_api_file=False,
        reuse_port=True,
        reclaim=not args.no_reclaim,
    )
    print(READY_LINE, flush=True)
    while not stopping.wait(0.5) and server.running:
        pass
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
