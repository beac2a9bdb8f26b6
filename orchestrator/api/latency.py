"""Request latency: an ASGI middleware that times every HTTP request into
`cotune_api_request_duration_seconds` (control/metrics.py) by route template, method and
status class.

The route is the template the router matched (`/v1/jobs/{job_id}`), never the raw path, so
a request for any URL adds no new series; a request no route matched counts as
`unmatched`. Time runs to the response's first byte: for an event stream (SSE) that is when
the stream starts, not when it ends minutes later. An exception that escapes the app (the
app's last-resort handler answers it, outside this middleware) counts as a 500.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from cotune.orchestrator.control import metrics

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send


class RequestLatency:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        timed = False

        def observe(status: int) -> None:
            nonlocal timed
            timed = True
            # The router writes the matched route into the scope it was given (this one).
            route = getattr(scope.get("route"), "path", None)
            metrics.observe_request(route, scope["method"], status, time.perf_counter() - started)

        async def send_timed(message: Message) -> None:
            if message["type"] == "http.response.start" and not timed:
                observe(int(message["status"]))
            await send(message)

        try:
            await self.app(scope, receive, send_timed)
        finally:
            if not timed:
                observe(500)
