"""The spool's row codec: events to rows and back, dead-letter bodies, and a row as a `DeadLetter`.

An append's events are encoded together (orjson, an array of arrays) into one `batches` row; a
dead letter keeps its event as a JSON body. Rows and bodies that are no valid event are turned
into `damaged` dead letters here, keeping what they held.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from forwarder.delivery.deadletter import DeadLetterNote
from forwarder.events import Event
from forwarder.events.model import shared_name
from forwarder.storage.sqlite.file import ROW_EVENTS, BatchRow, DeadRow


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One row of the dead-letter table.

    A row whose stored body is not a valid event (reason "damaged") carries a stand-in event with
    empty recipient_id and name and the raw body in `data`, so it can still be listed and read.
    For a spool row that was not a valid event, that body is `{"damaged_spool_row": {column:
    value}}`: the row as it was, in a form that never reads as an event (so it is not replayed).
    """

    id: int
    event: Event
    reason: str
    status: int | None
    error: str
    attempts: int
    first_attempt_at: float
    last_attempt_at: float
    dead_lettered_at: float

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready record: the keys of `dead_letter_record` plus "id"."""
        return {
            "id": self.id,
            "event": self.event.to_dict(),
            "reason": self.reason,
            "status": self.status,
            "error": self.error,
            "attempts": self.attempts,
            "first_attempt_at": self.first_attempt_at,
            "last_attempt_at": self.last_attempt_at,
            "dead_lettered_at": self.dead_lettered_at,
        }


# -- encoding ---------------------------------------------------------------------------------


# One encoder for every dead-letter body: json.dumps with options builds a fresh one per call.
encode_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def _body(event: Event) -> str:
    """An event as a dead-letter body (JSON); ValueError if it holds text SQLite cannot store."""
    body = encode_json(event.to_dict())
    try:
        body.encode("utf-8")
    except UnicodeEncodeError:
        # Caught here, at the caller, rather than failing a whole shared transaction later.
        raise ValueError(f"event {event.event_id!r} holds text that is not valid Unicode") from None
    return body


def encode_rows(events: list[Event]) -> list[BatchRow]:
    """Events as rows of the batches table: up to ROW_EVENTS of them to a row, in order.

    This runs on the event loop for every durable admission: one orjson call per row, over
    tuples of attributes. A row's size is its body's length, the bytes `queue.max_disk_bytes`
    bounds. ValueError names an event holding text that is not valid Unicode (a lone surrogate),
    which could not be stored.
    """
    rows: list[BatchRow] = []
    for start in range(0, len(events), ROW_EVENTS):
        chunk = events[start : start + ROW_EVENTS]
        try:
            body = orjson.dumps(
                [
                    (
                        e.event_id,
                        e.recipient_id,
                        e.name,
                        e.value,
                        e.conversion,
                        e.data,
                        e.ref,
                        e.accepted_at,
                        e.account,
                    )
                    for e in chunk
                ]
            )
        except orjson.JSONEncodeError:
            culprit = next((e for e in chunk if not _is_utf8_event(e)), chunk[0])
            raise ValueError(
                f"event {culprit.event_id!r} holds text that is not valid Unicode"
            ) from None
        rows.append((len(chunk), chunk[0].accepted_at, len(body), body))
    return rows


def is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_utf8_event(e: Event) -> bool:
    return all(
        is_utf8(text)
        for text in (e.event_id, e.recipient_id, e.name, e.value, e.data, e.ref, e.account)
    )


def row_entries(row: Sequence[Any]) -> list[object]:
    """The entries in a row of SELECT_BATCHES; ValueError says why the row cannot be read.

    SQLite's column types are only affinities, so every type is checked: this is on the read
    path, not admission's.
    """
    _seq, count, _accepted_at, body = row
    if type(count) is not int or not 0 < count <= ROW_EVENTS:
        raise ValueError(f"not a row of events: count is {count!r}")
    if not isinstance(body, bytes | str):
        raise ValueError(f"not a row of events: body is {type(body).__name__}")
    try:
        entries = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"not a row of events: body is not JSON: {exc}") from None
    if type(entries) is not list or len(entries) != count:
        raise ValueError(f"not a row of events: body is not a list of {count}")
    return entries


def event_from_entry(entry: object) -> Event:
    """The event an entry of a row holds; ValueError says why it is not one."""
    if type(entry) is not list or len(entry) != len(_ENTRY_FIELDS):
        raise ValueError(f"not an event: not a list of {len(_ENTRY_FIELDS)}")
    event_id, recipient_id, name, value, conversion, data, ref, accepted_at, account = entry
    texts = (event_id, recipient_id, name, value, data, ref, account)
    if not all(type(text) is str for text in texts):
        wrong = [
            n
            for n, v in zip(_ENTRY_FIELDS, entry, strict=True)
            if n in _TEXT_FIELDS and type(v) is not str
        ]
        raise ValueError(f"not an event: {', '.join(wrong)} not text")
    if not event_id or not recipient_id or not name:
        raise ValueError("not an event: empty event_id, recipient_id or name")
    if type(conversion) is not bool:
        raise ValueError(f"not an event: conversion is {conversion!r}, not true or false")
    if type(accepted_at) is not float and type(accepted_at) is not int:
        raise ValueError(f"not an event: accepted_at is {accepted_at!r}, not a number")
    return Event(
        event_id,
        recipient_id,
        # Shared copies: a window of 100 000 reloaded events holds a handful of distinct ones.
        shared_name(name),
        value,
        conversion,
        data,
        ref,
        float(accepted_at),
        shared_name(account),
    )


# The order of an entry's fields (see encode_rows), for the messages about a damaged one.
_ENTRY_FIELDS = (
    "event_id", "recipient_id", "name", "value", "conversion", "data", "ref", "accepted_at",
    "account",
)  # fmt: skip
_TEXT_FIELDS = frozenset(_ENTRY_FIELDS) - {"conversion", "accepted_at"}


def jsonable(value: object) -> object:
    if value is None or isinstance(value, str | int | float):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return repr(value)


def damaged_row(row: Sequence[Any], error: str, now: float) -> DeadRow:
    """A dead letter (reason "damaged") for a row of SELECT_BATCHES that cannot be read.

    Its body keeps the row as it was, wrapped so that it never reads as an event record: a
    replay must not send something rebuilt from a damaged row.
    """
    columns = dict(zip(("seq", "count", "accepted_at", "body"), map(jsonable, row), strict=True))
    body = encode_json({"damaged_spool_row": columns})
    return (None, "", "damaged", None, f"spool row {row[0]}: {error}", 0, 0.0, 0.0, now, body)


def damaged_event(seq: int, entry: object, error: str, now: float) -> DeadRow:
    """A dead letter (reason "damaged") for an entry of a row that is not an event."""
    event_id = account = None
    if type(entry) is list and len(entry) == len(_ENTRY_FIELDS):
        event_id = entry[0] if type(entry[0]) is str else None
        account = entry[-1] if type(entry[-1]) is str else None
    body = encode_json({"damaged_spool_row": {"seq": seq, "event": entry}})
    error = f"spool event {seq}: {error}"
    return (event_id, account or "", "damaged", None, error, 0, 0.0, 0.0, now, body)


def dead_row(event: Event, note: DeadLetterNote, dead_lettered_at: float) -> DeadRow:
    body = _body(event)
    return (
        event.event_id,
        event.account,
        note.reason,
        note.status,
        note.error,
        note.attempts,
        note.first_attempt_at,
        note.last_attempt_at,
        dead_lettered_at,
        body,
    )


def decode_body(body: object) -> Event:
    """The event stored in `body`; ValueError says why it is not one."""
    if not isinstance(body, str):
        raise ValueError(f"body is {type(body).__name__}, not text")
    try:
        raw = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"body is not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError("body is not a JSON object")
    try:
        return Event.from_dict(raw)
    except TypeError as exc:
        raise ValueError(f"not an event record: {exc}") from None


def event_id_of(body: object) -> str | None:
    """The event_id of a damaged body, if one can still be read from it."""
    with contextlib.suppress(ValueError, TypeError, RecursionError):
        raw = json.loads(body) if isinstance(body, str) else None
        if isinstance(raw, dict) and isinstance(raw.get("event_id"), str):
            return str(raw["event_id"])
    return None


def dead_letter_from_row(row: Sequence[Any]) -> DeadLetter:
    (id_, event_id, account, reason, status, error, attempts, first, last, at, body) = row
    try:
        event = decode_body(body)
    except ValueError:
        event = Event(
            event_id=event_id or "",
            recipient_id="",
            name="",
            data=body if isinstance(body, str) else repr(body),
            account=account or "",
        )
    return DeadLetter(
        id=id_,
        event=event,
        reason=reason or "",
        status=status,
        error=error or "",
        attempts=attempts or 0,
        first_attempt_at=first or 0.0,
        last_attempt_at=last or 0.0,
        dead_lettered_at=at or 0.0,
    )
