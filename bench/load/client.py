"""A lean HTTP/1.1 keep-alive client on asyncio streams: the load generator's only client.

One `Connection` is one TCP connection to one host, used for one request at a time (each
simulated worker holds its own, as a real worker's client does). Requests carry
Content-Length bodies; answers are read by Content-Length (or chunked). A connection the
server closed while idle (uvicorn closes keep-alive connections after 5 s) is opened again
before the request, and a request that fails on a reused connection before any answer
arrives is sent once more on a fresh one, as HTTP clients do.

Why not httpx: its AsyncClient costs several times the CPU per request of this, and on a
2-core machine the load generator shares the CPUs with the coordinator it measures.

    conn = Connection("127.0.0.1", 8470)
    status, body = await conn.request("GET", "/healthz")
    await conn.close()
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from urllib.parse import urlsplit

# uvicorn's default keep-alive timeout is 5 s: reopen a connection idle for longer than this
# rather than race the server's close.
IDLE_REOPEN_S = 4.0


class HttpError(Exception):
    """A malformed answer, or a connection that failed mid-request."""


class Connection:
    """One keep-alive HTTP/1.1 connection (module docstring)."""

    def __init__(self, host: str, port: int, *, timeout_s: float = 60.0) -> None:
        self.host, self.port, self.timeout_s = host, port, timeout_s
        self._host_header = f"Host: {host}:{port}\r\n".encode()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._last_used = 0.0
        self.opened = 0  # connections opened (the first one and every reopen)

    @classmethod
    def to(cls, url: str, **options: float) -> Connection:
        parts = urlsplit(url)
        return cls(parts.hostname or "127.0.0.1", parts.port or 80, **options)

    async def request(
        self,
        method: str,
        target: str,
        body: bytes | None = None,
        headers: bytes = b"",
    ) -> tuple[int, bytes]:
        """(status, body). `headers` are raw lines, each ending in CRLF."""
        head = b"%s %s HTTP/1.1\r\n" % (method.encode(), target.encode()) + self._host_header
        if body is not None:
            head += b"Content-Length: %d\r\n" % len(body)
        message = head + headers + b"\r\n" + (body or b"")
        for attempt in (0, 1):
            reused = self._writer is not None
            if (
                self._writer is None
                or self._reader is None
                or self._reader.at_eof()
                or time.monotonic() - self._last_used > IDLE_REOPEN_S
            ):
                await self._open()
                reused = False
            try:
                return await asyncio.wait_for(self._exchange(message), self.timeout_s)
            except (ConnectionError, asyncio.IncompleteReadError, HttpError):
                await self.close()
                if reused and attempt == 0:
                    continue  # the server closed it as we sent: once more, on a new one
                raise
            except BaseException:
                await self.close()  # a timeout or a cancel leaves the stream mid-answer
                raise
        raise AssertionError("unreachable")

    async def close(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _open(self) -> None:
        await self.close()
        self._reader, self._writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port), self.timeout_s
        )
        self.opened += 1

    async def _exchange(self, message: bytes) -> tuple[int, bytes]:
        reader, writer = self._reader, self._writer
        assert reader is not None and writer is not None
        writer.write(message)
        if len(message) > 65536:
            await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, _, rest = head.partition(b"\r\n")
        try:
            status = int(status_line.split(b" ", 2)[1])
        except (IndexError, ValueError):
            raise HttpError(f"bad status line {status_line[:80]!r}") from None
        length, chunked, close = None, False, False
        for line in rest.split(b"\r\n"):
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"connection":
                close = b"close" in value.lower()
        if chunked:
            body = await _read_chunked(reader)
        elif length is not None:
            body = await reader.readexactly(length) if length else b""
        elif status in (204, 304) or 100 <= status < 200:
            body = b""
        else:  # no length: the body runs to the end of the connection
            body = await reader.read()
            close = True
        if close:
            await self.close()
        else:
            self._last_used = time.monotonic()
        return status, body


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts = []
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size = int(size_line.split(b";", 1)[0].strip(), 16)
        if size == 0:
            await reader.readuntil(b"\r\n")  # the empty trailer
            return b"".join(parts)
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)


def multipart(fields: dict[str, str], data: bytes) -> tuple[bytes, bytes]:
    """(body, Content-Type header line) of an S3 POST-policy upload: every policy field,
    then the file (as worker/transfer.py sends it)."""
    boundary = b"cotune-bench-" + os.urandom(8).hex().encode()
    parts = []
    for name, value in fields.items():
        parts.append(
            b'--%s\r\nContent-Disposition: form-data; name="%s"\r\n\r\n%s\r\n'
            % (boundary, name.encode(), value.encode())
        )
    parts.append(
        b'--%s\r\nContent-Disposition: form-data; name="file"; filename="blob"\r\n'
        b"Content-Type: application/octet-stream\r\n\r\n" % boundary
    )
    body = b"".join(parts) + data + b"\r\n--%s--\r\n" % boundary
    return body, b"Content-Type: multipart/form-data; boundary=%s\r\n" % boundary
