"""A fault-injecting HTTP proxy on loopback, in front of an S3 server, for the reliability tests.

    with FaultProxy("http://127.0.0.1:8333", rate=0.05) as proxy:
        store = ObjectStore(proxy.url, ...)          # the coordinator's S3 endpoint
        ...
        print(proxy.counts)                          # requests, and each fault injected

Every request is drawn against `rate`: a faulted one is answered 503 SlowDown (as S3
throttles), or its connection is reset before it reaches S3, or it reaches S3 and the
connection is reset midway through the answer (the write may have happened). The rest pass
through byte for byte, the Host header included, so SigV4 signatures (presigned URLs too:
signed for the proxy's host) hold at the server. Plain asyncio streams on a thread of its
own; HTTP/1.1 keep-alive, Content-Length and chunked bodies, Expect: 100-continue.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import threading
from collections import Counter
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

FAULTS = ("slowdown", "reset", "cut")
_HEAD_LIMIT = 1 << 20
_CHUNK = 1 << 16
_SLOWDOWN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate (injected by the test proxy).</Message></Error>"
)
_SLOWDOWN = (
    b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
    + f"Content-Length: {len(_SLOWDOWN_BODY)}\r\n".encode()
    + b"Connection: close\r\n\r\n"
    + _SLOWDOWN_BODY
)


@dataclass(frozen=True)
class Seen:
    """One request the proxy received, and what it did with it ('pass' or a fault)."""

    method: str
    target: str
    outcome: str
    range: str | None = None  # its Range header: a resumed read asks for the rest


class FaultProxy:
    """See the module docstring. `faults` limits the kinds drawn; `seed` makes runs repeat."""

    def __init__(
        self,
        upstream: str,
        rate: float,
        *,
        faults: tuple[str, ...] = FAULTS,
        seed: int = 0,
    ) -> None:
        parts = urlsplit(upstream)
        if parts.hostname is None or parts.port is None:
            raise ValueError(f"upstream {upstream!r} needs a host and a port")
        if not 0.0 <= rate <= 1.0 or not set(faults) <= set(FAULTS) or not faults:
            raise ValueError(f"rate {rate} must be in [0, 1] and faults a subset of {FAULTS}")
        self._upstream = (parts.hostname, parts.port)
        self.rate = rate
        self._faults = faults
        self._random = random.Random(seed)
        self.seen: list[Seen] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def counts(self) -> Counter[str]:
        """How many requests passed ('pass') and how many met each fault."""
        return Counter(s.outcome for s in list(self.seen))

    @property
    def faults_injected(self) -> int:
        return sum(n for outcome, n in self.counts.items() if outcome != "pass")

    def start(self) -> FaultProxy:
        self._thread.start()
        started = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._accept, "127.0.0.1", 0, limit=_HEAD_LIMIT), self._loop
        )
        self._server = started.result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        if self._server is not None:
            asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(10)
            self._server = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- the loop's side -------------------------------------------------------------------

    async def _close(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # a client or the server hung up: nothing to relay any more
        except asyncio.CancelledError:
            pass  # the proxy is stopping; ending quietly keeps asyncio from logging it
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream: asyncio.StreamWriter | None = None
        pump: asyncio.Task[None] | None = None
        cut: list[str] = []  # the method of a request whose answer is to be cut midway
        try:
            while True:
                head = await _read_head(reader)
                if head is None:
                    return
                method, target, headers = _parse_head(head)
                outcome = self._draw()
                self.seen.append(Seen(method, target, outcome, headers.get("range")))
                if outcome == "slowdown":
                    if headers.get("expect", "").lower() != "100-continue":
                        await _copy_body(reader, None, headers)  # read it, forward nothing
                    writer.write(_SLOWDOWN)
                    await writer.drain()
                    return
                if outcome == "reset":
                    _reset(writer)
                    return
                if upstream is None:
                    up_reader, upstream = await asyncio.open_connection(*self._upstream)
                    pump = asyncio.create_task(_pump(up_reader, writer, cut))
                if outcome == "cut":
                    cut.append(method)
                upstream.write(head)
                await _copy_body(reader, upstream, headers)
        finally:
            if pump is not None:
                pump.cancel()
                with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                    await pump
            if upstream is not None:
                upstream.close()

    def _draw(self) -> str:
        if self._random.random() >= self.rate:
            return "pass"
        return self._random.choice(self._faults)


async def _read_head(reader: asyncio.StreamReader) -> bytes | None:
    """A request's line and headers, or None when the client closed between requests."""
    try:
        return await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial.strip():
            raise
        return None


def _parse_head(head: bytes) -> tuple[str, str, dict[str, str]]:
    """(method, target, headers) of a request; (version, status, headers) of an answer."""
    lines = head.decode("latin-1").split("\r\n")
    method, target = [*lines[0].split(" ", 2), ""][:2]
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    return method, target, headers


async def _copy_body(
    reader: asyncio.StreamReader, out: asyncio.StreamWriter | None, headers: dict[str, str]
) -> None:
    """Relay (or with `out` None, read and drop) a request body framed as `headers` say."""

    def send(data: bytes) -> None:
        if out is not None:
            out.write(data)

    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            line = await reader.readuntil(b"\r\n")
            send(line)
            size = int(line.split(b";", 1)[0], 16)
            if size == 0:
                while (trailer := await reader.readuntil(b"\r\n")) != b"\r\n":
                    send(trailer)
                send(b"\r\n")
                break
            send(await reader.readexactly(size + 2))
            if out is not None:
                await out.drain()
    else:
        left = int(headers.get("content-length", "0") or 0)
        while left > 0:
            data = await reader.read(min(left, _CHUNK))
            if not data:
                raise asyncio.IncompleteReadError(b"", left)
            left -= len(data)
            send(data)
            if out is not None:
                await out.drain()
    if out is not None:
        await out.drain()


async def _pump(
    upstream: asyncio.StreamReader, client: asyncio.StreamWriter, cut: list[str]
) -> None:
    """Relay the server's answers to the client; once `cut` names a request's method, relay
    the next answer up to half its body and reset the client's connection."""
    while data := await upstream.read(_CHUNK):
        if cut:
            await _relay_half(data, upstream, client, has_body=cut[0] != "HEAD")
            await asyncio.sleep(0.05)  # let the half reach the client before the reset
            _reset(client)
            return
        client.write(data)
        await client.drain()
    client.close()  # the server closed: so does the proxy, as the server would have


async def _relay_half(
    data: bytes, upstream: asyncio.StreamReader, client: asyncio.StreamWriter, *, has_body: bool
) -> None:
    """Relay the answer that starts with `data` up to half its body (half its head when it
    has none: a HEAD's, a 204's); an interim 100 Continue goes through whole."""
    buffer = data
    while True:
        while b"\r\n\r\n" not in buffer:
            more = await upstream.read(_CHUNK)
            if not more:
                client.write(buffer[: len(buffer) // 2])
                return
            buffer += more
        end = buffer.index(b"\r\n\r\n") + 4
        _, status, headers = _parse_head(buffer[:end])
        if status == "100":
            client.write(buffer[:end])
            await client.drain()
            buffer = buffer[end:] or await upstream.read(_CHUNK)
            if not buffer:
                return
            continue
        length = int(headers.get("content-length", "0") or 0)
        if not has_body or status in ("204", "304"):
            length = 0
        stop = end + length // 2 if length > 1 else end // 2
        while len(buffer) < stop and (more := await upstream.read(_CHUNK)):
            buffer += more
        client.write(buffer[:stop])
        await client.drain()
        return


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (SO_LINGER 0), as a crashed server or a dropped link does."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
