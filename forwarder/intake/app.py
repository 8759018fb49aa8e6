"""Intake: the aiohttp application apps talk to. Validate, queue, answer; never talk to the remote.

Every answer is JSON. Bad input gets a 4xx naming the field; a full queue or a stopping daemon
gets 503 with Retry-After, and then nothing of that request was queued. When `intake.auth_token`
is set, every request but GET /healthz must carry it (`Authorization: Bearer`, or
`X-Forwarder-Token` when the Authorization header holds an app's own API key), or gets 401.

This module is the application: the middleware every request passes, the routes and their
handlers. What they share is state.py's; the intake token auth.py's; reading bodies bodies.py's;
a request's account routing.py's; the answers answers.py's.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web
from aiohttp.http import HttpVersion11
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from forwarder import __version__
from forwarder.events import Event
from forwarder.events.model import EventValidationError, FieldError
from forwarder.events.parse import parse_ndjson
from forwarder.events.validate import Leniency, event_from_mapping, events_from_items
from forwarder.intake.accounts import CLIENT_PREFIX
from forwarder.intake.answers import (
    RETRY_AFTER_S,
    error_answer,
    http_error_answer,
    invalid_answer,
    json_answer,
    refuse,
    slow_body_answer,
    unroutable_answer,
    unsupported_answer,
)
from forwarder.intake.auth import token_refusal
from forwarder.intake.bodies import (
    BadBody,
    SlowBody,
    form_to_mapping,
    read_form,
    read_json,
    read_text,
    request_content_type,
    simple_form,
)
from forwarder.intake.connections import GuardedRequestHandler
from forwarder.intake.leniency import note as note_leniency
from forwarder.intake.routing import (
    ACCOUNT_HEADER,
    Unroutable,
    check_accounts,
    open_client,
    presented_client_key,
    request_account,
    route_fallback,
)
from forwarder.intake.state import STATE, IntakeState
from forwarder.storage.eventstatus import StatusUnavailable, parse_key
from forwarder.storage.sqlite.file import SpoolError

log = structlog.get_logger("forwarder.intake")


URLENCODED = "application/x-www-form-urlencoded"


FORM_TYPES = frozenset({URLENCODED, "multipart/form-data"})


JSON_TYPES = frozenset({"application/json"})


NDJSON_TYPES = frozenset({"application/x-ndjson", "application/ndjson", "application/jsonl"})


# The drop-in endpoint tolerates the remote's own way of passing the key, and ignores it.
DROP_IN_IGNORED = frozenset({"api_key"})


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
        refusal = token_refusal(request)
        if refusal is not None:
            return refusal
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return http_error_answer(request, exc)
    finally:
        if tracked is not None:
            tracked.request_done()


async def expect_continue(request: web.Request) -> web.StreamResponse | None:
    """`Expect: 100-continue` on intake's routes: refuse before the body is sent when we can.

    aiohttp's own expect handler tells every client to go on, so one whose body is larger than
    intake.max_body_bytes, or without the intake token, uploaded all of it for a 413 or a 401.
    Here those come first, on the head alone, and the connection closes after them. An Expect
    other than 100-continue got a 417 from the connection's gate already (runner.py).
    """
    if request.version != HttpVersion11:
        return None  # HTTP/1.0 has no interim answers (aiohttp ignores Expect there too)
    if request.headers.get("Expect", "").lower() != "100-continue":
        return error_answer(417, "unsupported Expect header: only '100-continue' is understood")
    state = request.app[STATE]
    refusal = token_refusal(request)
    length = request.content_length
    if refusal is None and length is not None and length > state.max_body_bytes:
        state.stats.invalid_requests += 1
        refusal = error_answer(
            413, f"request body is larger than intake.max_body_bytes ({state.max_body_bytes})"
        )
    if refusal is not None:
        refusal.force_close()  # the client may send the body anyway: dropped, then closed
        return refusal
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    request.writer.output_size = 0  # the answer proper has not started (as aiohttp's handler)
    return None


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


async def create_event(request: web.Request) -> web.Response:
    """POST /v1/recipientEvents/create: the drop-in for the remote's endpoint, one event."""
    state = request.app[STATE]
    ctype = request_content_type(request)
    errors: list[FieldError] = []
    raw: dict[str, object]
    try:
        if ctype == URLENCODED and (simple := await simple_form(request)) is not None:
            raw = simple
        elif ctype in FORM_TYPES:
            form = await read_form(request, state.max_body_bytes)
            raw, errors = form_to_mapping(form)
        elif ctype in JSON_TYPES:
            parsed = await read_json(request)
            if not isinstance(parsed, dict):
                return invalid_answer(
                    state,
                    [FieldError(0, "", "expected a JSON object; send batches to /v1/events")],
                )
            raw = parsed
        else:
            refusal = unsupported_answer(
                state, ctype, "application/x-www-form-urlencoded or application/json"
            )
            if state.drop_in_answer == "remote":
                refusal.set_status(400)  # the remote reads no fields from such a body: a 400
            return refusal
    except BadBody as exc:
        return invalid_answer(state, [FieldError(0, exc.field, str(exc))])
    except SlowBody:
        return slow_body_answer(state)
    try:
        fallback = ""
        client_key = None
        if state.accounts is not None and raw.get("account") is None:
            header = request.headers.get(ACCOUNT_HEADER, "")
            client_key = presented_client_key(request)
            fallback = route_fallback(state.accounts, header, client_key)
        # Lenient where the remote is: unknown fields ignored, any conversion value taken.
        lenient = Leniency()
        event = event_from_mapping(
            raw, 0, errors, ignored=DROP_IN_IGNORED, lenient=lenient, account=fallback
        )
        if event is None or errors:
            return invalid_answer(state, errors)
        if lenient.unknown_fields or lenient.odd_value:
            note_leniency(state.stats, lenient)
        if event.account != fallback:
            check_accounts(state, [event], fallback)
        elif client_key is not None and fallback.startswith(CLIENT_PREFIX):
            # Only now, the request found valid, may a new client key take an account.
            open_client(state.accounts, client_key)
    except Unroutable as exc:
        return unroutable_answer(state, exc, single=True)
    if state.numbers is not None:
        event.number = state.numbers.take()  # else the log's append gives its position
    if reason := await _admit(state, [event]):
        return refuse(state, reason, 1)
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
        return error_answer(
            400,
            "id: must be an event number (digits) or an event_id (10-255 of letters, digits,"
            " - _ . :)",
        )
    try:
        found = await state.status.lookup_text(text) if state.status is not None else None
    except (SpoolError, sqlite3.Error, StatusUnavailable) as exc:
        # The spool cannot be read, or a fleet's Redis cannot be reached: say so, not a 500, and
        # not a 404 (the event may well be known there).
        fleet = isinstance(exc, StatusUnavailable)
        log.error("event_status_failed", error=str(exc))
        return json_answer(
            503,
            {"success": False,
             "error": ("the fleet's Redis cannot be reached" if fleet
                       else "the spool cannot be read") + "; retry later",
             "reason": "redis_unavailable" if fleet else "spool_error"},
            {"Retry-After": RETRY_AFTER_S},
        )  # fmt: skip
    if found is None:
        return error_answer(
            404,
            f"no event {text} is known: never accepted here, or its outcome is older than"
            " state.outcome_retention_s",
            reason="unknown_event",
        )
    return json_answer(200, {"success": True, "data": found})


async def create_events(request: web.Request) -> web.Response:
    """POST /v1/events: a batch (JSON array or NDJSON), validated and queued as a whole."""
    state = request.app[STATE]
    events = await _batch_events(request, state)
    if isinstance(events, web.Response):
        return events
    if reason := await _admit(state, events):
        return refuse(state, reason, len(events))
    return json_answer(
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
    ctype = request_content_type(request)
    items: list[object]
    try:
        if ctype in JSON_TYPES:
            parsed = await read_json(request)
            if not isinstance(parsed, list):
                return invalid_answer(
                    state, [FieldError(-1, "", "expected a JSON array of events")]
                )
            items = parsed
        elif ctype in NDJSON_TYPES:
            items = parse_ndjson(await read_text(request))
        else:
            return unsupported_answer(state, ctype, "application/json or application/x-ndjson")
    except BadBody as exc:
        return invalid_answer(state, [FieldError(-1, exc.field, str(exc))])
    except SlowBody:
        return slow_body_answer(state)
    try:
        fallback = request_account(state, items, request.headers.get(ACCOUNT_HEADER, ""))
        events = events_from_items(items, max_items=state.max_batch, account=fallback)
        check_accounts(state, events, fallback)
    except EventValidationError as exc:
        bad = len({e.index for e in exc.errors})
        summary = f"{bad} of {len(items)} events are invalid; nothing was queued"
        if exc.errors[0].index < 0:
            summary = f"{exc}; nothing was queued"
        return invalid_answer(state, exc.errors, summary)
    except Unroutable as exc:
        return unroutable_answer(state, exc, single=False)
    return events


async def healthz(request: web.Request) -> web.Response:
    """GET /healthz: the process is alive and serving."""
    return json_answer(200, {"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """GET /readyz: 200 when events flow; 503 with the reason while they cannot."""
    state = request.app[STATE]
    reason = state.not_ready_reason()
    if reason:
        return json_answer(503, {"ready": False, "reason": reason, **state.ready_detail()})
    return json_answer(200, {"ready": True, **state.ready_detail()})


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
    return json_answer(200, payload)


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
