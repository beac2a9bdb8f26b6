"""Tokens: admin (submit, cancel, issue join tokens), join (enroll a worker), worker (its own
leases). Random, stored only as sha256 hashes, compared in constant time.

- The admin token comes from COTUNE_ADMIN_TOKEN, or in embedded mode is generated once into
  `<home>/admin-token` (0600); the coordinator keeps only its hash.
- Join tokens are created by an admin (`cotune token create --join --name alice`), stored
  in Redis under their hash with a contributor name and a kind (volunteer, or cluster for
  the workers the coordinator starts itself), optionally expiring (`ttl_s`) and with a use
  limit (`max_uses`, counted atomically at enrollment: control/lua/enroll.lua). An admin may
  revoke them (`cotune token revoke NAME`: control/workers.py `revoke_join_token`), which
  revokes the worker tokens enrolled with them too. A record stays JOIN_TOKEN_KEEP_S past its
  expiry, so the listing shows recently expired tokens.
- Worker tokens are issued at enrollment (orchestrator/control/workers.py); they expire
  unless used (`COTUNE_WORKER_TOKEN_TTL_S`).

Light on purpose (stdlib only at import): the CLI reads the admin token file through it.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import redis as redis_lib
    from cotune.orchestrator.control.keys import Keys

ADMIN_TOKEN_FILE = "admin-token"
JOIN_TOKEN_KEEP_S = 7 * 24 * 3600  # an expired join token is listed this long, then dropped
WorkerKind = Literal["volunteer", "cluster"]
MIN_GIVEN_TOKEN_CHARS = 32  # a standing join token from a deployment's Secret
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9 _.@+-]{0,63}$"  # a contributor (join token) name
_NAME = re.compile(NAME_PATTERN)


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
    uses: int = 0
    max_uses: int | None = None
    revoked_at: float | None = None

    @classmethod
    def from_hash(cls, digest: str, h: dict[str, str]) -> JoinToken:
        return cls(
            token_sha256=digest,
            name=h["name"],
            kind=h["kind"],  # type: ignore[arg-type]
            created_at=float(h.get("created_at") or 0),
            expires_at=float(h["expires_at"]) if h.get("expires_at") else None,
            uses=int(h.get("uses") or 0),
            max_uses=int(h["max_uses"]) if h.get("max_uses") else None,
            revoked_at=float(h["revoked_at"]) if h.get("revoked_at") else None,
        )

    def refusal(self, now: float) -> str | None:
        """Why this token enrolls no worker at `now` (None: it does). enroll.lua decides the
        same atomically; this is the same rule for a reader."""
        if self.revoked_at is not None:
            return "join token revoked"
        if self.expires_at is not None and self.expires_at < now:
            return "join token expired"
        if self.max_uses is not None and self.uses >= self.max_uses:
            return f"join token used up (max_uses {self.max_uses})"
        return None


class JoinTokens:
    """Join tokens in Redis: `token:join:<sha256>` hashes, listed in `tokens:join`."""

    def __init__(
        self, redis: redis_lib.Redis, keys: Keys, clock: Callable[[], float] = time.time
    ) -> None:
        self.redis: Any = redis
        self.keys = keys
        self.clock = clock

    def create(
        self,
        name: str,
        kind: WorkerKind = "volunteer",
        ttl_s: float | None = None,
        *,
        max_uses: int | None = None,
        now: float | None = None,
        token: str | None = None,
    ) -> tuple[str, JoinToken]:
        """A new join token (the secret, shown once) and its record; `token` registers a
        given secret (a deployment's standing token) instead of a random one."""
        check_name(name)
        if kind not in ("volunteer", "cluster"):
            raise ValueError(f"kind must be volunteer or cluster, got {kind!r}")
        if ttl_s is not None and ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        if max_uses is not None and max_uses < 1:
            raise ValueError(f"max_uses must be >= 1, got {max_uses}")
        now = self.clock() if now is None else now
        if token is None:
            token = new_token("join")
        elif len(token) < MIN_GIVEN_TOKEN_CHARS or not token.isascii() or not token.isprintable():
            raise ValueError(
                f"a given join token must be at least {MIN_GIVEN_TOKEN_CHARS} printable ASCII "
                "characters (make one with `python -c 'import secrets; "
                "print(secrets.token_urlsafe(32))'`)"
            )
        record = JoinToken(
            token_sha256=token_hash(token),
            name=name,
            kind=kind,
            created_at=now,
            expires_at=now + ttl_s if ttl_s is not None else None,
            max_uses=max_uses,
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
                "uses": 0,
                "max_uses": str(max_uses) if max_uses is not None else "",
                "revoked_at": "",
            },
        )
        if ttl_s is not None:
            # Kept a while past its expiry (listed as expired), then gone. Relative, not
            # EXPIREAT: Redis's clock need not be the coordinator's (tests move theirs).
            pipe.pexpire(key, math.ceil((ttl_s + JOIN_TOKEN_KEEP_S) * 1000))
        pipe.zadd(self.keys.join_tokens(), {record.token_sha256: now})
        pipe.execute()
        return token, record

    def ensure(self, token: str, name: str) -> bool:
        """Register the standing volunteer join token `token` unless it is known (revoked
        included: a revoked standing token stays revoked across restarts). True if new."""
        if self.redis.exists(self.keys.join_token(token_hash(token))):
            return False
        self.create(name, "volunteer", token=token)
        return True

    def get(self, token_sha256: str) -> JoinToken | None:
        from cotune.orchestrator.control.records import decode_hash

        raw = decode_hash(self.redis.hgetall(self.keys.join_token(token_sha256)))
        return JoinToken.from_hash(token_sha256, raw) if raw else None

    def verify(self, token: str) -> JoinToken | None:
        """The join token's record if it enrolls workers now (known, unexpired, unrevoked,
        uses left); None otherwise.

        The lookup is by the token's hash: nothing about the secret leaks through timing,
        since an attacker controls only the input of sha256, not which stored key matches.
        """
        found = self.get(token_hash(token))
        if found is None or found.refusal(self.clock()) is not None:
            return None
        return found

    def all(self) -> list[JoinToken]:
        """Every join token still on record, oldest first (those dropped are unlisted)."""
        digests = [_text(d) for d in self.redis.zrange(self.keys.join_tokens(), 0, -1)]
        records = [(d, self.get(d)) for d in digests]
        gone = [d for d, record in records if record is None]
        if gone:
            self.redis.zrem(self.keys.join_tokens(), *gone)
        return [record for _, record in records if record is not None]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
