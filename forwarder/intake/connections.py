"""Intake's connections: a cap on how many are open, deadlines for each request's head and for
answers a client does not read, and JSON answers for requests aiohttp's parser refuses.

aiohttp's server has a keep-alive timeout for idle connections but no deadline for receiving a
request's headers, none for a client that sends requests but never reads the answers, and nothing
bounds how many connections are open. All of that lives in `GuardedRequestHandler` (here), the
`RequestHandler` subclass that the `IntakeRunner` (runner.py) hands to every listener:

- At most `max_connections` are open at once. Past them `HEALTH_RESERVE` more are accepted, which
  may only ask GET/HEAD /healthz and /readyz (anything else: 503 `too_many_connections`) and are
  closed after one answer, so a saturated intake still answers its health checks. One more is
  answered at once with a canned 503 (`too_many_connections`, `Connection: close`) and closed,
  without being handled.
- A request's head (request line and headers) must arrive within `header_timeout_s`, counted from
  the moment the connection is accepted (its first request) or from the first byte of a later
  request on a kept-alive connection; otherwise the connection is closed. Idle time between
  requests is the keep-alive timeout's business (`keepalive_timeout_s`).
- An answer may wait on a full socket for `write_timeout_s`: from the moment the transport's
  buffer passes its high-water mark (writing paused) until it drains, or from the moment the
  connection is closed with bytes still unsent. Past it the connection is aborted. Without this a
  client that pipelines requests and never reads holds its connection (and a slot) for ever.
- A request aiohttp's parser refuses (a malformed head, CL+TE, a bad chunk size, a line or header
  count past the limits) or an unknown `Expect` gets the same JSON error shape as every other
  answer, naming the fault without echoing the request's bytes, and one throttled warning line
  (`logthrottle`), where aiohttp answers text/plain with the offending bytes and logs an ERROR
  with a traceback for each.

The request body's deadline is bodies.py's (`intake.body_timeout_s`): by then a handler runs.
What such an answer says is rejections.py's. The limits a reload may change and the counters are
guard.py's (`ConnectionGuard`); the server and runner that hand this class to every listener,
and the gate each request passes before the app, are runner.py's.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any, cast

import structlog
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from forwarder.intake.guard import HEALTH_RESERVE, REFUSAL, ConnectionGuard
from forwarder.intake.rejections import INTERNAL_ERROR, describe_rejection

log = structlog.get_logger("forwarder.connections")
# The kernel's send buffer of an intake TCP connection (it doubles the value). Linux would grow
# it to 4 MiB for a client that does not read, and the daemon would go on rendering answers
# (thousands of /metrics pages for a client pipelining them) until that much waits unread;
# intake's answers are small, so this much keeps a reader at full speed and a non-reader cheap.
SEND_BUFFER_BYTES = 128 * 1024


class GuardedRequestHandler(RequestHandler):
    """aiohttp's protocol for one connection, plus the cap and the head and write deadlines."""

    __slots__ = (
        "_awaiting_head",
        "_guard",
        "_head_deadline",
        "_head_timer",
        "_head_timer_at",
        "_refused",
        "_stream",
        "_write_timer",
        "reserved",
    )

    def __init__(self, manager: web.Server, *, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._guard = guard
        self._refused = False
        # Opened past max_connections: may only ask for HEALTH_ROUTES, one answer.
        self.reserved = False
        self._awaiting_head = True  # no request handler running: bytes now are a request's head
        # When the head now awaited is overdue (loop time); None while none is awaited.
        self._head_deadline: float | None = None
        # At most one timer per connection, left pending when a head arrives in time: see _arm.
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_timer_at = 0.0  # when it fires (uvloop's TimerHandle.when() costs a call)
        # The transport until the connection is lost (aiohttp forgets it when it closes it, but
        # a close waits for the unsent bytes: the write deadline must still reach it).
        self._stream: asyncio.WriteTransport | None = None
        self._write_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Refuse past the cap and its reserve (before aiohttp sees it), else start the deadline."""
        guard = self._guard
        # A cast, not an isinstance check: uvloop's transports are not asyncio's classes.
        stream = cast(asyncio.WriteTransport, transport)
        if guard.open >= guard.max_connections + HEALTH_RESERVE:
            self._refused = True
            guard.count_refused()
            stream.write(REFUSAL)
            stream.close()  # after the buffered answer is written
            return
        self.reserved = guard.open >= guard.max_connections
        guard.open += 1
        self._stream = stream
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
        super().connection_made(transport)
        task = self._task_handler
        if task is not None:
            # When aiohttp is done with the connection it closes it, unsent bytes or not.
            task.add_done_callback(self._handler_done)
        self._arm()  # a new connection owes its first request's head from now on

    def connection_lost(self, exc: BaseException | None) -> None:
        """Count it closed; aiohttp's own clean-up for the connections it handled."""
        if self._refused:
            return  # never counted, never handed to aiohttp
        self._guard.open -= 1
        self._stream = None
        self._head_deadline = None
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """Feed aiohttp's parser; the first byte of a later request starts its deadline."""
        super().data_received(data)
        if self._awaiting_head and self._head_deadline is None and data:
            self._arm()

    def head_received(self) -> None:
        """A request's head is complete and its handler runs (called by intake's middleware)."""
        self._awaiting_head = False
        self._head_deadline = None  # a pending timer finds nothing due (see _arm)

    def request_done(self) -> None:
        """The handler has answered: bytes from now on belong to the next request's head."""
        self._awaiting_head = True

    # --- answers a client does not read ---------------------------------------------------

    def pause_writing(self) -> None:
        """The transport's buffer is full: the answers in it have write_timeout_s to get out."""
        super().pause_writing()
        self._arm_write()

    def resume_writing(self) -> None:
        """The client read: the buffer drained below its low-water mark."""
        super().resume_writing()
        stream = self._stream
        if self._write_timer is not None and stream is not None and not stream.is_closing():
            self._write_timer.cancel()
            self._write_timer = None

    def force_close(self) -> None:
        """aiohttp's hard close; the transport still waits for its unsent bytes, so watch it."""
        super().force_close()
        self._watch_close()

    def _handler_done(self, task: asyncio.Task[None]) -> None:
        self._watch_close()

    def _watch_close(self) -> None:
        stream = self._stream
        if stream is not None and stream.is_closing() and stream.get_write_buffer_size():
            self._arm_write()

    def _arm_write(self) -> None:
        if self._write_timer is None:
            self._write_timer = self._loop.call_later(
                self._guard.write_timeout_s, self._write_overdue
            )

    def _write_overdue(self) -> None:
        self._write_timer = None
        stream = self._stream
        if stream is None:
            return
        if self.writing_paused or (stream.is_closing() and stream.get_write_buffer_size()):
            self._guard.count_write_timeout(stream.get_write_buffer_size())
            stream.abort()  # close() would wait for the client to read, for ever

    # --- answers aiohttp makes itself -------------------------------------------------------

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp's own answer to a request its parser refused, or whose handler raised.

        Overridden (aiohttp calls it for both cases and has no other hook for them) so that the
        answer is JSON like every other and never quotes the request, and the log line is a
        throttled warning without a traceback for what a client got wrong.
        """
        if status < 500:
            fault = describe_rejection(exc) if exc is not None else "the request is malformed"
            kind = type(exc).__name__ if exc is not None else "unknown"
            self._guard.count_bad_request(status, fault, kind)
            payload: dict[str, Any] = {
                "success": False,
                "error": f"malformed HTTP request: {fault}",
                "reason": "bad_request",
            }
        elif isinstance(exc, ConnectionError):
            # The client went away while its request was read: nobody to answer, not our fault.
            self._guard.throttle.log(log, "info", "client_disconnected", error=type(exc).__name__)
            payload = INTERNAL_ERROR
        else:
            self._guard.throttle.log(
                log,
                "error",
                "request_failed",
                key=type(exc).__name__ if exc is not None else str(status),
                status=status,
                path=request.path,
                exc_info=exc,
            )
            payload = INTERNAL_ERROR
        if request.writer.output_size > 0:  # as aiohttp: part of an answer went out already
            raise ConnectionError("an answer was partly sent already: cannot send an error")
        response = web.json_response(payload, status=status)
        response.force_close()
        return response

    # --- request heads ------------------------------------------------------------------------

    def _arm(self) -> None:
        # Each request on a kept-alive connection starts a deadline and nearly always meets it
        # at once. Scheduling and cancelling a timer for each cost intake a few per cent of its
        # throughput (and left cancelled handles in the loop's heap), so, like aiohttp's own
        # keep-alive timer, one timer stays pending and moves itself on to the current deadline
        # when it fires early.
        loop = self._loop
        deadline = loop.time() + self._guard.header_timeout_s
        self._head_deadline = deadline
        if self._head_timer is not None:
            if self._head_timer_at <= deadline:
                return
            self._head_timer.cancel()  # a reload shortened header_timeout_s
        self._head_timer = loop.call_at(deadline, self._head_check)
        self._head_timer_at = deadline

    def _head_check(self) -> None:
        self._head_timer = None
        deadline = self._head_deadline
        if deadline is None:
            return  # the head arrived; the next request's first byte arms again
        loop = self._loop
        if loop.time() < deadline - _TIMER_SLACK_S:
            self._head_timer = loop.call_at(deadline, self._head_check)
            self._head_timer_at = deadline
            return
        self._head_deadline = None
        if self._awaiting_head and self.transport is not None:
            self._guard.count_slow()
            self.force_close()


# A timer may fire a little before its time (the loop's clock resolution; libuv rounds to
# milliseconds): within this of the deadline it counts as due rather than being set again.
_TIMER_SLACK_S = 0.001
