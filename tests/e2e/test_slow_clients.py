"""Slow and idle clients against a real `forwarder run`: deadlines for heads and bodies, a cap."""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

import aiohttp
import pytest

from forwarder.intake.guard import HEALTH_RESERVE, REFUSAL
from tests.conftest import DaemonProc, MockProc

StartMock = Callable[..., Awaitable[MockProc]]
StartDaemon = Callable[..., Awaitable[DaemonProc]]
SLOW_HEAD = (
    b"POST /v1/events HTTP/1.1\r\nHost: forwarder\r\nContent-Type: application/json\r\n"
    b"X-Padding: " + b"a" * 4000 + b"\r\n"
)


def _address(d: DaemonProc) -> tuple[str, int]:
    parts = urlsplit(d.url)
    assert parts.hostname is not None
    assert parts.port is not None
    return parts.hostname, parts.port


async def _closed_by_server(reader: asyncio.StreamReader, timeout: float) -> bytes:
    """Everything the server sent until it closed the connection (fails if it never does)."""
    async with asyncio.timeout(timeout):
        try:
            return await reader.read()
        except ConnectionResetError:
            return b""


async def test_slowloris_is_cut_off_while_a_real_client_gets_its_202s_at_once(
    mock_remote: StartMock, daemon: StartDaemon
) -> None:
    header_timeout = 2.0
    mock = await mock_remote()
    d = await daemon(
        mock.base_url, intake={"header_timeout_s": header_timeout, "max_connections": 300}
    )
    host, port = _address(d)
    loop = asyncio.get_running_loop()
    opened = asyncio.Event()
    connected = 0

    async def slowloris() -> tuple[float, bytes]:
        """One header byte a second, never finishing; how long until the server hung up."""
        nonlocal connected
        started = loop.time()  # before connecting: the server's clock starts no earlier
        reader, writer = await asyncio.open_connection(host, port)
        connected += 1
        if connected == 200:
            opened.set()
        try:
            for byte in itertools.cycle(SLOW_HEAD):
                writer.write(bytes([byte]))
                try:
                    await writer.drain()
                    async with asyncio.timeout(1.0):
                        answer = await reader.read()  # b"" once the server closes
                    return loop.time() - started, answer
                except TimeoutError:
                    continue  # still open: the next byte
                except ConnectionError:
                    return loop.time() - started, b""
            raise AssertionError("unreachable")
        finally:
            writer.close()

    slow = [asyncio.create_task(slowloris()) for _ in range(200)]
    try:
        async with asyncio.timeout(10):
            await opened.wait()
        latencies = []
        async with aiohttp.ClientSession(base_url=d.url) as http:
            async with http.get("/v1/stats") as response:
                assert (await response.json())["connections"]["open"] >= 200
            for n in range(20):
                began = loop.time()
                event = {"recipient_id": str(n), "name": "SIGNUP"}
                async with http.post("/v1/events", json=[event]) as response:
                    assert response.status == 202, await response.text()
                latencies.append(loop.time() - began)
            assert loop.time() - began < header_timeout  # all of it while the slow ones hung on
        assert max(latencies) < 0.5, latencies
        async with asyncio.timeout(header_timeout + 8):
            results = await asyncio.gather(*slow)
    finally:
        for task in slow:
            task.cancel()
        await asyncio.gather(*slow, return_exceptions=True)
    held = sorted(elapsed for elapsed, _ in results)
    # Never before the deadline, and every one closed soon after it (a loaded machine is slow).
    assert held[0] >= header_timeout - 0.05, held[:5]
    assert held[-1] <= header_timeout + 4.0, held[-5:]
    assert all(answer == b"" for _, answer in results)  # closed, not answered
    async with aiohttp.ClientSession(base_url=d.url) as http:
        async with http.get("/v1/stats") as response:
            stats = await response.json()
        async with http.get("/metrics") as response:
            metrics = await response.text()
    assert stats["connections"]["header_timeouts"] == 200
    assert stats["connections"]["open"] <= 1
    assert stats["counters"]["accepted"] == 20
    assert "forwarder_connections_header_timeouts_total 200.0" in metrics
    (line,) = d.proc.events("slow_client_closed")  # one line, not two hundred
    assert line["header_timeout_s"] == header_timeout


async def test_a_body_that_does_not_arrive_in_time_gets_408_and_the_connection_closes(
    mock_remote: StartMock, daemon: StartDaemon
) -> None:
    mock = await mock_remote()
    d = await daemon(mock.base_url, intake={"body_timeout_s": 1.0, "header_timeout_s": 5.0})
    reader, writer = await asyncio.open_connection(*_address(d))
    try:
        writer.write(
            b"POST /v1/events HTTP/1.1\r\nHost: forwarder\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n"
            b'[{"recipient_id": "1", '
        )
        await writer.drain()
        began = asyncio.get_running_loop().time()
        answer = await _closed_by_server(reader, 6.0)
        elapsed = asyncio.get_running_loop().time() - began
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert b"Connection: close" in head
    payload = json.loads(body)
    assert payload["reason"] == "body_timeout"
    assert "intake.body_timeout_s (1 s)" in payload["error"]
    assert 0.9 <= elapsed <= 5.0
    async with (
        aiohttp.ClientSession(base_url=d.url) as http,
        http.get("/v1/stats") as response,
    ):
        stats = await response.json()
    assert stats["counters"]["body_timeouts"] == 1
    assert stats["counters"]["accepted"] == 0


async def test_past_max_connections_only_health_checks_answer_then_new_connections_get_503(
    mock_remote: StartMock, daemon: StartDaemon
) -> None:
    mock = await mock_remote()
    d = await daemon(mock.base_url, intake={"max_connections": 5, "header_timeout_s": 30.0})
    address = _address(d)
    idle = [await asyncio.open_connection(*address) for _ in range(5)]
    reserve: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        await asyncio.sleep(0.2)  # the daemon has accepted them all
        # The cap is reached: a health check still answers, on a connection of the reserve
        # that closes after it; anything else there gets the refusal.
        for request, status in (
            (b"GET /healthz HTTP/1.1\r\nHost: forwarder\r\n\r\n", b"200"),
            (b"GET /readyz HTTP/1.1\r\nHost: forwarder\r\n\r\n", b"200"),
            (b"GET /v1/stats HTTP/1.1\r\nHost: forwarder\r\n\r\n", b"503"),
        ):
            reader, writer = await asyncio.open_connection(*address)
            try:
                writer.write(request)
                answer = await _closed_by_server(reader, 5.0)
            finally:
                writer.close()
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.split(b" ", 2)[1] == status, answer
            assert b"Connection: close" in head
            if status == b"503":
                assert json.loads(body)["reason"] == "too_many_connections"
        # The reserve is bounded: once it is held too, a new connection gets the canned 503.
        reserve = [await asyncio.open_connection(*address) for _ in range(HEALTH_RESERVE)]
        await asyncio.sleep(0.2)
        reader, writer = await asyncio.open_connection(*address)
        try:
            answer = await _closed_by_server(reader, 2.0)
        finally:
            writer.close()
        assert answer == REFUSAL
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503 ")
        assert json.loads(body)["reason"] == "too_many_connections"
        for _, held in [*reserve, idle.pop()]:
            held.close()  # slots free up
            await held.wait_closed()
        reserve = []
        await asyncio.sleep(0.2)
        async with aiohttp.ClientSession(base_url=d.url) as http:
            async with http.post("/v1/events", json=[{"recipient_id": "1", "name": "A"}]) as r:
                assert r.status == 202
            async with http.get("/v1/stats") as response:
                connections = (await response.json())["connections"]
        assert connections["refused"] == 2  # the /v1/stats on the reserve, the canned one
        assert connections["max_connections"] == 5
        assert connections["health_reserve"] == HEALTH_RESERVE
        assert connections["open"] == 5  # four idle ones and this client's
    finally:
        for _, writer in [*idle, *reserve]:
            writer.close()
    assert len(d.proc.events("connections_refused")) == 1


async def test_clients_that_pipeline_and_never_read_are_closed_and_health_answers_meanwhile(
    mock_remote: StartMock, daemon: StartDaemon
) -> None:
    # The red team's case, smaller: clients send thousands of GET /metrics and read nothing.
    # They hold every slot until the write timeout closes them; /healthz answers all along.
    write_timeout = 2.0
    mock = await mock_remote()
    d = await daemon(
        mock.base_url,
        intake={"max_connections": 10, "write_timeout_s": write_timeout, "header_timeout_s": 60.0},
    )
    host, port = _address(d)
    loop = asyncio.get_running_loop()
    hogs: list[asyncio.StreamWriter] = []
    try:
        for _ in range(10):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills up soon
            sock.setblocking(False)
            await loop.sock_connect(sock, (host, port))
            _, writer = await asyncio.open_connection(sock=sock)
            writer.write(b"GET /metrics HTTP/1.1\r\nHost: forwarder\r\n\r\n" * 3000)
            hogs.append(writer)
        began = loop.time()
        await asyncio.sleep(0.2)  # the daemon has accepted them all
        for path in ("/healthz", "/readyz"):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(f"GET {path} HTTP/1.1\r\nHost: forwarder\r\n\r\n".encode())
                answer = await _closed_by_server(reader, 5.0)
            finally:
                writer.close()
            assert answer.startswith(b"HTTP/1.1 200 "), answer
        # Once the write timeout has closed them, everyone is served again.
        async with aiohttp.ClientSession(base_url=d.url) as http:
            async with asyncio.timeout(write_timeout + 15):
                while True:
                    async with http.get("/v1/stats") as response:
                        if response.status == 200:
                            connections = (await response.json())["connections"]
                            if connections["write_timeouts"] == 10:
                                break
                        else:
                            assert response.status == 503
                    await asyncio.sleep(0.1)
            elapsed = loop.time() - began
            async with http.get("/metrics") as response:
                metrics = await response.text()
    finally:
        for writer in hogs:
            writer.close()
    assert connections["open"] == 1  # this client's
    assert write_timeout <= elapsed <= write_timeout + 15, elapsed
    assert "forwarder_connections_write_timeouts_total 10.0" in metrics
    (line,) = d.proc.events("unread_client_closed")  # one line, not ten
    assert line["write_timeout_s"] == write_timeout


@pytest.mark.parametrize("case", ["new", "kept_alive_idle", "kept_alive_slow_head"])
async def test_idle_connections_and_slow_heads_on_kept_alive_ones_are_closed(
    mock_remote: StartMock, daemon: StartDaemon, case: str
) -> None:
    # A new connection owes its request's head within header_timeout_s; a kept-alive one may
    # idle for keepalive_timeout_s between requests, but once a request starts, its head is due
    # within header_timeout_s of its first byte.
    mock = await mock_remote()
    d = await daemon(mock.base_url, intake={"header_timeout_s": 1.0, "keepalive_timeout_s": 2.5})
    reader, writer = await asyncio.open_connection(*_address(d))
    loop = asyncio.get_running_loop()

    async def trickle() -> None:
        for byte in itertools.cycle(SLOW_HEAD):
            writer.write(bytes([byte]))
            await asyncio.sleep(0.2)

    trickling: asyncio.Task[None] | None = None
    try:
        if case != "new":
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: forwarder\r\n\r\n")
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 ")
            await reader.readexactly(int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0]))
        began = loop.time()
        if case == "kept_alive_slow_head":
            trickling = asyncio.create_task(trickle())
        answer = await _closed_by_server(reader, 8.0)
        elapsed = loop.time() - began
    finally:
        if trickling is not None:
            trickling.cancel()
            await asyncio.gather(trickling, return_exceptions=True)
        writer.close()
    assert answer == b""
    if case == "kept_alive_idle":
        assert 2.3 <= elapsed <= 6.0, elapsed  # keep-alive idle, not the head's deadline
    else:
        assert 0.9 <= elapsed <= 2.2, elapsed  # the head's deadline, before the idle one
