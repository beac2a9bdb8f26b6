"""Supervision of one service child process: start, wait until ready, stop, leave no orphan.

Each child runs in its own session (so its pid is its process group id and a stop reaches
every process it forked), logs to a file, and on Linux is told by the kernel to die with
the thread that started it, so a parent killed with SIGKILL leaves no service behind.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_PR_SET_PDEATHSIG = 1
_POLL_S = 0.05


class ServiceError(RuntimeError):
    """A service failed to start, answer or stop; the message says which and why."""


class ServiceExited(ServiceError):
    """A service process exited while it was being started."""

    def __init__(self, message: str, log_tail: str) -> None:
        super().__init__(message)
        self.log_tail = log_tail


@dataclass(frozen=True)
class ProcessId:
    """A process named so that a reused pid is not mistaken for it."""

    pid: int
    create_time: float

    @classmethod
    def of(cls, pid: int) -> ProcessId:
        import psutil

        return cls(pid=pid, create_time=psutil.Process(pid).create_time())

    def alive(self) -> bool:
        """True while this very process runs (not a zombie, not a newer one with its pid)."""
        import psutil

        try:
            proc = psutil.Process(self.pid)
            # create_time has clock-tick (10 ms) resolution, and a pid is not reused
            # within 10 ms, so this tells processes apart.
            same = abs(proc.create_time() - self.create_time) < 0.01
            return same and proc.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def to_json(self) -> dict[str, Any]:
        return {"pid": self.pid, "create_time": self.create_time}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ProcessId:
        return cls(pid=int(data["pid"]), create_time=float(data["create_time"]))


def stop_process_group(
    ident: ProcessId,
    grace_s: float,
    term_signal: int = signal.SIGTERM,
    reap: Callable[[], object] | None = None,
) -> None:
    """Stop a process started in its own session, and everything in its group.

    Sends `term_signal`, waits up to `grace_s`, then SIGKILL. A pid that now names another
    process is left alone. `reap` collects the exit status when the caller is the parent
    (by default `os.waitpid`, which does nothing for someone else's child).
    """
    reaper = reap or (lambda: _reap(ident.pid))
    if not ident.alive():
        reaper()
        if _pid_exists(ident.pid) or not _group_exists(ident.pid):
            return  # all gone, or the pid now names a process that is not ours
        _kill_group(ident.pid, signal.SIGKILL)  # stragglers of a leader already gone
        _wait_group_gone(ident, 5.0, reaper)
        return
    if not _group_led_by(ident.pid):
        raise ServiceError(f"process {ident.pid} does not lead its own process group: not ours")
    _kill_group(ident.pid, term_signal)
    if not _wait_group_gone(ident, grace_s, reaper):
        _kill_group(ident.pid, signal.SIGKILL)
        if not _wait_group_gone(ident, 5.0, reaper):
            raise ServiceError(f"process group {ident.pid} survived SIGKILL")


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def _group_led_by(pid: int) -> bool:
    try:
        return os.getpgid(pid) == pid
    except ProcessLookupError:
        return False


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _group_exists(pgid: int) -> bool:
    """True while a process group has a member that is not a zombie.

    Zombies count as gone: in a container whose init does not reap orphans they stay
    forever, yet they hold no port, file or memory.
    """
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    import psutil

    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, psutil.Error):
            continue
    return False


def _wait_group_gone(ident: ProcessId, timeout_s: float, reap: Callable[[], object]) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        reap()  # a dead leader that is our child stays a zombie, keeping its group, until reaped
        if not ident.alive() and not _group_exists(ident.pid):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_S)


def _die_with_parent(death_signal: int) -> Callable[[], None] | None:
    """A preexec hook asking Linux to signal the child when its parent thread exits."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    prctl = libc.prctl  # looked up before fork: the child only makes the call
    parent = os.getpid()

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, death_signal, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return hook


# Every process started here and not yet stopped; stopped at interpreter exit so that a
# test session or CLI that ends on an exception leaves nothing running.
_live: set[ManagedProcess] = set()


@atexit.register
def _stop_all_at_exit() -> None:
    for proc in list(_live):
        with contextlib.suppress(Exception):
            proc.stop()


class ManagedProcess:
    """One child process with its log file, readiness wait and clean stop.

    On Linux the child is signalled (`death_signal`) when the *thread* that called `start`
    ends, so start services from a thread that lives as long as they should (the main one).
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        *,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
        stop_grace_s: float = 5.0,
        death_signal: int = signal.SIGKILL,
        after_stop: Callable[[], None] | None = None,
    ) -> None:
        self.name = name
        self.argv = [str(a) for a in argv]
        self.log_path = log_path
        self.cwd = cwd
        self.env = dict(env) if env is not None else None
        self.stop_grace_s = stop_grace_s
        self.death_signal = death_signal
        self.after_stop = after_stop  # cleanup of what the process leaves behind
        self._popen: subprocess.Popen[bytes] | None = None
        self._ident: ProcessId | None = None
        self._log_offset = 0

    @property
    def ident(self) -> ProcessId:
        if self._ident is None:
            raise ServiceError(f"{self.name} was not started")
        return self._ident

    def start(self) -> ProcessId:
        """Launch the process (it is not ready yet: see `wait_ready`)."""
        if self._popen is not None and self._popen.poll() is None:
            raise ServiceError(f"{self.name} is already running as pid {self._popen.pid}")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            log.write(f"\n=== cotune starts {self.name}: {' '.join(self.argv)}\n".encode())
            log.flush()
            self._log_offset = log.tell()
            try:
                self._popen = subprocess.Popen(
                    self.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self.cwd,
                    env=self.env,
                    start_new_session=True,
                    # Not thread-safe in general, but the hook only calls prctl, which
                    # takes no lock; it ties the child's life to the starting thread.
                    preexec_fn=_die_with_parent(self.death_signal),
                )
            except OSError as exc:
                raise ServiceError(f"cannot start {self.name} ({self.argv[0]}): {exc}") from exc
        self._ident = ProcessId.of(self._popen.pid)
        _live.add(self)
        return self._ident

    def running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def exit_code(self) -> int | None:
        """The last run's exit status (negative: killed by that signal); None while it runs
        or before it started."""
        return None if self._popen is None else self._popen.poll()

    def wait_ready(self, check: Callable[[], bool], timeout_s: float) -> float:
        """Poll `check` until it returns True; return the seconds waited.

        Raises ServiceExited if the process dies meanwhile and ServiceError on timeout,
        both with the tail of the log.
        """
        began = time.monotonic()
        deadline = began + max(timeout_s, 0.0)
        last_error = ""
        while True:
            if self._popen is None:
                raise ServiceError(f"{self.name} was not started")
            code = self._popen.poll()
            if code is not None:
                tail = self.log_tail()
                raise ServiceExited(
                    f"{self.name} exited with code {code} while starting; "
                    f"log {self.log_path}:\n{tail}",
                    tail,
                )
            try:
                if check():
                    return time.monotonic() - began
            except Exception as exc:  # any failure of a probe just means "not ready yet"
                last_error = f"{type(exc).__name__}: {exc}"
            if time.monotonic() >= deadline:
                self.stop()
                why = f" (last probe: {last_error})" if last_error else ""
                raise ServiceError(
                    f"{self.name} did not become ready within {timeout_s:.0f} s{why}; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(_POLL_S)

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL it after the grace period, reap the child."""
        _live.discard(self)
        if self._popen is None or self._ident is None:
            return
        try:
            stop_process_group(self._ident, self.stop_grace_s, reap=self._popen.poll)
            # A killed multi-threaded leader shows as a zombie while its other threads are
            # still exiting, and cannot be reaped until they have: wait for it, so that a
            # start right after this stop does not find the old run still "running".
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._popen.wait(timeout=5.0)
        finally:
            if self.after_stop is not None:
                self.after_stop()

    def log_tail(self, lines: int = 30) -> str:
        """The last lines this run wrote to its log."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(self._log_offset)
                text = log.read().decode("utf-8", errors="replace")
        except OSError as exc:
            return f"(log unreadable: {exc})"
        return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"
