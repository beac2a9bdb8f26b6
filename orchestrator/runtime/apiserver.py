"""Serving the API: uvicorn on a thread of this process, and `<home>/api.json` saying where.

    server = serve_api(coordinator, "127.0.0.1", 0)   # port 0: a free one
    print(server.url)
    server.stop()

`cotune up` starts it next to the embedded stack; the job commands find it through
api.json ({"url", "pid"}; removed on stop) and the admin token in `<home>/admin-token`.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cotune.orchestrator.api.app import create_app
from cotune.orchestrator.api.context import ApiContext
from cotune.orchestrator.protocol.admin import API_FILE

_START_TIMEOUT_S = 15.0


@dataclass
class ApiServer:
    """A running API server; `stop()` ends it (and removes api.json if it wrote one)."""

    url: str
    host: str
    port: int
    api_file: Path | None
    _server: Any = field(repr=False)
    _thread: threading.Thread = field(repr=False)

    def stop(self, timeout_s: float = 10.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout_s)
        if self.api_file is not None:
            with contextlib.suppress(OSError, ValueError):
                if json.loads(self.api_file.read_text()).get("pid") == os.getpid():
                    self.api_file.unlink()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()


def serve_api(
    coordinator: ApiContext,
    host: str | None = None,
    port: int | None = None,
    *,
    write_api_file: bool = True,
    log_level: str = "warning",
) -> ApiServer:
    """Start the API on a daemon thread; return once it accepts connections.

    Host and port default to the settings (COTUNE_API_HOST/PORT); port 0 picks a free one.
    """
    import uvicorn
    from cotune.orchestrator.runtime.services.ports import free_port

    settings = coordinator.settings
    host = host or settings.api_host
    port = settings.api_port if port is None else port
    if port == 0:
        port = free_port(host)
    config = uvicorn.Config(
        create_app(coordinator),
        host=host,
        port=port,
        log_level=log_level,
        lifespan="on",
        timeout_graceful_shutdown=2,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="cotune-api", daemon=True)
    thread.start()
    give_up_at = time.monotonic() + _START_TIMEOUT_S
    while not server.started:
        if not thread.is_alive() or time.monotonic() > give_up_at:
            server.should_exit = True
            raise RuntimeError(
                f"the API did not start on {host}:{port} (is the port taken? see the log above)"
            )
        time.sleep(0.02)
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
    url = f"http://{shown}:{port}"
    api_file = None
    if write_api_file:
        api_file = settings.home / API_FILE
        settings.home.mkdir(mode=0o700, parents=True, exist_ok=True)
        partial = api_file.with_name(API_FILE + ".part")
        partial.write_text(json.dumps({"url": url, "pid": os.getpid()}, indent=2) + "\n")
        os.replace(partial, api_file)
    return ApiServer(url, host, port, api_file, server, thread)
