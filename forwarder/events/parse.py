"""JSON and NDJSON bodies read exactly: every number kept as the app wrote it.

orjson parses what it would give back as written (the common case, about twice as fast as the
standard module); a body holding a number it would not (`1.10`, `1E5`, `-0`, digits past 64
bits) is parsed by the standard module with hooks that keep each number's text (`JsonNumber`).
"""

from __future__ import annotations

import json
import re

import orjson

from forwarder.events.model import MAX_DATA_DEPTH, FieldError


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
