"""Tokens: admin (submit, cancel, issue join tokens), join (enroll a worker), worker (its own
leases). Random, stored only as sha256 hashes, compared in constant time.

- The admin token comes from COTUNE_ADMIN_TOKEN, or in embedded mode is generated once into
  `<home>/admin-token` (0600); the coordinator keeps only its hash.
- Join tokens are created by an admin (`cotune token create --join --name alice`), stored
  in Redis under their hash with a contributor name and a kind (volunteer, or cluster for
  the workers the coordinator starts itself), optionally expiring.
- Worker tokens are issued at enrollment (orchestrator/control/workers.py).

Light on purpose (stdlib only at import): the CLI reads the admin token file through it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import redis as redis_lib
    from cotune.orchestrator.control.keys import Keys

ADMIN_TOKEN_FILE = "admin-token"
WorkerKind = Literal["volunteer", "cluster"]
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.@+-]{0,63}$")


def new_token(kind: Literal["admin", "join", "worker"]) -> str:
    """A fresh random token; its prefix tells people which kind they hold."""
    return f"ct{kind[0]}_{secrets.token_urlsafe(32)}"


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def token_matches(token: str | None, stored_hash: str | None) -> bool:
    """True if `token` hashes to `stored_hash` (constant-time comparison)."""
    if not token or not stored_hash:
        return False
    return hmac.compare_digest(token_hash(token), stored_hash)


def read_admin_token(home: Path) -> str | None:
    """The admin token of the embedded stack on `home`, if one was made."""
    try:
        value = (home / ADMIN_TOKEN_FILE).read_text().strip()
    except FileNotFoundError:
        return None
    return value or None


def load_or_create_admin_token(home: Path) -> str:
    """The admin token in `<home>/admin-token`, created (0600) on first use."""
    existing = read_admin_token(home)
    if existing is not None:
        return existing
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    token = new_token("admin")
    path = home / ADMIN_TOKEN_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it first: use theirs
        return read_admin_token(home) or load_or_create_admin_token(home)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise ValueError(
            f"name {name!r}: 1-64 letters, digits, spaces or _.@+-, starting with a letter or digit"
        )
    return name


@dataclass(frozen=True)
class JoinToken:
    """A join token as stored (without the token itself, which only its creator sees)."""

    token_sha256: str
    name: str
    kind: WorkerKind
    created_at: float
    expires_at: float | None


class JoinTokens:
    """Join tokens in Redis: `token:join:<sha256>` hashes (expiring with the token)."""

    def __init__(self, redis: redis_lib.Redis, keys: Keys) -> None:
        self.redis: Any = redis
        self.keys = keys

    def create(
        self,
        name: str,
        kind: WorkerKind = "volunteer",
        ttl_s: float | None = None,
        *,
        now: float | None = None,
    ) -> tuple[str, JoinToken]:
        """A new join token (the secret, shown once) and its record."""
        check_name(name)
        if kind not in ("volunteer", "cluster"):
            raise ValueError(f"kind must be volunteer or cluster, got {kind!r}")
        if ttl_s is not None and ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        now = time.time() if now is None else now
        token = new_token("join")
        record = JoinToken(
            token_sha256=token_hash(token),
            name=name,
            kind=kind,
            created_at=now,
            expires_at=now + ttl_s if ttl_s is not None else None,
        )
        key = self.keys.join_token(record.token_sha256)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(
            key,
            mapping={
                "name": name,
                "kind": kind,
                "created_at": repr(now),
                "expires_at": repr(record.expires_at) if record.expires_at else "",
            },
        )
        if ttl_s is not None:
            pipe.pexpire(key, int(ttl_s * 1000))
        pipe.zadd(self.keys.join_tokens(), {record.token_sha256: now})
        pipe.execute()
        return token, record

    def verify(self, token: str) -> JoinToken | None:
        """The join token's record, or None if it is unknown or expired.

        The lookup is by the token's hash: nothing about the secret leaks through timing,
        since an attacker controls only the input of sha256, not which stored key matches.
        """
        from cotune.orchestrator.control.records import decode_hash

        digest = token_hash(token)
        raw = decode_hash(self.redis.hgetall(self.keys.join_token(digest)))
        if not raw:
            return None
        expires = float(raw["expires_at"]) if raw.get("expires_at") else None
        if expires is not None and expires < time.time():
            return None
        return JoinToken(
            token_sha256=digest,
            name=raw["name"],
            kind=raw["kind"],  # type: ignore[arg-type]
            created_at=float(raw["created_at"]),
            expires_at=expires,
        )
