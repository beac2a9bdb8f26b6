"""The embedded stack's secrets: a Redis password and an S3 key pair, kept in one 0600 file."""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from cotune.orchestrator.runtime.services.seaweed_server import S3Credentials

CREDENTIALS_FILE = "credentials.json"


@dataclass(frozen=True)
class StackCredentials:
    """Generated once per home and kept, so endpoints and data stay usable across restarts."""

    redis_password: str = field(repr=False)
    s3: S3Credentials

    @classmethod
    def generate(cls) -> StackCredentials:
        return cls(redis_password=secrets.token_urlsafe(24), s3=S3Credentials.generate())

    @classmethod
    def load_or_create(cls, home: Path) -> StackCredentials:
        """Read `<home>/credentials.json`, or write new credentials there (mode 0600)."""
        path = home / CREDENTIALS_FILE
        if path.exists():
            return cls.load(path)
        creds = cls.generate()
        creds.save(path)
        return creds

    @classmethod
    def load(cls, path: Path) -> StackCredentials:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: unreadable ({exc}); delete it to generate new ones") from exc
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object; delete it to generate new ones")
        for name in ("redis_password", "s3_access_key", "s3_secret_key"):
            if not isinstance(data.get(name), str) or not data[name]:
                raise ValueError(f"{path}: field {name!r} is missing or not a non-empty string")
        return cls(
            redis_password=data["redis_password"],
            s3=S3Credentials(access_key=data["s3_access_key"], secret_key=data["s3_secret_key"]),
        )

    def save(self, path: Path) -> None:
        data = {
            "redis_password": self.redis_password,
            "s3_access_key": self.s3.access_key,
            "s3_secret_key": self.s3.secret_key,
        }
        partial = path.with_name(path.name + ".part")
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(data, out, indent=2)
        os.chmod(partial, 0o600)  # O_CREAT's mode does not apply to a file that existed
        os.replace(partial, path)
