"""The coordinator process: the Ray pool, the HTTP API, the reconciler and local workers.

`CoordinatorService` starts them in dependency order against the configured Redis and S3
(the embedded stack's or external ones) and stops them in reverse:

    start: Ray (connect or local) -> API (uvicorn thread, or COTUNE_API_PROCESSES server
           processes on one port; writes <home>/api.json)
           -> a "cluster" join token for the workers it launches -> reconciler thread
    stop:  reconciler -> local workers (they give their leases back) -> API -> Ray

`cotune up` runs it next to the embedded stack; `cotune coordinator` runs it alone against
external services (a cluster deployment, and the fault tests that kill it):

    with CoordinatorService(settings, workers=2) as service:
        print(service.url, service.admin_token)
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from cotune.orchestrator.settings import Settings

log = logging.getLogger(__name__)

# The contributor name of COTUNE_JOIN_TOKEN's workers (a deployment's standing token).
STANDING_JOIN_TOKEN_NAME = "volunteers"


class CoordinatorService:
    """See the module docstring. `workers` None: one per GPU of the Ray cluster, else one."""

    def __init__(
        self,
        settings: Settings,
        *,
        workers: int | None = None,
        api_port: int | None = None,
        identity: str | None = None,
        interval_s: float = 0.5,
        idle_grace_s: float = 60.0,
    ) -> None:
        self.settings = settings
        self.workers = workers
        self.api_port = api_port
        self.identity = identity
        self.interval_s = interval_s
        self.idle_grace_s = idle_grace_s
        self.pool: Any = None
        self.api: Any = None
        self.reconciler: Any = None
        self.api_context: Any = None
        self._thread: threading.Thread | None = None
        self._owns_ray = False

    @property
    def url(self) -> str:
        assert self.api is not None, "start() the coordinator first"
        return str(self.api.url)

    @property
    def admin_token(self) -> str:
        from cotune.orchestrator.control.tokens import load_or_create_admin_token

        return self.settings.admin_token or load_or_create_admin_token(self.settings.home)

    def start(self) -> CoordinatorService:
        import ray
        from cotune.orchestrator.api import ApiContext
        from cotune.orchestrator.pipeline.reconciler import LoopTimes, Reconciler
        from cotune.orchestrator.runtime.apiserver import ApiProcesses, serve_api
        from cotune.orchestrator.runtime.raypool import AgentLaunch, RayPool

        try:
            self._owns_ray = not ray.is_initialized() and not self.settings.ray_address
            # A local Ray's CPUs are logical: one per local worker, plus two for the merges
            # and the base model's evaluation, so workers never starve the trusted work.
            wanted = self.workers if self.workers is not None else 1
            cpus = max(os.cpu_count() or 1, wanted + 2)
            self.pool = RayPool.connect(
                self.settings.ray_address, num_cpus=cpus, gpus=self.settings.ray_gpus
            )
            self.api_context = ApiContext.from_settings(self.settings)
            if self.settings.join_token and self.api_context.workers.join_tokens.ensure(
                self.settings.join_token, STANDING_JOIN_TOKEN_NAME
            ):
                log.info("registered the standing join token %r", STANDING_JOIN_TOKEN_NAME)
            if self.settings.api_processes > 1:  # beside this process's reconciler
                self.api = ApiProcesses(self.settings, port=self.api_port).start()
            else:
                self.api = serve_api(self.api_context, port=self.api_port)
            state = self.api_context.state
            max_agents = self.workers if self.workers is not None else max(int(self.pool.gpus), 1)
            if max_agents > 0:
                token, _ = self.api_context.workers.join_tokens.create("cluster", kind="cluster")
                self.pool.launch = AgentLaunch(
                    coordinator_url=self.settings.agent_url or self.api.url,
                    join_token=token,
                    home=self.settings.home,
                    max_agents=max_agents,
                    idle_grace_s=self.idle_grace_s,
                )
            self.reconciler = Reconciler(
                state,
                self.api_context.store,
                self.settings,
                self.pool,
                identity=self.identity,
                times=LoopTimes(interval_s=self.interval_s),
            )
            self._thread = threading.Thread(
                target=self.reconciler.run, name="cotune-reconciler", daemon=True
            )
            self._thread.start()
        except BaseException:
            self.stop()
            raise
        return self

    def dead_parts(self) -> list[str]:
        """Names of the parts that stopped on their own."""
        dead = []
        if self.api is not None and not self.api.running:
            dead.append("api")
        if self._thread is not None and not self._thread.is_alive():
            dead.append("reconciler")
        return dead

    def stop(self) -> None:
        """Stop what was started, in reverse order; safe to call twice."""
        if self.reconciler is not None:
            self.reconciler.stop()
        if self._thread is not None:
            self._thread.join(30)
            self._thread = None
        if self.pool is not None:
            try:
                self.pool.close(shutdown=self._owns_ray)
            except Exception:
                log.warning("stopping the Ray pool failed", exc_info=True)
            self.pool = None
        if self.api is not None:
            self.api.stop()
            self.api = None

    def __enter__(self) -> CoordinatorService:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def status_page_hint(api_url: str, settings: Settings) -> str:
    """The status page's URL and where the admin token it asks for is (`cotune up`, `run`)."""
    from cotune.orchestrator.api.status_page import url_of
    from cotune.orchestrator.control.tokens import ADMIN_TOKEN_FILE

    where = "$COTUNE_ADMIN_TOKEN" if settings.admin_token else settings.home / ADMIN_TOKEN_FILE
    return f"{url_of(api_url)}  (paste the admin token from {where})"


def print_service(console: Any, service: CoordinatorService, home: Path) -> None:
    console.print(f"  api          {service.url}  (docs {service.url}/docs)")
    console.print(f"  admin token  {home / 'admin-token'}")
    console.print(f"  status page  {status_page_hint(service.url, service.settings)}")
    workers = service.pool.agent_cap() if service.pool is not None else 0
    console.print(f"  workers      up to {workers} local worker(s), started as work arrives")


def run_coordinator(settings: Settings, workers: int | None) -> int:
    """`cotune coordinator`: the coordinator alone, against configured Redis and S3,
    in the foreground until Ctrl-C or SIGTERM."""
    from rich.console import Console

    console = Console(soft_wrap=True, highlight=False)
    if settings.embedded:
        console.print(
            "[red]error:[/] cotune coordinator needs COTUNE_REDIS_URL and COTUNE_S3_ENDPOINT "
            "(and the S3 keys); `cotune up` runs everything on this machine instead"
        )
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    service = CoordinatorService(settings, workers=workers)
    code = 0
    try:
        service.start()
        console.print(f"[bold green]cotune coordinator ready[/] (pid {os.getpid()})")
        print_service(console, service, settings.home)
        console.file.flush()
        while not service.dead_parts():
            time.sleep(0.5)
        console.print(f"[red]error:[/] {', '.join(service.dead_parts())} stopped unexpectedly")
        code = 1
    except KeyboardInterrupt:
        console.print("stopping the coordinator ...")
    except (RuntimeError, OSError, ValueError) as exc:  # a taken port, unreachable services
        console.print(f"[red]error:[/] {exc}")
        code = 1
    finally:
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)
        service.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code
