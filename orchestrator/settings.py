"""Runtime settings: the one module that reads the environment; CLI flags override it.

Secrets (COTUNE_ADMIN_TOKEN, COTUNE_JOIN_TOKEN, COTUNE_S3_ACCESS_KEY, COTUNE_S3_SECRET_KEY,
COTUNE_REDIS_PASSWORD) may come from a file instead: COTUNE_<NAME>_FILE=/path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

ENV_PREFIX = "COTUNE_"


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def _secret(name: str) -> str | None:
    """COTUNE_<name>, or the content of the file COTUNE_<name>_FILE names (a mounted
    Kubernetes Secret or Docker secret: the value then appears in no environment)."""
    value, path = _env(ENV_PREFIX + name), _env(ENV_PREFIX + name + "_FILE")
    if path is None:
        return value
    if value is not None:
        raise ValueError(f"{ENV_PREFIX}{name} and {ENV_PREFIX}{name}_FILE are both set: keep one")
    try:
        text = Path(path).read_text().strip()
    except OSError as exc:
        raise ValueError(f"{ENV_PREFIX}{name}_FILE: cannot read {path}: {exc}") from None
    if not text:
        raise ValueError(f"{ENV_PREFIX}{name}_FILE: {path} is empty")
    return text


def _with_password(url: str | None, password: str | None) -> str | None:
    """`url` with `password` (COTUNE_REDIS_PASSWORD[_FILE]) put in; refused if the URL has
    one of its own, since which should win is anyone's guess."""
    if url is None or password is None:
        return url
    from urllib.parse import quote, urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is not None:
        raise ValueError(
            f"{ENV_PREFIX}REDIS_URL has a password and {ENV_PREFIX}REDIS_PASSWORD is set too: "
            "keep one"
        )
    user = quote(parts.username, safe="") if parts.username else ""
    netloc = f"{user}:{quote(password, safe='')}@{parts.netloc.rpartition('@')[2]}"
    return urlunsplit(parts._replace(netloc=netloc))


@dataclass(frozen=True)
class Settings:
    """Where cotune's services live. Empty endpoints mean "use the embedded stack"."""

    home: Path = field(default_factory=lambda: Path("~/.cotune").expanduser())
    redis_url: str | None = None
    s3_endpoint: str | None = None
    s3_bucket: str = "cotune"
    s3_access_key: str | None = None
    s3_secret_key: str | None = None
    s3_region: str = "us-east-1"
    ray_address: str | None = None
    # GPUs the Ray cluster has or can scale to (COTUNE_RAY_GPUS): an autoscaled GPU group
    # starts at none, so the count at connect time would say "CPU only". None: that count.
    ray_gpus: float | None = None
    api_host: str = "127.0.0.1"
    api_port: int = 8470
    # HTTP server processes of the API (COTUNE_API_PROCESSES), sharing its port beside the
    # one reconciler: 1 serves it on a thread of the coordinator (runtime/apiserver.py).
    api_processes: int = 1
    admin_token: str | None = None
    # A standing volunteer join token (COTUNE_JOIN_TOKEN), registered at start if new: a
    # deployment's Secret can hand volunteers one without `cotune token create --join`.
    join_token: str | None = None
    # The API's address for the cluster workers the coordinator launches on Ray
    # (COTUNE_AGENT_URL); None: the API's own URL, right when they share a machine.
    agent_url: str | None = None
    # The coordinator's API, for the job commands (`cotune submit ...`): COTUNE_COORDINATOR.
    coordinator_url: str | None = None
    # Leases: a worker that misses heartbeats this long loses its task (COTUNE_LEASE_TTL_S);
    # workers are asked to beat every heartbeat_interval_s (COTUNE_HEARTBEAT_INTERVAL_S).
    lease_ttl_s: float = 120.0
    heartbeat_interval_s: float = 10.0
    # Failed attempts (expired, failed, rejected) before a task fails (COTUNE_MAX_ATTEMPTS).
    max_attempts: int = 3
    # A lease ends at this age whatever its heartbeats say (COTUNE_LEASE_MAX_AGE_S): nobody
    # holds a task forever; the next attempt resumes from the latest checkpoint.
    lease_max_age_s: float = 6 * 3600.0
    # A worker token unused this long stops working (COTUNE_WORKER_TOKEN_TTL_S); each call
    # renews it, so only an abandoned worker has to enroll again.
    worker_token_ttl_s: float = 24 * 3600.0
    # Each worker token may make this many calls a second, in bursts of up to
    # worker_rate_burst (COTUNE_WORKER_RATE_PER_S, COTUNE_WORKER_RATE_BURST): far above what an
    # honest worker needs (a heartbeat every few seconds), so only a flood hears 429.
    worker_rate_per_s: float = 20.0
    worker_rate_burst: float = 60.0
    # Strikes (rejected results, forgeries) that quarantine a volunteer owner: its workers get
    # no more work and their active leases are revoked (COTUNE_MAX_STRIKES; docs/security.md).
    max_strikes: float = 3.0

    def __post_init__(self) -> None:
        if self.max_strikes < 1:
            raise ValueError(
                f"{ENV_PREFIX}MAX_STRIKES must be >= 1 (one strike at least before a "
                f"quarantine), got {self.max_strikes:g}"
            )
        if self.worker_rate_burst < 1:
            raise ValueError(
                f"{ENV_PREFIX}WORKER_RATE_BURST must be >= 1 (one call at least), "
                f"got {self.worker_rate_burst:g}"
            )
        if self.worker_token_ttl_s <= 60:
            raise ValueError(
                f"{ENV_PREFIX}WORKER_TOKEN_TTL_S must be over 60 s (a token is renewed at most "
                f"once a minute), got {self.worker_token_ttl_s:g}"
            )

    @classmethod
    def from_env(cls, **overrides: Any) -> Settings:
        """Settings from COTUNE_* variables (and RAY_ADDRESS), then non-None overrides."""
        home = _env(ENV_PREFIX + "HOME")
        settings = cls(
            home=Path(home).expanduser() if home else Path("~/.cotune").expanduser(),
            redis_url=_with_password(_env(ENV_PREFIX + "REDIS_URL"), _secret("REDIS_PASSWORD")),
            s3_endpoint=_env(ENV_PREFIX + "S3_ENDPOINT"),
            s3_bucket=_env(ENV_PREFIX + "S3_BUCKET", "cotune") or "cotune",
            s3_access_key=_secret("S3_ACCESS_KEY"),
            s3_secret_key=_secret("S3_SECRET_KEY"),
            s3_region=_env(ENV_PREFIX + "S3_REGION", "us-east-1") or "us-east-1",
            ray_address=_env("RAY_ADDRESS"),
            ray_gpus=_optional_positive("RAY_GPUS", _env(ENV_PREFIX + "RAY_GPUS")),
            api_host=_env(ENV_PREFIX + "API_HOST", "127.0.0.1") or "127.0.0.1",
            api_port=_port(_env(ENV_PREFIX + "API_PORT", "8470")),
            api_processes=int(_positive("API_PROCESSES", _env(ENV_PREFIX + "API_PROCESSES"), 1)),
            admin_token=_secret("ADMIN_TOKEN"),
            join_token=_secret("JOIN_TOKEN"),
            agent_url=_env(ENV_PREFIX + "AGENT_URL"),
            coordinator_url=_env(ENV_PREFIX + "COORDINATOR"),
            lease_ttl_s=_positive("LEASE_TTL_S", _env(ENV_PREFIX + "LEASE_TTL_S"), 120.0),
            heartbeat_interval_s=_positive(
                "HEARTBEAT_INTERVAL_S", _env(ENV_PREFIX + "HEARTBEAT_INTERVAL_S"), 10.0
            ),
            max_attempts=int(_positive("MAX_ATTEMPTS", _env(ENV_PREFIX + "MAX_ATTEMPTS"), 3)),
            lease_max_age_s=_positive(
                "LEASE_MAX_AGE_S", _env(ENV_PREFIX + "LEASE_MAX_AGE_S"), 6 * 3600.0
            ),
            worker_token_ttl_s=_positive(
                "WORKER_TOKEN_TTL_S", _env(ENV_PREFIX + "WORKER_TOKEN_TTL_S"), 24 * 3600.0
            ),
            worker_rate_per_s=_positive(
                "WORKER_RATE_PER_S", _env(ENV_PREFIX + "WORKER_RATE_PER_S"), 20.0
            ),
            worker_rate_burst=_positive(
                "WORKER_RATE_BURST", _env(ENV_PREFIX + "WORKER_RATE_BURST"), 60.0
            ),
            max_strikes=_positive("MAX_STRIKES", _env(ENV_PREFIX + "MAX_STRIKES"), 3.0),
        )
        given = {k: v for k, v in overrides.items() if v is not None}
        if "home" in given:
            given["home"] = Path(given["home"]).expanduser()
        return replace(settings, **given)

    @property
    def embedded(self) -> bool:
        """True when neither Redis nor S3 is configured: cotune runs its own."""
        return self.redis_url is None and self.s3_endpoint is None


def _port(raw: str | None) -> int:
    try:
        port = int(raw or "")
    except ValueError:
        raise ValueError(f"{ENV_PREFIX}API_PORT must be a port number, got {raw!r}") from None
    if not 0 < port < 65536:
        raise ValueError(f"{ENV_PREFIX}API_PORT must be in 1..65535, got {port}")
    return port


def _optional_positive(name: str, raw: str | None) -> float | None:
    return None if raw is None else _positive(name, raw, 0.0)


def _positive(name: str, raw: str | None, default: float) -> float:
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{ENV_PREFIX}{name} must be a number, got {raw!r}") from None
    if not value > 0:
        raise ValueError(f"{ENV_PREFIX}{name} must be > 0, got {raw!r}")
    if name in ("MAX_ATTEMPTS", "API_PROCESSES") and value != int(value):
        raise ValueError(f"{ENV_PREFIX}{name} must be a whole number, got {raw!r}")
    return value
