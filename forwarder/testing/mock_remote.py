"""A faithful fake of the remote API's ``recipientEvents/create`` endpoint.

Used by the tests, the demo and anyone without an account. It follows the remote's facts as
docs/reference/remote-api.md records them: Basic or ``api_key`` query auth, a fixed per-key
rate window with the ``X-RateLimit-*`` headers on every answer, form validation, 24-hour
idempotency keys with 409/422, and JSON error bodies. On top it injects faults (5xx answers,
dropped connections, requests that are performed but never answered, and 429s as if another
client had spent the quota) at configurable rates, optionally seeded.

Inspect and steer it over HTTP under ``/_mock/`` (``events``, ``faults``, ``reset``) or, in
process, through :class:`MockRemote`'s attributes. ``/_mock/events`` lists the created events
and every 409 it answered (the repeats absorbed by an idempotency key).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import logging
import math
import random
import signal
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from typing import Any, Final, TypedDict
from urllib.parse import parse_qsl

from aiohttp import web

__all__ = [
    "CREATE_PATH",
    "DuplicateRecord",
    "EventRecord",
    "MockOptions",
    "MockRemote",
    "MockStats",
    "RunningMock",
    "serve_mock",
    "start_mock",
]

log = logging.getLogger("forwarder.mock_remote")

CREATE_PATH: Final = "/v1/recipientEvents/create"
# The real API's rate window; MockOptions.window_s defaults to it.
WINDOW_S: Final = 60.0
# Bounds of MockOptions.window_s: short windows for benchmarks, at most an hour.
MIN_WINDOW_S: Final = 0.1
MAX_WINDOW_S: Final = 3600.0
IDEMPOTENCY_TTL_S: Final = 24 * 60 * 60.0
# Rate windows whose request counts MockStats keeps.
KEPT_WINDOWS = 1000
# What the headers advertise when rate_limit is 0 (unlimited): clients still see a sane quota.
UNLIMITED_LIMIT: Final = 1_000_000
IDEMPOTENCY_HEADER: Final = "X-Idempotency-Key"
UNAUTHORIZED_ERROR: Final = "You need an API key or token to access this service"
# Default for the runner: shutdown hooks release hanging requests at once, so this only bounds
# handlers that are somewhere else (e.g. reading a slow body).
SHUTDOWN_TIMEOUT_S: Final = 0.25

_FIELDS: Final = ("recipient_id", "name", "value", "conversion", "data", "ref")
_REQUIRED: Final = ("recipient_id", "name")
_CONVERSION_VALUES: Final = frozenset({"1", "0", "true", "false"})
_FAIL_STATUSES: Final = (500, 502, 503)
_FAIL_ERRORS: Final = {
    500: "Internal server error",
    502: "Bad gateway",
    503: "Service temporarily unavailable",
}
# Options that /_mock/faults may change; seed is fixed at construction.
_TUNABLE: Final = (
    "api_key",
    "rate_limit",
    "window_s",
    "latency_ms",
    "fail_rate",
    "reset_rate",
    "timeout_rate",
    "throttle_rate",
    "hang_s",
)
_RATES: Final = ("fail_rate", "reset_rate", "timeout_rate", "throttle_rate")
# nginx's "closed without response": what the access log shows for a dropped connection.
_DROPPED_STATUS: Final = 444
# Dropped when an aiohttp HTTP error is re-answered as JSON.
_BODY_HEADERS: Final = frozenset({"content-type", "content-length"})

_CLOSING: Final = web.AppKey("closing", asyncio.Event)


def _check_option(name: str, value: object) -> object:
    """Return ``value`` normalised for option ``name``, or raise ValueError saying why not."""
    if name == "api_key":
        # A colon cannot survive Basic auth's user:password encoding.
        if not isinstance(value, str) or not value or ":" in value:
            raise ValueError("api_key must be a non-empty string without ':'")
        return value
    if name == "rate_limit":
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError("rate_limit must be an integer >= 0 (0 = unlimited)")
        return value
    if name == "seed":
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError("seed must be an integer or null")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number")
    number = float(value)
    if name in _RATES and not 0.0 <= number <= 1.0:
        raise ValueError(f"{name} must be between 0 and 1")
    if name == "latency_ms" and number < 0.0:
        raise ValueError("latency_ms must be >= 0")
    if name == "hang_s" and number <= 0.0:
        raise ValueError("hang_s must be > 0")
    if name == "window_s" and not MIN_WINDOW_S <= number <= MAX_WINDOW_S:
        raise ValueError(f"window_s must be between {MIN_WINDOW_S:g} and {MAX_WINDOW_S:g} seconds")
    return number


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


@dataclass
class MockOptions:
    """Behaviour of a :class:`MockRemote`; mutable at runtime (``/_mock/faults`` validates).

    Rates are probabilities per request between 0 and 1. ``rate_limit`` is requests per minute
    per key, 0 for unlimited. ``window_s`` is the length of the fixed rate window (0.1 to 3600
    seconds, default the real API's 60): each window allows
    ``max(1, round(rate_limit * window_s / 60))`` requests, the same average rate in shorter
    windows, which is what a benchmark wants. ``X-RateLimit-Limit`` reports that per-window
    quota and ``X-RateLimit-Reset`` the seconds until the window ends, rounded up to whole
    seconds like the real API's (so with a window under a second it still says 1).
    ``hang_s`` is how long a timeout-faulted request is held before the connection is dropped.
    ``throttle_rate`` answers that share 429 without performing the request, as if another
    client on the same key had just spent the window's quota: ``X-RateLimit-Remaining: 0``,
    ``X-RateLimit-Reset`` and a ``Retry-After`` of the seconds left in the window.
    ``seed`` makes the fault rolls reproducible.
    """

    api_key: str = "test-key"
    rate_limit: int = 300
    window_s: float = WINDOW_S
    latency_ms: float = 0.0
    fail_rate: float = 0.0
    reset_rate: float = 0.0
    timeout_rate: float = 0.0
    throttle_rate: float = 0.0
    hang_s: float = 600.0
    seed: int | None = None

    def __post_init__(self) -> None:
        # Fail at construction (e.g. from CLI flags) rather than on the first request.
        for f in fields(self):
            setattr(self, f.name, _check_option(f.name, getattr(self, f.name)))

    def public(self) -> dict[str, Any]:
        """The options as JSON, with the API key's value withheld."""
        shown = asdict(self)
        shown["api_key"] = "<set>"
        return shown

    def quota(self) -> int:
        """Requests allowed per key and window; 0 means unlimited."""
        if self.rate_limit == 0:
            return 0
        # Same average rate as rate_limit per minute; at least one request per window.
        return max(1, round(self.rate_limit * self.window_s / 60.0))


@dataclass
class MockStats:
    """Counters since start or the last reset.

    ``rate_limited`` counts the 429s of the real quota and ``throttled`` the injected ones
    (``throttle_rate``). ``first_rate_limited_at`` and ``last_rate_limited_at`` are the UNIX
    times (wall clock, not the mock's injectable monotonic clock) of the first and the latest
    quota 429, None before any: a benchmark can tell from them whether rate limiting happened
    only in the first window. ``window_counts`` holds the requests of each of the last
    `KEPT_WINDOWS` rate windows (the current one last, 429s included): a test of a fleet sees
    whether any window went over the quota.
    """

    requests: int = 0
    created: int = 0
    duplicates: int = 0
    conflicts: int = 0
    rate_limited: int = 0
    throttled: int = 0
    unauthorized: int = 0
    invalid: int = 0
    failed: int = 0
    resets: int = 0
    timeouts: int = 0
    first_rate_limited_at: float | None = None
    last_rate_limited_at: float | None = None
    window_counts: list[int] = field(default_factory=list)


class EventRecord(TypedDict):
    """One created event, fields exactly as received ("" when absent)."""

    id: int
    recipient_id: str
    name: str
    value: str
    conversion: str
    data: str
    ref: str
    idempotency_key: str
    auth_user: str
    received_at: str


class DuplicateRecord(TypedDict):
    """One 409: a repeat absorbed by its idempotency key (nothing was created)."""

    idempotency_key: str
    id: object  # the remote id of the event the key created first
    received_at: str


@dataclass
class _Window:
    started: float
    count: int = 0


@dataclass(frozen=True)
class _Remembered:
    fingerprint: tuple[str, ...]
    body: dict[str, Any]
    expires_at: float


class _Rejected(Exception):
    """A request answered with an error; raised inside the create handler."""

    def __init__(self, status: int, error: str) -> None:
        super().__init__(error)
        self.status = status
        self.error = error


class _Duplicate(Exception):
    """An idempotent repeat: answered 409 with the original body."""

    def __init__(self, body: dict[str, Any]) -> None:
        super().__init__("duplicate")
        self.body = body


def _now_text() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


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


class MockRemote:
    """The fake remote: options, created events, idempotency store, rate windows, counters.

    ``clock`` (monotonic seconds) drives the rate windows and key expiry; tests may replace it.
    """

    def __init__(
        self,
        options: MockOptions | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Create a mock with ``options`` (defaults if None)."""
        self.options = options if options is not None else MockOptions()
        self.clock = clock
        self.events: list[EventRecord] = []
        self.duplicates: list[DuplicateRecord] = []
        self.stats = MockStats()
        self._idempotency: dict[tuple[str, str], _Remembered] = {}
        self._windows: dict[str, _Window] = {}
        self._next_id = 1
        self._hanging = 0
        self._rng = random.Random(self.options.seed)

    @property
    def hanging(self) -> int:
        """How many timeout-faulted requests are being held right now."""
        return self._hanging

    def reset(self) -> None:
        """Forget events, 409s, idempotency keys, rate windows and counters; ids restart at 1."""
        self.events.clear()
        self.duplicates.clear()
        self.stats = MockStats()
        self._idempotency.clear()
        self._windows.clear()
        self._next_id = 1
        # Re-seed so a reset run replays the same faults.
        self._rng = random.Random(self.options.seed)

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
        except _Rejected as rejected:
            if rejected.status == 422:
                self.stats.conflicts += 1
            else:
                self.stats.invalid += 1
            return web.json_response(
                _error(rejected.error), status=rejected.status, headers=headers
            )
        except _Duplicate as duplicate:
            self.stats.duplicates += 1
            self.duplicates.append(
                DuplicateRecord(
                    idempotency_key=request.headers[IDEMPOTENCY_HEADER],
                    id=duplicate.body.get("data"),
                    received_at=_now_text(),
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
            raise _Rejected(413, "Request body too large") from exc
        except ValueError as exc:
            raise _Rejected(400, "Malformed request body") from exc
        received: dict[str, str] = {}
        for name in _FIELDS:
            value = form.get(name)
            if value is None:
                received[name] = ""
                continue
            if not isinstance(value, str):
                raise _Rejected(400, f"{name} must be a text field, not a file")
            received[name] = value
        for name in _REQUIRED:
            if not received[name].strip():
                raise _Rejected(400, f"{name} is required")
        if "conversion" in form and received["conversion"] not in _CONVERSION_VALUES:
            raise _Rejected(400, "conversion must be one of 1, 0, true, false")
        return received

    @staticmethod
    def _idempotency_key(request: web.BaseRequest) -> str | None:
        key = request.headers.get(IDEMPOTENCY_HEADER)
        if key is not None and not 10 <= len(key) <= 1024:
            raise _Rejected(400, f"{IDEMPOTENCY_HEADER} must be 10 to 1024 characters")
        return key

    def _create_event(
        self,
        api_key: str,
        auth_user: str,
        received: Mapping[str, str],
        idempotency_key: str | None,
    ) -> dict[str, Any]:
        """Create and record the event (or answer from the idempotency store)."""
        now = self.clock()
        fingerprint = tuple(received[name] for name in _FIELDS)
        if idempotency_key is not None:
            self._expire_keys(now)
            # Keys are per account, like the real platform's.
            remembered = self._idempotency.get((api_key, idempotency_key))
            if remembered is not None:
                if remembered.fingerprint != fingerprint:
                    raise _Rejected(422, "idempotency key reused with a different request")
                raise _Duplicate(remembered.body)

        event_id = self._next_id
        self._next_id += 1
        self.events.append(
            EventRecord(
                id=event_id,
                recipient_id=received["recipient_id"],
                name=received["name"],
                value=received["value"],
                conversion=received["conversion"],
                data=received["data"],
                ref=received["ref"],
                idempotency_key=idempotency_key or "",
                auth_user=auth_user,
                received_at=_now_text(),
            )
        )
        self.stats.created += 1
        body: dict[str, Any] = {"success": True, "data": event_id}
        if idempotency_key is not None:
            self._idempotency[(api_key, idempotency_key)] = _Remembered(
                fingerprint, body, now + IDEMPOTENCY_TTL_S
            )
        return body

    def _expire_keys(self, now: float) -> None:
        # Insertion order is expiry order, so expired keys are all at the front.
        while self._idempotency:
            oldest = next(iter(self._idempotency))
            if self._idempotency[oldest].expires_at > now:
                break
            del self._idempotency[oldest]

    def _roll(self, rate: float) -> bool:
        # Draw only for active faults so a seed replays the same way for the same options.
        return rate > 0 and self._rng.random() < rate

    # --- rate limit ---------------------------------------------------------------------

    def _count_rate_limited(self) -> None:
        self.stats.rate_limited += 1
        # Wall clock, so a benchmark can compare it with its own start time.
        at = time.time()
        if self.stats.first_rate_limited_at is None:
            self.stats.first_rate_limited_at = at
        self.stats.last_rate_limited_at = at

    def _window(self, key: str, now: float) -> _Window:
        window = self._windows.get(key)
        # The current window_s: a window shortened through /_mock/faults ends sooner.
        if window is None or now - window.started >= self.options.window_s:
            window = self._windows[key] = _Window(started=now)
            counts = self.stats.window_counts
            counts.append(0)
            del counts[:-KEPT_WINDOWS]
        return window

    def _rate_headers(self, window: _Window | None, now: float) -> dict[str, str]:
        window_s = self.options.window_s
        limit = self.options.quota() or UNLIMITED_LIMIT
        # Whole seconds like the real API, rounded up: a sub-second window still says 1.
        longest = math.ceil(window_s)
        if window is None or now - window.started >= window_s:
            used, reset = 0, longest
        else:
            # Elapsed first: started + 60 - now can round just above 60 and ceil to 61.
            used, reset = window.count, math.ceil(window_s - (now - window.started))
        return {
            "X-RateLimit-Limit": str(limit),
            "X-RateLimit-Remaining": str(max(0, limit - used)),
            "X-RateLimit-Reset": str(min(longest, max(0, reset))),
        }

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
        unknown = sorted(set(update) - set(_TUNABLE))
        if unknown:
            allowed = ", ".join(_TUNABLE)
            return web.json_response(
                _error(f"unknown option(s) {', '.join(unknown)}; allowed: {allowed}"), status=400
            )
        # Validate everything first so a bad request changes nothing.
        try:
            checked = {name: _check_option(name, value) for name, value in update.items()}
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


@dataclass
class RunningMock:
    """A mock serving on ``host``:``port``; ``close()`` stops it (idempotent)."""

    mock: MockRemote
    runner: web.AppRunner
    host: str
    port: int
    _closed: bool = field(default=False, init=False, repr=False)

    @property
    def base_url(self) -> str:
        """The API base URL to configure a client with, e.g. ``http://127.0.0.1:8080/v1``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    async def close(self) -> None:
        """Stop serving; held (hanging) requests are dropped at once."""
        if self._closed:
            return
        self._closed = True
        await self.runner.cleanup()


async def start_mock(options: MockOptions, host: str = "127.0.0.1", port: int = 0) -> RunningMock:
    """Start a mock on ``host``:``port`` (0 = ephemeral) and return it running.

    With port 0, give a literal address: a name resolving to several addresses would get a
    different ephemeral port on each.
    """
    mock = MockRemote(options)
    # handler_cancellation: a client that gives up on a held request frees its handler.
    # No access log: it would print ?api_key=... query strings; the debug log replaces it.
    runner = web.AppRunner(
        mock.app(),
        shutdown_timeout=SHUTDOWN_TIMEOUT_S,
        handler_cancellation=True,
        access_log=None,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound_port = int(runner.addresses[0][1])
    except BaseException:
        await runner.cleanup()
        raise
    return RunningMock(mock=mock, runner=runner, host=host, port=bound_port)


async def serve_mock(options: MockOptions, host: str, port: int, *, event_loop: str = "") -> None:
    """Serve a mock until SIGTERM or SIGINT, announcing its URL on one stdout line.

    ``event_loop`` (which loop runs, as the command line chose it) goes on a second line: the
    first stays the one that scripts wait for.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    running = await start_mock(options, host, port)
    installed: list[signal.Signals] = []
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
        print(f"mock-remote listening on {running.base_url}", flush=True)
        if event_loop:
            print(f"mock-remote event loop: {event_loop}", flush=True)
        # Unbounded on purpose: serving until told to stop is the job.
        await stop.wait()
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
        await running.close()
