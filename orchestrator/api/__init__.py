"""The coordinator's HTTP API (FastAPI, `/v1`): jobs, workers, tokens, owners,
leaderboard, health.

    context = ApiContext.from_settings(settings)
    app = create_app(context)                 # runtime/apiserver.py serves it with uvicorn

The OpenAPI document is at /openapi.json (docs at /docs); docs/api.md describes every route.
"""

from cotune.orchestrator.api.app import create_app
from cotune.orchestrator.api.context import ApiContext

__all__ = ["ApiContext", "create_app"]
