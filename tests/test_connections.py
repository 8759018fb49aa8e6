"""The request-head deadline of intake's connections (connections.py), in process."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from forwarder.connections import ConnectionGuard, GuardedRequestHandler, IntakeRunner

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
