"""Unit tests for event validation and the form sent to the remote."""

from __future__ import annotations

import json
import os
import re
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from forwarder import events
from forwarder.events import (
    Event,
    EventValidationError,
    FieldError,
    event_from_mapping,
    events_from_items,
    loads_json,
    new_event_id,
    new_event_ids,
    parse_ndjson,
    shared_name,
)


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
        (b'{"a": [1, 2.5, "x"]}', {"a": [1, 2.5, "x"]}),
        # Past 64 bits orjson would give a float: kept exact.
        ('{"n": 123456789012345678901234567890}', {"n": 123456789012345678901234567890}),
        (b'{"n": -12345678901234567890123}', {"n": -12345678901234567890123}),
        ('{"n": 18446744073709551615}', {"n": 18446744073709551615}),
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


def test_data_object_is_serialised_compactly_even_past_orjson() -> None:
    errors: list[FieldError] = []
    deep: object = 1
    for _ in range(300):  # deeper than orjson serialises
        deep = [deep]
    event = event_from_mapping(
        {"recipient_id": "1", "name": "X", "data": {"big": 2**70, "deep": deep}}, 0, errors
    )
    assert not errors
    assert event is not None
    assert event.data.startswith('{"big":1180591620717411303424,"deep":[[[')


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
    monkeypatch.setattr(events, "_names", {})
    monkeypatch.setattr(events, "_NAMES_MAX", 2)
    kept = [shared_name("".join(["NAME_", str(n)])) for n in range(2)]
    assert shared_name("".join(["NAME_", "0"])) is kept[0]
    late = "".join(["NAME_", "2"])  # built at run time: not a constant of this module
    assert shared_name(late) is late
    assert "NAME_2" not in events._names  # past the bound: not kept, only not shared
    assert len(events._names) == 2

    class Name(str):
        pass

    monkeypatch.setattr(events, "_names", {})
    odd = Name("ODD")
    assert shared_name(odd) is odd
    assert events._names == {}  # a str subclass is never kept


@given(st.text(alphabet="0123456789 ,[]x\u00e9\n", max_size=80))
def test_long_digit_check_matches_the_regular_expression(text: str) -> None:
    expected = re.search(r"[0-9]{20}", text) is not None
    assert events._has_long_digits(text) is expected
    assert events._has_long_digits(text.encode()) is expected


def test_ndjson_keeps_a_long_integer_exact_on_its_line_only() -> None:
    body = '{"n": 1}\n{"n": 123456789012345678901234567890}\n{"n": 2.5}\n'
    assert parse_ndjson(body) == [{"n": 1}, {"n": 123456789012345678901234567890}, {"n": 2.5}]
    assert parse_ndjson('{"n": 18446744073709551617}') == [{"n": 18446744073709551617}]
