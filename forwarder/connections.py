"""Intake's connections: a cap on how many are open, and a deadline for each request's head.

aiohttp's server has a keep-alive timeout for idle connections but no deadline for receiving a
request's headers, so a client sending one header byte a second (slowloris) could hold a
connection for ever, and nothing bounds how many connections are open. Both live here, in a
`RequestHandler` subclass that the `IntakeRunner` hands to every listener:

- At most `max_connections` are open at once. One more is answered at once with a canned 503
  (`too_many_connections`, `Connection: close`) and closed, without being handled.
- A request's head (request line and headers) must arrive within `header_timeout_s`, counted from
  the moment the connection is accepted (its first request) or from the first byte of a later
  request on a kept-alive connection; otherwise the connection is closed. Idle time between
  requests is the keep-alive timeout's business (`keepalive_timeout_s`).

The request body's deadline is intake.py's (`intake.body_timeout_s`): by then a handler runs.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, cast

import structlog
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

log = structlog.get_logger("forwarder.connections")
# After an early answer (413, 401, 408) aiohttp reads and drops the rest of the body so the
# client gets to read the answer; this long at most (aiohttp's own default is 10 s).
LINGER_S = 2.0
# At most one log line about refused or slow connections this often: a flood must not flood
# the journal too. The counters in /metrics count every one.
LOG_EVERY_S = 60.0

_REFUSAL_BODY = json.dumps(
    {
        "success": False,
        "error": "too many open connections (intake.max_connections); retry later",
        "reason": "too_many_connections",
    }
).encode()
# Written straight to the socket: the connection is never handed to aiohttp's parser.
REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Content-Type: application/json\r\n"
    b"Content-Length: " + str(len(_REFUSAL_BODY)).encode() + b"\r\n"
    b"Retry-After: 1\r\n"
    b"Connection: close\r\n"
    b"\r\n" + _REFUSAL_BODY
)


@dataclass(slots=True)
class ConnectionGuard:
    """The limits (a reload may change them; new connections use the new ones) and counters."""

    max_connections: int
    header_timeout_s: float
    keepalive_timeout_s: float
    open: int = 0
    refused: int = 0  # connections past max_connections, answered 503 and closed
    header_timeouts: int = 0  # connections closed for a request head that did not arrive
    _refused_logged_at: float = field(default=-math.inf, init=False)
    _slow_logged_at: float = field(default=-math.inf, init=False)

    def view(self) -> dict[str, Any]:
        """For /v1/stats."""
        return {
            "open": self.open,
            "max_connections": self.max_connections,
            "refused": self.refused,
            "header_timeouts": self.header_timeouts,
        }

    def count_refused(self) -> None:
        """A connection past the cap was refused."""
        self.refused += 1
        now = time.monotonic()
        if now - self._refused_logged_at >= LOG_EVERY_S:
            self._refused_logged_at = now
            log.warning(
                "connections_refused",
                open=self.open,
                max_connections=self.max_connections,
                total=self.refused,
                note=f"one line per {LOG_EVERY_S:.0f}s at most",
            )

    def count_slow(self) -> None:
        """A connection was closed for a request head that did not arrive in time."""
        self.header_timeouts += 1
        now = time.monotonic()
        if now - self._slow_logged_at >= LOG_EVERY_S:
            self._slow_logged_at = now
            log.warning(
                "slow_client_closed",
                header_timeout_s=self.header_timeout_s,
                total=self.header_timeouts,
                note=f"one line per {LOG_EVERY_S:.0f}s at most",
            )


class GuardedRequestHandler(RequestHandler):
    """aiohttp's protocol for one connection, plus the cap and the request-head deadline."""

    __slots__ = (
        "_awaiting_head",
        "_guard",
        "_head_deadline",
        "_head_timer",
        "_head_timer_at",
        "_refused",
    )

    def __init__(self, manager: web.Server, *, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._guard = guard
        self._refused = False
        self._awaiting_head = True  # no request handler running: bytes now are a request's head
        # When the head now awaited is overdue (loop time); None while none is awaited.
        self._head_deadline: float | None = None
        # At most one timer per connection, left pending when a head arrives in time: see _arm.
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_timer_at = 0.0  # when it fires (uvloop's TimerHandle.when() costs a call)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Refuse past the cap (before aiohttp sees the connection), else start the deadline."""
        guard = self._guard
        if guard.open >= guard.max_connections:
            self._refused = True
            guard.count_refused()
            # A cast, not an isinstance check: uvloop's transports are not asyncio's classes.
            stream = cast(asyncio.WriteTransport, transport)
            stream.write(REFUSAL)
            stream.close()  # after the buffered answer is written
            return
        guard.open += 1
        super().connection_made(transport)
        self._arm()  # a new connection owes its first request's head from now on

    def connection_lost(self, exc: BaseException | None) -> None:
        """Count it closed; aiohttp's own clean-up for the connections it handled."""
        if self._refused:
            return  # never counted, never handed to aiohttp
        self._guard.open -= 1
        self._head_deadline = None
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
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


class _GuardedServer(web.Server):
    """aiohttp's low-level server, making a `GuardedRequestHandler` for each connection."""

    def __init__(
        self, guard: ConnectionGuard, handler_args: dict[str, Any], app_server: web.Server
    ) -> None:
        super().__init__(
            app_server.request_handler,
            request_factory=app_server.request_factory,
            handler_cancellation=app_server.handler_cancellation,
            **handler_args,
        )
        self._guard = guard
        self._handler_args = handler_args

    def __call__(self) -> RequestHandler:
        return GuardedRequestHandler(
            self,
            guard=self._guard,
            loop=asyncio.get_running_loop(),
            **self._handler_args,
            # Read per connection, so a reload applies to new connections.
            keepalive_timeout=self._guard.keepalive_timeout_s,
        )


class IntakeRunner(web.AppRunner):
    """`web.AppRunner` whose listeners use `GuardedRequestHandler` connections.

    aiohttp offers no public hook for the connection class: this overrides AppRunner's
    `_make_server`, keeping everything the app's own server sets up (startup signals, the
    request factory) and only swapping the per-connection protocol.
    """

    def __init__(
        self, app: web.Application, guard: ConnectionGuard, *, shutdown_timeout: float
    ) -> None:
        super().__init__(app, access_log=None, shutdown_timeout=shutdown_timeout)
        self.guard = guard
        # aiohttp's defaults for the request line (8190 bytes), each header (8190) and their
        # number (128) stay: past them aiohttp answers 400 and closes.
        self._handler_args: dict[str, Any] = {"access_log": None, "lingering_time": LINGER_S}

    async def _make_server(self) -> web.Server:
        app_server = await super()._make_server()  # runs the app's startup, freezes it
        return _GuardedServer(self.guard, self._handler_args, app_server)
