"""The coordinator's HTTP API (FastAPI, `/v1`): jobs, workers, tokens, leaderboard, health.

    coordinator = Coordinator.from_settings(settings)
    server = serve_api(coordinator, "127.0.0.1", 8470)   # uvicorn on a thread; writes api.json
    ...
    server.stop()

The OpenAPI document is at /openapi.json (docs at /docs); docs/api.md describes every route.
"""

from orchestrator.api.app import create_app
from orchestrator.api.coordinator import Coordinator
from orchestrator.api.server import ApiServer, serve_api

__all__ = ["ApiServer", "Coordinator", "create_app", "serve_api"]
