"""The embedded stack: Redis and S3 (SeaweedFS) run as child processes under one home folder.

`cotune up` runs it in the foreground and restarts a service that dies (`revive`, from its
AOF or data folder, on the same ports; runtime/up.py); `cotune run` and the tests start it
in-process. A second start on the same home attaches to the running stack rather than
starting another.

Home layout:
    stack.json        endpoints, pids and owner, present while a stack runs
    stack.lock        serialises starts and stops on this home
    credentials.json  Redis password and S3 key pair (0600), generated once
    ports.json        the ports last used, taken again when free so endpoints stay put
    redis/            redis.conf (0600), the AOF and RDB files
    seaweed/          s3-identities.json (0600), data/
    logs/             redis.log, seaweed.log
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from urllib.parse import urlsplit

from cotune.orchestrator.runtime.services.credentials import CREDENTIALS_FILE, StackCredentials
from cotune.orchestrator.runtime.services.ports import LOOPBACK, free_port, ports_free
from cotune.orchestrator.runtime.services.process import ProcessId, ServiceError, stop_process_group
from cotune.orchestrator.runtime.services.redis_server import RedisServer, redis_answers, redis_url
from cotune.orchestrator.runtime.services.seaweed_server import (
    SeaweedPorts,
    SeaweedServer,
    remove_weed_sockets,
    s3_answers,
)
from cotune.orchestrator.runtime.services.stackfile import (
    STACK_FILE,
    StackError,
    StackRecord,
    home_lock,
    read_ports,
    read_record,
    write_json,
    write_ports,
)
from cotune.orchestrator.runtime.services.supervisor import Restart, RestartBudget, describe_exit
from cotune.orchestrator.settings import Settings

_LEFTOVER_GRACE_S = 2.5
_RESTART_TIMEOUT_S = 30.0  # weed waits for its volumes to register again


@dataclass(frozen=True)
class StackInfo:
    """Where a running embedded stack answers. Secrets are kept out of repr."""

    home: Path
    redis_url: str = field(repr=False)
    s3_endpoint: str
    s3_access_key: str
    s3_secret_key: str = field(repr=False)
    s3_bucket: str
    pids: dict[str, int]
    owner_pid: int
    attached: bool
    startup_s: float = 0.0

    @property
    def redis_url_public(self) -> str:
        """The Redis URL with its password masked, for printing."""
        parts = urlsplit(self.redis_url)
        return f"redis://:***@{parts.hostname}:{parts.port}{parts.path}"


def settings_for_stack(info: StackInfo, base: Settings | None = None) -> Settings:
    """Settings that point at this stack exactly as they would at external services."""
    return replace(
        base or Settings(home=info.home),
        home=info.home,
        redis_url=info.redis_url,
        s3_endpoint=info.s3_endpoint,
        s3_access_key=info.s3_access_key,
        s3_secret_key=info.s3_secret_key,
        s3_bucket=info.s3_bucket,
        s3_region="us-east-1",
    )


def _credentials(home: Path, *, create: bool) -> StackCredentials:
    try:
        if create:
            return StackCredentials.load_or_create(home)
        # A running stack's credentials must be read, never made up anew.
        return StackCredentials.load(home / CREDENTIALS_FILE)
    except ValueError as exc:
        raise StackError(str(exc)) from exc


def find_running(home: Path, bucket: str | None = None) -> StackInfo | None:
    """The stack running on `home` (alive and answering), or None."""
    home = home.expanduser().resolve()
    record = read_record(home)
    if record is None or not record.owner.alive():
        return None
    if not (record.redis.alive() and record.seaweed.alive()):
        return None
    creds = _credentials(home, create=False)
    info = StackInfo(
        home=home,
        redis_url=redis_url(record.redis_port, creds.redis_password),
        s3_endpoint=f"http://{LOOPBACK}:{record.seaweed_ports.s3}",
        s3_access_key=creds.s3.access_key,
        s3_secret_key=creds.s3.secret_key,
        s3_bucket=bucket or record.bucket,
        pids={"redis": record.redis.pid, "seaweed": record.seaweed.pid},
        owner_pid=record.owner.pid,
        attached=True,
    )
    try:
        healthy = redis_answers(info.redis_url) and s3_answers(info.s3_endpoint, creds.s3)
    except Exception:
        healthy = False
    return info if healthy else None


class EmbeddedStack:
    """Redis + SeaweedFS for one home folder; a context manager yielding its StackInfo.

    Example:
        with EmbeddedStack(Path("/tmp/cotune")) as info:
            settings = settings_for_stack(info)
    """

    def __init__(
        self, home: Path, bucket: str = "cotune", *, startup_timeout_s: float = 15.0
    ) -> None:
        self.home = home.expanduser().resolve()
        self.bucket = bucket
        self.startup_timeout_s = startup_timeout_s
        self._redis: RedisServer | None = None
        self._seaweed: SeaweedServer | None = None
        self._info: StackInfo | None = None
        self._budgets = {"redis": RestartBudget(), "seaweed": RestartBudget()}

    @property
    def info(self) -> StackInfo:
        if self._info is None:
            raise StackError(f"the stack on {self.home} is not started")
        return self._info

    def start(self) -> StackInfo:
        """Start Redis and S3, or attach to those already running on this home."""
        if self._info is not None:
            return self._info
        if self.home.exists() and not self.home.is_dir():
            raise StackError(f"cotune home {self.home} exists and is not a folder")
        self.home.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            with home_lock(self.home):
                info = self._attach() or self._start_fresh()
        except (ServiceError, ValueError) as exc:  # leftovers that would not stop, bad config
            raise StackError(f"the embedded stack on {self.home}: {exc}") from exc
        self._info = info
        return info

    def stop(self) -> None:
        """Stop the services this object started (an attached stack is left running)."""
        info, self._info = self._info, None
        if info is None or info.attached:
            return
        with home_lock(self.home):
            try:
                if self._seaweed is not None:
                    self._seaweed.stop()
            finally:
                if self._redis is not None:
                    self._redis.stop()
                with contextlib.suppress(StackError, OSError):
                    record = read_record(self.home)
                    if record is not None and record.owner.pid == os.getpid():
                        (self.home / STACK_FILE).unlink()

    def dead_services(self) -> list[str]:
        """Names of the stack's services whose process is gone."""
        info = self.info
        if info.attached:
            record = read_record(self.home)
            if record is None:
                return ["redis", "seaweed"]
            alive = {"redis": record.redis.alive(), "seaweed": record.seaweed.alive()}
        else:
            alive = {
                "redis": self._redis is not None and self._redis.running(),
                "seaweed": self._seaweed is not None and self._seaweed.running(),
            }
        return [name for name, up in alive.items() if not up]

    def revive(self, name: str) -> Restart:
        """Restart the service `name` ("redis" or "seaweed") after it died: from its AOF or
        data folder, on the same ports, so every client and presigned URL still reaches it.

        Raises StackError when it has used its restart budget (RestartBudget: a service
        that keeps dying is broken, not unlucky), when this stack was attached to (its
        owner supervises it), or when it does not come back.
        """
        info = self.info
        server = {"redis": self._redis, "seaweed": self._seaweed}.get(name)
        if info.attached or server is None:
            raise StackError(f"cannot restart {name!r}: not a service this process started")
        budget, log = self._budgets[name], self.log_paths()[name]
        old, code = server.ident, server.exit_code()
        if not budget.take():
            raise StackError(
                f"{name} {describe_exit(code)} after {budget.limit} restarts within "
                f"{budget.window_s:.0f} s; not restarting it again (log {log})"
            )
        with home_lock(self.home):
            try:
                took = server.restart(_RESTART_TIMEOUT_S)
            except ServiceError as exc:
                raise StackError(f"{name} did not come back after it died: {exc}") from exc
            self._info = replace(info, pids={**info.pids, name: server.ident.pid})
            self._write_record()
        if isinstance(server, RedisServer):
            source, where = "its AOF", f"port {server.port}"
        else:
            source, where = "its data folder", f"S3 port {server.ports.s3}"
        return Restart(
            service=name,
            old_pid=old.pid,
            exit_code=code,
            new_pid=server.ident.pid,
            source=source,
            where=where,
            took_s=took,
            used=budget.used,
            limit=budget.limit,
            window_s=budget.window_s,
        )

    def log_paths(self) -> dict[str, Path]:
        return {
            "redis": self.home / "logs" / "redis.log",
            "seaweed": self.home / "logs" / "seaweed.log",
        }

    def __enter__(self) -> StackInfo:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- internals -------------------------------------------------------------------------

    def _attach(self) -> StackInfo | None:
        """The running stack of this home, or None after clearing a dead one's leftovers."""
        record = read_record(self.home)
        if record is None:
            return None
        info = find_running(self.home, self.bucket)
        if info is not None:
            from cotune.orchestrator.data.objectstore import ObjectStore

            ObjectStore(
                info.s3_endpoint, self.bucket, info.s3_access_key, info.s3_secret_key
            ).ensure_bucket()
            return info
        if record.owner.alive():
            raise StackError(
                f"the stack on {self.home} (started by pid {record.owner.pid}) is not "
                f"answering; see {self.home / 'logs'}, stop pid {record.owner.pid} and retry"
            )
        # Its owner died without stopping it: end what is left and start afresh.
        for ident in (record.seaweed, record.redis):
            stop_process_group(ident, _LEFTOVER_GRACE_S)
        remove_weed_sockets(record.seaweed_ports)
        (self.home / STACK_FILE).unlink(missing_ok=True)
        return None

    def _start_fresh(self) -> StackInfo:
        creds = _credentials(self.home, create=True)
        redis_port, weed_ports = self._preferred_ports()
        redis = RedisServer(
            self.home / "redis",
            self.home / "logs" / "redis.log",
            password=creds.redis_password,
            port=redis_port,
        )
        seaweed = SeaweedServer(
            self.home / "seaweed", self.home / "logs" / "seaweed.log", creds.s3, ports=weed_ports
        )
        began = time.monotonic()
        deadline = began + self.startup_timeout_s
        try:
            redis.launch()
            seaweed.launch()  # both start at once; weed is the slow one
            redis.wait_ready(deadline - time.monotonic())
            seaweed.wait_ready(deadline - time.monotonic())
            seaweed.ensure_bucket(self.bucket)
        except BaseException as exc:
            with contextlib.suppress(ServiceError):
                seaweed.stop()
            with contextlib.suppress(ServiceError):
                redis.stop()
            if isinstance(exc, ServiceError | FileNotFoundError):
                raise StackError(f"the embedded stack on {self.home} did not start: {exc}") from exc
            raise
        startup_s = time.monotonic() - began
        self._redis, self._seaweed = redis, seaweed
        write_ports(self.home, redis.port, seaweed.ports)
        self._write_record()
        return StackInfo(
            home=self.home,
            redis_url=redis.url,
            s3_endpoint=seaweed.endpoint,
            s3_access_key=creds.s3.access_key,
            s3_secret_key=creds.s3.secret_key,
            s3_bucket=self.bucket,
            pids={"redis": redis.ident.pid, "seaweed": seaweed.ident.pid},
            owner_pid=os.getpid(),
            attached=False,
            startup_s=startup_s,
        )

    def _write_record(self) -> None:
        """stack.json for the services this process runs (their current pids)."""
        assert self._redis is not None and self._seaweed is not None
        record = StackRecord(
            owner=ProcessId.of(os.getpid()),
            redis_port=self._redis.port,
            redis=self._redis.ident,
            seaweed_ports=self._seaweed.ports,
            seaweed=self._seaweed.ident,
            bucket=self.bucket,
        )
        write_json(self.home / STACK_FILE, record.to_json(self.home))

    def _preferred_ports(self) -> tuple[int, SeaweedPorts]:
        """Last run's ports when all are free (endpoints stay put), else fresh ones."""
        last = read_ports(self.home)
        if last is not None and ports_free([last[0], *last[1].to_json().values()]):
            return last
        return free_port(), SeaweedPorts.allocate()
