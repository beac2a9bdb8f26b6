"""`cotune worker` on a terminal: a live panel of its WorkerView, library noise into a log file.

While `LiveScreen` runs, the terminal shows one panel (redrawn 4 times a second) and the
worker's own errors above it; everything else goes to the log file (worker/home.py
`log_file`, its path in the panel):

- every log record (the agent's lines, transformers', bitsandbytes', peft's, ...), and
  `warnings` (through logging.captureWarnings);
- transformers' own stderr handler is removed (its records propagate to the file) and its
  progress bars (tqdm "Loading weights", hub downloads) are turned off;
- whatever else writes to stderr (a tqdm bar, a native library's message) or prints to
  stdout: sys.stderr, sys.stdout and file descriptor 2 point at the log file; the panel
  keeps the terminal's stdout to itself (fd 1 stays, so rich still sees its size).

Without a terminal (`--plain`, a pipe, a multi-GPU parent) none of this runs: the worker
logs one line per event as before.

    with LiveScreen(agent.view, log_file(work_dir)):
        agent.run()
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from cotune.worker.transfer import human_bytes
from cotune.worker.view import (
    Link,
    TaskState,
    ViewState,
    WorkerView,
    coordinator_state,
    stop_state,
)
from rich.console import Console, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

REFRESH_PER_S = 4
LOG_ROTATE_BYTES = 20 << 20  # a bigger log file is renamed to <name>.1 when a worker starts
# Read by tqdm and huggingface_hub when they are imported: set before they load.
PROGRESS_BARS_OFF = {"TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def quiet_progress_bars() -> None:
    """Turn off tqdm and hub progress bars in this process; call before they are imported."""
    for name, value in PROGRESS_BARS_OFF.items():
        os.environ.setdefault(name, value)


# --- the panel ----------------------------------------------------------------------------


def render(state: ViewState) -> RenderableType:
    """The panel for one snapshot of the view."""
    rows = Table.grid(padding=(0, 2))
    rows.add_column(style="bold", no_wrap=True)
    rows.add_column(overflow="fold")
    link_style = {Link.CONNECTED: "green", Link.UNREACHABLE: "red"}.get(state.link, "yellow")
    link = Text.assemble(state.coordinator, "  ", (coordinator_state(state), link_style))
    rows.add_row("coordinator", link)
    worker = Text(f"{state.worker_id or '(enrolling)'} on {state.machine}, {state.device}")
    if (stopping := stop_state(state)) is not None:
        worker.append(f"  {stopping}", style="yellow")
    rows.add_row("worker", worker)
    if state.task is None:
        rows.add_row("task", Text("none" if state.stopped else "waiting for work", style="dim"))
    else:
        _task_rows(rows, state.task, state.on_gpu)
    for transfer in state.transfers:
        done = f"{human_bytes(transfer.done)} of {human_bytes(transfer.total)}"
        rows.add_row("transfer", f"{transfer.label}: {done}")
    session = (
        f"{state.completed} done, {state.rejected} rejected, {state.failed} failed, "
        f"{state.released} given back"
    )
    rows.add_row("session", session)
    credit = Text(f"{state.credit:,.1f}", style="bold green")
    if state.uncredited:
        credit.append(
            f"  (+{state.uncredited} accepted, credited once the coordinator has checked)",
            style="dim",
        )
    rows.add_row("credit", credit)
    rows.add_row("last", Text(state.last_event or "", style="dim"))
    if state.log_file is not None:
        rows.add_row("log file", Text(str(state.log_file), style="dim"))
    return Panel(rows, title="cotune worker", title_align="left", border_style="blue")


def _task_rows(rows: Table, task: TaskState, on_gpu: bool) -> None:
    if task.job is None:
        where = f"{task.task_id}  attempt {task.attempt}"
    else:
        where = (
            f"job {task.job}  trial {task.trial}  round {task.round}  shard {task.shard}  "
            f"attempt {task.attempt}"
        )
        if task.duplicate is not None:
            where += f"  (duplicate {task.duplicate})"
    rows.add_row("task", where)
    rows.add_row("phase", task.phase)
    if task.max_steps:
        bar = Table.grid(padding=(0, 2))
        bar.add_row(
            ProgressBar(total=task.max_steps, completed=task.step, width=40),
            f"step {task.step}/{task.max_steps}",
        )
        rows.add_row("progress", bar)
    else:
        rows.add_row("progress", f"step {task.step}")
    rows.add_row("loss", f"{task.loss:.4f}" if task.loss is not None else "-")
    if task.memory_bytes:  # known from the first step on
        memory = human_bytes(task.memory_bytes) + (" GPU peak" if on_gpu else " RSS")
        rows.add_row("speed", f"{task.tokens_per_s:,.0f} tokens/s   memory {memory}")
    else:
        rows.add_row("speed", "-")


# --- the screen ---------------------------------------------------------------------------


class LiveScreen:
    """The live panel on this terminal; see the module docstring for where output goes.

    `console` (a test's) is drawn on instead of this process's stdout.
    """

    def __init__(self, view: WorkerView, log_path: Path, *, console: Console | None = None) -> None:
        self.view = view
        self.log_path = log_path
        self._console = console
        self._live: Live | None = None
        self._log: IO[str] | None = None
        self._handlers: list[logging.Handler] = []
        self._saved: dict[str, Any] = {}

    def __enter__(self) -> LiveScreen:
        log = self._log = _open_log(self.log_path)
        sys.stdout.flush()
        sys.stderr.flush()
        # The panel keeps the terminal; print(), sys.stderr and fd 2 (tqdm, native
        # libraries) go to the log. The console writes to the stdout taken before the swap.
        console = self._console or Console(file=sys.stdout)
        self._saved = {
            "stdout": sys.stdout,
            "stderr": sys.stderr,
            "stderr_fd": os.dup(2),
            "root_level": logging.getLogger().level,
        }
        os.dup2(log.fileno(), 2)
        sys.stdout = sys.stderr = log
        self._route_logging(console, log)
        self._live = Live(
            console=console,
            get_renderable=lambda: render(self.view.snapshot()),
            refresh_per_second=REFRESH_PER_S,
            transient=False,
            redirect_stdout=False,
            redirect_stderr=False,
        )
        self._live.start()
        # Redrawn at once on each milestone too: a phase that outruns the 4 Hz redraws (the
        # last steps of a short task, say) still shows on the terminal.
        self.view.on_milestone(self._redraw)
        self._saved["transformers"] = _route_transformers()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._live is not None:
            self._live.stop()  # draws the last frame, which stays on the terminal
        _restore_transformers(self._saved.get("transformers"))
        logging.captureWarnings(False)
        root = logging.getLogger()
        for handler in self._handlers:
            root.removeHandler(handler)
        root.setLevel(self._saved["root_level"])
        sys.stdout.flush()
        sys.stderr.flush()
        sys.stdout, sys.stderr = self._saved["stdout"], self._saved["stderr"]
        os.dup2(self._saved["stderr_fd"], 2)
        os.close(self._saved["stderr_fd"])
        assert self._log is not None
        self._log.close()

    def _redraw(self) -> None:
        if self._live is not None and self._live.is_started:
            self._live.refresh()

    def abandon(self) -> None:
        """Before os._exit (a second Ctrl-C): give the terminal its cursor back."""
        if self._live is not None:
            self._live.console.show_cursor(True)
            self._live.console.line()

    def _route_logging(self, console: Console, log: IO[str]) -> None:
        to_file = logging.StreamHandler(log)
        to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        ours = logging.Filter("cotune")
        last_event = self.view.event_handler()
        last_event.addFilter(ours)
        on_screen = _ScreenLines(console)
        on_screen.addFilter(ours)
        self._handlers = [to_file, last_event, on_screen]
        root = logging.getLogger()
        for handler in self._handlers:
            root.addHandler(handler)
        root.setLevel(logging.INFO)
        for noisy in ("httpx", "httpcore"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        logging.captureWarnings(True)


class _ScreenLines(logging.Handler):
    """The worker's errors, one line each above the panel (tracebacks stay in the log)."""

    def __init__(self, console: Console) -> None:
        super().__init__(logging.ERROR)
        self._console = console

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = f"{record.levelname.lower()}: {record.getMessage()}"
        except Exception:
            self.handleError(record)
            return
        self._console.print(Text(line, style="red"))


def _open_log(path: Path) -> IO[str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file() and path.stat().st_size > LOG_ROTATE_BYTES:
        path.replace(path.with_name(path.name + ".1"))
    return path.open("a", encoding="utf-8", buffering=1)


def _route_transformers() -> tuple[bool, bool] | None:
    """transformers' records to the root logger (the file), its progress bars off; what
    was on before, for `_restore_transformers`. None when transformers is not installed."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return None
    hf_logging.disable_default_handler()  # configures its logger first: `before` is real
    before = (logging.getLogger("transformers").propagate, hf_logging.is_progress_bar_enabled())
    hf_logging.enable_propagation()
    hf_logging.disable_progress_bar()
    return before


def _restore_transformers(before: tuple[bool, bool] | None) -> None:
    if before is None:
        return
    from transformers.utils import logging as hf_logging

    propagate, bars = before
    hf_logging.enable_default_handler()
    if not propagate:
        hf_logging.disable_propagation()
    if bars:
        hf_logging.enable_progress_bar()
