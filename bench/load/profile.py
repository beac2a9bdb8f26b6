"""A sampling profile of the coordinator under test during a load run (py-spy, from the
dev extra), so that each benchmark shows what bounds it, not only by how much it missed.

py-spy samples the coordinator's process and its children (`--subprocesses`: the API's
server processes) without pausing them (`--nonblocking`), every thread, and writes the
collapsed stacks of the samples in which a thread was running (py-spy leaves out a thread
that the OS shows waiting: on its selector, a lock, a sleep or a socket read such as a Redis
round trip). `summarize` reads them back:

- `threads`: each thread's running samples and `busy_pct`, their share of the samples taken
  in the recording's length (`RATE_HZ` a second). An API thread busy near 100% is saturated
  (its CPU is the bound); well below while requests queue, it waits on something else, such
  as Redis round trips made on its event loop;
- `self` and `total`: the functions with most of the running samples, innermost frame only
  (where the time goes) and anywhere on the stack (what it is spent for), in percent of all
  running samples. Frames on nearly every stack of their threads (a thread's bootstrap, the
  server's loop) are left out of `total`: they say nothing.

    profiler = Profiler([pid]).start()   # where py-spy is missing, stop() says so in `note`
    ... the load ...
    summary = profiler.stop()            # the dict above; {} if py-spy recorded nothing
"""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

RATE_HZ = 47  # samples a second a thread: off any periodic timer's beat
SHOWN = 12
_FRAME = re.compile(r"^(?P<fn>.+?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def py_spy() -> str | None:
    """The py-spy beside this interpreter, else on PATH; None where it is not installed."""
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


class Profiler:
    """py-spy recording `pids` (and their children) until `stop`."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.note: str | None = None
        self._procs: list[subprocess.Popen[bytes]] = []
        self._files: list[Path] = []
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._began = 0.0

    def start(self) -> Profiler:
        exe = py_spy()
        if exe is None:
            self.note = "py-spy is not installed (pip install -e '.[dev]'): no profile"
            return self
        self._dir = tempfile.TemporaryDirectory(prefix="cotune-bench-profile-")
        self._began = time.monotonic()
        for pid in self.pids:
            out = Path(self._dir.name) / f"{pid}.txt"
            self._files.append(out)
            self._procs.append(
                subprocess.Popen(
                    [
                        *(exe, "record", "--pid", str(pid), "--subprocesses", "--threads"),
                        *("--nonblocking", "--rate", str(RATE_HZ)),
                        *("--format", "raw", "--output", str(out)),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    stdin=subprocess.DEVNULL,
                )
            )
        return self

    def stop(self) -> dict[str, Any]:
        seconds = time.monotonic() - self._began
        errors = []
        for proc in self._procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
            try:
                _, err = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
            if proc.returncode not in (0, -signal.SIGINT) and err:
                errors.append(err.decode(errors="replace").strip()[-300:])
        lines: list[str] = []
        for path in self._files:
            with contextlib.suppress(OSError):
                lines += path.read_text(errors="replace").splitlines()
        if self._dir is not None:
            self._dir.cleanup()
        summary = summarize(lines, seconds) if lines else {}
        if self.note or (errors and not summary):
            summary["note"] = self.note or "; ".join(errors)
        return summary


def _frames(stack: str) -> tuple[str, list[str]]:
    """(thread, frames outermost first) of one collapsed stack; the thread is its name, with
    its process's id where py-spy followed several processes."""
    process, thread, frames = "", "?", []
    for part in stack.split(";"):
        if part.startswith("process "):
            process = part[len("process ") :].split(":", 1)[0]  # process <pid>:"<command>"
            continue
        if part.startswith("thread ("):
            thread = part.split(": ", 1)[1] if ": " in part else part
            continue
        frames.append(_short(part))
    return (f"{thread}@{process}" if process else thread), frames


def _short(frame: str) -> str:
    """`fn (module.py)`: the file's name only, no line (one entry per function)."""
    m = _FRAME.match(frame)
    if not m:
        return frame
    return f"{m['fn']} ({Path(m['file']).name})" if m["file"] else m["fn"]


def summarize(lines: list[str], seconds: float) -> dict[str, Any]:
    """The module docstring's summary of py-spy's collapsed stacks (`stack count` lines)
    recorded over `seconds`."""
    threads: Counter[str] = Counter()
    leaf: Counter[str] = Counter()
    total: Counter[str] = Counter()
    where: dict[str, set[str]] = {}  # frame -> the threads it was seen on
    for line in lines:
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        thread, frames = _frames(stack)
        threads[thread] += count
        if frames:
            leaf[frames[-1]] += count
            for frame in set(frames):
                total[frame] += count
                where.setdefault(frame, set()).add(thread)
    samples = sum(threads.values())
    # A frame on (nearly) every stack of the threads it is seen on (a thread's bootstrap, the
    # server's loop) says nothing of where their time goes.
    informative = Counter(
        {f: n for f, n in total.items() if n < 0.95 * sum(threads[t] for t in where[f])}
    )
    if len({t.split("@", 1)[1] for t in threads if "@" in t}) == 1:
        threads = Counter({t.split("@", 1)[0]: n for t, n in threads.items()})  # one process
    expected = max(seconds * RATE_HZ, 1.0)

    def pct(counter: Counter[str]) -> list[list[Any]]:
        return [[name, round(100.0 * n / samples, 1)] for name, n in counter.most_common(SHOWN)]

    return {
        "rate_hz": RATE_HZ,
        "seconds": round(seconds, 1),
        "samples": samples,
        "threads": {
            name: {"samples": n, "busy_pct": round(min(100.0, 100.0 * n / expected), 1)}
            for name, n in threads.most_common(8)
        },
        "self": pct(leaf) if samples else [],
        "total": pct(informative) if samples else [],
    }


def profile_lines(summary: dict[str, Any], indent: str = "    ", shown: int = 6) -> list[str]:
    """A few lines for a benchmark's table: busy threads, then where the time goes."""
    if not summary:
        return []
    if "samples" not in summary:
        return [f"{indent}profile: {summary.get('note', 'none')}"]
    threads = ", ".join(
        f"{name} busy {t['busy_pct']:.0f}%"
        for name, t in summary["threads"].items()
        if t["busy_pct"] >= 5
    )
    out = [
        f"{indent}profile over {summary['seconds']:.0f} s ({summary['samples']:,} running "
        f"samples; {threads or 'every thread under 5% busy'}):"
    ]
    out += [f"{indent}  self  {p:5.1f}%  {name}" for name, p in summary["self"][:shown]]
    out += [f"{indent}  total {p:5.1f}%  {name}" for name, p in summary["total"][:shown]]
    return out
