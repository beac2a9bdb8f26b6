"""Where trusted work runs: the interface the pipeline needs of the Ray pool
(orchestrator/runtime/raypool.py implements it; tests may pass a local one)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from cotune.orchestrator.pipeline.roundmerge import MergeRequest


class Pool(Protocol):
    """Runs merges and calls off the loop's thread, and follows the queue's demand."""

    def submit_merge(self, request: MergeRequest) -> Any: ...

    def submit_call(self, fn: Callable[..., Any], *args: Any) -> Any: ...

    def poll(self, handle: Any) -> tuple[bool, Any, BaseException | None]: ...

    def follow_queue(self, demand: int) -> None: ...
