"""Validation of what apps send: a form or JSON object checked field by field into an `Event`.

Validation collects every problem (index, field, message) instead of stopping at the first one, so a
batch can be answered with one complete list and apps can fix everything in one go.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import cast

import orjson

from forwarder.events.ids import new_event_id, new_event_ids
from forwarder.events.model import (
    ACCOUNT_RE,
    EVENT_ID_RE,
    MAX_DATA_BYTES,
    MAX_DATA_DEPTH,
    MAX_ID_CHARS,
    MAX_NAME_CHARS,
    MAX_REF_CHARS,
    MAX_VALUE_CHARS,
    Event,
    EventValidationError,
    FieldError,
    shared_name,
    shared_names,
)
from forwarder.events.parse import JsonNumber

FIELDS = ("event_id", "recipient_id", "name", "value", "conversion", "data", "ref", "account")
_FIELD_SET = frozenset(FIELDS)
_TRUE = frozenset({"true", "1", "yes"})
_FALSE = frozenset({"false", "0", "no", ""})


def _fragment(value: object) -> orjson.Fragment:
    # orjson's `default`: a kept number goes into the output as its own text.
    if type(value) is JsonNumber:
        return orjson.Fragment(value.text)
    raise TypeError(f"cannot serialise {type(value).__name__}")


def _text(
    raw: object, field: str, index: int, errors: list[FieldError], *, numbers: bool
) -> str | None:
    """A string field; JSON numbers become strings where `numbers` allows it."""
    if type(raw) is str:
        # The common case first: ASCII text is valid Unicode, so only NUL needs a look.
        if raw.isascii() and "\x00" not in raw:
            return raw
        if "\x00" in raw:
            errors.append(FieldError(index, field, "must not contain NUL characters"))
            return None
        if not _is_utf8(raw):
            errors.append(FieldError(index, field, "must be valid Unicode (no lone surrogates)"))
            return None
        return raw
    if isinstance(raw, str):  # a str subclass: never from JSON or a form, but be exact
        return _text(str(raw), field, index, errors, numbers=numbers)
    if numbers and type(raw) is JsonNumber:
        if _is_int(raw.text) or math.isfinite(float(raw.text)):
            return raw.text  # the number as the app wrote it
        errors.append(FieldError(index, field, "must be a finite number"))
        return None
    if numbers and isinstance(raw, int) and not isinstance(raw, bool):
        return str(raw)  # loads_json gives an int only where its text is the number's text
    if numbers and isinstance(raw, float):  # not from loads_json, which keeps every float's text
        if not math.isfinite(raw):
            errors.append(FieldError(index, field, "must be a finite number"))
            return None
        return repr(raw)
    kinds = "a string or a number" if numbers else "a string"
    errors.append(FieldError(index, field, f"must be {kinds}, got {_json_kind(raw)}"))
    return None


def _is_utf8(text: str) -> bool:
    # JSON escapes can smuggle in lone surrogates, which no file or form can carry later.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _json_kind(raw: object) -> str:
    if raw is None:
        return "null"
    if isinstance(raw, bool):
        return "a boolean"
    if isinstance(raw, int | float | JsonNumber):
        return "a number"
    if isinstance(raw, str):
        return "a string"
    if isinstance(raw, list):
        return "an array"
    if isinstance(raw, dict):
        return "an object"
    return type(raw).__name__


def _conversion(raw: object, index: int, errors: list[FieldError]) -> bool | None:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, int) and raw in (0, 1):
        return bool(raw)
    if type(raw) is JsonNumber and raw.text in ("0", "-0", "1"):
        return raw.text == "1"
    if isinstance(raw, str):
        folded = raw.strip().lower()
        if folded in _TRUE:
            return True
        if folded in _FALSE:
            return False
    errors.append(
        FieldError(index, "conversion", "must be true/false, 1/0, yes/no (as JSON or a string)")
    )
    return None


def _data(raw: object, index: int, errors: list[FieldError]) -> str | None:
    if isinstance(raw, dict | list):
        # Apps often hand structured data; the remote takes a string, so serialise compactly.
        # orjson first: it cannot recurse without bound (it refuses past 255 levels, in C), and
        # its text tells cheaply whether the depth needs a look at all (nesting n levels deep
        # takes 2n brackets).
        try:
            text = orjson.dumps(raw).decode("utf-8")
        except TypeError:  # a kept number, a lone surrogate, or nesting past orjson's limit
            text = _dumps_kept(raw)
        maybe_deep = not text or (
            len(text) > 2 * MAX_DATA_DEPTH and text.count("[") + text.count("{") > MAX_DATA_DEPTH
        )
        if maybe_deep and _deeper_than(raw, MAX_DATA_DEPTH):
            errors.append(
                FieldError(index, "data", f"must not be nested more than {MAX_DATA_DEPTH} levels")
            )
            return None
        if not text:
            errors.append(FieldError(index, "data", "must be valid Unicode (no lone surrogates)"))
            return None
    else:
        maybe = _text(raw, "data", index, errors, numbers=False)
        if maybe is None:
            return None
        text = maybe
    # Characters never outnumber bytes, and an ASCII text has one byte each: encode only if needed.
    if len(text) > MAX_DATA_BYTES or (
        len(text) * 4 > MAX_DATA_BYTES
        and not text.isascii()
        and len(text.encode("utf-8")) > MAX_DATA_BYTES
    ):
        errors.append(FieldError(index, "data", f"must be at most {MAX_DATA_BYTES} bytes"))
        return None
    return text


def _dumps_kept(raw: object) -> str:
    """`raw` serialised with its kept numbers (JsonNumber) as written; "" if orjson cannot."""
    try:
        return orjson.dumps(raw, default=_fragment).decode("utf-8")
    except TypeError:
        return ""


def _deeper_than(value: object, limit: int) -> bool:
    """Whether arrays and objects in `value` nest more than `limit` levels (no recursion)."""
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        children = node.values() if isinstance(node, dict) else cast(list[object], node)
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def _required(
    raw: object, field: str, limit: int, index: int, errors: list[FieldError], numbers: bool
) -> str:
    if type(raw) is str and raw.isascii() and "\x00" not in raw:
        text: str | None = raw  # _text's common case without the call: one event, four fields
    elif raw is None:
        errors.append(FieldError(index, field, "is required"))
        return ""
    else:
        text = _text(raw, field, index, errors, numbers=numbers)
    if text is None:
        return ""
    if not text.strip():
        errors.append(FieldError(index, field, "must not be empty"))
    elif len(text) > limit:
        errors.append(FieldError(index, field, f"must be at most {limit} characters"))
    return text


def _optional(
    raw: object, field: str, limit: int, index: int, errors: list[FieldError], numbers: bool
) -> str:
    if type(raw) is str and raw.isascii() and "\x00" not in raw:
        text: str | None = raw  # as in _required
    elif raw is None:
        return ""
    else:
        text = _text(raw, field, index, errors, numbers=numbers)
    if text is None:
        return ""
    if len(text) > limit:
        errors.append(FieldError(index, field, f"must be at most {limit} characters"))
    return text


@dataclass(slots=True)
class Leniency:
    """What the drop-in endpoint took as the remote would, where /v1/events refuses it.

    `unknown_fields`: names of fields it ignored; `odd_value`: a conversion's value that is not a
    plain number, delivered as sent.
    """

    unknown_fields: list[str] = field(default_factory=list)
    odd_value: bool = False


def event_from_mapping(
    raw: Mapping[str, object],
    index: int,
    errors: list[FieldError],
    *,
    ignored: frozenset[str] = frozenset(),
    lenient: Leniency | None = None,
    now: float | None = None,
    account: str = "",
    new_id: str = "",
) -> Event | None:
    """Validate one event given as a mapping (form or JSON object).

    Problems are appended to `errors`; returns the Event only when this item had none. Keys in
    `ignored` (the drop-in endpoint's `api_key`) are tolerated and dropped. With `lenient` (the
    drop-in endpoint), what the remote takes is taken too and noted there: unknown fields are
    dropped, and a conversion's value need not be a number. `account` is the
    account of an event that names none (the request's; "" means the default account). `new_id`
    is the event_id of an event that brings none ("": one is made).
    """
    before = len(errors)
    if not _FIELD_SET.issuperset(raw):
        for key in raw:
            if key not in _FIELD_SET and key not in ignored:
                if lenient is not None:
                    lenient.unknown_fields.append(str(key))
                else:
                    errors.append(FieldError(index, str(key), "unknown field"))

    get = raw.get
    recipient_id = _required(get("recipient_id"), "recipient_id", MAX_ID_CHARS, index, errors, True)
    name = _required(get("name"), "name", MAX_NAME_CHARS, index, errors, False)
    value = _optional(get("value"), "value", MAX_VALUE_CHARS, index, errors, True)
    ref = _optional(get("ref"), "ref", MAX_REF_CHARS, index, errors, False)
    conversion = False
    if (raw_conversion := get("conversion")) is not None:
        conversion = bool(_conversion(raw_conversion, index, errors))
    data = ""
    if (raw_data := get("data")) is not None:
        data = _data(raw_data, index, errors) or ""
    if conversion and value and not _is_number(value):
        if lenient is not None:
            lenient.odd_value = True
        else:
            errors.append(
                FieldError(index, "value", "must be a number when conversion is true (e.g. 24.99)")
            )

    event_id = ""
    raw_id = get("event_id")
    if raw_id is not None:
        if not isinstance(raw_id, str) or not EVENT_ID_RE.fullmatch(raw_id):
            errors.append(
                FieldError(
                    index,
                    "event_id",
                    "must be 10-255 characters of letters, digits and - _ . :",
                )
            )
        else:
            event_id = raw_id

    raw_account = get("account")
    if raw_account is not None:
        if not isinstance(raw_account, str) or not ACCOUNT_RE.fullmatch(raw_account):
            errors.append(
                FieldError(index, "account", "must be 1-64 characters of letters, digits, - and _")
            )
        else:
            account = raw_account

    if len(errors) > before:
        return None
    # Positional: keyword arguments cost about a third of building the Event. The name's lookup
    # inline: a known name (the common case) then costs no call.
    return Event(
        event_id or new_id or new_event_id(),
        recipient_id,
        shared_names.get(name) or shared_name(name),
        value,
        conversion,
        data,
        ref,
        time.time() if now is None else now,
        account,
    )


def _is_int(text: str) -> bool:
    return text.lstrip("-").isdigit()


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def events_from_items(items: Iterable[object], *, max_items: int, account: str = "") -> list[Event]:
    """Validate a batch as a whole: every event, or an EventValidationError listing all problems.

    `account` goes to the events that name none.
    """
    errors: list[FieldError] = []
    events: list[Event] = []
    seen: dict[str, int] = {}
    now = time.time()
    # Every new event_id at once, from one system call (an item with an id leaves its own unused).
    ids = new_event_ids(min(len(items), max_items)) if isinstance(items, list) else []
    for index, item in enumerate(items):
        if index >= max_items:
            raise EventValidationError(
                [FieldError(-1, "batch", f"holds more than {max_items} events")]
            )
        if isinstance(item, FieldError):  # a line that did not parse (NDJSON)
            errors.append(item)
            continue
        if not isinstance(item, dict):
            errors.append(FieldError(index, "", f"must be a JSON object, got {_json_kind(item)}"))
            continue
        event = event_from_mapping(
            item, index, errors, now=now, account=account, new_id=ids[index] if ids else ""
        )
        if event is None:
            continue
        if "event_id" in item:
            if event.event_id in seen:
                errors.append(
                    FieldError(
                        index, "event_id", f"repeats the event_id of item {seen[event.event_id]}"
                    )
                )
                continue
            seen[event.event_id] = index
        events.append(event)
    if errors:
        raise EventValidationError(errors)
    if not events:
        raise EventValidationError([FieldError(-1, "batch", "holds no events")])
    return events
