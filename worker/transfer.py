"""Streaming transfers to and from presigned URLs: sha256 verified, retried, with progress.

Downloads stream to a `.part` file while hashing and only take the final name once size and
sha256 match what the coordinator announced. Uploads are S3 POST-policy forms streamed from
disk. Transport errors, 5xx/429 answers and integrity mismatches are retried with
exponential backoff (tenacity); other 4xx answers are final (an expired or refused URL will
not get better by asking again).

These requests never carry the worker token: presigned URLs authenticate themselves, and
the token must not leak to the object store.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol

import httpx
from cotune.orchestrator.protocol.wire import ArtifactRef, PresignedGet, PresignedPost
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
_RETRY_STATUS = {429, 500, 502, 503, 504}


class TransferError(Exception):
    """A transfer that failed for good (after retries where retrying made sense)."""


class IntegrityError(TransferError):
    """What arrived is not what was announced (size or sha256)."""


class TransferCancelled(TransferError):
    """The worker is stopping: the transfer was abandoned midway."""


class _Retryable(Exception):
    """One attempt failed in a way another attempt may fix."""


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 4
    initial_s: float = 0.5
    max_s: float = 15.0


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


# --- progress display -------------------------------------------------------------------


class TransferDisplay(Protocol):
    def track(
        self, label: str, total: int
    ) -> contextlib.AbstractContextManager[Callable[[int], None]]:
        """A context giving `advance(nbytes)` for one transfer."""
        ...


class LogLines:
    """Plain log lines (not a TTY): one when a transfer starts, one when it ends."""

    @contextlib.contextmanager
    def track(self, label: str, total: int) -> Iterator[Callable[[int], None]]:
        done = 0
        start = time.monotonic()

        def advance(n: int) -> None:
            nonlocal done
            done += n

        log.info("%s: %s", label, human_bytes(total))
        yield advance
        elapsed = max(time.monotonic() - start, 1e-6)
        speed = human_bytes(done / elapsed)
        log.info("%s: done, %s in %.1f s (%s/s)", label, human_bytes(done), elapsed, speed)


class RichBars:
    """rich progress bars on a TTY; one shared live display for concurrent transfers."""

    def __init__(self, console: Console | None = None) -> None:
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        )
        self._lock = threading.Lock()
        self._active = 0

    @contextlib.contextmanager
    def track(self, label: str, total: int) -> Iterator[Callable[[int], None]]:
        with self._lock:
            if self._active == 0:
                self._progress.start()
            self._active += 1
            task = self._progress.add_task(label, total=total)
        try:
            yield lambda n: self._progress.advance(task, n)
        finally:
            with self._lock:
                self._progress.remove_task(task)
                self._active -= 1
                if self._active == 0:
                    self._progress.stop()


def human_bytes(n: float) -> str:
    """A byte count for people: 512 B, 3.4 MiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


# --- transfers --------------------------------------------------------------------------


class _CountingReader:
    """A file wrapper reporting bytes read (httpx streams multipart files through read)."""

    def __init__(self, f: IO[bytes], advance: Callable[[int], None], cancel: threading.Event):
        self._f = f
        self._advance = advance
        self._cancel = cancel

    def read(self, n: int = -1) -> bytes:
        if self._cancel.is_set():
            raise TransferCancelled("upload cancelled: the worker is stopping")
        data = self._f.read(n)
        self._advance(len(data))
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def fileno(self) -> int:
        return self._f.fileno()


class _IntegrityMismatch(_Retryable):
    """Size or sha256 differ: maybe corrupted in transit, so worth another attempt."""


class Transfers:
    """Downloads from presigned GETs and uploads to presigned POSTs.

    `cancel` (per call) abandons a transfer midway, also while it waits to retry.
    """

    def __init__(
        self,
        *,
        display: TransferDisplay | None = None,
        retry: RetryPolicy = RetryPolicy(),
        http: httpx.Client | None = None,
    ) -> None:
        self._http = http or httpx.Client(timeout=httpx.Timeout(60.0, connect=10.0))
        self._display = display or LogLines()
        self._retry = retry

    def close(self) -> None:
        self._http.close()

    def download(
        self, src: PresignedGet, dest: Path, *, label: str, cancel: threading.Event | None = None
    ) -> Path:
        """Fetch `src` into `dest`; raises TransferError naming `label` when it cannot."""
        if dest.is_file() and dest.stat().st_size == src.bytes and sha256_file(dest) == src.sha256:
            return dest  # already here from an earlier attempt (a cached base model)
        dest.parent.mkdir(parents=True, exist_ok=True)
        cancel = cancel or threading.Event()
        self._retrying(label, cancel)(self._download_once, src, dest, label, cancel)
        return dest

    def upload(
        self, dst: PresignedPost, path: Path, *, label: str, cancel: threading.Event | None = None
    ) -> ArtifactRef:
        """Send `path` to `dst`; returns what the coordinator should be told about it."""
        size = path.stat().st_size
        if size > dst.max_bytes:
            raise TransferError(
                f"{label}: {path.name} is {human_bytes(size)}, over the "
                f"{human_bytes(dst.max_bytes)} the coordinator accepts for it"
            )
        sha = sha256_file(path)
        cancel = cancel or threading.Event()
        self._retrying(label, cancel)(self._upload_once, dst, path, size, label, cancel)
        return ArtifactRef(key=dst.key, sha256=sha, bytes=size)

    def _retrying(self, label: str, cancel: threading.Event) -> Retrying:
        def before_sleep(state: RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome else None
            log.warning(
                "%s: attempt %d/%d failed (%s); retrying",
                label,
                state.attempt_number,
                self._retry.attempts,
                error,
            )

        def raise_final(state: RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome else None
            cls = IntegrityError if isinstance(error, _IntegrityMismatch) else TransferError
            raise cls(f"{label}: failed after {state.attempt_number} attempts: {error}") from error

        def sleep(seconds: float) -> None:
            if cancel.wait(seconds):
                raise TransferCancelled(f"{label}: cancelled, the worker is stopping")

        return Retrying(
            stop=stop_after_attempt(self._retry.attempts),
            wait=wait_exponential_jitter(
                multiplier=self._retry.initial_s,
                max=self._retry.max_s,
                jitter=self._retry.initial_s,
            ),
            retry=retry_if_exception_type(_Retryable),
            sleep=sleep,
            before_sleep=before_sleep,
            retry_error_callback=raise_final,
        )

    def _download_once(
        self, src: PresignedGet, dest: Path, label: str, cancel: threading.Event
    ) -> None:
        part = dest.with_name(dest.name + ".part")
        digest = hashlib.sha256()
        received = 0
        try:
            with self._http.stream("GET", src.url) as response:
                _check_status(response, label, "download")
                with part.open("wb") as f, self._display.track(label, src.bytes) as advance:
                    for chunk in response.iter_bytes(CHUNK_BYTES):
                        if cancel.is_set():
                            raise TransferCancelled(f"{label}: cancelled, the worker is stopping")
                        received += len(chunk)
                        if received > src.bytes:
                            raise _IntegrityMismatch(f"more than the announced {src.bytes} bytes")
                        digest.update(chunk)
                        f.write(chunk)
                        advance(len(chunk))
            if received != src.bytes:
                raise _IntegrityMismatch(f"got {received} bytes, expected {src.bytes}")
            if digest.hexdigest() != src.sha256:
                raise _IntegrityMismatch(
                    f"sha256 mismatch: expected {src.sha256}, got {digest.hexdigest()}"
                )
            part.replace(dest)
        except httpx.TransportError as error:
            raise _Retryable(f"{type(error).__name__}: {error}") from error
        finally:
            part.unlink(missing_ok=True)

    def _upload_once(
        self, dst: PresignedPost, path: Path, size: int, label: str, cancel: threading.Event
    ) -> None:
        try:
            with path.open("rb") as f, self._display.track(label, size) as advance:
                body = _CountingReader(f, advance, cancel)
                response = self._http.post(
                    dst.url,
                    data=dst.fields,
                    files={"file": (path.name, body, "application/octet-stream")},  # type: ignore[dict-item]
                )
            _check_status(response, label, "upload")
        except httpx.TransportError as error:
            raise _Retryable(f"{type(error).__name__}: {error}") from error


def _check_status(response: httpx.Response, label: str, what: str) -> None:
    if response.status_code < 300:
        return
    body = response.read()[:300].decode("utf-8", "replace").strip()
    message = f"{what} answered HTTP {response.status_code}: {body or response.reason_phrase}"
    if response.status_code in _RETRY_STATUS:
        raise _Retryable(message)
    hint = ""
    if response.status_code == 403:
        hint = " (the presigned URL expired or its policy refused the file)"
    raise TransferError(f"{label}: {message}{hint}")
