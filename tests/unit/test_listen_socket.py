"""The API's listening socket (runtime/apiserver.py `listen_socket`): the connections it
accepts send small writes at once (TCP_NODELAY), as asyncio sets for TCP sockets.

Before the protocol was named, the socket's `proto` was 0, asyncio left Nagle's algorithm on,
and every answer uvicorn wrote in two parts waited on the client's delayed ACK (44 ms a
request on one connection)."""

from __future__ import annotations

import asyncio
import socket

import pytest
from cotune.orchestrator.runtime.apiserver import listen_socket


@pytest.mark.parametrize("reuse_port", [False, True])
def test_accepted_connections_have_nodelay(reuse_port: bool) -> None:
    async def scenario() -> int:
        seen: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            sock = writer.get_extra_info("socket")
            if not seen.done():
                seen.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        listening = listen_socket("127.0.0.1", 0, reuse_port=reuse_port)
        assert listening.proto == socket.IPPROTO_TCP
        server = await asyncio.start_server(accepted, sock=listening)
        port = listening.getsockname()[1]
        async with server:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            flag = await asyncio.wait_for(seen, 10)
            writer.close()
        return flag

    assert asyncio.run(scenario()) != 0
