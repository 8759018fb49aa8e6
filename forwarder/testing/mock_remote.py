"""A faithful fake of the remote API's ``recipientEvents/create`` endpoint, served over HTTP.

Used by the tests, the demo and anyone without an account. It follows the remote's facts as
docs/reference/remote-api.md records them: Basic or ``api_key`` query auth, a fixed per-key
rate window with the ``X-RateLimit-*`` headers on every answer, form validation, 24-hour
idempotency keys with 409/422, and JSON error bodies. On top it injects faults (5xx answers,
dropped connections, requests that are performed but never answered, and 429s as if another
client had spent the quota) at configurable rates, optionally seeded.

Inspect and steer it over HTTP under ``/_mock/`` (``events``, ``faults``, ``reset``) or, in
process, through :class:`MockRemote`'s attributes. ``/_mock/events`` lists the created events
and every 409 it answered (the repeats absorbed by an idempotency key).

This module is the HTTP side: the routes, authentication, the form as the real platform reads
it, the faults that act on the connection, and the answers. What the platform keeps (events,
idempotency keys, rate windows, counters) is ``forwarder.testing.mock_platform``; its options
``forwarder.testing.mock_options``; serving it on a port ``forwarder.testing.mock_server``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict
from typing import Any, Final
from urllib.parse import parse_qsl

from aiohttp import web

from forwarder.testing.mock_options import TUNABLE, WINDOW_S, check_option
from forwarder.testing.mock_platform import (
    FIELDS,
    Duplicate,
    DuplicateRecord,
    MockPlatform,
    Rejected,
    now_text,
)

__all__ = ["CREATE_PATH", "IDEMPOTENCY_HEADER", "UNAUTHORIZED_ERROR", "MockRemote"]

log = logging.getLogger("forwarder.mock_remote")

CREATE_PATH: Final = "/v1/recipientEvents/create"
IDEMPOTENCY_HEADER: Final = "X-Idempotency-Key"
UNAUTHORIZED_ERROR: Final = "You need an API key or token to access this service"

_REQUIRED: Final = ("recipient_id", "name")
_CONVERSION_VALUES: Final = frozenset({"1", "0", "true", "false"})
_FAIL_STATUSES: Final = (500, 502, 503)
_FAIL_ERRORS: Final = {
    500: "Internal server error",
    502: "Bad gateway",
    503: "Service temporarily unavailable",
}
# nginx's "closed without response": what the access log shows for a dropped connection.
_DROPPED_STATUS: Final = 444
# Dropped when an aiohttp HTTP error is re-answered as JSON.
_BODY_HEADERS: Final = frozenset({"content-type", "content-length"})

_CLOSING: Final = web.AppKey("closing", asyncio.Event)


def _seconds_text(seconds: float) -> str:
    """``seconds`` for an error message: "minute", "second", "6 seconds", "2.5 seconds"."""
    if seconds == WINDOW_S:
        # The real API's wording for its one-minute window.
        return "minute"
    if seconds == 1.0:
        return "second"
    # float(): options set directly as attributes may hold an int.
    number = float(seconds)
    shown = str(int(number)) if number.is_integer() else repr(number)
    return f"{shown} seconds"


def _error(message: str) -> dict[str, Any]:
    return {"success": False, "error": message}


async def _closing_within(closing: asyncio.Event, seconds: float) -> bool:
    """Wait up to ``seconds``; True if the server began shutting down meanwhile."""
    try:
        async with asyncio.timeout(seconds):
            await closing.wait()
    except TimeoutError:
        return False
    return True


def _basic_user(header: str) -> str:
    """The user name of an HTTP Basic ``Authorization`` header, or "" if there is none."""
    # Decoded by hand: aiohttp 3.14 deprecates BasicAuth and older versions lack a replacement.
    scheme, _, encoded = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return ""
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode()
    except (binascii.Error, ValueError):
        return ""
    user, colon, _ = decoded.partition(":")
    return user if colon else ""


def _drop(request: web.BaseRequest) -> web.StreamResponse:
    """Close the connection without answering.

    aiohttp cannot write the returned response to the closing transport; it treats that as a
    premature client disconnect (debug log only) rather than a handler error.
    """
    transport = request.transport
    if transport is not None:
        transport.close()
    return web.Response(status=_DROPPED_STATUS)


class MockRemote(MockPlatform):
    """The fake remote: a `MockPlatform` served over HTTP by the application `app()` builds."""

    def app(self) -> web.Application:
        """Build the aiohttp application serving this mock.

        Serve it with ``access_log=None`` (as :func:`start_mock` does): aiohttp's access log
        prints query strings, so an ``?api_key=`` would end up in the log.
        """

        @web.middleware
        async def json_errors(
            request: web.Request,
            handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
        ) -> web.StreamResponse:
            # The real API answers JSON even for unknown paths and wrong methods.
            try:
                return await handler(request)
            except web.HTTPException as exc:
                if exc.status < 400:
                    raise
                headers = {k: v for k, v in exc.headers.items() if k.lower() not in _BODY_HEADERS}
                if not request.path.startswith("/_mock/"):
                    headers.update(self._peek_headers(request))
                return web.json_response(_error(exc.reason), status=exc.status, headers=headers)

        app = web.Application(middlewares=[json_errors])
        app[_CLOSING] = asyncio.Event()

        async def release_hanging(app: web.Application) -> None:
            # Runs before aiohttp waits for handlers: held requests end now, not at the timeout.
            app[_CLOSING].set()

        app.on_shutdown.append(release_hanging)
        app.router.add_post(CREATE_PATH, self._create)
        app.router.add_get("/_mock/events", self._events)
        app.router.add_get("/_mock/faults", self._get_faults)
        app.router.add_post("/_mock/faults", self._set_faults)
        app.router.add_post("/_mock/reset", self._reset)
        return app

    # --- recipientEvents/create ---------------------------------------------------------

    async def _create(self, request: web.Request) -> web.StreamResponse:
        self.stats.requests += 1
        response = await self._perform(request)
        log.debug(
            "POST %s -> %s (auth=%s)",
            request.path,
            "dropped" if response.status == _DROPPED_STATUS else response.status,
            self._auth_kind(request),
        )
        return response

    async def _perform(self, request: web.Request) -> web.StreamResponse:
        opts = self.options
        key, auth_user = self._authenticate(request)
        if auth_user is None:
            self.stats.unauthorized += 1
            return web.json_response(
                _error(UNAUTHORIZED_ERROR), status=401, headers=self._peek_headers(request)
            )

        now = self.clock()
        window = self._window(key, now)
        window.count += 1
        self.stats.window_counts[-1] = window.count
        headers = self._rate_headers(window, now)
        quota = opts.quota()
        if quota > 0 and window.count > quota:
            self._count_rate_limited()
            window_text = _seconds_text(opts.window_s)
            return web.json_response(
                _error(f"Rate limit exceeded: {quota} requests per {window_text}"),
                status=429,
                headers=headers,
            )
        if self._roll(opts.throttle_rate):
            # Another client on the key spent the quota: nothing is performed, and the answer
            # says so the way the real one would, with a Retry-After on top (remote-api.md).
            self.stats.throttled += 1
            reset = headers["X-RateLimit-Reset"]
            headers.update({"X-RateLimit-Remaining": "0", "Retry-After": reset})
            return web.json_response(
                _error(f"Rate limit exceeded; try again in {reset} seconds"),
                status=429,
                headers=headers,
            )

        closing = request.app[_CLOSING]
        if opts.latency_ms > 0 and await _closing_within(closing, opts.latency_ms / 1000):
            return _drop(request)
        if self._roll(opts.reset_rate):
            self.stats.resets += 1
            return _drop(request)
        if self._roll(opts.fail_rate):
            self.stats.failed += 1
            status = self._rng.choice(_FAIL_STATUSES)
            return web.json_response(_error(_FAIL_ERRORS[status]), status=status, headers=headers)

        try:
            received = await self._read_form(request)
            idempotency_key = self._idempotency_key(request)
            body = self._create_event(key, auth_user, received, idempotency_key)
        except Rejected as rejected:
            if rejected.status == 422:
                self.stats.conflicts += 1
            else:
                self.stats.invalid += 1
            return web.json_response(
                _error(rejected.error), status=rejected.status, headers=headers
            )
        except Duplicate as duplicate:
            self.stats.duplicates += 1
            self.duplicates.append(
                DuplicateRecord(
                    idempotency_key=request.headers[IDEMPOTENCY_HEADER],
                    id=duplicate.body.get("data"),
                    received_at=now_text(),
                )
            )
            return web.json_response(duplicate.body, status=409, headers=headers)

        if self._roll(opts.timeout_rate):
            # Performed and recorded; the client never hears back, so its retry meets the key.
            self.stats.timeouts += 1
            log.debug("timeout fault: holding event %s unanswered", body["data"])
            self._hanging += 1
            try:
                await _closing_within(closing, opts.hang_s)
            finally:
                self._hanging -= 1
            return _drop(request)
        return web.json_response(body, status=200, headers=headers)

    def _authenticate(self, request: web.BaseRequest) -> tuple[str, str | None]:
        """Return (presented key, auth_user); auth_user is None when the key is wrong."""
        expected = self.options.api_key.encode()
        user = _basic_user(request.headers.get("Authorization", ""))
        if user and hmac.compare_digest(user.encode(), expected):
            return user, user
        query_key = request.query.get("api_key", "")
        if query_key and hmac.compare_digest(query_key.encode(), expected):
            return query_key, "query"
        return user or query_key, None

    @staticmethod
    def _auth_kind(request: web.BaseRequest) -> str:
        # For the log: how the client authenticated, never with what.
        if "Authorization" in request.headers:
            return "basic"
        return "query" if "api_key" in request.query else "none"

    async def _read_form(self, request: web.Request) -> dict[str, str]:
        try:
            form: Mapping[str, object]
            if request.content_type == "multipart/form-data":
                form = await request.post()
            else:
                # Parsed from the raw body as the real platform (PHP) parses it: split at "&",
                # "+" a space, nothing stripped, the last of a repeated field wins.
                # request.post() strips the body's end, and with it a last value's trailing
                # space.
                form = dict(parse_qsl((await request.read()).decode(), keep_blank_values=True))
        except web.HTTPRequestEntityTooLarge as exc:
            raise Rejected(413, "Request body too large") from exc
        except ValueError as exc:
            raise Rejected(400, "Malformed request body") from exc
        received: dict[str, str] = {}
        for name in FIELDS:
            value = form.get(name)
            if value is None:
                received[name] = ""
                continue
            if not isinstance(value, str):
                raise Rejected(400, f"{name} must be a text field, not a file")
            received[name] = value
        for name in _REQUIRED:
            if not received[name].strip():
                raise Rejected(400, f"{name} is required")
        if "conversion" in form and received["conversion"] not in _CONVERSION_VALUES:
            raise Rejected(400, "conversion must be one of 1, 0, true, false")
        return received

    @staticmethod
    def _idempotency_key(request: web.BaseRequest) -> str | None:
        key = request.headers.get(IDEMPOTENCY_HEADER)
        if key is not None and not 10 <= len(key) <= 1024:
            raise Rejected(400, f"{IDEMPOTENCY_HEADER} must be 10 to 1024 characters")
        return key

    def _peek_headers(self, request: web.BaseRequest) -> dict[str, str]:
        """Rate headers for the presented key's window, without counting the request."""
        presented, _ = self._authenticate(request)
        return self._rate_headers(self._windows.get(presented), self.clock())

    # --- /_mock/ control endpoints ------------------------------------------------------

    async def _events(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"events": self.events, "duplicates": self.duplicates, "stats": asdict(self.stats)}
        )

    async def _get_faults(self, request: web.Request) -> web.Response:
        return web.json_response(self.options.public())

    async def _set_faults(self, request: web.Request) -> web.Response:
        try:
            update = await request.json()
        except ValueError:
            return web.json_response(_error("body must be a JSON object"), status=400)
        if not isinstance(update, dict):
            return web.json_response(_error("body must be a JSON object"), status=400)
        unknown = sorted(set(update) - set(TUNABLE))
        if unknown:
            allowed = ", ".join(TUNABLE)
            return web.json_response(
                _error(f"unknown option(s) {', '.join(unknown)}; allowed: {allowed}"), status=400
            )
        # Validate everything first so a bad request changes nothing.
        try:
            checked = {name: check_option(name, value) for name, value in update.items()}
        except ValueError as exc:
            return web.json_response(_error(str(exc)), status=400)
        for name, value in checked.items():
            setattr(self.options, name, value)
        log.debug("faults updated: %s", sorted(checked))
        return web.json_response(self.options.public())

    async def _reset(self, request: web.Request) -> web.Response:
        self.reset()
        log.debug("mock reset")
        return web.json_response({"success": True})
