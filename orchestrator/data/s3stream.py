"""An S3 object's body as a stream that survives a dropped connection.

ObjectStore.open_stream hands one out (wrapped in io.BufferedReader): reading a shard or a
checkpoint that takes minutes must not start over, nor fail, because one connection broke.
A read that fails is tried again (by the store's retry policy), opening the rest of the
object from where it broke; If-Match pins the ETag, so a replaced object fails with 412
rather than splice two versions together.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from typing import Any

# rest(offset, etag) -> a GetObject answer for bytes offset.. of that version
OpenRest = Callable[[int, "str | None"], Any]
# retried(read) -> read(), with transient failures retried and the rest translated
Retried = Callable[[Callable[[], bytes]], bytes]


class ResumingReader(io.RawIOBase):
    """A raw binary stream over the body of `answer` (a GetObject answer)."""

    def __init__(self, answer: dict[str, Any], rest: OpenRest, retried: Retried) -> None:
        self._body: Any = answer["Body"]
        self._etag: str | None = answer.get("ETag")
        self._size = int(answer["ContentLength"])
        self._rest = rest
        self._retried = retried
        self._pos = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._pos >= self._size or len(buffer) == 0:
            return 0
        data = self._retried(lambda: self._read(len(buffer)))
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def _read(self, n: int) -> bytes:
        if self._body is None:
            self._body = self._rest(self._pos, self._etag)["Body"]
        try:
            data: bytes = self._body.read(n)
        except Exception:
            self._drop()  # the next try opens the rest afresh
            raise
        return data

    def _drop(self) -> None:
        body, self._body = self._body, None
        if body is not None:
            with contextlib.suppress(Exception):  # a broken connection may not close cleanly
                body.close()

    def close(self) -> None:
        if not self.closed:
            self._drop()
        super().close()
