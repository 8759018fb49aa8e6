"""Intake's connections (intake/connections.py, guard.py, runner.py), in process: head and
write deadlines, the reserve."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from structlog.testing import capture_logs

from forwarder.intake.connections import GuardedRequestHandler
from forwarder.intake.guard import HEALTH_RESERVE, REFUSAL, ConnectionGuard
from forwarder.intake.runner import IntakeRunner

REQUEST = b"GET /ok HTTP/1.1\r\nHost: forwarder\r\n\r\n"


async def _ok(request: web.Request) -> web.Response:
    protocol = request.protocol
    assert isinstance(protocol, GuardedRequestHandler)
    protocol.head_received()  # what intake's middleware does
    try:
        return web.Response(text="ok")
    finally:
        protocol.request_done()


@pytest.fixture
async def served() -> AsyncIterator[tuple[ConnectionGuard, int]]:
    app = web.Application()
    app.router.add_get("/ok", _ok)
    guard = ConnectionGuard(max_connections=10, header_timeout_s=0.3, keepalive_timeout_s=60.0)
    runner = IntakeRunner(app, guard, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server = site._server
    assert isinstance(server, asyncio.Server)
    port = server.sockets[0].getsockname()[1]
    try:
        yield guard, port
    finally:
        await runner.cleanup()


async def _answer(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
    return head + await reader.readexactly(length)


async def test_requests_on_a_kept_alive_connection_do_not_each_schedule_a_timer(
    served: tuple[ConnectionGuard, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The deadline moves with each request, but its timer stays the one pending (it moves itself
    # on when it fires early) instead of being scheduled and cancelled for every request.
    _, port = served
    loop = asyncio.get_running_loop()
    scheduled: list[Any] = []
    call_at = loop.call_at

    def counting(when: float, callback: Any, *args: Any, **kwargs: Any) -> asyncio.TimerHandle:
        if getattr(callback, "__name__", "") == "_head_check":
            scheduled.append(callback)
        return call_at(when, callback, *args, **kwargs)

    monkeypatch.setattr(loop, "call_at", counting)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for _ in range(50):
            writer.write(REQUEST)
            assert (await _answer(reader)).startswith(b"HTTP/1.1 200 ")
    finally:
        writer.close()
    assert 1 <= len(scheduled) <= 2, len(scheduled)


async def test_a_slow_head_after_fast_requests_is_still_cut_off(
    served: tuple[ConnectionGuard, int],
) -> None:
    # The timer left pending by the fast requests fires before the slow head's deadline: it must
    # wait on for that deadline, then close the connection.
    guard, port = served
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for _ in range(5):
            writer.write(REQUEST)
            assert (await _answer(reader)).startswith(b"HTTP/1.1 200 ")
        await asyncio.sleep(0.2)  # part of the first deadline gone: the timer fires early
        writer.write(b"GET /ok HTTP/1.1\r\n")  # and the rest of the head never comes
        async with asyncio.timeout(10):
            assert await reader.read() == b""
    finally:
        writer.close()
    assert guard.header_timeouts == 1


async def test_a_shortened_header_timeout_applies_to_the_next_head(
    served: tuple[ConnectionGuard, int],
) -> None:
    # A reload may shorten header_timeout_s while a timer for the longer deadline is pending.
    guard, port = served
    guard.header_timeout_s = 3600.0
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(REQUEST)
        assert (await _answer(reader)).startswith(b"HTTP/1.1 200 ")
        guard.header_timeout_s = 0.3
        writer.write(b"GET /ok HTTP/1.1\r\n")
        async with asyncio.timeout(10):  # not the hour the pending timer was set for
            assert await reader.read() == b""
    finally:
        writer.close()
    assert guard.header_timeouts == 1


# --- answers a client does not read, the health reserve -------------------------------------

BIG = b"x" * (256 * 1024)
RENDERED = web.AppKey("rendered", list[str])


async def _big(request: web.Request) -> web.Response:
    request.app[RENDERED].append(request.path)
    return web.Response(body=BIG)


async def _huge_then_close(request: web.Request) -> web.Response:
    # Room for the whole answer in the transport's buffer: writing never pauses, aiohttp closes
    # the connection with bytes unsent, and only the write deadline can end it.
    transport = request.transport
    assert transport is not None
    transport.set_write_buffer_limits(high=64 * 1024 * 1024)
    response = web.Response(body=b"y" * (16 * 1024 * 1024))
    response.force_close()
    return response


async def _boom(request: web.Request) -> web.Response:
    raise RuntimeError("a bug in a handler")


@pytest.fixture
async def served_app() -> AsyncIterator[tuple[ConnectionGuard, int, web.Application]]:
    app = web.Application()
    app[RENDERED] = []
    for path, handler in (("/ok", _ok), ("/healthz", _ok), ("/readyz", _ok), ("/other", _ok)):
        app.router.add_get(path, handler)
    app.router.add_get("/big", _big)
    app.router.add_get("/boom", _boom)
    app.router.add_get("/huge", _huge_then_close)
    guard = ConnectionGuard(
        max_connections=2, header_timeout_s=5.0, keepalive_timeout_s=60.0, write_timeout_s=0.5
    )
    runner = IntakeRunner(app, guard, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server = site._server
    assert isinstance(server, asyncio.Server)
    try:
        yield guard, server.sockets[0].getsockname()[1], app
    finally:
        await runner.cleanup()


async def _connect_not_reading(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection whose receive buffer is small, so the server's answers back up soon."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return await asyncio.open_connection(sock=sock)


async def _until(condition: Any, timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.02)


@pytest.mark.parametrize("path", ["/big", "/huge"])
async def test_a_client_that_sends_requests_and_never_reads_is_cut_off_by_the_write_timeout(
    served_app: tuple[ConnectionGuard, int, web.Application], path: str
) -> None:
    # /big: pipelined answers fill the socket, writing pauses and never resumes. /huge: one
    # answer sits unsent in the buffer of a connection aiohttp has closed (no pause at all).
    guard, port, app = served_app
    loop = asyncio.get_running_loop()
    _, writer = await _connect_not_reading(port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: forwarder\r\n\r\n".encode() * 50)
        await writer.drain()
        began = loop.time()
        await _until(lambda: guard.open == 0, 10.0)
        elapsed = loop.time() - began
    finally:
        writer.close()
    assert guard.write_timeouts == 1
    assert 0.4 <= elapsed <= 5.0, elapsed
    # The kernel's send buffer is kept small (SEND_BUFFER_BYTES): a client that reads nothing
    # gets a couple of answers rendered, not the dozen Linux's 4 MiB default would take.
    assert len(app[RENDERED]) <= 5, len(app[RENDERED])
    # A client that reads gets everything, however large, without a write timeout.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /big HTTP/1.1\r\nHost: forwarder\r\n\r\n" * 3)
        for _ in range(3):
            assert (await _answer(reader)).endswith(BIG)
    finally:
        writer.close()
    assert guard.write_timeouts == 1


async def test_past_the_cap_health_checks_still_answer_on_reserve_connections(
    served_app: tuple[ConnectionGuard, int, web.Application],
) -> None:
    guard, port, _ = served_app
    held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(guard.max_connections)]
    try:
        await _until(lambda: guard.open == guard.max_connections, 5.0)
        for path in ("/healthz", "/readyz"):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(f"GET {path} HTTP/1.1\r\nHost: forwarder\r\n\r\n".encode())
            async with asyncio.timeout(5):
                answer = await reader.read()  # one answer, then the server closes
            writer.close()
            assert answer.startswith(b"HTTP/1.1 200 "), answer
            assert b"Connection: close" in answer
        # Anything else on a reserve connection is refused like a connection past the cap.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /other HTTP/1.1\r\nHost: forwarder\r\n\r\n")
        async with asyncio.timeout(5):
            answer = await reader.read()
        writer.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503 "), answer
        assert json.loads(body)["reason"] == "too_many_connections"
        assert guard.refused == 1
        # The reserve is bounded too: past it, the canned refusal at once.
        reserve = [await asyncio.open_connection("127.0.0.1", port) for _ in range(HEALTH_RESERVE)]
        held.extend(reserve)
        await _until(lambda: guard.open == guard.max_connections + HEALTH_RESERVE, 5.0)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        async with asyncio.timeout(5):
            assert await reader.read() == REFUSAL
        writer.close()
        assert guard.refused == 2
    finally:
        for _, writer in held:
            writer.close()


async def test_a_handler_that_raises_gets_a_json_500_and_one_error_line_with_its_traceback(
    served_app: tuple[ConnectionGuard, int, web.Application],
) -> None:
    # aiohttp's handle_error, overridden: its text/plain 500 becomes the JSON error shape, and
    # the ERROR with a traceback is logged once, then counted (the log throttle).
    _, port, _ = served_app
    with capture_logs() as logs:
        for _ in range(3):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /boom HTTP/1.1\r\nHost: forwarder\r\n\r\n")
            async with asyncio.timeout(5):
                answer = await reader.read()
            writer.close()
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 500 ")
            assert b"application/json" in head
            payload = json.loads(body)
            assert payload["reason"] == "internal_error"
            assert "bug" not in payload["error"]
    (line,) = [line for line in logs if line["event"] == "request_failed"]
    assert line["log_level"] == "error"
    assert isinstance(line["exc_info"], RuntimeError)
    assert line["path"] == "/boom"
