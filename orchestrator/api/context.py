"""The context every API route works in: Redis state, leases, workers, strikes, the store,
settings."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cotune.orchestrator.control.leases import Leases
from cotune.orchestrator.control.state import State, connect
from cotune.orchestrator.control.strikes import Strikes
from cotune.orchestrator.control.tokens import load_or_create_admin_token, token_hash
from cotune.orchestrator.control.workers import Workers

if TYPE_CHECKING:
    from cotune.orchestrator.data.objectstore import ObjectStore
    from cotune.orchestrator.settings import Settings


@dataclass
class ApiContext:
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
    ) -> ApiContext:
        state = State(redis, prefix=prefix, clock=clock)
        return cls(
            settings=settings,
            state=state,
            store=store,
            leases=Leases(state, store, settings, retry_after_s=retry_after_s),
            workers=Workers(state, token_ttl_s=settings.worker_token_ttl_s),
            admin_token_sha256=token_hash(admin_token),
            reclaim_interval_s=reclaim_interval_s,
        )

    @classmethod
    def from_settings(cls, settings: Settings, **options: Any) -> ApiContext:
        """Connect to the configured Redis and S3 (`settings_for_stack` for the embedded one).

        The admin token is COTUNE_ADMIN_TOKEN, else `<home>/admin-token` (made on first use).
        """
        from cotune.orchestrator.data.objectstore import ObjectStore

        if not settings.redis_url:
            raise ValueError(
                "COTUNE_REDIS_URL is not set: start the embedded stack (`cotune up`) or point "
                "cotune at a Redis server"
            )
        store = ObjectStore.from_settings(settings)
        admin = settings.admin_token or load_or_create_admin_token(settings.home)
        return cls.create(settings, connect(settings.redis_url), store, admin, **options)

    @property
    def strikes(self) -> Strikes:
        """Strikes and quarantine, at the limit of the settings (COTUNE_MAX_STRIKES): the
        same object the leases strike with."""
        return self.leases.strikes

    def store_for(self, bucket: str | None) -> ObjectStore:
        """The coordinator's store, or one on another bucket of the same S3 (same keys)."""
        if bucket is None or bucket == self.store.bucket:
            return self.store
        if bucket not in self._stores:
            from cotune.orchestrator.data.objectstore import ObjectStore

            s = self.settings
            self._stores[bucket] = ObjectStore(
                self.store.endpoint_url, bucket, s.s3_access_key, s.s3_secret_key, s.s3_region
            )
        return self._stores[bucket]
