"""The on-disk state of a running embedded stack: stack.json, its lock, the ports it used."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cotune.orchestrator.runtime.services.credentials import CREDENTIALS_FILE
from cotune.orchestrator.runtime.services.ports import LOOPBACK
from cotune.orchestrator.runtime.services.process import ProcessId
from cotune.orchestrator.runtime.services.seaweed_server import SeaweedPorts

STACK_FILE = "stack.json"
LOCK_FILE = "stack.lock"
PORTS_FILE = "ports.json"
_FORMAT = 1
_LOCK_WAIT_S = 60.0  # longer than a start (15 s) plus a stop, so waiting means a real hang


class StackError(RuntimeError):
    """The embedded stack cannot start, attach or stop; the message says what to do."""


@dataclass(frozen=True)
class StackRecord:
    """The contents of stack.json."""

    owner: ProcessId
    redis_port: int
    redis: ProcessId
    seaweed_ports: SeaweedPorts
    seaweed: ProcessId
    bucket: str

    def to_json(self, home: Path) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "owner": self.owner.to_json(),
            "credentials": str(home / CREDENTIALS_FILE),
            "redis": {
                "url": f"redis://{LOOPBACK}:{self.redis_port}/0",
                "port": self.redis_port,
                "process": self.redis.to_json(),
                "log": str(home / "logs" / "redis.log"),
            },
            "s3": {
                "endpoint": f"http://{LOOPBACK}:{self.seaweed_ports.s3}",
                "bucket": self.bucket,
                "ports": self.seaweed_ports.to_json(),
                "process": self.seaweed.to_json(),
                "log": str(home / "logs" / "seaweed.log"),
            },
        }

    @classmethod
    def from_json(cls, data: Any, path: Path) -> StackRecord:
        try:
            if data["format"] != _FORMAT:
                raise ValueError(f"format {data['format']!r}, expected {_FORMAT}")
            return cls(
                owner=ProcessId.from_json(data["owner"]),
                redis_port=int(data["redis"]["port"]),
                redis=ProcessId.from_json(data["redis"]["process"]),
                seaweed_ports=SeaweedPorts.from_json(data["s3"]["ports"]),
                seaweed=ProcessId.from_json(data["s3"]["process"]),
                bucket=str(data["s3"]["bucket"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise StackError(
                f"{path} is not a stack record ({type(exc).__name__}: {exc}); if no "
                "`cotune up` runs on this home, delete the file"
            ) from exc


def read_record(home: Path) -> StackRecord | None:
    """The record of the stack last started on `home`, or None."""
    path = home / STACK_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise StackError(f"{path} is not valid JSON ({exc}); if no stack runs, delete it") from exc
    return StackRecord.from_json(data, path)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Replace a JSON file atomically."""
    partial = path.with_name(path.name + ".part")
    partial.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(partial, path)  # readers never see half a file


@contextlib.contextmanager
def home_lock(home: Path) -> Iterator[None]:
    """Hold the home's lock file: one process at a time starts or stops its stack."""
    path = home / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + _LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise StackError(
                        f"another cotune process has held {path} for {_LOCK_WAIT_S:.0f} s "
                        "while starting or stopping the stack; is it stuck?"
                    ) from None
                time.sleep(0.1)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def read_ports(home: Path) -> tuple[int, SeaweedPorts] | None:
    """The Redis and SeaweedFS ports of the last stack on `home`, if recorded and readable."""
    try:
        data = json.loads((home / PORTS_FILE).read_text())
        return int(data["redis"]), SeaweedPorts.from_json(data["seaweed"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_ports(home: Path, redis_port: int, seaweed: SeaweedPorts) -> None:
    write_json(home / PORTS_FILE, {"redis": redis_port, "seaweed": seaweed.to_json()})
