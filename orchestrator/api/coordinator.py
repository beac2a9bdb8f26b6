"""The context every API route works in: Redis state, leases, workers, the store, settings."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from orchestrator.leases import Leases
from orchestrator.state import State
from orchestrator.tokens import load_or_create_admin_token, token_hash
from orchestrator.workers import Workers

if TYPE_CHECKING:
    from orchestrator.objectstore import ObjectStore
    from orchestrator.settings import Settings


@dataclass
class Coordinator:
    """What the routes need. Build with `from_settings`, or from parts in tests."""

    settings: Settings
    state: State
    store: ObjectStore
    leases: Leases
    workers: Workers
    admin_token_sha256: str = field(repr=False)
    reclaim_interval_s: float = 1.0
    _stores: dict[str, ObjectStore] = field(default_factory=dict, repr=False)

    @classmethod
    def create(
        cls,
        settings: Settings,
        redis: Any,
        store: ObjectStore,
        admin_token: str,
        *,
        prefix: str = "cotune:",
        retry_after_s: float = 2.0,
        reclaim_interval_s: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> Coordinator:
        state = State(redis, prefix=prefix, clock=clock)
        return cls(
            settings=settings,
            state=state,
            store=store,
            leases=Leases(state, store, settings, retry_after_s=retry_after_s),
            workers=Workers(state),
            admin_token_sha256=token_hash(admin_token),
            reclaim_interval_s=reclaim_interval_s,
        )

    @classmethod
    def from_settings(cls, settings: Settings, **options: Any) -> Coordinator:
        """Connect to the configured Redis and S3 (`settings_for_stack` for the embedded one).

        The admin token is COTUNE_ADMIN_TOKEN, else `<home>/admin-token` (made on first use).
        """
        import redis

        from orchestrator.objectstore import ObjectStore

        if not settings.redis_url:
            raise ValueError(
                "COTUNE_REDIS_URL is not set: start the embedded stack (`cotune up`) or point "
                "cotune at a Redis server"
            )
        store = ObjectStore.from_settings(settings)
        admin = settings.admin_token or load_or_create_admin_token(settings.home)
        client = redis.Redis.from_url(settings.redis_url)
        return cls.create(settings, client, store, admin, **options)

    def store_for(self, bucket: str | None) -> ObjectStore:
        """The coordinator's store, or one on another bucket of the same S3 (same keys)."""
        if bucket is None or bucket == self.store.bucket:
            return self.store
        if bucket not in self._stores:
            from orchestrator.objectstore import ObjectStore

            s = self.settings
            self._stores[bucket] = ObjectStore(
                self.store.endpoint_url, bucket, s.s3_access_key, s.s3_secret_key, s.s3_region
            )
        return self._stores[bucket]
