"""Unit tests for event validation and the form sent to the remote."""

from __future__ import annotations

import json
import math
import os
import uuid

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from forwarder.events import Event, model, parse
from forwarder.events.ids import new_event_id, new_event_ids
from forwarder.events.model import MAX_DATA_DEPTH, EventValidationError, FieldError, shared_name
from forwarder.events.parse import JsonNumber, loads_json, parse_ndjson
from forwarder.events.validate import event_from_mapping, events_from_items


def _one(raw: dict[str, object]) -> tuple[Event | None, list[FieldError]]:
    errors: list[FieldError] = []
    return event_from_mapping(raw, 0, errors), errors


def test_seed_example_is_accepted_with_exact_fields() -> None:
    event, errors = _one(
        {"name": "PURCHASE", "value": "24.99", "conversion": "1", "recipient_id": "12345"}
    )
    assert errors == []
    assert event is not None
    assert event.form() == {
        "recipient_id": "12345",
        "name": "PURCHASE",
        "value": "24.99",
        "conversion": "1",
    }
    assert len(event.event_id) == 36  # a UUID


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (True, True), (False, False), (1, True), (0, False), ("true", True), ("FALSE", False),
        ("1", True), ("0", False), ("yes", True), ("no", False), ("", False),
    ],
)  # fmt: skip
def test_conversion_spellings(given: object, expected: bool) -> None:
    event, errors = _one({"recipient_id": "1", "name": "SIGNUP", "conversion": given})
    assert errors == []
    assert event is not None
    assert event.conversion is expected
    assert event.form()["conversion"] == ("1" if expected else "0")


@pytest.mark.parametrize("given", ["maybe", 2, 1.5, [], {}])
def test_bad_conversion_names_the_field(given: object) -> None:
    _, errors = _one({"recipient_id": "1", "name": "SIGNUP", "conversion": given})
    assert [e.field for e in errors] == ["conversion"]


def test_numbers_become_strings_and_data_is_serialised_compactly() -> None:
    event, errors = _one(
        {"recipient_id": 12345, "name": "PURCHASE", "value": 24.5, "data": {"a": [1, "é"]}}
    )
    assert errors == []
    assert event is not None
    assert (event.recipient_id, event.value) == ("12345", "24.5")
    assert event.data == '{"a":[1,"é"]}'


@pytest.mark.parametrize(
    ("raw", "field", "fragment"),
    [
        ({"name": "X"}, "recipient_id", "required"),
        ({"recipient_id": "1"}, "name", "required"),
        ({"recipient_id": "1", "name": "  "}, "name", "empty"),
        ({"recipient_id": True, "name": "X"}, "recipient_id", "string or a number"),
        ({"recipient_id": {"a": 1}, "name": "X"}, "recipient_id", "an object"),
        ({"recipient_id": "1", "name": 5}, "name", "must be a string"),
        ({"recipient_id": "1", "name": "X" * 256}, "name", "at most 255"),
        ({"recipient_id": "1", "name": "X", "data": "x" * 70000}, "data", "bytes"),
        ({"recipient_id": "1", "name": "X", "ref": 7}, "ref", "must be a string"),
        ({"recipient_id": "1", "name": "X", "colour": "red"}, "colour", "unknown field"),
        ({"recipient_id": "1\x00", "name": "X"}, "recipient_id", "NUL"),
        ({"recipient_id": "1", "name": "X", "event_id": "short"}, "event_id", "10-255"),
        ({"recipient_id": "1", "name": "X", "event_id": "has space 123"}, "event_id", "10-255"),
        (
            {"recipient_id": "1", "name": "PURCHASE", "value": "lots", "conversion": True},
            "value",
            "number",
        ),
    ],
)
def test_errors_name_the_field(raw: dict[str, object], field: str, fragment: str) -> None:
    event, errors = _one(raw)
    assert event is None
    assert [e.field for e in errors] == [field]
    assert fragment in errors[0].message


def test_api_key_is_ignored_only_where_allowed() -> None:
    errors: list[FieldError] = []
    raw = {"recipient_id": "1", "name": "X", "api_key": "k"}
    assert event_from_mapping(raw, 0, errors, ignored=frozenset({"api_key"})) is not None
    assert event_from_mapping(raw, 0, errors) is None
    assert errors[0].field == "api_key"


def test_batch_lists_every_bad_item_and_returns_nothing() -> None:
    items: list[object] = [
        {"recipient_id": "1", "name": "A"},
        {"name": "B"},
        "not an object",
        {"recipient_id": "3", "name": "C", "conversion": "perhaps"},
    ]
    with pytest.raises(EventValidationError) as caught:
        events_from_items(items, max_items=10)
    assert [(e.index, e.field) for e in caught.value.errors] == [
        (1, "recipient_id"),
        (2, ""),
        (3, "conversion"),
    ]


def test_batch_limits_and_duplicates() -> None:
    one = {"recipient_id": "1", "name": "A"}
    with pytest.raises(EventValidationError, match="more than 2"):
        events_from_items([one, one, one], max_items=2)
    with pytest.raises(EventValidationError, match="no events"):
        events_from_items([], max_items=2)
    dup = {**one, "event_id": "evt-0000000001"}
    with pytest.raises(EventValidationError, match="repeats the event_id of item 0"):
        events_from_items([dup, dup], max_items=5)
    events = events_from_items([one, {**one, "name": "B"}], max_items=5)
    assert [e.name for e in events] == ["A", "B"]
    assert events[0].event_id != events[1].event_id


def test_ndjson_bad_line_becomes_an_error_item() -> None:
    items = parse_ndjson('{"recipient_id": "1", "name": "A"}\n\nnot json\n')
    assert isinstance(items[1], FieldError)
    with pytest.raises(EventValidationError) as caught:
        events_from_items(items, max_items=5)
    assert caught.value.errors[0].index == 1


def test_nan_is_not_json() -> None:
    with pytest.raises(ValueError, match="NaN"):
        loads_json('{"value": NaN}')


def test_record_round_trip_and_damage() -> None:
    event, _ = _one({"recipient_id": "1", "name": "X", "data": "d", "ref": "r", "value": "v"})
    assert event is not None
    assert Event.from_dict(json.loads(json.dumps(event.to_dict()))) == event
    with pytest.raises(ValueError, match="not an event record"):
        Event.from_dict({"name": "X"})


def test_new_event_ids_are_version_4_uuids() -> None:
    ids = {new_event_id() for _ in range(2000)}
    assert len(ids) == 2000
    for text in ids:
        parsed = uuid.UUID(text)
        assert str(parsed) == text
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122


@pytest.fixture
def urandom_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes asked of os.urandom from here on."""
    calls: list[int] = []
    urandom = os.urandom

    def counting(size: int) -> bytes:
        calls.append(size)
        return urandom(size)

    monkeypatch.setattr(os, "urandom", counting)
    return calls


def test_event_ids_made_for_single_events_are_distinct_uuids_from_few_system_calls(
    urandom_calls: list[int],
) -> None:
    # The ids are made many at once (one os.urandom call per 256), and each is handed out once.
    calls = urandom_calls
    made = []
    for _ in range(1000):
        event = event_from_mapping({"recipient_id": "r", "name": "X"}, 0, [])
        assert event is not None
        made.append(event.event_id)
    assert len(set(made)) == 1000
    assert all(uuid.UUID(text).version == 4 for text in made)
    assert 1 <= len(calls) <= 5, calls


def test_a_batchs_new_event_ids_are_distinct_uuids_from_one_system_call(
    urandom_calls: list[int],
) -> None:
    calls = urandom_calls
    items: list[object] = [{"recipient_id": str(n), "name": "X"} for n in range(500)]
    items[7] = {"recipient_id": "7", "name": "X", "event_id": "client-chosen-7"}
    events = events_from_items(items, max_items=500)
    assert calls == [16 * 500]
    made = [e.event_id for e in events if e.event_id != "client-chosen-7"]
    assert events[7].event_id == "client-chosen-7"
    assert len(made) == len(set(made)) == 499
    for text in made:
        parsed = uuid.UUID(text)
        assert (str(parsed), parsed.version, parsed.variant) == (text, 4, uuid.RFC_4122)


def test_new_event_ids_use_every_random_bit_but_the_fixed_ones() -> None:
    # Over many ids every digit of each free position takes many values: none is left constant.
    ids = new_event_ids(4000)
    for position in range(36):
        seen = {text[position] for text in ids}
        if position in (8, 13, 18, 23):
            assert seen == {"-"}
        elif position == 14:
            assert seen == {"4"}
        elif position == 19:
            assert seen == set("89ab")
        else:
            assert seen == set("0123456789abcdef"), position


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"a": 1}', {"a": 1}),
        # A float written in its shortest form is one; any other keeps its text.
        (b'{"a": [1, 2.5, "x"]}', {"a": [1, 2.5, "x"]}),
        (
            b'{"a": [1, 2.50, 1e5, -0]}',
            {"a": [1, JsonNumber("2.50"), JsonNumber("1e5"), JsonNumber("-0")]},
        ),
        # Past 64 bits orjson would give a float: kept exact.
        (
            '{"n": 123456789012345678901234567890}',
            {"n": JsonNumber("123456789012345678901234567890")},
        ),
        (b'{"n": -12345678901234567890123}', {"n": JsonNumber("-12345678901234567890123")}),
        ('{"n": 18446744073709551615}', {"n": JsonNumber("18446744073709551615")}),
        # A lone surrogate escape: kept, so that validation can name the field.
        ('{"s": "\\ud800"}', {"s": "\ud800"}),
    ],
)
def test_loads_json_takes_what_the_standard_module_takes(
    text: str | bytes, expected: object
) -> None:
    assert loads_json(text) == expected


@pytest.mark.parametrize("text", ["NaN", '{"a": Infinity}', '{"a": -Infinity}', "[1,]", b"\xff"])
def test_loads_json_refuses_what_is_not_json(text: str | bytes) -> None:
    with pytest.raises(ValueError, match=r"."):
        loads_json(text)


def test_data_object_is_serialised_compactly_with_its_numbers_as_written() -> None:
    errors: list[FieldError] = []
    deep: object = 1
    for _ in range(MAX_DATA_DEPTH - 2):  # the deepest data allowed: data > "deep" > ...
        deep = [deep]
    parsed = loads_json(b'{"big": 1180591620717411303424, "price": 1.10}')
    assert isinstance(parsed, dict)
    event = event_from_mapping(
        {"recipient_id": "1", "name": "X", "data": {**parsed, "deep": deep}}, 0, errors
    )
    assert not errors
    assert event is not None
    assert event.data.startswith('{"big":1180591620717411303424,"price":1.10,"deep":[[[')


def test_events_of_one_name_share_one_copy_of_it() -> None:
    def parsed() -> Event:
        # Each batch parsed apart: each has its own "PURCHASE" string before validation.
        items = loads_json(b'[{"recipient_id": "r1", "name": "PURCHASE"}]')
        assert isinstance(items, list)
        return events_from_items(items, max_items=10)[0]

    first, second = parsed(), parsed()
    assert first.name == second.name == "PURCHASE"
    assert first.name is second.name
    record = Event.from_dict(json.loads(json.dumps(first.to_dict())))
    assert record.name is first.name


def test_the_shared_names_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model, "shared_names", {})
    monkeypatch.setattr(model, "_NAMES_MAX", 2)
    kept = [shared_name("".join(["NAME_", str(n)])) for n in range(2)]
    assert shared_name("".join(["NAME_", "0"])) is kept[0]
    late = "".join(["NAME_", "2"])  # built at run time: not a constant of this module
    assert shared_name(late) is late
    assert "NAME_2" not in model.shared_names  # past the bound: not kept, only not shared
    assert len(model.shared_names) == 2

    class Name(str):
        pass

    monkeypatch.setattr(model, "shared_names", {})
    odd = Name("ODD")
    assert shared_name(odd) is odd
    assert model.shared_names == {}  # a str subclass is never kept


def test_ndjson_keeps_a_long_integer_exact_on_its_line_only() -> None:
    body = '{"n": 1}\n{"n": 123456789012345678901234567890}\n{"n": 2.5}\n'
    assert parse_ndjson(body) == [
        {"n": 1},
        {"n": JsonNumber("123456789012345678901234567890")},
        {"n": 2.5},
    ]
    assert parse_ndjson('{"n": 18446744073709551617}') == [
        {"n": JsonNumber("18446744073709551617")}
    ]


def _nested(depth: int) -> str:
    """JSON arrays `depth` levels deep around a 1."""
    return "[" * depth + "1" + "]" * depth


@pytest.mark.parametrize("depth", [MAX_DATA_DEPTH + 1, 300, 1000])
def test_data_nested_too_deep_is_refused_naming_the_field(depth: int) -> None:
    # 300 and 1000: past what orjson serialises, where the standard module's encoder (the old
    # fallback) raised RecursionError, a 500 at intake.
    items = parse_ndjson(f'{{"recipient_id": "1", "name": "x", "data": {_nested(depth)}}}\n')
    with pytest.raises(EventValidationError) as caught:
        events_from_items(items, max_items=10)
    [error] = caught.value.errors
    assert (error.index, error.field) == (0, "data")
    assert f"more than {MAX_DATA_DEPTH} levels" in error.message


def test_data_nested_to_the_limit_is_kept() -> None:
    items = parse_ndjson(f'{{"recipient_id": "1", "name": "x", "data": {_nested(MAX_DATA_DEPTH)}}}')
    [event] = events_from_items(items, max_items=10)
    assert event.data == _nested(MAX_DATA_DEPTH).replace(" ", "")


def test_data_as_a_string_is_not_looked_into() -> None:
    # A string is the app's own text: forwarder never parses nor re-encodes it, so no depth
    # applies; the remote gets it as sent.
    deep = _nested(5000)
    event, errors = _one({"recipient_id": "1", "name": "x", "data": deep})
    assert not errors
    assert event is not None
    assert event.data == deep


# Every shape a JSON number can take: ints of any size and sign (-0 too), fractions with
# trailing zeros, exponents in either case with or without a sign.
_DIGITS = st.text(alphabet="0123456789", min_size=1, max_size=25)
_INT_PART = st.one_of(st.just("0"), st.from_regex(r"\A[1-9][0-9]{0,24}\Z"))
_JSON_NUMBERS = st.one_of(
    st.integers().map(str),
    st.integers(min_value=-(2**80), max_value=2**80).map(str),
    st.sampled_from(["-0", "0", "1E5", "1e5", "-0.0", "1.10", "12345678901234567.5", "1e-7"]),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),  # shortest forms, orjson's way
    st.tuples(
        st.sampled_from(["", "-"]),
        _INT_PART,
        st.one_of(st.just(""), _DIGITS.map(lambda d: "." + d)),
        st.one_of(
            st.just(""),
            st.tuples(
                st.sampled_from(["e", "E"]), st.sampled_from(["", "+", "-"]), st.integers(0, 300)
            ).map(lambda p: f"{p[0]}{p[1]}{p[2]}"),
        ),
    ).map("".join),
)


@given(number=_JSON_NUMBERS, spaced=st.booleans())
def test_json_numbers_arrive_as_written(number: str, spaced: bool) -> None:
    # What the app wrote is what the remote receives: recipient_id and value take the number's
    # text, and data keeps it inside the object, in the fast (orjson) way and the exact one.
    sep = ": " if spaced else ":"
    line = (
        f'{{"recipient_id"{sep}{number}, "name"{sep}"x", "value"{sep}{number}, '
        f'"data"{sep}{{"n"{sep}{number}, "list"{sep}[1, {number}]}}}}'
    )
    plain = '{"recipient_id": "7", "name": "y", "data": {"n": 12}}'
    # Alone, among lines without risky numbers, and as one JSON array.
    bodies = [line, f"{plain}\n{line}\n{plain}"]
    batches = [parse_ndjson(body) for body in bodies]
    array = loads_json(f"[{plain}, {line}]".encode())
    assert isinstance(array, list)
    batches.append(array)
    finite = number.lstrip("-").isdigit() or math.isfinite(float(number))
    for items in batches:
        if not finite:  # past a float's range: refused as before, never sent as "inf"
            with pytest.raises(EventValidationError, match="finite"):
                events_from_items(items, max_items=10)
            continue
        event = next(e for e in events_from_items(items, max_items=10) if e.name == "x")
        assert event.recipient_id == number
        assert event.value == number
        assert event.data == f'{{"n":{number},"list":[1,{number}]}}'
        assert json.loads(event.data)["n"] == json.loads(number)


def test_numbers_the_red_team_sent_arrive_as_written() -> None:
    body = (
        '{"recipient_id": -9300000000000000001, "name": "x", '
        '"data": {"order": -9999999999999999999, "price": 1.10}}\n'
        '{"recipient_id": 12345678901234567.5, "name": "y"}\n'
    )
    first, second = events_from_items(parse_ndjson(body), max_items=10)
    assert first.recipient_id == "-9300000000000000001"
    assert first.data == '{"order":-9999999999999999999,"price":1.10}'
    assert second.recipient_id == "12345678901234567.5"


@pytest.mark.parametrize(("number", "expected"), [("1", True), ("0", False), ("-0", False)])
def test_conversion_as_a_kept_number(number: str, expected: bool) -> None:
    [item] = parse_ndjson(f'{{"recipient_id": "1", "name": "x", "conversion": {number}, "v": 1.5}}')
    assert isinstance(item, dict)
    item.pop("v")
    event, errors = _one(item)
    assert not errors
    assert event is not None
    assert event.conversion is expected


def test_a_number_where_a_string_is_required_is_still_refused() -> None:
    [item] = parse_ndjson('{"recipient_id": "1", "name": 1.50, "ref": -0}')
    assert isinstance(item, dict)
    _, errors = _one(item)
    assert {e.field for e in errors} == {"name", "ref"}
    assert all("got a number" in e.message for e in errors)


@given(
    st.lists(
        st.one_of(_JSON_NUMBERS, st.text(alphabet="0123456789.eE-+ ,:[x", max_size=30).map(repr)),
        max_size=6,
    ),
    st.sampled_from([",", ", ", ",\n ", " ,\t"]),
)
def test_risky_number_check_never_misses_one(values: list[str], sep: str) -> None:
    # Values and number-like strings ('...' made "..."): whatever the check lets through to
    # orjson must come back with every number as written.
    text = "[" + sep.join(v.replace("'", '"') if v.startswith("'") else v for v in values) + "]"
    try:
        exact = json.loads(text, parse_float=JsonNumber, parse_int=JsonNumber)
    except ValueError:
        return  # a string repr with a backslash or a quote: not the point here
    if parse._has_risky_number(text):
        return
    fast = orjson.loads(text)
    assert [x.text if isinstance(x, JsonNumber) else x for x in exact] == [
        str(x) if isinstance(x, int | float) else x for x in fast
    ]
    # ... and orjson writes them back (data) as written too.
    assert [x.text if isinstance(x, JsonNumber) else x for x in exact] == [
        orjson.dumps(x).decode() if isinstance(x, int | float) else x for x in fast
    ]
    assert parse._has_risky_number(text.encode()) is False
