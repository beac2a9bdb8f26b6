"""`cotune worker` as a user starts it: its folders follow $COTUNE_HOME, and a coordinator
that does not answer is reported attempt by attempt until SIGTERM stops the worker cleanly."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from cotune.orchestrator.runtime.services.ports import free_port
from cotune.worker.home import cotune_home, default_models_dir, default_work_dir

COTUNE = Path(sys.executable).parent / "cotune"
RETRY_LINE = re.compile(
    r"coordinator (?P<url>\S+) unreachable \((?P<why>[^)]*)\); retrying (?P<path>\S+) "
    r"in (?P<pause>[\d.]+) s \(attempt (?P<attempt>\d+)\)"
)


def test_home_folders_follow_cotune_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("COTUNE_HOME", str(tmp_path / "home"))
    assert default_work_dir() == tmp_path / "home" / "worker"
    assert default_models_dir() == tmp_path / "home" / "models"
    monkeypatch.setenv("COTUNE_HOME", "~/elsewhere")
    assert cotune_home() == Path.home() / "elsewhere"
    monkeypatch.setenv("COTUNE_HOME", "")  # empty counts as unset
    assert default_work_dir() == Path.home() / ".cotune" / "worker"
    monkeypatch.delenv("COTUNE_HOME")
    assert default_models_dir() == Path.home() / ".cotune" / "models"


def _lines_of(stream: object, into: queue.Queue[str]) -> None:
    for line in stream:  # type: ignore[attr-defined]
        into.put(line)


@pytest.mark.skipif(not COTUNE.is_file(), reason=f"no installed console script at {COTUNE}")
def test_an_unreachable_coordinator_is_reported_each_attempt_and_sigterm_stops(
    tmp_path: Path,
) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    home = tmp_path / "home"
    env = {**os.environ, "COTUNE_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    worker = subprocess.Popen(
        [str(COTUNE), "worker", "--coordinator", url, "--join-token", "x", "--cpu"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_lines_of, args=(worker.stdout, lines), daemon=True).start()
    seen: list[str] = []
    retries: list[re.Match[str]] = []
    try:
        # Enrolling gives up after 20 s; two retry lines come within ~2 s of the first try.
        give_up = time.monotonic() + 60
        while len(retries) < 2 and time.monotonic() < give_up:
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                assert worker.poll() is None, "".join(seen)
                continue
            seen.append(line)
            if match := RETRY_LINE.search(line):
                retries.append(match)
        assert len(retries) == 2, "".join(seen)
        worker.send_signal(signal.SIGTERM)
        code = worker.wait(timeout=30)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    output = "".join(seen)
    assert code == 0, output
    assert f"work folder {home / 'worker' / 'cpu'}" in output  # the default follows the home
    for match in retries:
        assert match["url"] == url and match["why"] == "connection refused", output
        assert match["path"] == "/v1/workers/enroll"
    # One line per attempt, each naming the next: no repeats, no flood.
    assert [int(m["attempt"]) for m in retries] == [2, 3], output
