"""Where trusted work runs: the interface the pipeline needs of the Ray pool
(orchestrator/runtime/raypool.py implements it; tests may pass a local one, which may run a
call at once and answer its first poll)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from cotune.orchestrator.pipeline.roundmerge import MergeRequest


class Pool(Protocol):
    """Runs merges and calls off the loop's thread, and follows the queue's demand.

    `submit_call` is for work that may want the model on a GPU (evaluations, upload checks);
    `submit_cpu_call` for work that never does (staging and sharding a job's inputs), so it
    never waits for a GPU that cluster workers hold. `fn` is a module-level function, its
    arguments and value picklable. `poll(handle)` answers (done, value, error) at once."""

    def submit_merge(self, request: MergeRequest) -> Any: ...

    def submit_call(self, fn: Callable[..., Any], *args: Any) -> Any: ...

    def submit_cpu_call(self, fn: Callable[..., Any], *args: Any) -> Any: ...

    def poll(self, handle: Any) -> tuple[bool, Any, BaseException | None]: ...

    def follow_queue(self, demand: int) -> None: ...
