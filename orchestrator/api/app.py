"""The FastAPI app: routes, error answers, body size limits, request latency, health probes,
the Prometheus metrics, the status page (/ui/), and the lease reclaimer.

`create_app(coordinator)` builds it; while it runs (its lifespan), a background task ends
overdue leases every `coordinator.reclaim_interval_s` seconds so their tasks go back to the
queue even when no worker calls in.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from importlib.metadata import PackageNotFoundError, version

from cotune.orchestrator.api import (
    errors,
    routes_jobs,
    routes_owners,
    routes_tokens,
    routes_workers,
    status_page,
)
from cotune.orchestrator.api.auth import CoordinatorDep
from cotune.orchestrator.api.context import ApiContext
from cotune.orchestrator.api.latency import RequestLatency
from cotune.orchestrator.api.limits import BodyLimit
from cotune.orchestrator.control import metrics, scrape
from fastapi import FastAPI
from fastapi.responses import PlainTextResponse, Response

log = logging.getLogger(__name__)


def _version() -> str:
    try:
        return version("cotune")
    except PackageNotFoundError:
        return "0+unknown"


async def _reclaim_forever(coordinator: ApiContext) -> None:
    while True:
        try:
            expired = await asyncio.to_thread(coordinator.leases.reclaim_expired)
            if expired:
                log.info("%d lease(s) expired; their tasks were queued again", expired)
        except Exception as exc:  # Redis away for a moment: try again next tick
            metrics.count_error(exc)
            log.warning("reclaiming expired leases failed", exc_info=True)
        await asyncio.sleep(coordinator.reclaim_interval_s)


def create_app(coordinator: ApiContext, *, reclaim: bool = True) -> FastAPI:
    """The app; `reclaim` False leaves the lease reclaimer out (the second and later of
    several API processes: one is enough, and the reconciler reclaims too)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not reclaim:
            yield
            return
        reclaimer = asyncio.create_task(_reclaim_forever(coordinator))
        try:
            yield
        finally:
            reclaimer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reclaimer

    app = FastAPI(
        title="cotune coordinator",
        version=_version(),
        description=(
            "Distributed community fine-tuning: jobs, workers, tokens, owners (docs/api.md)."
        ),
        lifespan=lifespan,
    )
    app.state.coordinator = coordinator
    errors.install(app)
    app.add_middleware(BodyLimit)
    app.add_middleware(RequestLatency)  # outermost of the two: it times the body limit too
    app.include_router(routes_jobs.router)
    app.include_router(routes_workers.router)
    app.include_router(routes_tokens.router)
    app.include_router(routes_owners.router)
    status_page.mount(app)  # /ui/: the status page's static files (api/status_page.py)

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, bool]:
        """The process is up."""
        return {"ok": True}

    @app.get("/readyz", tags=["health"])
    def readyz(c: CoordinatorDep) -> PlainTextResponse:
        """Redis and the object store answer (503 naming the one that does not)."""
        down = []
        try:
            c.state.ping()
        except Exception as exc:
            down.append(f"redis: {type(exc).__name__}: {exc}")
        try:
            c.store.head("readyz")  # any answer, found or not, means S3 is there
        except Exception as exc:
            down.append(f"s3: {exc}")
        if down:
            return PlainTextResponse("not ready\n" + "\n".join(down) + "\n", status_code=503)
        return PlainTextResponse("ready\n")

    # One collector per app: the state in Redis at each scrape, beside this process's series.
    state_metrics = scrape.StateCollector(
        coordinator.state.scripts,
        coordinator.state.clock,
        online_window_s=coordinator.settings.lease_ttl_s,
    )

    @app.get("/metrics", tags=["health"], response_class=PlainTextResponse)
    def prometheus_metrics() -> Response:
        """Prometheus text exposition: the cluster's state from Redis and this process's own
        series (control/metrics.py declares them all). Redis away: `cotune_state_up 0` and
        the rest."""
        return Response(scrape.render(state_metrics), media_type=metrics.CONTENT_TYPE)

    return app
