"""Intake: the aiohttp application apps talk to. Validate, queue, answer; never talk to the remote.

Every answer is JSON. Bad input gets a 4xx naming the field; a full queue or a stopping daemon
gets 503 with Retry-After, and then nothing of that request was queued. When `intake.auth_token`
is set, every request but GET /healthz must carry it (`Authorization: Bearer`, or
`X-Forwarder-Token` when the Authorization header holds an app's own API key), or gets 401.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import hmac
import json
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import orjson
import structlog
from aiohttp import BodyPartReader, web
from aiohttp.http import HttpVersion11
from aiohttp.http_exceptions import HttpProcessingError
from multidict import MultiDict
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from forwarder import __version__
from forwarder.events import Event
from forwarder.events.model import EventValidationError, FieldError
from forwarder.events.parse import describe_error, loads_json, parse_ndjson
from forwarder.events.validate import Leniency, event_from_mapping, events_from_items
from forwarder.intake.accounts import CLIENT_PREFIX, AccountError, Accounts
from forwarder.intake.connections import GuardedRequestHandler
from forwarder.intake.leniency import note as note_leniency
from forwarder.ops.credentials import Secret
from forwarder.ops.logthrottle import LogThrottle
from forwarder.ops.metrics import Metrics, Stats
from forwarder.storage.eventstatus import StatusBook, parse_key
from forwarder.storage.log import EventLog
from forwarder.storage.numbering import EventNumbers
from forwarder.storage.queue import TOO_LARGE, EventQueue
from forwarder.storage.sqlite.file import SpoolError

log = structlog.get_logger("forwarder.intake")
RETRY_AFTER_S = "5"
URLENCODED = "application/x-www-form-urlencoded"
FORM_TYPES = frozenset({URLENCODED, "multipart/form-data"})
JSON_TYPES = frozenset({"application/json"})
NDJSON_TYPES = frozenset({"application/x-ndjson", "application/ndjson", "application/jsonl"})
# The drop-in endpoint tolerates the remote's own way of passing the key, and ignores it.
DROP_IN_IGNORED = frozenset({"api_key"})
MAX_FORM_FIELDS = 1000  # aiohttp's own bound for urlencoded forms


@dataclass(slots=True)
class IntakeState:
    """What the handlers need: the queue, the counters and the daemon's condition."""

    queue: EventQueue
    stats: Stats
    metrics: Metrics
    max_batch: int
    max_body_bytes: int
    accepting: bool = True
    # Routes events to accounts; None leaves every event on the default account ("").
    accounts: Accounts | None = None
    # Where accepted events go (storage/log.py); None: straight into the queue.
    log: EventLog | None = None
    # Returns "" when ready, or why not (delivery paused, shutting down).
    not_ready_reason: Callable[[], str] = field(default=lambda: "")
    stats_extra: Callable[[], dict[str, Any]] = field(default=dict)
    # What /readyz adds to its answer (the fleet mode); {} without a fleet.
    ready_detail: Callable[[], dict[str, Any]] = field(default=dict)
    # The token every request but GET /healthz must carry; None: no token required.
    auth_token: Secret | None = None
    # A request's body must arrive within this long of its head (intake.body_timeout_s).
    body_timeout_s: float = 30.0
    # Every log line intake can write once per request goes through it (ops/logthrottle.py).
    throttle: LogThrottle = field(default_factory=LogThrottle)
    # intake.drop_in_answer: "remote" (200, data = the event number) or "accepted" (202).
    drop_in_answer: str = "remote"
    # The event numbers intake gives (the log's `intake_numbers`; None: the log numbers them).
    numbers: EventNumbers | None = None
    # What became of events, for GET /v1/events/{id}; None: the route answers 404.
    status: StatusBook | None = None


STATE = web.AppKey("state", IntakeState)


def _json(
    status: int, payload: dict[str, Any], headers: dict[str, str] | None = None
) -> web.Response:
    try:
        body = orjson.dumps(payload)
    except TypeError:
        # An error may echo a lone surrogate the app sent (a JSON escape): backslashreplace it.
        body = json.dumps(payload, ensure_ascii=False).encode("utf-8", "backslashreplace")
    return web.Response(
        status=status,
        body=body,
        content_type="application/json",
        headers=headers,
    )


def _error(status: int, message: str, **extra: Any) -> web.Response:
    return _json(status, {"success": False, "error": message, **extra})


@web.middleware
async def guard(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every request's way in: the connection's head deadline, the intake token, JSON errors.

    One middleware rather than three: each layer costs a coroutine per request, and intake
    answers many small requests. The connection is told that the request's head arrived (its
    deadline stops while the handler runs, connections.py) and when the handler is done.
    """
    protocol = request.protocol
    # Not a GuardedRequestHandler when served some other way (tests' TestServer).
    tracked = protocol if isinstance(protocol, GuardedRequestHandler) else None
    if tracked is not None:
        tracked.head_received()
    try:
        refusal = _token_refusal(request)
        if refusal is not None:
            return refusal
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _json_error(request, exc)
    finally:
        if tracked is not None:
            tracked.request_done()


TOKEN_HEADER = "X-Forwarder-Token"
_OPEN_ROUTES = frozenset({("GET", "/healthz"), ("HEAD", "/healthz")})


def _presented_tokens(request: web.Request) -> list[str]:
    """What the request offers as the intake token: a Bearer credential, X-Forwarder-Token."""
    offered = [request.headers.get(TOKEN_HEADER, "")]
    scheme, _, credential = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        offered.append(credential.strip())
    return [token for token in offered if token]


def _token_matches(offered: str, token: Secret) -> bool:
    # Bytes, not str: compare_digest takes only ASCII str, and a header may hold anything.
    # Constant-time, so the comparison's duration does not tell how much of a guess was right.
    return hmac.compare_digest(
        offered.encode("utf-8", "surrogatepass"), token.reveal().encode("utf-8", "surrogatepass")
    )


def _token_refusal(request: web.Request) -> web.Response | None:
    """With `intake.auth_token` set, the 401 for any request but GET /healthz without it.

    Looked at before any handler runs and before any body is read. The answer never echoes what
    the request sent.
    """
    state = request.app[STATE]
    token = state.auth_token
    if token is None or (request.method, request.path) in _OPEN_ROUTES:
        return None
    offered = _presented_tokens(request)
    if any(_token_matches(candidate, token) for candidate in offered):
        return None
    state.stats.unauthorized += 1
    # Throttled: a scanner must not flood the journal. Keyed by nothing the client chose.
    state.throttle.log(
        log,
        "warning",
        "unauthorized",
        peer=request.remote or "unix socket",
        path=request.path,
        token_sent=bool(offered),
        total=state.stats.unauthorized,
    )
    why = "wrong" if offered else "missing"
    return _json(
        401,
        {
            "success": False,
            "error": (
                f"{why} intake token: send it as 'Authorization: Bearer <token>', or in the "
                f"{TOKEN_HEADER} header when Authorization carries your API key "
                "(see intake.auth_token)"
            ),
            "reason": "unauthorized",
        },
        {"WWW-Authenticate": 'Bearer realm="forwarder"'},
    )


async def expect_continue(request: web.Request) -> web.StreamResponse | None:
    """`Expect: 100-continue` on intake's routes: refuse before the body is sent when we can.

    aiohttp's own expect handler tells every client to go on, so one whose body is larger than
    intake.max_body_bytes, or without the intake token, uploaded all of it for a 413 or a 401.
    Here those come first, on the head alone, and the connection closes after them. An Expect
    other than 100-continue got a 417 from the connection's gate already (connections.py).
    """
    if request.version != HttpVersion11:
        return None  # HTTP/1.0 has no interim answers (aiohttp ignores Expect there too)
    if request.headers.get("Expect", "").lower() != "100-continue":
        return _error(417, "unsupported Expect header: only '100-continue' is understood")
    state = request.app[STATE]
    refusal = _token_refusal(request)
    length = request.content_length
    if refusal is None and length is not None and length > state.max_body_bytes:
        state.stats.invalid_requests += 1
        refusal = _error(
            413, f"request body is larger than intake.max_body_bytes ({state.max_body_bytes})"
        )
    if refusal is not None:
        refusal.force_close()  # the client may send the body anyway: dropped, then closed
        return refusal
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    request.writer.output_size = 0  # the answer proper has not started (as aiohttp's handler)
    return None


def _json_error(request: web.Request, exc: web.HTTPException) -> web.Response:
    """aiohttp's own refusals (404, 405, 413, ...) in the same JSON error shape as ours."""
    headers = {k: v for k, v in exc.headers.items() if k in ("Allow", "Retry-After")}
    message = exc.text or exc.reason
    if exc.status == 413 and (exc.text or "").startswith("Maximum request body size"):
        limit = request.app[STATE].max_body_bytes
        message = f"request body is larger than intake.max_body_bytes ({limit})"
    if exc.status == 405:
        message = f"method {request.method} is not allowed here; use {headers.get('Allow', '')}"
    if exc.status == 404:
        message = f"no such endpoint: {request.path}"
    if 400 <= exc.status < 500:
        request.app[STATE].stats.invalid_requests += 1
    return _json(exc.status, {"success": False, "error": message}, headers)


def _content_type(request: web.Request) -> str:
    return request.content_type.lower() if "Content-Type" in request.headers else ""


def _invalid(
    state: IntakeState, errors: list[FieldError], summary: str | None = None
) -> web.Response:
    state.stats.invalid_requests += 1
    if summary is None:
        summary = str(EventValidationError(errors))
    return _error(400, summary, errors=[e.to_dict() for e in errors])


_REFUSALS = {
    "shutting_down": "forwarder is shutting down; retry later",
    "queue_full": "queue is full (queue.max_events); retry later",
    "queue_bytes_full": "queue is full (queue.max_bytes); retry later",
    "spool_full": "the spool is full (queue.max_disk_bytes); retry later",
    "spool_error": "the spool cannot be written (see forwarder's log); retry later",
}


def _refuse(state: IntakeState, reason: str, count: int) -> web.Response:
    if reason == TOO_LARGE:
        # Waiting would not help: these events alone are more than the queue may ever hold.
        state.stats.invalid_requests += 1
        limit = state.queue.max_bytes
        return _error(
            413,
            f"the {count} events of this request take more than queue.max_bytes ({limit}) "
            "allows in memory; send fewer or smaller events at a time",
            reason=TOO_LARGE,
        )
    state.stats.refused[reason] += count
    state.throttle.log(
        log,
        "warning",
        "refused",
        key=reason,
        reason=reason,
        count=count,
        queue_depth=len(state.queue),
    )
    return _json(
        503,
        {"success": False, "error": _REFUSALS[reason], "reason": reason},
        {"Retry-After": RETRY_AFTER_S},
    )


async def _admit(state: IntakeState, events: list[Event]) -> str:
    """Queue all of `events` or none; returns "" or the reason for refusing them."""
    if not state.accepting:
        return "shutting_down"
    if state.log is None:
        reason = state.queue.admit(events)
    # At once when the log can (memory); awaited when it commits first (durable).
    elif (at_once := state.log.try_append(events)) is not None:
        reason = at_once
    else:
        reason = await state.log.append(events)
    if not reason:
        state.stats.accepted += len(events)
    return reason


ACCOUNT_HEADER = "X-Forwarder-Account"


def _client_key(request: web.Request) -> str | None:
    """The API key an app sent the remote's way (Basic auth user name), if any."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "basic" or not token:
        return None
    try:
        user = base64.b64decode(token.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return user.partition(":")[0] or None


def _request_account(
    state: IntakeState, items: list[object], header: str, client_key: str | None = None
) -> str:
    """The account of this request's events that name none; raises _Unroutable.

    Worked out once per request, before the events are built, so that no event is copied to set
    its account. Only when some item names no account: an explicit account wins over the header
    and the client key, which are then not looked at (a client key would open a lane).
    """
    router = state.accounts
    if router is None or not any(
        not isinstance(item, dict) or item.get("account") is None for item in items
    ):
        return ""
    return _route(router, header, client_key)


def _route(router: Accounts, header: str, client_key: str | None) -> str:
    """The account for events that name none; raises _Unroutable."""
    try:
        return router.route("", header=header, client_key=client_key)
    except AccountError as exc:
        raise _Unroutable([FieldError(-1, exc.field, str(exc))], exc.status) from None


def _open_client(router: Accounts | None, client_key: str) -> None:
    """Create (or touch) the account of a valid request's client key; raises _Unroutable."""
    assert router is not None
    try:
        router.open_client(client_key)
    except AccountError as exc:
        raise _Unroutable([FieldError(-1, exc.field, str(exc))], exc.status) from None


def _check_accounts(state: IntakeState, events: list[Event], fallback: str) -> None:
    """Every account an event names must be configured; raises _Unroutable (with the items)."""
    router = state.accounts
    if router is None:
        return
    errors: list[FieldError] = []
    status = 400
    for index, event in enumerate(events):
        if event.account == fallback:
            continue  # the router chose it
        try:
            router.route(event.account)
        except AccountError as exc:
            errors.append(FieldError(index, exc.field, str(exc)))
            status = max(status, exc.status)
    if errors:
        raise _Unroutable(errors, status)


class _Unroutable(Exception):
    def __init__(self, errors: list[FieldError], status: int) -> None:
        super().__init__(errors[0].message)
        self.errors = errors
        self.status = status


def _unroutable(state: IntakeState, exc: _Unroutable, single: bool) -> web.Response:
    if exc.status != 400:
        payload = {"success": False, "error": str(exc), "errors": [e.to_dict() for e in exc.errors]}
        # A 503 (every client-account slot taken) passes: the app keeps the event and retries.
        retry = {"Retry-After": RETRY_AFTER_S} if exc.status == 503 else None
        return _json(exc.status, payload, retry)
    if single:
        exc.errors = [dataclasses.replace(e, index=0) for e in exc.errors]
    return _invalid(state, exc.errors)


class _SlowBody(Exception):
    """The body did not arrive within intake.body_timeout_s."""


def _slow_body(state: IntakeState) -> web.Response:
    state.stats.body_timeouts += 1
    response = _error(
        408,
        f"the request body did not arrive within intake.body_timeout_s "
        f"({state.body_timeout_s:g} s); nothing was queued",
        reason="body_timeout",
    )
    response.force_close()  # the rest of a body that slow is not waited for
    return response


class _BadBody(Exception):
    """The body could not be read as the content type it claims."""

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.field = field


async def _read_body(request: web.Request) -> bytes:
    try:
        if request.content.is_eof():
            # The whole body is here already (a small one comes with the head): reading cannot
            # wait, so no deadline. asyncio.timeout schedules and cancels a timer each time.
            return await request.read()  # raises 413 past client_max_size
        async with asyncio.timeout(request.app[STATE].body_timeout_s):
            return await request.read()
    except TimeoutError:
        raise _SlowBody from None
    except (web.RequestPayloadError, HttpProcessingError) as exc:  # e.g. corrupt gzip
        raise _BadBody(f"body cannot be read: {describe_error(exc)}") from None


async def _read_text(request: web.Request) -> str:
    body = await _read_body(request)
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _BadBody(f"body is not valid UTF-8 (byte {exc.start})") from None


async def _read_json(request: web.Request) -> object:
    body = await _read_body(request)
    try:
        return loads_json(body)
    except UnicodeDecodeError as exc:
        raise _BadBody(f"body is not valid UTF-8 (byte {exc.start})") from None
    except (ValueError, RecursionError) as exc:
        raise _BadBody(f"not valid JSON: {describe_error(exc)}") from None


_UTF8 = frozenset({"", "utf-8", "utf8"})


async def _simple_form(request: web.Request) -> dict[str, object] | None:
    """The fields of an urlencoded form in the common case, or None for `_read_form` to read.

    The common case: the whole body is here, UTF-8, with no percent escapes and no field given
    twice. It is split exactly as aiohttp's own parser splits such a body (yarl's
    query_to_pairs), without the two multidicts that request.post() and `_read_form` build for
    a handful of fields. Anything else, errors included, takes `_read_form`'s way as before
    (the body read here stays cached in the request).
    """
    charset = request.charset
    if not request.content.is_eof() or (charset is not None and charset.lower() not in _UTF8):
        return None
    try:
        body = await request.read()  # at once, the body is here; 413 past client_max_size
        # Not stripped (aiohttp's own parser strips): a trailing space is the last value's.
        text = body.decode("utf-8")
    except (UnicodeDecodeError, web.RequestPayloadError, HttpProcessingError):
        return None
    if "%" in text:
        return None
    pairs = text.replace("+", " ").split("&")
    if len(pairs) > MAX_FORM_FIELDS:
        return None
    fields: dict[str, object] = {}
    for pair in pairs:
        if pair:
            name, _, value = pair.partition("=")
            if name in fields:
                return None
            fields[name] = value
    return fields


async def _read_form(request: web.Request, limit: int) -> MultiDict[str]:
    """The form's text fields; anything aiohttp cannot parse becomes a 400, never a 500."""
    try:
        if request.content_type != "multipart/form-data":
            return _parse_urlencoded(await _read_body(request), request.charset)
        async with asyncio.timeout(request.app[STATE].body_timeout_s):
            return await _read_multipart(request, limit)
    except TimeoutError:
        raise _SlowBody from None
    except UnicodeDecodeError as exc:
        raise _BadBody(f"form is not valid UTF-8 (byte {exc.start})") from None
    except _FORM_ERRORS as exc:
        raise _BadBody(f"form cannot be read: {describe_error(exc)}") from None


def _parse_urlencoded(body: bytes, charset: str | None) -> MultiDict[str]:
    """An urlencoded body's fields as the remote's own kind parses them (PHP: split at "&",
    "+" is a space, nothing stripped), not as request.post() does: it strips the body's end,
    and with it a trailing space of the last value."""
    encoding = charset or "utf-8"
    text = body.decode(encoding)
    pairs = parse_qsl(
        text,
        keep_blank_values=True,
        encoding=encoding,
        errors="strict",
        max_num_fields=MAX_FORM_FIELDS,
    )
    return MultiDict(pairs)


# What aiohttp raises on a form a client got wrong: bad charset names, broken multipart headers,
# unknown transfer encodings, corrupt compression.
_FORM_ERRORS = (
    ValueError,
    LookupError,
    RuntimeError,
    AssertionError,
    HttpProcessingError,
    web.RequestPayloadError,
)


async def _read_multipart(request: web.Request, limit: int) -> MultiDict[str]:
    # Walked by hand rather than with request.post(): that spools file parts to temporary files
    # it leaks when the body turns out broken, and a file is never an event field anyway.
    fields: MultiDict[str] = MultiDict()
    total = 0
    reader = await request.multipart()
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader):
            raise _BadBody("nested multipart bodies are not supported")
        name = part.name or ""
        if part.filename is not None:
            raise _BadBody("must be a text field, not a file", field=name)
        data = bytearray()
        while chunk := await part.read_chunk(64 * 1024):
            total += len(chunk)
            if total > limit:
                raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=total)
            data.extend(chunk)
        fields.add(name, part.decode(bytes(data)).decode(part.get_charset(default="utf-8")))
        if len(fields) > MAX_FORM_FIELDS:
            raise _BadBody(f"more than {MAX_FORM_FIELDS} form fields")
    return fields


def _form_to_mapping(form: MultiDict[str]) -> tuple[dict[str, object], list[FieldError]]:
    fields: dict[str, object] = {}
    errors: list[FieldError] = []
    for key in form:
        if key in fields:
            continue
        values = form.getall(key)
        if len(values) > 1:
            errors.append(FieldError(0, key, "given more than once"))
        else:
            fields[key] = values[0]
    return fields, errors


async def create_event(request: web.Request) -> web.Response:
    """POST /v1/recipientEvents/create: the drop-in for the remote's endpoint, one event."""
    state = request.app[STATE]
    ctype = _content_type(request)
    errors: list[FieldError] = []
    raw: dict[str, object]
    try:
        if ctype == URLENCODED and (simple := await _simple_form(request)) is not None:
            raw = simple
        elif ctype in FORM_TYPES:
            form = await _read_form(request, state.max_body_bytes)
            raw, errors = _form_to_mapping(form)
        elif ctype in JSON_TYPES:
            parsed = await _read_json(request)
            if not isinstance(parsed, dict):
                return _invalid(
                    state,
                    [FieldError(0, "", "expected a JSON object; send batches to /v1/events")],
                )
            raw = parsed
        else:
            refusal = _unsupported(
                state, ctype, "application/x-www-form-urlencoded or application/json"
            )
            if state.drop_in_answer == "remote":
                refusal.set_status(400)  # the remote reads no fields from such a body: a 400
            return refusal
    except _BadBody as exc:
        return _invalid(state, [FieldError(0, exc.field, str(exc))])
    except _SlowBody:
        return _slow_body(state)
    try:
        fallback = ""
        client_key = None
        if state.accounts is not None and raw.get("account") is None:
            header = request.headers.get(ACCOUNT_HEADER, "")
            client_key = _client_key(request)
            fallback = _route(state.accounts, header, client_key)
        # Lenient where the remote is: unknown fields ignored, any conversion value taken.
        lenient = Leniency()
        event = event_from_mapping(
            raw, 0, errors, ignored=DROP_IN_IGNORED, lenient=lenient, account=fallback
        )
        if event is None or errors:
            return _invalid(state, errors)
        if lenient.unknown_fields or lenient.odd_value:
            note_leniency(state.stats, lenient)
        if event.account != fallback:
            _check_accounts(state, [event], fallback)
        elif client_key is not None and fallback.startswith(CLIENT_PREFIX):
            # Only now, the request found valid, may a new client key take an account.
            _open_client(state.accounts, client_key)
    except _Unroutable as exc:
        return _unroutable(state, exc, single=True)
    if state.numbers is not None:
        event.number = state.numbers.take()  # else the log's append gives its position
    if reason := await _admit(state, [event]):
        return _refuse(state, reason, 1)
    # The answer's JSON put together from constant parts: an event_id is letters, digits and
    # - _ . : only (events.EVENT_ID_RE), nothing JSON would escape.
    event_id = event.event_id
    if state.drop_in_answer == "accepted":
        body = _QUEUED_HEAD + event_id.encode("ascii") + _QUEUED_TAIL
        return web.Response(status=202, body=body, content_type="application/json")
    # The remote's answer: 200 and the new event's number as `data` (15.1).
    response = web.Response(
        status=200,
        body=b'{"success":true,"data":%d}' % event.number,
        content_type="application/json",
    )
    headers = response.headers
    headers[EVENT_ID_HEADER] = event_id
    headers["Location"] = "/v1/events/" + event_id
    return response


_QUEUED_HEAD = b'{"success":true,"data":{"id":"'
_QUEUED_TAIL = b'","status":"queued"}}'
EVENT_ID_HEADER = "X-Forwarder-Event-Id"


async def event_status(request: web.Request) -> web.Response:
    """GET /v1/events/{id}: what became of an event, by its event_id or its number."""
    state = request.app[STATE]
    text = request.match_info["id"]
    key = parse_key(text)
    if key is None:
        state.stats.invalid_requests += 1
        return _error(
            400,
            "id: must be an event number (digits) or an event_id (10-255 of letters, digits,"
            " - _ . :)",
        )
    try:
        found = await state.status.lookup_text(text) if state.status is not None else None
    except (SpoolError, sqlite3.Error) as exc:  # the spool cannot be read: say so, not a 500
        log.error("event_status_failed", error=str(exc))
        return _json(
            503,
            {"success": False, "error": "the spool cannot be read; retry later",
             "reason": "spool_error"},
            {"Retry-After": RETRY_AFTER_S},
        )  # fmt: skip
    if found is None:
        return _error(
            404,
            f"no event {text} is known: never accepted here, or its outcome is older than"
            " state.outcome_retention_s",
            reason="unknown_event",
        )
    return _json(200, {"success": True, "data": found})


async def create_events(request: web.Request) -> web.Response:
    """POST /v1/events: a batch (JSON array or NDJSON), validated and queued as a whole."""
    state = request.app[STATE]
    events = await _batch_events(request, state)
    if isinstance(events, web.Response):
        return events
    if reason := await _admit(state, events):
        return _refuse(state, reason, len(events))
    return _json(
        202,
        {
            "success": True,
            "data": {
                "ids": [e.event_id for e in events],
                "count": len(events),
                "status": "queued",
            },
        },
    )


async def _batch_events(request: web.Request, state: IntakeState) -> list[Event] | web.Response:
    """The batch's events, or the answer refusing it.

    A function of its own so that the parsed items are gone before the events wait for a
    durable commit: a hundred dicts a request need not live on through that wait, for every
    request of the group.
    """
    ctype = _content_type(request)
    items: list[object]
    try:
        if ctype in JSON_TYPES:
            parsed = await _read_json(request)
            if not isinstance(parsed, list):
                return _invalid(state, [FieldError(-1, "", "expected a JSON array of events")])
            items = parsed
        elif ctype in NDJSON_TYPES:
            items = parse_ndjson(await _read_text(request))
        else:
            return _unsupported(state, ctype, "application/json or application/x-ndjson")
    except _BadBody as exc:
        return _invalid(state, [FieldError(-1, exc.field, str(exc))])
    except _SlowBody:
        return _slow_body(state)
    try:
        fallback = _request_account(state, items, request.headers.get(ACCOUNT_HEADER, ""))
        events = events_from_items(items, max_items=state.max_batch, account=fallback)
        _check_accounts(state, events, fallback)
    except EventValidationError as exc:
        bad = len({e.index for e in exc.errors})
        summary = f"{bad} of {len(items)} events are invalid; nothing was queued"
        if exc.errors[0].index < 0:
            summary = f"{exc}; nothing was queued"
        return _invalid(state, exc.errors, summary)
    except _Unroutable as exc:
        return _unroutable(state, exc, single=False)
    return events


def _unsupported(state: IntakeState, ctype: str, expected: str) -> web.Response:
    state.stats.invalid_requests += 1
    got = f"'{ctype}'" if ctype else "none"
    return _error(415, f"unsupported Content-Type {got}; send {expected}")


async def healthz(request: web.Request) -> web.Response:
    """GET /healthz: the process is alive and serving."""
    return _json(200, {"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """GET /readyz: 200 when events flow; 503 with the reason while they cannot."""
    state = request.app[STATE]
    reason = state.not_ready_reason()
    if reason:
        return _json(503, {"ready": False, "reason": reason, **state.ready_detail()})
    return _json(200, {"ready": True, **state.ready_detail()})


async def metrics(request: web.Request) -> web.Response:
    """GET /metrics: Prometheus text format."""
    body = generate_latest(request.app[STATE].metrics.registry)
    response = web.Response(body=body)
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


async def stats(request: web.Request) -> web.Response:
    """GET /v1/stats: queue depth, in flight, counters by outcome."""
    state = request.app[STATE]
    payload: dict[str, Any] = {
        "version": __version__,
        "uptime_s": round(time.time() - state.stats.started_at, 3),
        "accepting": state.accepting,
        "queue": {
            "depth": len(state.queue),
            "max_events": state.queue.max_events,
            # Estimated bytes of the events in memory (waiting and in delivery), and the bound.
            "bytes": state.queue.bytes,
            "max_bytes": state.queue.max_bytes,
        },
        "counters": state.stats.counters(),
    }
    payload.update(state.stats_extra())
    return _json(200, payload)


def create_app(state: IntakeState) -> web.Application:
    """The intake application; the daemon serves it on TCP and/or a Unix socket."""
    app = web.Application(
        client_max_size=state.max_body_bytes,
        middlewares=[guard],
    )
    app[STATE] = state
    router, expect = app.router, expect_continue
    router.add_post("/v1/recipientEvents/create", create_event, expect_handler=expect)
    router.add_post("/v1/events", create_events, expect_handler=expect)
    router.add_get("/healthz", healthz, expect_handler=expect)
    router.add_get("/readyz", readyz, expect_handler=expect)
    router.add_get("/metrics", metrics, expect_handler=expect)
    router.add_get("/v1/stats", stats, expect_handler=expect)
    router.add_get("/v1/events/{id}", event_status, expect_handler=expect)
    return app
