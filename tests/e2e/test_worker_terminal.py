"""`cotune worker` on a terminal: the live view, and library noise kept in the log file.

A real coordinator (the session's Redis, SeaweedFS and Ray) offers one tiny task; the
worker runs under a pseudo-terminal, as a volunteer starts it in a shell, and trains it.
The screen is what the terminal received; the log file is <work folder>/worker.log. And
with no coordinator to reach, the view says so, and Ctrl-C stops the worker cleanly.
"""

from __future__ import annotations

import fcntl
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from cotune.orchestrator.cli.client import CotuneClient
from cotune.orchestrator.runtime.coordinator import CoordinatorService
from cotune.orchestrator.runtime.services.ports import free_port

from tests.e2e.sweep_stack import ROOT, service_settings, write_spec

pytestmark = pytest.mark.e2e

ROWS, COLUMNS = 40, 120
# Colours, cursor moves, line erases, cursor hiding: what a redrawn rich Live sends.
ESCAPES = re.compile(r"\x1b(\[[0-9;?]*[A-Za-z]|\][^\x07]*\x07|[()][A-Za-z0-9])")
# What the libraries print when nothing catches it: transformers' handler, tqdm bars
# ("Loading weights: 100%|...|"), Python warnings, hub downloads.
NOISE = re.compile(r"\[transformers\]|Loading weights|\d+%\|| \w*Warning: |it/s\]")


class Terminal:
    """`argv` run with a pseudo-terminal of ROWS x COLUMNS as stdin, stdout and stderr."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self._controller, terminal = os.openpty()
        fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLUMNS, 0, 0))
        self.proc = subprocess.Popen(
            argv, stdin=terminal, stdout=terminal, stderr=terminal, cwd=ROOT, env=env
        )
        os.close(terminal)
        self.received = bytearray()
        self._open = True

    @property
    def screen(self) -> str:
        """Everything the terminal got, escape codes removed (every frame, in order)."""
        return ESCAPES.sub("", self.received.decode("utf-8", "replace")).replace("\r", "")

    def read_until(self, text: str | None, timeout_s: float) -> None:
        """Read until `text` is on the screen (None: until the program exits)."""
        give_up_at = time.monotonic() + timeout_s
        while self._open and (text is None or text not in self.screen):
            if time.monotonic() > give_up_at:
                pytest.fail(f"not on the screen within {timeout_s:.0f} s: {text}\n{self.screen}")
            ready, _, _ = select.select([self._controller], [], [], 0.5)
            if not ready:
                self._open = self.proc.poll() is None
                continue
            try:
                chunk = os.read(self._controller, 1 << 16)
            except OSError:  # EIO: every copy of the terminal's other end is closed
                chunk = b""
            self.received += chunk
            self._open = bool(chunk)
        if text is not None and text not in self.screen:
            pytest.fail(f"the program exited without showing {text}:\n{self.screen}")

    def wait(self, timeout_s: float) -> int:
        self.read_until(None, timeout_s)
        return self.proc.wait(30)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self._controller)


def worker_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COTUNE_")}
    env.update(COTUNE_HOME=str(home), TERM="xterm-256color")
    for name in ("COLUMNS", "LINES", "TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS"):
        env.pop(name, None)  # the worker sets what it needs itself
    return env


WORKER = [sys.executable, "-m", "cotune.orchestrator", "worker", "--cpu"]


@pytest.mark.slow
@pytest.mark.integration
def test_on_a_terminal_the_worker_shows_step_loss_and_credit_and_logs_the_rest(
    tmp_path: Path,
    redis_server: str,
    s3_server: Any,
    ray_cluster: str,
    alpaca_dataset: Path,
) -> None:
    home = tmp_path / "home"
    settings = service_settings(home, redis_server, s3_server)
    spec = write_spec(
        tmp_path,
        alpaca_dataset,
        name="e2e-terminal",
        rounds=1,
        training={"max_steps": 6, "checkpoint_steps": 3},
    )
    one_shard = yaml.safe_load(spec.read_text())
    one_shard["dataset"]["shards"] = 1  # one task in all
    spec.write_text(yaml.safe_dump(one_shard, sort_keys=False))
    work_dir = tmp_path / "volunteer" / "worker"
    with (
        CoordinatorService(settings, workers=0, api_port=0) as service,
        CotuneClient(service.url, service.admin_token) as client,
    ):
        # A cluster token: its results are credited at completion (a volunteer's wait for
        # the heavy checks), so the credit on the screen is the coordinator's number.
        token = client.create_join_token("terminal", kind="cluster").token
        client.submit(spec)
        argv = [*WORKER, "--once", "--coordinator", service.url, "--join-token", token]
        argv += ["--wait", "120", "--work-dir", str(work_dir)]
        terminal = Terminal(argv, worker_env(tmp_path / "volunteer"))
        try:
            code = terminal.wait(420)
        finally:
            terminal.close()
        screen = terminal.screen
        # The session's Redis holds other tests' workers too: this one is the token's.
        [worker] = [w for w in client.workers() if w.name == "terminal"]

    log = (work_dir / "cpu" / "worker.log").read_text(errors="replace")  # --cpu: its folder
    assert code == 0, f"{screen}\n--- worker.log\n{log[-4000:]}"
    assert worker.tasks_accepted == 1 and worker.tokens > 0
    # The live view: its frames show each step of the task, with its loss ...
    assert "cotune worker" in screen and "job e2e-terminal-" in screen
    assert "trial 0  round 0  shard 0  attempt 1" in screen
    assert "step 6/6" in screen, screen  # earlier steps too, unless they outran the redraws
    assert re.search(r"loss\s+\d+\.\d{4}", screen), screen
    assert re.search(r"[\d,]+ tokens/s\s+memory [\d.]+ [KMG]iB RSS", screen), screen
    # ... and its last frame stays: the task done, the coordinator's credit, the log file.
    last = screen[screen.rindex("cotune worker") :]
    assert "stopped" in last and "1 done, 0 rejected, 0 failed" in last, last
    assert f"{worker.tokens:,.1f}" in last, last
    assert "worker.log" in last
    # No library output reached the terminal; the log file has the whole story, with any
    # warning the libraries gave (transformers' deprecation FutureWarnings, today).
    assert not NOISE.search(screen), NOISE.search(screen)
    for warning in re.findall(r"py\.warnings: .*?: (\w*Warning: [^\n]{1,60})", log):
        assert warning not in screen, warning
    assert "enrolled with" in log and "training on CPU" in log
    assert re.search(r"task e2e-terminal-\S+ accepted, credit [\d.]+", log), log


def test_on_a_terminal_an_unreachable_coordinator_shows_as_retrying_and_ctrl_c_stops(
    tmp_path: Path,
) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    argv = [*WORKER, "--coordinator", url, "--join-token", "x"]
    terminal = Terminal(argv, worker_env(tmp_path / "home"))
    try:
        terminal.read_until("unreachable (connection refused), retrying", 60)
        terminal.proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        code = terminal.wait(60)
    finally:
        terminal.close()
    screen = terminal.screen
    assert code == 0, screen
    last = screen[screen.rindex("cotune worker") :]
    assert "(enrolling)" in last and "stopped" in last, last
    assert b"\x1b[?25h" in terminal.received  # the cursor, hidden under the panel, is back
    log = (tmp_path / "home" / "worker" / "cpu" / "worker.log").read_text()
    assert re.search(r"WARNING cotune.worker.client: coordinator \S+ unreachable", log), log
    assert "SIGINT: finishing the current step" in log
