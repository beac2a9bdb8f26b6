"""The status page at `/ui/`: static HTML, CSS and JS (the `ui/` folder beside this module; no
build step) that reads the API in the browser with the admin token the user pastes once.

    mount(app)       # api/app.py: /ui/ serves ui/index.html, /ui redirects there

The files themselves need no token (they hold no data); the page calls `/v1/...` with
`Authorization: Bearer <token>` from the browser's session storage, never from a URL. Every
answer under /ui/ carries a Content-Security-Policy of this origin only, so no inline
script, no inline style and no other host can run in the page or be reached from it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

PATH = "/ui"
FILES = Path(__file__).with_name("ui")  # shipped as package data (pyproject.toml)

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS: dict[str, str] = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # a coordinator upgraded in place serves its new page at once
}


def url_of(api_url: str) -> str:
    """The status page of the API at `api_url` (`http://127.0.0.1:8470` -> `.../ui/`)."""
    return api_url.rstrip("/") + PATH + "/"


class _WithHeaders:
    """ASGI wrapper adding `HEADERS` to every response of the app it wraps."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.raw = [(k.lower().encode(), v.encode()) for k, v in HEADERS.items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *self.raw]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def mount(app: FastAPI) -> None:
    """Serve the page's files at /ui/ (index.html for the folder) and redirect /ui there."""

    @app.get(PATH, include_in_schema=False)
    def status_page() -> RedirectResponse:
        return RedirectResponse(PATH + "/", status_code=308)

    files = StaticFiles(directory=FILES, html=True, check_dir=True)
    app.mount(PATH, _WithHeaders(files), name="status-page")
