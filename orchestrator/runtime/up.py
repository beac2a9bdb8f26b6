"""`cotune up`: the embedded stack and the coordinator in the foreground, supervised.

    cotune up --home /tmp/cotune --workers 2      # Redis, S3, Ray, the API, the reconciler
    cotune up --stack-only                         # Redis and S3 alone, for `cotune coordinator`

A redis-server or weed that dies is restarted from its AOF or data folder on the same ports
(runtime/stack.py `revive`; one line printed per restart, at most five a minute each, then
the stack stops with an error), while the coordinator keeps running: its Redis client
reconnects and retries (control/state.py `connect`), its S3 calls retry with backoff
(data/s3client.py), and the API answers 503 while Redis is away, which volunteers retry.
"""

from __future__ import annotations

import signal
import time
from types import FrameType
from typing import Any

from cotune.orchestrator.runtime.services.credentials import CREDENTIALS_FILE
from cotune.orchestrator.runtime.services.process import ServiceError
from cotune.orchestrator.runtime.stack import (
    EmbeddedStack,
    StackError,
    StackInfo,
    settings_for_stack,
)
from cotune.orchestrator.settings import Settings

_WATCH_S = 0.5  # how often the services are checked: a dead one is restarted within this


def run_up(settings: Settings, workers: int | None = None, *, coordinator: bool = True) -> int:
    """Run the embedded stack and (unless `coordinator` is False) the coordinator (Ray, the
    API, the reconciler and up to `workers` local workers; runtime/coordinator.py) until
    Ctrl-C or SIGTERM; the exit code."""
    from rich.console import Console

    console = Console(soft_wrap=True, highlight=False)
    if not settings.embedded:
        given = [
            name
            for name, value in (
                ("COTUNE_REDIS_URL", settings.redis_url),
                ("COTUNE_S3_ENDPOINT", settings.s3_endpoint),
            )
            if value
        ]
        console.print(
            f"[red]error:[/] cotune up runs the embedded Redis and S3, but {' and '.join(given)} "
            "point cotune at external services; unset them to run the embedded stack"
        )
        return 2
    from cotune.orchestrator.runtime.coordinator import CoordinatorService, print_service

    stack = EmbeddedStack(settings.home, settings.s3_bucket)
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    code = 0
    service: CoordinatorService | None = None
    try:
        info = stack.start()
        if info.attached:
            console.print(
                f"[red]error:[/] a stack already runs on {info.home} (pid {info.owner_pid}); "
                "use it, or stop it first"
            )
            return 1
        if coordinator:
            # The coordinator depends on the stack: started after it, stopped before it.
            service = CoordinatorService(settings_for_stack(info, settings), workers=workers)
            service.start()
        _print_endpoints(console, info)
        if service is not None:
            print_service(console, service, info.home)
        else:
            console.print(
                "  coordinator  none here (--stack-only): run `cotune coordinator` with "
                f"these endpoints and the keys in {info.home / CREDENTIALS_FILE}"
            )
        console.print("Ctrl-C or SIGTERM stops it.")
        console.file.flush()
        while True:
            time.sleep(_WATCH_S)
            for name in stack.dead_services():
                # StackError once a service has used its restart budget: the stack stops.
                console.print(stack.revive(name).line())
                console.file.flush()
            dead = service.dead_parts() if service is not None else []
            if dead:
                console.print(
                    f"[red]error:[/] the coordinator's {', '.join(dead)} stopped "
                    "unexpectedly (see the log above); stopping the stack"
                )
                code = 1
                break
    except KeyboardInterrupt:
        console.print("stopping the embedded stack ...")
    except (StackError, RuntimeError, OSError) as exc:  # RuntimeError: the API's port taken
        console.print(f"[red]error:[/] {exc}")
        code = 1
    finally:
        for sig in previous:  # a second Ctrl-C must not cut the stop short
            signal.signal(sig, signal.SIG_IGN)
        if service is not None:
            service.stop()
        try:
            stack.stop()
        except (StackError, ServiceError) as exc:
            console.print(f"[red]error:[/] stopping the stack: {exc}")
            code = 1
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if code == 0:
        console.print("stopped")
    return code


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _print_endpoints(console: Any, info: StackInfo) -> None:
    console.print(f"[bold green]cotune stack ready[/] in {info.startup_s:.1f} s, home {info.home}")
    console.print(f"  redis        {info.redis_url_public}")
    console.print(f"  s3           {info.s3_endpoint}  bucket {info.s3_bucket}")
    console.print(f"  credentials  {info.home / CREDENTIALS_FILE}")
    console.print(f"  logs         {info.home / 'logs'}")
    console.print(f"  pids         redis {info.pids['redis']}, seaweed {info.pids['seaweed']}")
