"""The load generator of bench/load/ on its own: the lean HTTP client and a fleet of
simulated workers against a minimal local HTTP server (no coordinator), so the plumbing
(keep-alive, reconnects, the start barrier, closed and open loops, merged samples) is
checked in seconds. tests/bench/test_benchmarks.py runs the benchmarks themselves."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from bench.load.client import Connection, multipart
from bench.load.fleet import plan, run_fleet
from bench.load.stats import Latencies, verdict


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, Content-Length answers

    def do_GET(self) -> None:
        if self.path == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for part in (b"hello ", b"world"):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")
            return
        body = b'{"status": "ok"}'
        self.send_response(200 if self.path in ("/healthz", "/close") else 404)
        self.send_header("Content-Length", str(len(body)))
        if self.path == "/close":
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        data = self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(201)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_connection_keeps_alive_reads_chunked_and_reopens(server: str) -> None:
    async def go() -> tuple[list[tuple[int, bytes]], int]:
        conn = Connection.to(server, timeout_s=10)
        answers = [await conn.request("GET", "/healthz") for _ in range(3)]
        answers.append(await conn.request("GET", "/chunked"))
        answers.append(await conn.request("POST", "/echo", b"x" * 100_000))
        answers.append(await conn.request("GET", "/close"))  # the server closes after it
        answers.append(await conn.request("GET", "/missing"))
        await conn.close()
        return answers, conn.opened

    answers, opened = asyncio.run(go())
    assert [s for s, _ in answers] == [200, 200, 200, 200, 201, 200, 404]
    assert answers[3][1] == b"hello world"
    assert answers[4][1] == b"x" * 100_000
    assert opened == 2  # one connection until the server closed it, then a second


def test_multipart_names_every_field_then_the_file() -> None:
    body, header = multipart({"key": "a/b", "policy": "p"}, b"DATA")
    boundary = header.split(b"boundary=")[1].strip()
    assert body.count(b"--" + boundary) == 4  # two fields, the file, the closing line
    assert body.index(b'name="key"') < body.index(b'name="policy"') < body.index(b"DATA")
    assert body.endswith(b"--" + boundary + b"--\r\n")


def test_closed_loop_fleet_counts_every_request(server: str) -> None:
    result = run_fleet(plan("noop", api_url=server, duration_s=1.5), workers=6, processes=2)
    assert result.processes == 2 and result.workers == 6
    # Measured from when every worker had finished a first cycle, for duration_s.
    assert result.settled and result.settle_s >= 0
    assert result.end - result.start == pytest.approx(1.5, abs=0.2)
    counted = result.window("healthz", result.start, result.end)
    assert counted.count > 0 and counted.rate > 0
    marks = result.samples["healthz"][0]
    assert (marks < result.start).sum() >= 6  # every worker's first request, at least
    # Requests that ended after the end (the stop reaches workers within ~0.1 s) are not
    # counted: a few a worker at most.
    assert (marks > result.end).sum() <= 3 * 6
    assert counted.count == ((marks >= result.start) & (marks <= result.end)).sum()
    assert not result.errors
    assert counted.summary()["p50_ms"] > 0


def test_open_loop_fleet_serves_the_offered_rate(server: str) -> None:
    rate, seconds = 60.0, 2.0
    the_plan = plan(
        "noop",
        api_url=server,
        duration_s=seconds,
        loop="open",
        rate=rate,
        arrivals="even",
        drain_s=5.0,
    )
    result = run_fleet(the_plan, workers=12, processes=2)
    served = result.window("healthz", result.start, result.end)
    # Evenly spaced arrivals, each worker's first in its own slot: the count is exact to a
    # couple of arrivals at the window's edges.
    assert abs(served.count - rate * seconds) <= 3
    assert not result.errors and not result.counts.get("unserved")


def test_latency_summary_and_verdicts() -> None:
    import numpy as np

    summary = Latencies(np.array([0.001, 0.002, 0.003, 0.100]), 2.0).summary()
    assert summary["count"] == 4 and summary["per_s"] == 2.0
    assert summary["max_ms"] == 100.0 and summary["p50_ms"] == 2.5
    assert Latencies(np.empty(0), 1.0).summary()["p99_ms"] is None
    assert verdict(30.0, 25.0, at_most=True)["met"] is False
    assert verdict(0.8, 0.7)["met"] is True and verdict(0.8, 0.7)["ratio"] == 1.143
