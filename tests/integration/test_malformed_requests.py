"""Requests aiohttp's parser refuses, unknown Expect values, 100-continue, and the log under floods.

Served as the daemon serves intake (IntakeRunner: the guarded connection class), in process, so
the log can be captured. Every answer is the JSON error shape, never an echo of the request's
bytes; a flood of bad or refused requests writes a few log lines, not one per request.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import aiohttp
import pytest
from aiohttp import http_exceptions, web
from structlog.testing import capture_logs

from forwarder.events import Event
from forwarder.intake.app import create_app
from forwarder.intake.guard import ConnectionGuard
from forwarder.intake.rejections import describe_rejection
from forwarder.intake.runner import IntakeRunner
from forwarder.intake.state import IntakeState
from forwarder.ops.credentials import Secret
from forwarder.storage.backlog import Backlog
from forwarder.storage.durable import DurableLog
from forwarder.storage.sqlite.file import SpoolError
from forwarder.storage.sqlite.spool import Spool
from tests.conftest import intake_state

MARK = b"<EVIL-9f3a>"  # in every bad request: it must never come back
TOKEN = "intake-token-0123456789abcdef"
EVENT = b'[{"recipient_id": "1", "name": "SIGNUP"}]'


def _post(path: str, headers: bytes, body: bytes = b"") -> bytes:
    return b"POST " + path.encode() + b" HTTP/1.1\r\nHost: forwarder\r\n" + headers + b"\r\n" + body


# Each kind of request aiohttp's parser refuses, as a hostile client sent it (in one write).
PARSER_REJECTIONS: dict[str, tuple[bytes, str]] = {
    "content_length_and_chunked": (
        _post(
            "/v1/events",
            b"Content-Type: application/json\r\nContent-Length: 5\r\n"
            b"Transfer-Encoding: chunked\r\nX-Note: " + MARK + b"\r\n",
            b"0\r\n\r\n",
        ),
        "Transfer-Encoding can't be present with Content-Length",
    ),
    "duplicate_content_length": (
        _post("/v1/events", b"Content-Length: 2\r\nContent-Length: 3" + MARK + b"\r\n", b"[]"),
        "Duplicate Content-Length",
    ),
    "bad_chunk_size": (
        _post(
            "/v1/events",
            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n",
            b"zz" + MARK + b"\r\n[]\r\n0\r\n\r\n",
        ),
        "chunk size",
    ),
    "cr_in_header": (
        b"GET /healthz HTTP/1.1\r\nHost: forwarder\r\nX-A: a\rb" + MARK + b"\r\n\r\n",
        "LF",
    ),
    "nul_in_header": (
        b"GET /healthz HTTP/1.1\r\nHost: forwarder\r\nX-A: a\x00" + MARK + b"\r\n\r\n",
        "header value",
    ),
    "request_line_too_long": (
        b"GET /" + MARK * 1000 + b" HTTP/1.1\r\nHost: forwarder\r\n\r\n",
        "longer than 8190 bytes",
    ),
    "header_too_long": (
        b"GET /healthz HTTP/1.1\r\nHost: forwarder\r\nX-A: " + MARK * 1000 + b"\r\n\r\n",
        "longer than 8190 bytes",
    ),
    "too_many_headers": (
        b"GET /healthz HTTP/1.1\r\nHost: forwarder\r\n"
        + b"".join(b"X-%d: %s\r\n" % (n, MARK) for n in range(200))
        + b"\r\n",
        "Too many headers",
    ),
    "bad_method": (b"GE" + MARK + b" /healthz HTTP/1.1\r\nHost: forwarder\r\n\r\n", "method"),
    "bad_version": (b"GET /healthz HTTP/9" + MARK + b"\r\nHost: forwarder\r\n\r\n", "line"),
}


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[IntakeState], Any]]:
    """Serve intake as the daemon does (IntakeRunner); yields a function returning the port."""
    runners: list[web.AppRunner] = []

    async def start(state: IntakeState) -> int:
        guard = ConnectionGuard(
            max_connections=1000,
            header_timeout_s=5.0,
            keepalive_timeout_s=30.0,
            throttle=state.throttle,  # as the daemon shares one
        )
        runner = IntakeRunner(create_app(state), guard, shutdown_timeout=1.0)
        runners.append(runner)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert isinstance(server, asyncio.Server)
        port: int = server.sockets[0].getsockname()[1]
        return port

    yield start
    for runner in runners:
        await runner.cleanup()


async def _exchange(port: int, raw: bytes, timeout: float = 5.0) -> bytes:
    """Send `raw`, return everything until the server closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        async with asyncio.timeout(timeout):
            return await reader.read()
    finally:
        writer.close()


def _split(answer: bytes) -> tuple[bytes, dict[str, Any]]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return head, json.loads(body)


@pytest.mark.parametrize("kind", sorted(PARSER_REJECTIONS))
async def test_a_request_the_parser_refuses_gets_json_without_an_echo_and_a_warning(
    serve: Callable[[IntakeState], Any], kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    raw, fault = PARSER_REJECTIONS[kind]
    port = await serve(intake_state())
    with capture_logs() as logs, caplog.at_level(logging.DEBUG):
        answer = await _exchange(port, raw)
    head, payload = _split(answer)
    assert head.split(b" ", 2)[1] == b"400", answer[:300]
    assert b"Content-Type: application/json" in head
    assert payload["success"] is False
    assert payload["reason"] == "bad_request"
    assert payload["error"].startswith("malformed HTTP request: ")
    assert fault in payload["error"]
    assert MARK not in answer
    assert b"EVIL" not in answer
    (line,) = [line for line in logs if line["event"] == "bad_request"]
    assert line["log_level"] == "warning"
    assert "exc_info" not in line
    assert "EVIL" not in json.dumps(line)
    # aiohttp's own "Error handling request" line (an ERROR with a traceback) is gone.
    assert not [r for r in caplog.records if r.name.startswith("aiohttp")], caplog.records


@pytest.mark.parametrize("path", ["/v1/events", "/no/such/path"])
async def test_an_unknown_expect_gets_a_json_417_without_an_echo(
    serve: Callable[[IntakeState], Any], path: str
) -> None:
    port = await serve(intake_state())
    raw = _post(path, b"Expect: 200-ok" + MARK + b"\r\nContent-Length: 0\r\n")
    head, payload = _split(await _exchange(port, raw))
    assert head.startswith(b"HTTP/1.1 417 ")
    assert b"Content-Type: application/json" in head
    assert payload == {
        "success": False,
        "error": "unsupported Expect header: only '100-continue' is understood",
        "reason": "expectation_failed",
    }


# --- Expect: 100-continue ----------------------------------------------------------------------


async def _head_only(port: int, headers: bytes) -> tuple[bytes, asyncio.StreamReader, Any]:
    """Send a request's head alone, and what the server answers before any body is sent."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(_post("/v1/events", headers))
    await writer.drain()
    async with asyncio.timeout(5):
        head = await reader.readuntil(b"\r\n\r\n")
    return head, reader, writer


async def test_100_continue_with_a_body_over_the_limit_is_refused_before_the_body(
    serve: Callable[[IntakeState], Any],
) -> None:
    state = intake_state(max_body_bytes=4096)
    port = await serve(state)
    head, reader, writer = await _head_only(
        port,
        b"Content-Type: application/json\r\nContent-Length: 1000000\r\nExpect: 100-continue\r\n",
    )
    try:
        assert head.startswith(b"HTTP/1.1 413 "), head  # not "100 Continue": the body stays home
        assert b"Connection: close" in head
        length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
        payload = json.loads(await reader.readexactly(length))
    finally:
        writer.close()
    assert payload == {
        "success": False,
        "error": "request body is larger than intake.max_body_bytes (4096)",
    }
    assert state.stats.invalid_requests == 1


@pytest.mark.parametrize("token", [None, "wrong-token-0123456789"])
async def test_100_continue_without_the_intake_token_is_refused_before_the_body(
    serve: Callable[[IntakeState], Any], token: str | None
) -> None:
    state = intake_state()
    state.auth_token = Secret(TOKEN)
    port = await serve(state)
    auth = b"" if token is None else b"Authorization: Bearer " + token.encode() + b"\r\n"
    head, _reader, writer = await _head_only(
        port,
        b"Content-Type: application/json\r\nContent-Length: 41\r\nExpect: 100-continue\r\n" + auth,
    )
    writer.close()
    assert head.startswith(b"HTTP/1.1 401 "), head
    assert b"WWW-Authenticate: Bearer" in head
    assert state.stats.unauthorized == 1


async def test_100_continue_that_may_go_on_gets_its_interim_answer_then_its_202(
    serve: Callable[[IntakeState], Any],
) -> None:
    state = intake_state()
    state.auth_token = Secret(TOKEN)
    port = await serve(state)
    head, reader, writer = await _head_only(
        port,
        b"Content-Type: application/json\r\nContent-Length: %d\r\nExpect: 100-continue\r\n"
        b"Authorization: Bearer %s\r\n" % (len(EVENT), TOKEN.encode()),
    )
    try:
        assert head == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(EVENT)
        async with asyncio.timeout(5):
            answer = await reader.readuntil(b"\r\n\r\n")
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 202 "), answer
    assert state.stats.accepted == 1


# --- floods: a few log lines, not one per request ----------------------------------------------


async def test_2000_malformed_requests_write_a_few_log_lines(
    serve: Callable[[IntakeState], Any], caplog: pytest.LogCaptureFixture
) -> None:
    state = intake_state()
    port = await serve(state)
    kinds = sorted(PARSER_REJECTIONS)
    statuses: list[bytes] = []

    async def client(worker: int) -> None:
        for n in range(worker, 2000, 20):
            raw, _ = PARSER_REJECTIONS[kinds[n % len(kinds)]]
            statuses.append((await _exchange(port, raw)).split(b" ", 2)[1])

    with capture_logs() as logs, caplog.at_level(logging.DEBUG):
        await asyncio.gather(*(client(worker) for worker in range(20)))
        state.throttle.close()  # what a stop writes: the counts held back
    assert statuses == [b"400"] * 2000
    lines = [line for line in logs if line["event"] == "bad_request"]
    # One line per kind at once, then one summary per kind with the count.
    assert len(lines) <= 2 * len(kinds), len(lines)
    assert len(logs) == len(lines)
    # Every request is accounted for: a line of its own, or counted in a summary.
    assert sum(line.get("suppressed", 1) for line in lines) == 2000
    assert len(json.dumps(logs, default=str)) < 10_000
    assert not [r for r in caplog.records if r.name.startswith("aiohttp")]


async def test_2000_refusals_write_one_line_and_a_summary(
    serve: Callable[[IntakeState], Any],
) -> None:
    state = intake_state(max_events=1)
    port = await serve(state)
    assert not state.queue.admit([Event(event_id="fill", recipient_id="1", name="FILL")])
    url = f"http://127.0.0.1:{port}/v1/events"
    statuses: list[int] = []
    with capture_logs() as logs:
        async with aiohttp.ClientSession() as http:

            async def client(worker: int) -> None:
                for _ in range(100):
                    async with http.post(
                        url, data=EVENT, headers={"Content-Type": "application/json"}
                    ) as response:
                        statuses.append(response.status)

            await asyncio.gather(*(client(worker) for worker in range(20)))
        state.throttle.close()
    assert statuses == [503] * 2000
    assert state.stats.refused["queue_full"] == 2000
    first, summary = [line for line in logs if line["event"] == "refused"]
    assert len(logs) == 2
    assert (first["reason"], first["count"]) == ("queue_full", 1)
    assert summary["suppressed"] == 1999
    assert summary["count"] == 1999
    assert summary["summary"] == "refused queue_full: 1999 more in the last 60 s"


class _FailingSpool:
    """Stands in for a spool on a disk that fails every commit."""

    depth = 0

    async def append(self, events: list[Event], *, force: bool = False) -> list[int]:
        raise SpoolError("could not write to the spool /state/spool.db: disk I/O error")


async def test_2000_requests_on_a_failing_disk_write_two_lines_and_their_summaries(
    serve: Callable[[IntakeState], Any],
) -> None:
    # Durable mode with a disk that fails: each request is answered 503 spool_error, and each
    # used to log both `spool_write_failed` and `refused`.
    state = intake_state()
    spool = cast(Spool, _FailingSpool())
    backlog = Backlog(state.queue, spool)
    backlog.throttle = state.throttle  # as the daemon shares one
    assert state.numbers is not None
    assert state.status is not None
    state.log = DurableLog(spool, state.numbers, state.status, backlog)
    port = await serve(state)
    url = f"http://127.0.0.1:{port}/v1/events"
    statuses: list[int] = []
    with capture_logs() as logs:
        async with aiohttp.ClientSession() as http:

            async def client() -> None:
                for _ in range(100):
                    async with http.post(
                        url, data=EVENT, headers={"Content-Type": "application/json"}
                    ) as response:
                        statuses.append(response.status)

            await asyncio.gather(*(client() for _ in range(20)))
        assert len(logs) == 2
        state.throttle.close()
    assert statuses == [503] * 2000
    assert state.stats.refused["spool_error"] == 2000
    events = sorted((line["event"], line.get("suppressed", 0)) for line in logs)
    assert events == [
        ("refused", 0),
        ("refused", 1999),
        ("spool_write_failed", 0),
        ("spool_write_failed", 1999),
    ]


@pytest.mark.parametrize(
    ("exc", "said"),
    [
        # aiohttp's pure-Python parser builds these from the request itself.
        (http_exceptions.InvalidURLError("evil"), "the request target is malformed"),
        (http_exceptions.BadStatusLine("GET evil"), "the request line is malformed"),
        (http_exceptions.InvalidHeader(b"X-Evil"), "a header is malformed"),
        (http_exceptions.LineTooLong("evil", 8190), "a request line or header is longer"),
        (http_exceptions.BadHttpMessage("Duplicate 'evil' header found."), "is malformed"),
        (http_exceptions.BadHttpMessage("Bad thing: evil"), "the request is malformed"),
        (http_exceptions.BadHttpMessage("Invalid header value char:\n\n  b'evil'"), "value char"),
        (http_exceptions.TransferEncodingError("Not enough data (received 5 of 9 bytes)."), "5 of"),
    ],
)
def test_a_rejection_is_described_without_the_request_s_words(
    exc: http_exceptions.HttpProcessingError, said: str
) -> None:
    text = describe_rejection(exc)
    assert said in text
    assert "evil" not in text
