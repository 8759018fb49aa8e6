"""The Event type: validation of what apps send, and the form body sent to the remote.

Validation collects every problem (index, field, message) instead of stopping at the first one, so a
batch can be answered with one complete list and apps can fix everything in one go.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import orjson

MAX_ID_CHARS = 255
MAX_NAME_CHARS = 255
MAX_VALUE_CHARS = 1024
MAX_REF_CHARS = 255
MAX_DATA_BYTES = 64 * 1024
# `data` given as a JSON object or array may nest this deep, no deeper. Real templating data is a
# few levels deep; 64 stays far below what orjson serialises (255 levels), what PHP's json_decode
# reads by default (512, the remote's kind) and Python's recursion limit, so nothing past
# validation can fail on depth.
MAX_DATA_DEPTH = 64
EVENT_ID_RE = re.compile(r"[A-Za-z0-9._:-]{10,255}")
# Names of configured accounts ([accounts.NAME]); client-key accounts are "client:" + a digest.
ACCOUNT_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")

FIELDS = ("event_id", "recipient_id", "name", "value", "conversion", "data", "ref", "account")
_FIELD_SET = frozenset(FIELDS)
_TRUE = frozenset({"true", "1", "yes"})
_FALSE = frozenset({"false", "0", "no", ""})
# Event names are a small set (PURCHASE, PAGE_VIEW, ...) repeated over every queued event: each
# event keeps one shared copy of its name instead of its own (~60 bytes an event in memory). A
# bounded table of our own rather than sys.intern, which made strings immortal on some CPython
# 3.12 releases (python/cpython#113993): an app's every new name would never be freed. Past the
# bound, new names are just not shared.
_NAMES_MAX = 1024
_names: dict[str, str] = {}


@dataclass(frozen=True, slots=True)
class FieldError:
    """One problem with one field of one event in a request."""

    index: int
    field: str
    message: str

    def to_dict(self) -> dict[str, object]:
        return {"index": self.index, "field": self.field, "message": self.message}


class EventValidationError(Exception):
    """A request whose events are not all valid; carries every problem found."""

    def __init__(self, errors: list[FieldError]) -> None:
        self.errors = errors
        first = errors[0]
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        where = f"item {first.index}: " if first.index >= 0 else ""
        super().__init__(f"{where}{first.field}: {first.message}{more}")


# Not frozen: a frozen dataclass sets each field through object.__setattr__, which made building
# an Event cost about five times as much, and intake builds one per accepted event. Nothing
# changes an Event after validation; a changed copy is made with dataclasses.replace.
@dataclass(slots=True)
class Event:
    """An accepted recipient event. `event_id` is its idempotency key for every delivery attempt.

    Treat it as immutable: it is shared by the queue, the spool and the delivery lanes.
    """

    event_id: str
    recipient_id: str
    name: str
    value: str = ""
    conversion: bool = False
    data: str = ""
    ref: str = ""
    accepted_at: float = 0.0
    # The account it is delivered under; "" means the default account.
    account: str = ""
    # Its event number (storage/numbering.py), set once it is queued: in memory mode by intake, in
    # durable mode its spool position. 0: none. Not part of its value (equality, records).
    number: int = dataclasses.field(default=0, compare=False)

    def form(self) -> dict[str, str]:
        """The form fields sent to the remote; optional fields are left out when empty."""
        form = {
            "recipient_id": self.recipient_id,
            "name": self.name,
            "conversion": "1" if self.conversion else "0",
        }
        if self.value:
            form["value"] = self.value
        if self.data:
            form["data"] = self.data
        if self.ref:
            form["ref"] = self.ref
        return form

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready record, used by the pending and dead-letter files."""
        return {
            "event_id": self.event_id,
            "recipient_id": self.recipient_id,
            "name": self.name,
            "value": self.value,
            "conversion": self.conversion,
            "data": self.data,
            "ref": self.ref,
            "accepted_at": self.accepted_at,
            "account": self.account,
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Event:
        """Rebuild an event from `to_dict` output; raises ValueError if the record is damaged."""
        try:
            event = cls(
                event_id=str(raw["event_id"]),
                recipient_id=str(raw["recipient_id"]),
                name=shared_name(str(raw["name"])),
                value=str(raw.get("value", "")),
                conversion=bool(raw.get("conversion", False)),
                data=str(raw.get("data", "")),
                ref=str(raw.get("ref", "")),
                accepted_at=float(raw.get("accepted_at", 0.0)),
                account=str(raw.get("account", "")),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not an event record: {exc!r}") from None
        if not event.event_id or not event.recipient_id or not event.name:
            raise ValueError("not an event record: empty event_id, recipient_id or name")
        return event


class JsonNumber:
    """A JSON number kept as the app wrote it (`1.10`, `1E5`, `-0`, digits past 64 bits).

    What `loads_json` gives for a number that a float or an int would not give back as written:
    a string field takes its text, and `data` is serialised with the text as it came.
    """

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return f"JsonNumber({self.text!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, JsonNumber) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)


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


def shared_name(name: str) -> str:
    """The one shared copy of an event name (see `_names`); `name` itself if it is new and the
    table is full."""
    shared = _names.get(name)
    if shared is None:
        shared = name
        if len(_names) < _NAMES_MAX and type(name) is str:  # never keep a str subclass
            _names[name] = name
    return shared


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


def new_event_id() -> str:
    """A fresh idempotency key: a random (version 4) UUID in its usual text form."""
    try:
        return _id_pool.pop()  # atomic: no two callers get the same id
    except IndexError:
        _id_pool.extend(new_event_ids(_IDS_AT_ONCE))
        return _id_pool.pop()


# Ids made this many at a time: os.urandom is a system call, and one per single-event request
# cost about as much as making the id's text.
_IDS_AT_ONCE = 256
_id_pool: list[str] = []
# A UUID's 32 hex digits in its five groups; the 13th digit (3rd group's first) becomes the
# version, 4, and the 17th (4th group's first) the RFC 4122 variant: 8, 9, a or b.
_UUID_GROUPS = re.compile(r"(.{8})(.{4}).(.{3})(.)(.{3})(.{12})", re.DOTALL)


def new_event_ids(count: int) -> list[str]:
    """`count` fresh version 4 UUIDs in text form, from one os.urandom call.

    Made from random bytes directly, all at once: `str(uuid.uuid4())` costs several times as
    much, and slicing and formatting each id on its own cost a tenth of batch intake.
    """
    groups = _UUID_GROUPS.findall(os.urandom(16 * count).hex())
    return [f"{a}-{b}-4{c}-{_VARIANT[v]}{d}-{e}" for a, b, c, v, d, e in groups]


_VARIANT = {d: "89ab"[int(d, 16) & 3] for d in "0123456789abcdef"}


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
        _names.get(name) or shared_name(name),
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


# A JSON number that orjson would not give back as written: a fraction or exponent whose text
# is not the float's shortest form (orjson makes a float of it: `1.10` comes back as `1.1`, `1E5`
# as `100000.0`), `-0` (an int 0), or 19 digits and more (past 64 bits orjson makes a float of
# it; negative ones from 19 digits on). Found at C speed where it can be: whitespace dropped (a
# number holds none), then a translation makes every digit "0", "e"/"E" "." and every place a
# value can start ("," "[") ":", keeping each byte's place. A run of 19 zeros is then a long
# int, and ":" (-) zeros "." the start of a fraction or exponent (a string such as "24.99" has
# its quote after the ":"), whose text is then looked at. Searches with a literal start: a
# regular expression over the raw body took ten times as long.
_WHITESPACE = b" \t\r\n"
_NUMBER_SHAPES = bytes.maketrans(b"eE,[123456789", b"..::000000000")
_FRACTIONS = (re.compile(rb":00*\."), re.compile(rb":-00*\."))
_NUMBER = re.compile(rb"-?[0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?")
_NEGATIVE_ZERO = re.compile(rb"-0(?![0-9])")


def _has_risky_number(text: str | bytes) -> bool:
    """Whether `text` may hold a JSON number that orjson would not keep as written.

    May say yes for a number-like string (the exact way then parses it, only slower); never
    says no for such a number.
    """
    raw = text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass")
    compact = raw.translate(None, _WHITESPACE)
    shapes = compact.translate(_NUMBER_SHAPES)
    if b"0000000000000000000" in shapes or _NEGATIVE_ZERO.search(compact) is not None:
        return True
    for fractions in _FRACTIONS:
        for found in fractions.finditer(shapes):
            number = _NUMBER.match(compact, found.start() + 1)
            if number is None:
                return True
            token = number.group()
            shortest = _shortest_seen.get(token)  # prices repeat: most are known
            if shortest is None:
                shortest = _shortest(token)
            if not shortest:
                return True
    return False


# Float texts already looked at, and whether each is in its shortest form; bounded (~100 KB).
_SHORTEST_SEEN_MAX = 1024
_shortest_seen: dict[bytes, bool] = {}


def _shortest(text: bytes) -> bool:
    # A float given in the form both repr() (string fields) and orjson (data) write it back in.
    value = float(text)
    shortest = orjson.dumps(value) == text and repr(value).encode("ascii") == text
    if len(_shortest_seen) < _SHORTEST_SEEN_MAX:
        _shortest_seen[text] = shortest
    return shortest


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not valid JSON")


# Digits an int may have and still be read as one by the exact way: below 19 every integer's
# text is its value's text, and orjson serialises it again (past 64 bits it cannot).
_EXACT_INT_DIGITS = 18


def _exact_int(text: str) -> int | JsonNumber:
    if text == "-0" or len(text) > _EXACT_INT_DIGITS:
        return JsonNumber(text)
    return int(text)


# One decoder for every call: json.loads with hooks builds a new one each time.
_EXACT = json.JSONDecoder(
    parse_constant=_reject_constant, parse_float=JsonNumber, parse_int=_exact_int
)


def loads_json(text: str | bytes, *, checked: bool = False) -> object:
    """Parse JSON, refusing NaN/Infinity (which the standard module accepts by default).

    Every number comes back as the app wrote it: an int whose text is its own, or a JsonNumber
    keeping the text (fractions, exponents, -0, ints of 19 digits and more). Input free of such
    numbers is parsed by orjson (about twice as fast as the standard module); the rest, and input
    orjson refuses, by the standard module with hooks that keep each number's text. The standard
    module also accepts lone surrogate escapes (validation then names the field at fault) and
    its error messages name the place.
    Raises ValueError (UnicodeDecodeError for bytes that are not UTF-8), also for nesting too
    deep to read (past orjson's 1024 levels, where the standard module runs out of stack).
    `checked`: the caller found no risky number in a text holding this one.
    """
    if checked or not _has_risky_number(text):
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError:
            pass
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    try:
        return _EXACT.decode(text)
    except RecursionError:
        raise ValueError(
            f"nested too deeply to read (data may nest at most {MAX_DATA_DEPTH} levels)"
        ) from None


def parse_ndjson(text: str) -> list[object]:
    """Split an NDJSON body into items; a line that does not parse becomes a FieldError item."""
    items: list[object] = []
    # Once for the body, not once a line; a body with a risky number looks at each line.
    checked = not _has_risky_number(text)
    # Only "\n" ends a line: splitlines() would also split at U+2028 inside a JSON string.
    for line in text.split("\n"):
        if not line.strip():
            continue
        try:
            items.append(loads_json(line, checked=checked))
        except (ValueError, RecursionError) as exc:
            items.append(FieldError(len(items), "", f"not valid JSON: {describe_error(exc)}"))
    return items


def describe_error(exc: BaseException) -> str:
    """A parse error's message, bounded in length for an answer to the app."""
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 120 else text[:117] + "..."
