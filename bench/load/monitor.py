"""CPU and memory of the processes in a load run, sampled once a second (psutil).

Groups: the coordinator under test (its process and every descendant: the API's server
processes, and in `cotune coordinator` mode Ray's), Redis, SeaweedFS, and the load
generator's processes. CPU is in percent of one core (200 = both cores of this machine);
what a group used says what limited a run.

    monitor = Monitor({"coordinator": [pid], "redis": [pid], ...})
    monitor.start(load_pids)   # the fleet's processes join as "load"
    figures = monitor.stop()   # {group: {cpu_mean_pct, cpu_max_pct, rss_max_mb}}

With `profile=True` the coordinator's processes are also sampled by py-spy meanwhile
(bench/load/profile.py); the summary is `figures["coordinator"]["profile"]`.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import psutil

from bench.load.profile import Profiler

INTERVAL_S = 1.0


class Monitor:
    def __init__(
        self,
        groups: dict[str, list[int]],
        *,
        trees: tuple[str, ...] = ("coordinator",),
        profile: bool = False,
    ):
        self.groups = {name: list(pids) for name, pids in groups.items()}
        self.trees = trees
        self.profile = profile
        self._profiler: Profiler | None = None
        self._procs: dict[int, psutil.Process] = {}
        self._cpu: dict[str, list[float]] = {}
        self._rss: dict[str, list[float]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, load_pids: list[int] | None = None) -> None:
        if load_pids:
            self.groups["load"] = list(load_pids)
        self._cpu = {name: [] for name in self.groups}
        self._rss = {name: [] for name in self.groups}
        self._stop.clear()
        self._sample()  # primes cpu_percent: its first reading of a process is 0
        if self.profile and self.groups.get("coordinator"):
            self._profiler = Profiler(self.groups["coordinator"]).start()
        self._thread = threading.Thread(target=self._loop, name="bench-monitor", daemon=True)
        self._thread.start()

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        figures: dict[str, Any] = {}
        for name in self.groups:
            cpu, rss = self._cpu[name][1:], self._rss[name]
            figures[name] = {
                "cpu_mean_pct": round(sum(cpu) / len(cpu), 1) if cpu else None,
                "cpu_max_pct": round(max(cpu), 1) if cpu else None,
                "rss_max_mb": round(max(rss), 1) if rss else None,
            }
        if self._profiler is not None and "coordinator" in figures:
            figures["coordinator"]["profile"] = self._profiler.stop()
            self._profiler = None
        return figures

    def _loop(self) -> None:
        while not self._stop.wait(INTERVAL_S):
            self._sample()

    def _sample(self) -> None:
        for name, roots in self.groups.items():
            cpu = rss = 0.0
            for proc in self._members(name, roots):
                try:
                    cpu += proc.cpu_percent(None)
                    rss += proc.memory_info().rss / 2**20
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
            self._cpu[name].append(cpu)
            self._rss[name].append(rss)

    def _members(self, name: str, roots: list[int]) -> list[psutil.Process]:
        found = []
        for pid in roots:
            proc = self._process(pid)
            if proc is None:
                continue
            found.append(proc)
            if name in self.trees:
                with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                    found.extend(self._process(c.pid) or c for c in proc.children(recursive=True))
        return found

    def _process(self, pid: int) -> psutil.Process | None:
        """The same Process object every time, so cpu_percent measures since the last call."""
        if pid not in self._procs:
            try:
                self._procs[pid] = psutil.Process(pid)
            except psutil.NoSuchProcess:
                return None
        return self._procs[pid]
