"""The volunteer's live view: events update the WorkerView, the panel shows what they said,
and LiveScreen keeps library noise (warnings, transformers, tqdm, stray prints) off the
terminal and in the log file."""

from __future__ import annotations

import io
import logging
import re
import sys
import threading
import warnings
from pathlib import Path

import httpx
import pytest
from cotune.orchestrator.protocol.task import TrainTask
from cotune.orchestrator.protocol.wire import (
    ADAPTER_FILES,
    Capabilities,
    LeaseRequest,
    PresignedGet,
    PresignedPost,
    ResumeCheckpoint,
    TaskInputs,
    TaskLease,
    TaskOutputs,
)
from cotune.orchestrator.runtime.services.ports import free_port
from cotune.worker.client import CoordinatorClient, Refused, Unreachable
from cotune.worker.hardware import CudaDevice, Hardware
from cotune.worker.live import LiveScreen, render
from cotune.worker.training import Progress
from cotune.worker.view import Link, WorkerView, coordinator_state, stop_state
from rich.console import Console

CPU = Hardware(devices=(), cpu_count=4, ram_bytes=8 << 30)
GPU = Hardware(
    devices=(CudaDevice(0, "NVIDIA H200", 140 << 30, (9, 0), True),), cpu_count=16, ram_bytes=1
)
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
SHA = "0" * 64


def lease(task_id: str = "sweep-1a2b.t3.r1.s2", attempt: int = 2, resume: int = 0) -> TaskLease:
    post = PresignedPost(url="http://s3.test/b", fields={}, key="k", max_bytes=1 << 20)
    get = PresignedGet(url="http://s3.test/b/shard", sha256=SHA, bytes=10)
    return TaskLease(
        task_id=task_id,
        attempt=attempt,
        lease_id="lease-1",
        deadline=1030.0,
        server_time=1000.0,
        task=TrainTask(base_model="cotune://tiny-llama", max_steps=10),
        inputs=TaskInputs(
            base_model="cotune://tiny-llama",
            train=[get],
            resume_checkpoint=ResumeCheckpoint(step=resume, archive=get) if resume else None,
        ),
        outputs=TaskOutputs(adapter={name: post for name in ADAPTER_FILES}, checkpoint=post),
        heartbeat_interval_s=1.0,
    )


def progress(step: int, loss: float | None, memory: int = 3 << 30) -> Progress:
    return Progress(
        step=step,
        max_steps=10,
        loss=loss,
        learning_rate=1e-3,
        tokens_per_s=1234.0,
        tokens_seen=step * 512,
        memory_bytes=memory,
    )


def screen_text(view: WorkerView) -> str:
    """The panel as a terminal of 100 columns would show it, escape codes removed."""
    out = io.StringIO()
    Console(file=out, width=100, force_terminal=True).print(render(view.snapshot()))
    return ANSI.sub("", out.getvalue())


def test_a_task_from_lease_to_credit_shows_on_the_panel(tmp_path: Path) -> None:
    view = WorkerView("http://coord.test", CPU, log_file=tmp_path / "worker.log", machine="box")
    view.reached()
    view.enrolled("w-42")
    view.leased(lease())
    state = view.snapshot()
    assert state.task is not None
    assert (state.task.job, state.task.trial, state.task.round, state.task.shard) == (
        "sweep-1a2b",
        3,
        1,
        2,
    )
    assert (state.task.attempt, state.task.step, state.task.max_steps) == (2, 0, 10)

    view.phase("training")
    view.progress(progress(7, 2.3456))
    view.progress(progress(8, None))  # a step without a loss keeps the last one shown
    text = screen_text(view)
    assert "http://coord.test  connected" in text
    assert "w-42 on box, CPU (4 cores)" in text
    assert "job sweep-1a2b  trial 3  round 1  shard 2  attempt 2" in text
    assert "step 8/10" in text and "2.3456" in text
    assert "1,234 tokens/s" in text and "3.0 GiB RSS" in text
    assert str(tmp_path / "worker.log") in text

    view.phase("uploading")
    view.credited(812.5)  # the coordinator's number, from its CompleteResponse
    view.task_ended("completed")
    state = view.snapshot()
    assert (state.task, state.completed, state.credit) == (None, 1, 812.5)
    text = screen_text(view)
    assert "waiting for work" in text and "step 8/10" not in text
    assert "1 done, 0 rejected, 0 failed, 0 given back" in text
    assert "812.5" in text


def test_credit_and_counters_add_up_over_a_session() -> None:
    view = WorkerView("http://coord.test", GPU)
    for outcome, credit in [("completed", 100.0), ("completed", 0.0), ("completed", 50.0)]:
        view.leased(lease())
        view.credited(credit)
        view.task_ended(outcome)
    for outcome in ("rejected", "failed", "lost", "released"):
        view.leased(lease())
        view.task_ended(outcome)
    state = view.snapshot()
    assert (state.completed, state.rejected, state.failed, state.released) == (3, 1, 2, 1)
    assert state.credit == 150.0
    assert state.uncredited == 1  # accepted for the heavy checks, credited later
    text = screen_text(view)
    assert "3 done, 1 rejected, 2 failed, 1 given back" in text
    assert "150.0" in text and "+1 accepted, credited once the coordinator has checked" in text


def test_memory_is_the_gpu_peak_on_a_gpu_and_a_resumed_task_starts_at_its_checkpoint() -> None:
    view = WorkerView("http://coord.test", GPU)
    view.leased(lease(resume=4))
    state = view.snapshot()
    assert state.task is not None and state.task.step == 4
    view.progress(progress(5, 1.5, memory=12 << 30))
    text = screen_text(view)
    assert "NVIDIA H200" in text and "12.0 GiB GPU peak" in text and "step 5/10" in text


def test_a_task_id_of_another_layout_is_shown_as_it_is() -> None:
    view = WorkerView("http://coord.test", CPU)
    view.leased(lease(task_id="custom-task", attempt=1))
    text = screen_text(view)
    assert "custom-task  attempt 1" in text and "trial" not in text
    view.leased(lease(task_id="j.t0.r0.s1.dup2", attempt=1001))
    state = view.snapshot()
    assert state.task is not None and (state.task.shard, state.task.duplicate) == (1, 2)
    assert "(duplicate 2)" in screen_text(view)


def test_states_connecting_unreachable_connected_then_draining_stopping_stopped() -> None:
    view = WorkerView("http://coord.test", CPU)
    assert coordinator_state(view.snapshot()) == "connecting"
    view.unreachable("connection refused")
    assert coordinator_state(view.snapshot()) == "unreachable (connection refused), retrying"
    assert "http://coord.test  unreachable (connection refused), retrying" in screen_text(view)
    view.reached()
    assert view.snapshot().link is Link.CONNECTED
    view.leased(lease())
    assert stop_state(view.snapshot()) is None
    view.stop_requested()
    assert stop_state(view.snapshot()) == (
        "draining: finishing task sweep-1a2b.t3.r1.s2, then stopping (Ctrl-C again quits at once)"
    )
    assert "draining: finishing task sweep-1a2b.t3.r1.s2" in screen_text(view)
    view.task_ended("released")
    assert stop_state(view.snapshot()) == "stopping"
    view.stopped()
    assert stop_state(view.snapshot()) == "stopped"
    assert coordinator_state(view.snapshot()) == "connected"
    assert "stopped" in screen_text(view)


def test_the_client_reports_each_attempt_to_the_view() -> None:
    """The real client against a port where nothing listens, then one that answers."""
    view = WorkerView("http://coord.test", CPU)
    dead = f"http://127.0.0.1:{free_port()}"
    client = CoordinatorClient(dead, link=view, backoff_initial_s=0.01)
    with pytest.raises(Unreachable):
        client.lease("w-1", _lease_request(), retry_for_s=0)
    client.close()
    state = view.snapshot()
    assert state.link is Link.UNREACHABLE and state.link_reason == "connection refused"

    # Any answer, even a refusal, means the coordinator is there.
    refusing = httpx.Client(transport=httpx.MockTransport(lambda r: httpx.Response(401)))
    client = CoordinatorClient("http://coord.test", link=view, http=refusing)
    with pytest.raises(Refused):
        client.lease("w-1", _lease_request(), retry_for_s=0)
    client.close()
    assert view.snapshot().link is Link.CONNECTED


def _lease_request() -> LeaseRequest:
    return LeaseRequest(capabilities=Capabilities(memory_bytes=1, bf16=False))


def test_transfers_show_while_they_run() -> None:
    view = WorkerView("http://coord.test", CPU)
    with view.track("download shard-00000.jsonl", 4 << 20) as advance:
        advance(1 << 20)
        advance(1 << 20)
        assert "download shard-00000.jsonl: 2.0 MiB of 4.0 MiB" in screen_text(view)
    assert view.snapshot().transfers == ()


def test_the_last_event_is_the_agents_newest_log_line() -> None:
    view = WorkerView("http://coord.test", CPU)
    logger = logging.getLogger("cotune.worker.test_view")
    handler = view.event_handler()
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        logger.info("task %s accepted, credit %.1f", "j.t0.r0.s0", 42.0)
        logger.debug("not an event")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
    assert view.snapshot().last_event == "task j.t0.r0.s0 accepted, credit 42.0"
    assert "task j.t0.r0.s0 accepted, credit 42.0" in screen_text(view)


def test_events_from_many_threads_are_all_counted() -> None:
    view = WorkerView("http://coord.test", CPU)

    def finish_tasks() -> None:
        for _ in range(200):
            view.credited(1.0)
            view.task_ended("completed")

    threads = [threading.Thread(target=finish_tasks) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    state = view.snapshot()
    assert (state.completed, state.credit) == (800, 800.0)


def test_live_screen_keeps_library_noise_off_the_terminal_and_in_the_log(tmp_path: Path) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.get_verbosity()  # transformers configures its logger on first use
    propagate = logging.getLogger("transformers").propagate
    terminal = io.StringIO()
    view = WorkerView("http://coord.test", CPU, log_file=tmp_path / "worker.log")
    log_path = tmp_path / "worker.log"
    with LiveScreen(view, log_path, console=Console(file=terminal, width=200, force_terminal=True)):
        logging.getLogger("cotune.worker.agent").info("enrolled with the coordinator")
        logging.getLogger("cotune.worker.agent").error("task j.t0.r0.s0 failed: out of memory")
        hf_logging.get_logger("transformers.modeling_utils").warning("NOISE-transformers")
        logging.getLogger("bitsandbytes.cextension").warning("NOISE-bitsandbytes")
        warnings.warn("NOISE-warning", UserWarning, stacklevel=1)
        print("NOISE-print")
        sys.stderr.write("NOISE-stderr\n")
        from tqdm.auto import tqdm

        for _ in tqdm(range(3), desc="NOISE-tqdm", disable=False):
            pass
        assert hf_logging.is_progress_bar_enabled() is False
        hf_logging.tqdm(range(3), desc="NOISE-loading-weights")  # what weight loading uses
    shown = ANSI.sub("", terminal.getvalue())
    logged = log_path.read_text()
    assert "NOISE" not in shown, shown
    for noise in ("transformers", "bitsandbytes", "warning", "print", "stderr", "tqdm"):
        assert f"NOISE-{noise}" in logged, noise
    assert "NOISE-loading-weights" not in logged  # transformers' bars are off altogether
    assert "INFO cotune.worker.agent: enrolled with the coordinator" in logged
    # The worker's own errors are shown above the panel; its info lines only as the last event.
    assert "error: task j.t0.r0.s0 failed: out of memory" in shown
    assert "cotune worker" in shown and str(log_path) in shown
    # Afterwards, everything is as it was.
    assert "worker.log" not in str(getattr(sys.stdout, "name", ""))
    assert "worker.log" not in str(getattr(sys.stderr, "name", ""))
    assert logging.getLogger("transformers").propagate is propagate
    assert hf_logging.is_progress_bar_enabled()


def test_each_phase_is_drawn_even_when_it_outruns_the_redraws(tmp_path: Path) -> None:
    """A short task's last steps, its upload and its end all happen within one 4 Hz redraw:
    milestones redraw at once, so the terminal still shows the step a phase ended on."""
    terminal = io.StringIO()
    view = WorkerView("http://coord.test", CPU, log_file=tmp_path / "worker.log")
    drawn: list[str] = []
    view.on_milestone(
        lambda: drawn.append(view.snapshot().task.phase if view.snapshot().task else "-")
    )
    console = Console(file=terminal, width=200, force_terminal=True)
    with LiveScreen(view, tmp_path / "worker.log", console=console):
        view.leased(lease())
        view.phase("training")
        for step in range(1, 11):
            view.progress(progress(step, 1.0 / step))
        view.phase("uploading")
        view.task_ended("completed")
    shown = ANSI.sub("", terminal.getvalue())
    assert drawn == ["downloading", "training", "uploading", "-"]
    assert "phase        uploading" in shown and "step 10/10" in shown, shown
