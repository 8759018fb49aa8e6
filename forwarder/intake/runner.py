"""The server intake's listeners run: every connection a `GuardedRequestHandler`, every request
through a gate before the app.

The gate answers what must not reach the app: a connection past the cap (the health reserve) may
only ask for its health routes, and an `Expect` aiohttp does not understand gets a JSON 417.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.http import HttpVersion11
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from forwarder.intake.connections import GuardedRequestHandler
from forwarder.intake.guard import HEALTH_ROUTES, REFUSAL_JSON, ConnectionGuard
from forwarder.intake.rejections import UNMET_EXPECTATION

# After an early answer (413, 401, 408) aiohttp reads and drops the rest of the body so the
# client gets to read the answer; this long at most (aiohttp's own default is 10 s).
LINGER_S = 2.0


_Handler = Callable[[BaseRequest], Awaitable[web.StreamResponse]]


class _GuardedServer(web.Server):
    """aiohttp's low-level server, making a `GuardedRequestHandler` for each connection.

    Every request passes `_gate` before the app sees it: a reserve connection may only ask for
    its health routes, and an `Expect` aiohttp does not understand gets a JSON 417 (aiohttp's
    answers text/plain, quoting the header, before any middleware could help).
    """

    def __init__(
        self, guard: ConnectionGuard, handler_args: dict[str, Any], app_server: web.Server
    ) -> None:
        self._guard = guard
        self._handler_args = handler_args
        self._app_handler: _Handler = app_server.request_handler
        super().__init__(
            self._gate,
            request_factory=app_server.request_factory,
            handler_cancellation=app_server.handler_cancellation,
            **handler_args,
        )

    def __call__(self) -> RequestHandler:
        return GuardedRequestHandler(
            self,
            guard=self._guard,
            loop=asyncio.get_running_loop(),
            **self._handler_args,
            # Read per connection, so a reload applies to new connections.
            keepalive_timeout=self._guard.keepalive_timeout_s,
        )

    def _gate(self, request: BaseRequest) -> Awaitable[web.StreamResponse]:
        # A plain function returning the app's awaitable: the common case costs a call and two
        # look-ups, not another coroutine per request.
        expect = request.headers.get("Expect")
        protocol = request.protocol
        if expect or (isinstance(protocol, GuardedRequestHandler) and protocol.reserved):
            # These may be answered before intake's middleware runs (which tells the connection
            # that the head is in): the head deadline must not cut the answer's lingering short.
            if isinstance(protocol, GuardedRequestHandler):
                protocol.head_received()
            if expect and request.version == HttpVersion11 and expect.lower() != "100-continue":
                return self._unmet_expectation()
            if isinstance(protocol, GuardedRequestHandler) and protocol.reserved:
                return self._reserve(request)
        return self._app_handler(request)

    async def _unmet_expectation(self) -> web.StreamResponse:
        self._guard.count_bad_request(417, "unsupported Expect header", "Expect")
        response = web.json_response(UNMET_EXPECTATION, status=417)
        response.force_close()
        return response

    async def _reserve(self, request: BaseRequest) -> web.StreamResponse:
        """A connection past the cap: its health check only, then it closes."""
        if (request.method, request.path) in HEALTH_ROUTES:
            response = await self._app_handler(request)
        else:
            self._guard.count_refused()
            response = web.json_response(REFUSAL_JSON, status=503, headers={"Retry-After": "1"})
        response.force_close()
        return response


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
