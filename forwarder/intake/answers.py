"""What intake answers: every answer JSON, refusals in one shape, the counters they bump.

A bad request gets a 4xx naming the field (`invalid_answer`); a full queue or a stopping daemon a
503 with Retry-After (`refuse`), and then nothing of that request was queued; aiohttp's own
refusals (404, 405, 413, ...) are put in the same shape (`http_error_answer`).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import orjson
import structlog
from aiohttp import web

from forwarder.events.model import EventValidationError, FieldError
from forwarder.intake.routing import Unroutable
from forwarder.intake.state import STATE, IntakeState
from forwarder.storage.queue import TOO_LARGE

log = structlog.get_logger("forwarder.intake")


RETRY_AFTER_S = "5"


def json_answer(
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


def error_answer(status: int, message: str, **extra: Any) -> web.Response:
    return json_answer(status, {"success": False, "error": message, **extra})


def http_error_answer(request: web.Request, exc: web.HTTPException) -> web.Response:
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
    return json_answer(exc.status, {"success": False, "error": message}, headers)


def invalid_answer(
    state: IntakeState, errors: list[FieldError], summary: str | None = None
) -> web.Response:
    state.stats.invalid_requests += 1
    if summary is None:
        summary = str(EventValidationError(errors))
    return error_answer(400, summary, errors=[e.to_dict() for e in errors])


_REFUSALS = {
    "shutting_down": "forwarder is shutting down; retry later",
    "queue_full": "queue is full (queue.max_events); retry later",
    "queue_bytes_full": "queue is full (queue.max_bytes); retry later",
    "spool_full": "the spool is full (queue.max_disk_bytes); retry later",
    "spool_error": "the spool cannot be written (see forwarder's log); retry later",
}


def refuse(state: IntakeState, reason: str, count: int) -> web.Response:
    if reason == TOO_LARGE:
        # Waiting would not help: these events alone are more than the queue may ever hold.
        state.stats.invalid_requests += 1
        limit = state.queue.max_bytes
        return error_answer(
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
    return json_answer(
        503,
        {"success": False, "error": _REFUSALS[reason], "reason": reason},
        {"Retry-After": RETRY_AFTER_S},
    )


def unroutable_answer(state: IntakeState, exc: Unroutable, single: bool) -> web.Response:
    if exc.status != 400:
        payload = {"success": False, "error": str(exc), "errors": [e.to_dict() for e in exc.errors]}
        # A 503 (every client-account slot taken) passes: the app keeps the event and retries.
        retry = {"Retry-After": RETRY_AFTER_S} if exc.status == 503 else None
        return json_answer(exc.status, payload, retry)
    if single:
        exc.errors = [dataclasses.replace(e, index=0) for e in exc.errors]
    return invalid_answer(state, exc.errors)


def slow_body_answer(state: IntakeState) -> web.Response:
    state.stats.body_timeouts += 1
    response = error_answer(
        408,
        f"the request body did not arrive within intake.body_timeout_s "
        f"({state.body_timeout_s:g} s); nothing was queued",
        reason="body_timeout",
    )
    response.force_close()  # the rest of a body that slow is not waited for
    return response


def unsupported_answer(state: IntakeState, ctype: str, expected: str) -> web.Response:
    state.stats.invalid_requests += 1
    got = f"'{ctype}'" if ctype else "none"
    return error_answer(415, f"unsupported Content-Type {got}; send {expected}")
