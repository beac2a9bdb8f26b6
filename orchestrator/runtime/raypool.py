"""The Ray pool: trusted merge and evaluation as Ray tasks, cluster workers as Ray actors.

The coordinator connects to the Ray cluster at RAY_ADDRESS, or starts a local one (its
resources logical: enough CPUs for the local workers plus the merges). On it:

- merge + evaluate of a round (`submit_merge`) and other trusted calls (`submit_call`, the
  base model's evaluation) run as Ray tasks, on a GPU where the cluster has one; calls that
  need no GPU (`submit_cpu_call`: staging and sharding a job's inputs) as Ray tasks on one
  CPU, so they never wait for a GPU. With a local Ray they run on the coordinator's machine
  and read its disk; on a cluster reached as a Ray client they run on a cluster node;
- cluster worker agents run as Ray actors, each asking for one GPU (or one CPU in CPU
  mode), so Ray places them and an autoscaler sees the demand. An actor runs the same
  `cotune worker` a volunteer runs, as a subprocess tied to the actor's life, enrolled with
  a join token of kind "cluster" that the coordinator issued itself: cluster workers and
  volunteers speak one protocol, and the worker role never imports the coordinator.
  `follow_queue` keeps their number at the work there is (queued + leased tasks), up to
  `max_agents`, and stops them all once no work has been seen for `idle_grace_s`.

Volunteers never join Ray (Ray assumes a trusted network): they reach only the HTTP API
and presigned S3 URLs.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cotune.orchestrator.pipeline.roundmerge import MergeOutcome, MergeRequest, merge_and_evaluate

log = logging.getLogger(__name__)

LOCAL_OBJECT_STORE_BYTES = 128 << 20  # merges pass small dataclasses, not tensors


@dataclass(frozen=True)
class AgentLaunch:
    """How cluster worker agents start: the API they enroll with and where they work."""

    coordinator_url: str
    join_token: str
    home: Path  # COTUNE_HOME of the agents: their base-model cache is <home>/models
    max_agents: int
    idle_grace_s: float = 60.0


class _Agent:
    """A Ray actor running one `cotune worker` process (tied to the actor's life)."""

    def __init__(self, argv: list[str], env: dict[str, str], log_path: str) -> None:
        import signal

        from cotune.orchestrator.runtime.services.process import ManagedProcess

        # This node's interpreter, not the coordinator's: on a cluster the two run different
        # images (the coordinator's slim one, the Ray pods' CUDA one) with Python elsewhere.
        self.proc = ManagedProcess(
            "cotune worker",
            [sys.executable, *argv],
            Path(log_path),
            env={**os.environ, **env},
            stop_grace_s=60.0,  # time to upload a checkpoint and give the lease back
            death_signal=signal.SIGKILL,
        )
        self.proc.start()

    def alive(self) -> bool:
        return self.proc.running()

    def stop(self) -> None:
        self.proc.stop()


LOOPBACK = "127.0.0.1"


def _keep_loopback() -> None:
    """Make a local Ray listen on loopback only.

    Ray 2.60 binds its gRPC servers (GCS, raylet, workers, agents) to the node's IP and, for
    a node IP of 127.0.0.1, to loopback alone; but `ray.init` first turns a loopback
    `_node_ip_address` into the machine's reachable IP (`services.resolve_ip_for_localhost`),
    so a local Ray listens on every interface. A local Ray serves this machine only (the
    embedded stack, the tests), so the conversion is switched off here; a cluster's Ray
    (RAY_ADDRESS) is not touched. tests/security/test_loopback.py lists the sockets.
    """
    import ray._private.services as services

    services.resolve_ip_for_localhost = lambda host: host


class RayPool:
    """Connects to Ray once; see the module docstring."""

    def __init__(self, *, gpus: float, launch: AgentLaunch | None = None) -> None:
        self.gpus = gpus
        self.launch = launch
        self._agents: list[Any] = []
        self._started = 0
        self._last_work = time.monotonic()
        self._last_reap = 0.0

    @classmethod
    def connect(
        cls,
        address: str | None,
        *,
        launch: AgentLaunch | None = None,
        num_cpus: int | None = None,
        gpus: float | None = None,
    ) -> RayPool:
        """Join the cluster at `address`, or start a local Ray (reused if this process
        already runs one, as the tests do).

        `gpus`: the GPUs the cluster can scale to (COTUNE_RAY_GPUS), when more than it has
        now: an autoscaled GPU group starts at none, and only work that asks for a GPU
        makes the autoscaler add one."""
        import signal
        import threading

        import ray

        # ray.init replaces SIGTERM's handler with sys.exit; the coordinator keeps its own,
        # so that `cotune up` still stops its parts in order.
        main = threading.current_thread() is threading.main_thread()
        sigterm = signal.getsignal(signal.SIGTERM) if main else None
        if not ray.is_initialized():
            if address:
                ray.init(address=address, namespace="cotune", log_to_driver=False)
            else:
                agents = launch.max_agents if launch else 0
                _keep_loopback()
                ray.init(
                    _node_ip_address=LOOPBACK,
                    num_cpus=num_cpus or max(os.cpu_count() or 1, agents + 2),
                    include_dashboard=False,
                    object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                    namespace="cotune",
                    log_to_driver=False,
                )
        if sigterm is not None:
            signal.signal(signal.SIGTERM, sigterm)
        present = float(ray.cluster_resources().get("GPU", 0.0))
        return cls(gpus=max(present, gpus or 0.0), launch=launch)

    # --- trusted work ---------------------------------------------------------------------

    def _options(self, *, gpu: bool = True) -> dict[str, Any]:
        gpus = 1 if gpu and self.gpus >= 1 else 0
        return {"num_cpus": 1, "num_gpus": gpus, "max_retries": 1}

    def submit_merge(self, request: MergeRequest) -> Any:
        import ray

        task = ray.remote(merge_and_evaluate).options(**self._options())
        return task.remote(request)

    def submit_call(self, fn: Callable[..., Any], *args: Any) -> Any:
        import ray

        return ray.remote(fn).options(**self._options()).remote(*args)

    def submit_cpu_call(self, fn: Callable[..., Any], *args: Any) -> Any:
        import ray

        return ray.remote(fn).options(**self._options(gpu=False)).remote(*args)

    def poll(self, handle: Any) -> tuple[bool, Any, BaseException | None]:
        """(done, value, error) of submitted work, without waiting."""
        import ray

        ready, _ = ray.wait([handle], timeout=0)
        if not ready:
            return False, None, None
        try:
            value = ray.get(handle)
        except Exception as exc:  # the task's own error, or Ray's (a worker that died)
            return True, None, getattr(exc, "cause", None) or exc
        return True, value, None

    def wait(self, handle: Any, timeout_s: float) -> MergeOutcome | Any:
        """Block until the work is done (tests and the CLI); its value or its error."""
        import ray

        return ray.get(handle, timeout=timeout_s)

    # --- cluster worker agents ------------------------------------------------------------

    def follow_queue(self, demand: int) -> None:
        """Start agents while there is more work than agents (up to max_agents); stop them
        all once no work has been seen for idle_grace_s."""
        launch = self.launch
        if launch is None or launch.max_agents <= 0:
            return
        now = time.monotonic()
        if now - self._last_reap > 5.0:
            self._reap()
            self._last_reap = now
        if demand > 0:
            self._last_work = now
        want = min(self.agent_cap(), demand)
        while len(self._agents) < want:
            self._agents.append(self._start_agent(launch))
        if demand == 0 and self._agents and now - self._last_work > launch.idle_grace_s:
            log.info(
                "no work for %.0f s: stopping %d worker(s)", launch.idle_grace_s, len(self._agents)
            )
            self.stop_agents()

    def agent_cap(self) -> int:
        """At most max_agents; on a cluster with several GPUs one is left for the merges'
        evaluation (with one GPU, the idle stop frees it)."""
        cap = self.launch.max_agents if self.launch is not None else 0
        return min(cap, int(self.gpus) - 1) if self.gpus > 1 else cap

    def _start_agent(self, launch: AgentLaunch) -> Any:
        import ray

        self._started += 1
        name = f"agent-{self._started}"
        work_dir = launch.home / "workers" / name
        argv = ["-m", "cotune.orchestrator", "worker"]
        argv += ["--coordinator", launch.coordinator_url, "--join-token", launch.join_token]
        argv += ["--work-dir", str(work_dir)]
        resources: dict[str, Any] = {"num_cpus": 1}
        if self.gpus >= 1:
            resources["num_gpus"] = 1
        else:
            argv.append("--cpu")
        env = {"COTUNE_HOME": str(launch.home), "PYTHONUNBUFFERED": "1"}
        log_path = str(launch.home / "logs" / f"{name}.log")
        actor = ray.remote(_Agent).options(**resources).remote(argv, env, log_path)
        log.info("started cluster worker %s (log %s)", name, log_path)
        return actor

    def _reap(self) -> None:
        """Forget agents whose actor or process is gone (they restart with demand)."""
        import ray

        kept = []
        for actor in self._agents:
            try:
                if ray.get(actor.alive.remote(), timeout=10):
                    kept.append(actor)
                    continue
            except Exception:
                pass  # the actor died (its node went away): forget it
            ray.kill(actor)
        self._agents = kept

    def stop_agents(self) -> None:
        """Stop every agent: SIGTERM lets each upload a checkpoint and give its lease back."""
        import ray

        agents, self._agents = self._agents, []
        stops = [actor.stop.remote() for actor in agents]
        if stops:
            ray.wait(stops, num_returns=len(stops), timeout=90)
        for actor in agents:
            ray.kill(actor)

    def close(self, *, shutdown: bool = False) -> None:
        """Stop the agents; with `shutdown`, disconnect from Ray (a local Ray stops)."""
        self.stop_agents()
        if shutdown:
            import ray

            ray.shutdown()
