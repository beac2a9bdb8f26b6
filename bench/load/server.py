"""The coordinator under test: the embedded Redis and SeaweedFS on a fresh home, and the
coordinator's API as a separate OS process started exactly as in production.

Two ways to run the API (`server`):

- "api": `cotune api --host H --port P --processes N`, the HTTP API alone with its lease
  reclaimer, N server processes sharing the port (no reconciler, no Ray);
- "coordinator": `cotune coordinator --workers 0`, the API and the reconciler (and a local
  Ray for the reconciler's work), with COTUNE_API_PROCESSES=N for the API's processes
  (where the coordinator knows that setting);
- "auto": "api" when `cotune api --help` succeeds in this checkout, else "coordinator".

Both read the services from the environment (orchestrator/settings.py): COTUNE_REDIS_URL,
COTUNE_S3_ENDPOINT, the S3 keys and bucket, COTUNE_ADMIN_TOKEN, COTUNE_HOME. The per-worker
rate limit is raised far above what any benchmark sends (COTUNE_WORKER_RATE_PER_S,
COTUNE_WORKER_RATE_BURST), so a closed loop measures the coordinator, not its limiter;
`describe()` records every setting given. Ready when `GET /readyz` answers 200; stopped with
SIGTERM (then SIGKILL to the process group it was started in, if it lingers).

    with CoordinatorUnderTest(home, server="auto", processes=1) as coordinator:
        coordinator.url, coordinator.context   # the API's URL; an ApiContext on its state
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

# Far above any benchmark's per-worker rate (a closed-loop worker makes a few hundred calls
# a second at most): the limiter still runs, it just never refuses.
RATE_SETTINGS = {"COTUNE_WORKER_RATE_PER_S": "1000000", "COTUNE_WORKER_RATE_BURST": "1000000"}
READY_TIMEOUT_S = 180.0  # `cotune coordinator` starts Ray first: tens of seconds when busy
STOP_TIMEOUT_S = 60.0


def cotune_command() -> list[str]:
    """The `cotune` console script of this interpreter's environment."""
    script = Path(sys.executable).with_name("cotune")
    if script.exists():
        return [str(script)]
    found = shutil.which("cotune")
    if found:
        return [found]
    return [sys.executable, "-c", "from cotune.orchestrator.cli.app import main; main()"]


def api_command_available() -> bool:
    """True when this checkout has `cotune api` (the HTTP API alone)."""
    try:
        done = subprocess.run(
            [*cotune_command(), "api", "--help"], capture_output=True, timeout=120, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def api_processes_setting_known() -> bool:
    """True when the settings know COTUNE_API_PROCESSES (`cotune coordinator`'s processes)."""
    from cotune.orchestrator.settings import Settings

    return any(f.name == "api_processes" for f in dataclasses.fields(Settings))


class CoordinatorUnderTest:
    """See the module docstring."""

    def __init__(
        self,
        home: Path,
        *,
        server: str = "auto",
        processes: int = 1,
        env: dict[str, str] | None = None,
    ) -> None:
        if server not in ("auto", "api", "coordinator"):
            raise ValueError(f"server must be auto, api or coordinator, got {server!r}")
        self.home = home
        self.requested = server
        self.processes = processes
        self.extra_env = dict(env or {})
        self.mode = ""
        self.fallback = False
        self.url = ""
        self.admin_token = "cta_bench_" + secrets.token_urlsafe(24)
        self.context: Any = None
        self.stack: Any = None
        self.info: Any = None
        self.command: list[str] = []
        self.settings_env: dict[str, str] = {}
        self.ready_s = 0.0
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    # --- life -------------------------------------------------------------------------------

    def start(self) -> CoordinatorUnderTest:
        from cotune.orchestrator.api import ApiContext
        from cotune.orchestrator.runtime.services.ports import free_port
        from cotune.orchestrator.runtime.stack import EmbeddedStack, settings_for_stack

        self.mode = self.requested
        if self.mode == "auto":
            self.mode = "api" if api_command_available() else "coordinator"
            self.fallback = self.mode == "coordinator"
        self.stack = EmbeddedStack(self.home)
        self.info = self.stack.start()
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        settings = dataclasses.replace(settings_for_stack(self.info), admin_token=self.admin_token)
        self.context = ApiContext.from_settings(settings)
        self.settings_env = {
            "COTUNE_API_HOST": "127.0.0.1",
            "COTUNE_API_PORT": str(port),
            **RATE_SETTINGS,
            **self.extra_env,
        }
        env = {k: v for k, v in os.environ.items() if not k.startswith("COTUNE_")}
        env.pop("RAY_ADDRESS", None)
        env.update(
            COTUNE_HOME=str(self.home),
            COTUNE_REDIS_URL=self.info.redis_url,
            COTUNE_S3_ENDPOINT=self.info.s3_endpoint,
            COTUNE_S3_ACCESS_KEY=self.info.s3_access_key,
            COTUNE_S3_SECRET_KEY=self.info.s3_secret_key,
            COTUNE_S3_BUCKET=self.info.s3_bucket,
            COTUNE_ADMIN_TOKEN=self.admin_token,
            **self.settings_env,
        )
        if self.mode == "api":
            self.command = [
                *cotune_command(),
                "api",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--processes",
                str(self.processes),
            ]
        else:
            self.command = [*cotune_command(), "coordinator", "--workers", "0"]
            env["COTUNE_API_PROCESSES"] = str(self.processes)
            self.settings_env["COTUNE_API_PROCESSES"] = str(self.processes)
        self._log = (self.home / "coordinator.log").open("wb")
        began = time.monotonic()
        try:
            self._proc = subprocess.Popen(
                self.command,
                env=env,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group, so a lingering one can go
            )
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        self.ready_s = time.monotonic() - began
        print(f"-- coordinator: {self.describe()['command']} at {self.url}", flush=True)
        return self

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(STOP_TIMEOUT_S)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # whatever of its group is left
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.stack is not None:
            self.stack.stop()
            self.stack = None

    def __enter__(self) -> CoordinatorUnderTest:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- what the benchmarks read ---------------------------------------------------------

    @property
    def runs_reconciler(self) -> bool:
        return self.mode == "coordinator"

    @property
    def pid(self) -> int:
        assert self._proc is not None, "start() first"
        return self._proc.pid

    def service_pids(self) -> dict[str, list[int]]:
        """Process ids by group, for bench/load/monitor.py."""
        pids = self.info.pids if self.info is not None else {}
        return {
            "coordinator": [self.pid],
            "redis": [pids["redis"]] if "redis" in pids else [],
            "seaweed": [pids["seaweed"]] if "seaweed" in pids else [],
        }

    def join_token(self, name: str, kind: str) -> str:
        """A fresh join token (control/tokens.py), `kind` volunteer or cluster."""
        token, _ = self.context.workers.join_tokens.create(name, kind=kind)
        return str(token)

    def describe(self) -> dict[str, Any]:
        """The run's coordinator, for the JSON: how it was started and with what settings."""
        return {
            "mode": self.mode,
            "requested": self.requested,
            "fallback": self.fallback,
            "note": (
                "`cotune api` is not in this checkout: ran `cotune coordinator --workers 0` "
                "(API + reconciler + a local Ray)"
                if self.fallback
                else None
            ),
            "command": " ".join(
                Path(self.command[0]).name if i == 0 else a for i, a in enumerate(self.command)
            ),
            "processes": self.processes,
            "api_processes_setting_known": api_processes_setting_known(),
            "settings": self.settings_env,
            "stack_startup_s": round(self.info.startup_s, 2) if self.info else None,
            "ready_s": round(self.ready_s, 2),
        }

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return (self.home / "coordinator.log").read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def _wait_ready(self) -> None:
        give_up = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < give_up:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"the coordinator exited ({self._proc.returncode}) before it was ready:\n"
                    + self.log_tail()
                )
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=5) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.25)
        raise RuntimeError(
            f"the coordinator did not answer /readyz within {READY_TIMEOUT_S:.0f} s:\n"
            + self.log_tail()
        )
