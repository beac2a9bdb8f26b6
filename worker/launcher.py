"""`cotune worker`: checks the flags, finds the devices, runs one agent per GPU.

One GPU (or the CPU): the agent runs in this process. Several GPUs: one child process per
GPU, each pinned with CUDA_VISIBLE_DEVICES; the children run in their own sessions so a
terminal's Ctrl-C reaches only this parent, which passes each signal on once (a child's
second signal means "quit now", so it must not get the terminal's copy and ours).

Signals in an agent process: the first SIGTERM / SIGINT finishes the current step, uploads
a checkpoint, gives the lease back and exits 0; a second one exits at once (130).

What the terminal shows: with stdout on a terminal, one agent in this process and no
`--plain`, a live panel (worker/live.py) with library output sent to <work folder>/worker.log;
otherwise one log line per event on stderr (a multi-GPU parent and its children always log
lines).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from cotune.worker.agent import EXIT_OK, EXIT_USAGE, Agent, AgentConfig
from cotune.worker.client import check_coordinator_url
from cotune.worker.hardware import Hardware
from cotune.worker.home import default_work_dir

log = logging.getLogger("cotune.worker")

GIB = 1 << 30
# The variable CUDA reads to choose the devices a process sees (not a cotune setting).
CUDA_DEVICES_ENV = "CUDA_VISIBLE_DEVICES"


class UsageError(ValueError):
    """A flag that cannot work; the message names it."""


@dataclass(frozen=True)
class WorkerOptions:
    coordinator: str
    join_token: str
    gpus: str | None = None
    max_memory_gb: float | None = None
    cpu: bool = False
    once: bool = False
    wait_s: float = 300.0
    work_dir: Path | None = None  # [default: <COTUNE_HOME or ~/.cotune>/worker]
    agent_process: bool = False  # a child of a multi-GPU parent: plain logs, work_dir as given
    plain: bool = False  # log lines even on a terminal (no live panel)


def worker_command(options: WorkerOptions) -> int:
    """Run `cotune worker`; returns the exit code (see worker.agent EXIT_*)."""
    work_dir = (options.work_dir or default_work_dir()).expanduser()
    try:
        gpus = _check(options)
        masks = [_physical(gpu) for gpu in gpus or []]
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if options.agent_process:
        return _run_agent(options, work_dir)  # the parent pinned this process's device
    if options.cpu:
        os.environ[CUDA_DEVICES_ENV] = ""  # before torch loads: training then runs on CPU
        return _run_agent(options, work_dir / "cpu")
    if gpus is None:
        count = _cuda_device_count()
        gpus, masks = list(range(count)), [_physical(gpu) for gpu in range(count)]
    if len(gpus) > 1:
        return _supervise(options, dict(zip(gpus, masks, strict=True)), work_dir)
    if gpus:
        os.environ[CUDA_DEVICES_ENV] = masks[0]  # pinned before torch loads
        return _run_agent(options, work_dir / f"gpu{gpus[0]}")
    return _run_agent(options, work_dir / "cpu")


def _check(options: WorkerOptions) -> list[int] | None:
    try:
        check_coordinator_url(options.coordinator)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if not options.join_token.strip():
        raise UsageError("--join-token is empty: ask the coordinator's operator for one")
    if options.max_memory_gb is not None and options.max_memory_gb <= 0:
        raise UsageError(f"--max-memory-gb must be positive, got {options.max_memory_gb}")
    if options.wait_s < 0:
        raise UsageError(f"--wait must be >= 0 seconds, got {options.wait_s}")
    if options.gpus is None:
        return None
    if options.cpu:
        raise UsageError("--cpu and --gpus exclude each other: pick one")
    try:
        gpus = [int(part) for part in options.gpus.split(",")]
    except ValueError:
        raise UsageError(f"--gpus {options.gpus!r}: give device indexes such as 0 or 0,1") from None
    if any(g < 0 for g in gpus) or len(set(gpus)) != len(gpus):
        raise UsageError(f"--gpus {options.gpus!r}: indexes must be distinct and >= 0")
    return gpus


def _physical(index: int) -> str:
    """The CUDA_VISIBLE_DEVICES entry for visible device `index`, under any existing mask."""
    mask = os.environ.get(CUDA_DEVICES_ENV)
    if not mask:
        return str(index)
    entries = [e.strip() for e in mask.split(",") if e.strip()]
    if index >= len(entries):
        raise UsageError(f"--gpus {index}: {CUDA_DEVICES_ENV}={mask} shows {len(entries)} devices")
    return entries[index]


def _cuda_device_count() -> int:
    import torch

    # device_count asks NVML and creates no CUDA context in this (parent) process.
    return int(torch.cuda.device_count())


def _run_agent(options: WorkerOptions, work_dir: Path) -> int:
    from cotune.worker.hardware import detect_hardware
    from cotune.worker.transfer import LogLines, RichBars, TransferDisplay
    from rich.console import Console

    live = _wants_live(options)
    if live:
        from cotune.worker.live import quiet_progress_bars

        quiet_progress_bars()  # before torch, transformers or the hub load tqdm
    console = Console(stderr=True)
    tty = console.is_terminal and not options.agent_process
    if not live:
        _configure_logging(console if tty else None, _log_prefix(options, work_dir))
    hardware = detect_hardware()
    if options.gpus is not None and not options.cpu and not hardware.devices:
        which = (
            f"GPU {os.environ.get(CUDA_DEVICES_ENV)}"
            if options.agent_process
            else f"--gpus {options.gpus}"
        )
        print(f"error: {which}: no such CUDA device here", file=sys.stderr)
        return EXIT_USAGE
    config = AgentConfig(
        coordinator=options.coordinator,
        join_token=options.join_token,
        work_dir=work_dir,
        once=options.once,
        wait_for_work_s=options.wait_s,
        max_memory_bytes=int(options.max_memory_gb * GIB) if options.max_memory_gb else None,
    )
    if live:
        return _run_live(config, hardware, work_dir)
    log.info("training on %s; work folder %s", hardware.label, work_dir)
    display: TransferDisplay = RichBars(console) if tty else LogLines()
    agent = Agent(config, hardware, display=display)
    _install_signals(agent)
    try:
        return agent.run()
    finally:
        agent.close()


def _wants_live(options: WorkerOptions) -> bool:
    """The live panel: stdout is a terminal, no --plain, and logging is ours to set up."""
    return (
        sys.stdout.isatty()
        and not options.plain
        and not options.agent_process
        and not logging.getLogger().handlers  # embedded in a program that set up logging
    )


def _run_live(config: AgentConfig, hardware: Hardware, work_dir: Path) -> int:
    from cotune.worker.home import log_file
    from cotune.worker.live import LiveScreen
    from cotune.worker.view import WorkerView

    view = WorkerView(config.coordinator, hardware, log_file=log_file(work_dir))
    agent = Agent(config, hardware, display=view, view=view)
    with LiveScreen(view, log_file(work_dir)) as screen:
        _install_signals(agent, before_exit=screen.abandon)
        log.info("training on %s; work folder %s", hardware.label, work_dir)
        try:
            return agent.run()
        finally:
            view.stopped()  # the panel's last frame stays on the terminal
            agent.close()


def _install_signals(agent: Agent, before_exit: Callable[[], None] | None = None) -> None:
    received = 0

    def handle(signum: int, frame: FrameType | None) -> None:
        nonlocal received
        received += 1
        if received > 1:
            if before_exit is not None:
                before_exit()
            os._exit(128 + signal.SIGINT)
        log.warning(
            "%s: finishing the current step, uploading a checkpoint and giving the task "
            "back (press Ctrl-C again to quit at once)",
            signal.Signals(signum).name,
        )
        agent.request_stop()

    signal.signal(signal.SIGINT, handle)
    signal.signal(signal.SIGTERM, handle)


def _supervise(options: WorkerOptions, gpus: dict[int, str], work_dir: Path) -> int:
    """One child agent per GPU (`gpus`: index -> CUDA_VISIBLE_DEVICES entry); waits for all."""
    _configure_logging(None, _log_prefix(options, work_dir))
    children: dict[int, subprocess.Popen[bytes]] = {}
    for gpu, mask in gpus.items():
        argv = [
            sys.executable,
            "-c",
            "from cotune.orchestrator.cli.app import main; main()",
            "worker",
            "--coordinator",
            options.coordinator,
            "--join-token",
            options.join_token,
            "--gpus",
            "0",
            "--work-dir",
            str(work_dir / f"gpu{gpu}"),
            "--wait",
            str(options.wait_s),
            "--agent-process",
        ]
        if options.once:
            argv.append("--once")
        if options.max_memory_gb is not None:
            argv += ["--max-memory-gb", str(options.max_memory_gb)]
        env = {**os.environ, CUDA_DEVICES_ENV: mask}
        children[gpu] = subprocess.Popen(argv, env=env, start_new_session=True)
        log.info("agent for GPU %d started (pid %d)", gpu, children[gpu].pid)

    def forward(signum: int, frame: FrameType | None) -> None:
        for child in children.values():
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    codes = {gpu: child.wait() for gpu, child in children.items()}
    failed = {gpu: code for gpu, code in codes.items() if code != EXIT_OK}
    for gpu, code in failed.items():
        log.error("agent for GPU %d exited with %d", gpu, code)
    return max(failed.values(), default=EXIT_OK)


def _log_prefix(options: WorkerOptions, work_dir: Path) -> str:
    """A multi-GPU parent's children tag their lines with their folder (gpu0, gpu1, ...)."""
    return f"[{work_dir.name}] " if options.agent_process else ""


def _configure_logging(console: object | None, prefix: str) -> None:
    root = logging.getLogger()
    if root.handlers:
        return  # embedded in a program (or a test) that set up logging itself
    if console is not None:
        from rich.console import Console
        from rich.logging import RichHandler

        assert isinstance(console, Console)
        handler: logging.Handler = RichHandler(console=console, show_path=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {prefix}%(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
