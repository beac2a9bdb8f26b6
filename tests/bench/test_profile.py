"""The load benchmarks' profiler (bench/load/profile.py): py-spy on a real process, and the
summary it makes of collapsed stacks."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest

from bench.load.profile import Profiler, profile_lines, py_spy, summarize

# One thread spins in `spin`, another sleeps, a third blocks in a socket read (as an event
# loop blocked on a Redis round trip does): only the first is running.
PROGRAM = textwrap.dedent(
    """
    import socket, threading, time
    a, b = socket.socketpair()
    def sleeper():
        time.sleep(60)
    def read_response():
        a.recv(1)
    def spin():
        x = 0
        while True:
            x += 1
    threading.Thread(target=sleeper, name="sleeper", daemon=True).start()
    threading.Thread(target=read_response, name="reader", daemon=True).start()
    print("ready", flush=True)
    spin()
    """
)


def test_summary_gives_each_threads_busy_share_and_where_the_time_goes() -> None:
    head = 'process 1:"python x";thread (10): MainThread;<module> (a.py:1);serve (b.py:3);'
    pool = 'process 1:"python x";thread (11): pool;<module> (a.py:1);serve (b.py:3);'
    lines = [
        head + "work (c.py:9) 60",
        head + "parse (d.py:4) 20",
        pool + "WorkerThread.run (x.py:2);work (c.py:9) 20",
        "not a stack line",
    ]
    got = summarize(lines, seconds=2.0)  # 2 s at 47 Hz: 94 samples a thread that never waits
    assert got["samples"] == 100
    assert got["threads"]["MainThread"] == {"samples": 80, "busy_pct": 85.1}
    assert got["threads"]["pool"] == {"samples": 20, "busy_pct": 21.3}
    assert got["self"] == [["work (c.py)", 80.0], ["parse (d.py)", 20.0]]
    # `serve` and `<module>` are on every stack, `WorkerThread.run` on every one of its
    # thread's: they say nothing, so they are left out.
    assert [name for name, _ in got["total"]] == ["work (c.py)", "parse (d.py)"]
    shown = "\n".join(profile_lines(got))
    assert "MainThread busy 85%" in shown and "self   80.0%  work (c.py)" in shown


def test_threads_of_several_processes_are_told_apart() -> None:
    lines = [
        'process 1:"a";thread (10): MainThread;serve (b.py:3) 10',
        'process 2:"a";thread (20): MainThread;serve (b.py:3) 30',
    ]
    assert set(summarize(lines, seconds=1.0)["threads"]) == {"MainThread@1", "MainThread@2"}


@pytest.mark.skipif(py_spy() is None, reason="py-spy is not installed (the dev extra has it)")
def test_py_spy_profiles_a_running_process() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", PROGRAM], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == b"ready"
        profiler = Profiler([child.pid]).start()
        time.sleep(2.0)
        got = profiler.stop()
    finally:
        child.kill()
        child.wait()
    assert "note" not in got, got
    threads = got["threads"]
    assert threads["MainThread"]["busy_pct"] > 80
    assert got["self"][0] == ["spin (<string>)", pytest.approx(got["self"][0][1])]
    assert got["self"][0][1] > 80
    # A sleeping thread and one blocked in a socket read are waiting, not running.
    assert threads.get("sleeper", {"busy_pct": 0.0})["busy_pct"] < 5
    assert threads.get("reader", {"busy_pct": 0.0})["busy_pct"] < 5
