"""Runtime settings: the one module that reads the environment; CLI flags override it."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

ENV_PREFIX = "COTUNE_"


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


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
    api_host: str = "127.0.0.1"
    api_port: int = 8470
    admin_token: str | None = None

    @classmethod
    def from_env(cls, **overrides: Any) -> Settings:
        """Settings from COTUNE_* variables (and RAY_ADDRESS), then non-None overrides."""
        home = _env(ENV_PREFIX + "HOME")
        settings = cls(
            home=Path(home).expanduser() if home else Path("~/.cotune").expanduser(),
            redis_url=_env(ENV_PREFIX + "REDIS_URL"),
            s3_endpoint=_env(ENV_PREFIX + "S3_ENDPOINT"),
            s3_bucket=_env(ENV_PREFIX + "S3_BUCKET", "cotune") or "cotune",
            s3_access_key=_env(ENV_PREFIX + "S3_ACCESS_KEY"),
            s3_secret_key=_env(ENV_PREFIX + "S3_SECRET_KEY"),
            s3_region=_env(ENV_PREFIX + "S3_REGION", "us-east-1") or "us-east-1",
            ray_address=_env("RAY_ADDRESS"),
            api_host=_env(ENV_PREFIX + "API_HOST", "127.0.0.1") or "127.0.0.1",
            api_port=_port(_env(ENV_PREFIX + "API_PORT", "8470")),
            admin_token=_env(ENV_PREFIX + "ADMIN_TOKEN"),
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
