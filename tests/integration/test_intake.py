"""The intake HTTP API, served for real on an ephemeral port: the contract apps rely on.

Every answer is JSON; bad input gets a 4xx naming the field; a full queue or a stopping daemon gets
503 with Retry-After, and then nothing of that request was queued.
"""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol
from unittest import mock
from urllib.parse import urlencode

import orjson
import pytest
from aiohttp import web
from aiohttp.streams import StreamReader
from aiohttp.test_utils import TestClient, make_mocked_request
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDictProxy
from prometheus_client.parser import text_string_to_metric_families

from forwarder.events import Event
from forwarder.events.model import MAX_DATA_BYTES, MAX_NAME_CHARS
from forwarder.intake.bodies import parse_urlencoded, simple_form
from forwarder.intake.state import IntakeState
from forwarder.ops.credentials import Secret
from forwarder.ops.metrics import Stats
from forwarder.storage.queue import EventQueue, event_size
from tests.conftest import ServeIntake, intake_state

CREATE = "/v1/recipientEvents/create"
BATCH = "/v1/events"
FORM = "application/x-www-form-urlencoded"
JSON = "application/json"
NDJSON = "application/x-ndjson"
CURL_FIELDS = [("name", "PURCHASE"), ("value", "24.99"), ("conversion", "1")]
CURL_FIELDS.append(("recipient_id", "12345"))
GIVEN_ID = "order-2024.11:0042_a"


def basic(user: str, password: str = "") -> dict[str, str]:
    """What `curl -u user:password` sends."""
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def multipart(fields: list[tuple[str, str]], boundary: str = "fwd-test-boundary") -> bytes:
    """A multipart/form-data body of plain text fields (what `curl -F k=v` sends)."""
    out = b""
    for name, value in fields:
        out += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
        out += value.encode() + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def multipart_type(boundary: str = "fwd-test-boundary") -> str:
    return f"multipart/form-data; boundary={boundary}"


def is_uuid(text: object) -> bool:
    if not isinstance(text, str):
        return False
    try:
        return str(uuid.UUID(text)) == text
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class Answer:
    """One response, its body already parsed (every intake answer must be a JSON object)."""

    status: int
    body: dict[str, Any]
    headers: CIMultiDictProxy[str]

    @property
    def errors(self) -> list[dict[str, Any]]:
        errors = self.body["errors"]
        assert isinstance(errors, list)
        return errors

    def fields(self) -> set[tuple[int, str]]:
        return {(e["index"], e["field"]) for e in self.errors}


@dataclass(slots=True)
class Intake:
    """A served intake app and the state behind it."""

    client: TestClient[web.Request, web.Application]
    state: IntakeState

    @property
    def queue(self) -> EventQueue:
        return self.state.queue

    @property
    def stats(self) -> Stats:
        return self.state.stats

    def queued(self) -> list[Event]:
        """Everything queued so far, oldest first (emptying the queue)."""
        return self.queue.take_all()

    async def raw(
        self,
        method: str,
        path: str,
        body: bytes | str = b"",
        content_type: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, CIMultiDictProxy[str], str, bytes]:
        """Send a request as given; no Content-Type at all when `content_type` is None."""
        all_headers = dict(headers or {})
        skip: list[str] = []
        if content_type is None:
            skip.append("Content-Type")
        else:
            all_headers["Content-Type"] = content_type
        data = body.encode() if isinstance(body, str) else body
        async with self.client.request(
            method, path, data=data, headers=all_headers, skip_auto_headers=skip
        ) as response:
            return response.status, response.headers, response.content_type, await response.read()

    async def send(
        self,
        method: str,
        path: str,
        body: bytes | str = b"",
        content_type: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Answer:
        status, got_headers, ctype, raw = await self.raw(method, path, body, content_type, headers)
        assert ctype == "application/json", (status, ctype, raw[:300])
        payload = json.loads(raw)
        assert isinstance(payload, dict), payload
        if status >= 400 and path != "/readyz":  # the probe answers {"ready": false, ...}
            assert payload["success"] is False, payload
            assert isinstance(payload["error"], str)
            assert payload["error"]
        return Answer(status, payload, got_headers)

    async def form(
        self,
        fields: list[tuple[str, str]],
        path: str = CREATE,
        headers: Mapping[str, str] | None = None,
    ) -> Answer:
        return await self.send("POST", path, urlencode(fields), FORM, headers)

    async def json(
        self, payload: object, path: str = CREATE, headers: Mapping[str, str] | None = None
    ) -> Answer:
        return await self.send("POST", path, json.dumps(payload), JSON, headers)

    async def ndjson(self, lines: list[str], content_type: str = NDJSON) -> Answer:
        return await self.send("POST", BATCH, "\n".join(lines) + "\n", content_type)

    async def get(self, path: str) -> Answer:
        return await self.send("GET", path)


class IntakeFactory(Protocol):
    def __call__(
        self,
        *,
        max_events: int = ...,
        max_bytes: int = ...,
        max_batch: int = ...,
        max_body_bytes: int = ...,
        not_ready_reason: Callable[[], str] = ...,
        stats_extra: Callable[[], dict[str, Any]] = ...,
    ) -> Awaitable[Intake]: ...


@pytest.fixture
def make_intake(serve_intake: ServeIntake) -> IntakeFactory:
    async def factory(
        *,
        max_events: int = 100,
        max_bytes: int = 0,
        max_batch: int = 10,
        max_body_bytes: int = 1024 * 1024,
        not_ready_reason: Callable[[], str] = lambda: "",
        stats_extra: Callable[[], dict[str, Any]] = dict,
    ) -> Intake:
        state = intake_state(
            max_events=max_events,
            max_bytes=max_bytes,
            max_batch=max_batch,
            max_body_bytes=max_body_bytes,
            not_ready_reason=not_ready_reason,
            stats_extra=stats_extra,
        )
        return Intake(await serve_intake(state), state)

    return factory


@pytest.fixture
async def intake(make_intake: IntakeFactory) -> Intake:
    return await make_intake()


def event(**fields: object) -> dict[str, object]:
    """A valid JSON event, with `fields` changed (None removes a field)."""
    base: dict[str, object] = {"recipient_id": "r-1", "name": "PURCHASE"}
    base.update(fields)
    return {k: v for k, v in base.items() if v is not None}


# --- POST /v1/recipientEvents/create: the drop-in -------------------------------------------------


async def test_create_form_like_curl(intake: Intake) -> None:
    answer = await intake.form(CURL_FIELDS, headers=basic("live-key-123"))
    assert answer.status == 202, answer.body
    assert answer.body["success"] is True
    assert answer.body["data"]["status"] == "queued"
    assert set(answer.body["data"]) == {"id", "status"}
    assert is_uuid(answer.body["data"]["id"])
    [queued] = intake.queued()
    assert queued.event_id == answer.body["data"]["id"]
    assert (queued.recipient_id, queued.name, queued.value) == ("12345", "PURCHASE", "24.99")
    assert queued.conversion is True
    assert (queued.data, queued.ref) == ("", "")
    assert queued.accepted_at > 0
    assert intake.stats.accepted == 1
    assert intake.stats.invalid_requests == 0


async def test_create_json_object(intake: Intake) -> None:
    payload = {
        "recipient_id": "r-9",
        "name": "SIGNUP",
        "value": 10,
        "conversion": False,
        "ref": "campaign-7",
        "data": "plain text",
    }
    answer = await intake.json(payload)
    assert answer.status == 202, answer.body
    assert answer.body["data"]["status"] == "queued"
    [queued] = intake.queued()
    assert queued.event_id == answer.body["data"]["id"]
    assert is_uuid(queued.event_id)
    assert queued.form() == {
        "recipient_id": "r-9",
        "name": "SIGNUP",
        "value": "10",
        "conversion": "0",
        "ref": "campaign-7",
        "data": "plain text",
    }


async def test_create_multipart_form(intake: Intake) -> None:
    body = multipart([*CURL_FIELDS, ("ref", "mp-1")])
    answer = await intake.send("POST", CREATE, body, multipart_type())
    assert answer.status == 202, answer.body
    [queued] = intake.queued()
    assert (queued.recipient_id, queued.name, queued.value, queued.ref) == (
        "12345",
        "PURCHASE",
        "24.99",
        "mp-1",
    )
    assert queued.conversion is True


async def test_create_multipart_file_field_is_refused(intake: Intake) -> None:
    body = (
        b"--b0undary\r\n"
        b'Content-Disposition: form-data; name="name"; filename="name.txt"\r\n'
        b"Content-Type: text/plain\r\n\r\nPURCHASE\r\n"
        b'--b0undary\r\nContent-Disposition: form-data; name="recipient_id"\r\n\r\n1\r\n'
        b"--b0undary--\r\n"
    )
    answer = await intake.send("POST", CREATE, body, multipart_type("b0undary"))
    assert answer.status == 400, answer.body
    assert (0, "name") in answer.fields()
    assert len(intake.queue) == 0


@pytest.mark.parametrize(
    "charset_type",
    [f"{FORM}; charset=utf-8", f"{JSON}; charset=utf-8", "Application/JSON", f"{FORM.upper()}"],
)
async def test_create_content_type_parameters_and_case(intake: Intake, charset_type: str) -> None:
    fields = [("recipient_id", "r-1"), ("name", "Café ☕")]
    body = json.dumps(dict(fields)) if "json" in charset_type.lower() else urlencode(fields)
    answer = await intake.send("POST", CREATE, body, charset_type)
    assert answer.status == 202, answer.body
    [queued] = intake.queued()
    assert queued.name == "Café ☕"


@pytest.mark.parametrize(
    ("how", "path_suffix"),
    [
        ("form field", ""),
        ("query", "?api_key=live-key-123"),
        ("basic auth", ""),
        ("json field", ""),
        ("json and query", "?api_key=x"),
    ],
)
async def test_create_tolerates_and_ignores_api_key(
    intake: Intake, how: str, path_suffix: str
) -> None:
    headers = basic("live-key-123") if how == "basic auth" else {}
    if how.startswith("json"):
        fields = dict(CURL_FIELDS)
        if how == "json field":
            fields["api_key"] = "live-key-123"
        answer = await intake.json(fields, CREATE + path_suffix, headers)
    else:
        fields_list = list(CURL_FIELDS)
        if how == "form field":
            fields_list.append(("api_key", "live-key-123"))
        answer = await intake.form(fields_list, CREATE + path_suffix, headers)
    assert answer.status == 202, answer.body
    [queued] = intake.queued()
    assert "live-key-123" not in json.dumps(queued.to_dict())
    assert queued.form() == {
        "recipient_id": "12345",
        "name": "PURCHASE",
        "value": "24.99",
        "conversion": "1",
    }


@pytest.mark.parametrize("encoding", ["form", "json", "multipart"])
async def test_create_keeps_given_event_id(intake: Intake, encoding: str) -> None:
    fields = [*CURL_FIELDS, ("event_id", GIVEN_ID)]
    if encoding == "form":
        answer = await intake.form(fields)
    elif encoding == "json":
        answer = await intake.json(dict(fields))
    else:
        answer = await intake.send("POST", CREATE, multipart(fields), multipart_type())
    assert answer.status == 202, answer.body
    assert answer.body["data"]["id"] == GIVEN_ID
    [queued] = intake.queued()
    assert queued.event_id == GIVEN_ID


async def test_create_refuses_json_array(intake: Intake) -> None:
    answer = await intake.json([event()])
    assert answer.status == 400
    assert "/v1/events" in answer.errors[0]["message"]
    assert len(intake.queue) == 0


async def test_create_answer_is_the_json_it_always_was(intake: Intake) -> None:
    # The 202 body is put together from constant parts (no dict, no dumps): byte for byte what
    # orjson made of the dict, for a made id and for an app's own.
    for fields in (CURL_FIELDS, [*CURL_FIELDS, ("event_id", GIVEN_ID)]):
        _, _, ctype, raw = await intake.raw("POST", CREATE, urlencode(fields), FORM)
        assert ctype == "application/json"
        event_id = json.loads(raw)["data"]["id"]
        assert raw == orjson.dumps({"success": True, "data": {"id": event_id, "status": "queued"}})
    assert [e.event_id for e in intake.queued()][1] == GIVEN_ID


@pytest.mark.parametrize(
    ("body", "content_type", "expected"),
    [
        # The short way: plain fields, '+' for spaces, empty values and pairs, and trailing
        # blanks kept, as the remote's own kind (PHP) reads them.
        (
            b"recipient_id=r+1&name=PAGE+VIEW&ref=&&value=2 \r\n",
            FORM,
            ("r 1", "PAGE VIEW", "2 \r\n"),
        ),
        (b"recipient_id=7&name=X&value", f"{FORM}; charset=UTF-8", ("7", "X", "")),
        # The long way: percent escapes, another charset.
        (b"recipient_id=r%2B1&name=Caf%C3%A9+%E2%98%95&value=%32", FORM, ("r+1", "Café ☕", "2")),
        (b"recipient_id=7&name=Caf\xe9", f"{FORM}; charset=latin-1", ("7", "Café", "")),
    ],
)
async def test_create_form_fields_are_decoded_like_the_remote_does(
    intake: Intake, body: bytes, content_type: str, expected: tuple[str, str, str]
) -> None:
    answer = await intake.send("POST", CREATE, body, content_type)
    assert answer.status == 202, answer.body
    [queued] = intake.queued()
    assert (queued.recipient_id, queued.name, queued.value) == expected


async def test_create_form_still_arriving_when_the_handler_starts(intake: Intake) -> None:
    # A body not all here yet (chunked, in pieces) is read under the body deadline, as always.
    async def pieces() -> AsyncIterator[bytes]:
        for piece in (b"recipient_id=12", b"345&name=PURCH", b"ASE"):
            yield piece
            await asyncio.sleep(0.02)  # so that the handler starts before the rest is sent

    async with intake.client.post(CREATE, data=pieces(), headers={"Content-Type": FORM}) as got:
        assert got.status == 202, await got.text()
    [queued] = intake.queued()
    assert (queued.recipient_id, queued.name) == ("12345", "PURCHASE")


async def test_create_repeated_form_key_is_named_on_the_short_way_too(intake: Intake) -> None:
    answer = await intake.send("POST", CREATE, b"recipient_id=1&name=A&ref=x&ref=y", FORM)
    assert answer.status == 400
    assert answer.fields() == {(0, "ref")}
    assert "more than once" in answer.errors[0]["message"]
    assert len(intake.queue) == 0


async def test_create_duplicate_form_keys_are_refused(intake: Intake) -> None:
    answer = await intake.form([("recipient_id", "1"), ("name", "A"), ("name", "B")])
    assert answer.status == 400
    assert answer.fields() == {(0, "name")}
    assert "more than once" in answer.errors[0]["message"]
    assert "name" in answer.body["error"]
    assert len(intake.queue) == 0
    assert intake.stats.invalid_requests == 1


# --- POST /v1/events: batches ---------------------------------------------------------------------


async def test_batch_json_array(intake: Intake) -> None:
    items = [
        event(name="A"),
        event(name="B", event_id=GIVEN_ID, value=3.5, conversion=True),
        event(name="C", recipient_id=77, data={"k": [1, 2]}),
    ]
    answer = await intake.json(items, BATCH)
    assert answer.status == 202, answer.body
    data = answer.body["data"]
    assert data["count"] == 3
    assert data["status"] == "queued"
    ids = data["ids"]
    assert len(ids) == 3
    assert ids[1] == GIVEN_ID
    assert is_uuid(ids[0])
    assert is_uuid(ids[2])
    assert len(set(ids)) == 3
    queued = intake.queued()
    assert [e.event_id for e in queued] == ids
    assert [e.name for e in queued] == ["A", "B", "C"]
    assert (queued[1].value, queued[1].conversion) == ("3.5", True)
    assert (queued[2].recipient_id, queued[2].data) == ("77", '{"k":[1,2]}')
    assert intake.stats.accepted == 3


@pytest.mark.parametrize("ctype", [NDJSON, "application/ndjson", "application/jsonl"])
async def test_batch_ndjson(intake: Intake, ctype: str) -> None:
    lines = [json.dumps(event(name=f"E{i}")) for i in range(4)]
    body = "\r\n".join([lines[0], "", lines[1], "   ", lines[2]]) + "\n" + lines[3]  # no final \n
    answer = await intake.send("POST", BATCH, body, ctype)
    assert answer.status == 202, answer.body
    assert answer.body["data"]["count"] == 4
    queued = intake.queued()
    assert [e.name for e in queued] == ["E0", "E1", "E2", "E3"]
    assert [e.event_id for e in queued] == answer.body["data"]["ids"]


async def test_batch_ndjson_string_holding_unicode_line_separators(intake: Intake) -> None:
    # U+2028, U+2029 and U+0085 may appear raw inside JSON strings; only "\n" ends an NDJSON line.
    names = ["a\u2028b", "c\u2029d", "e\x85f"]
    lines = [json.dumps(event(name=n), ensure_ascii=False) for n in names]
    answer = await intake.ndjson(lines)
    assert answer.status == 202, answer.body
    assert [e.name for e in intake.queued()] == names


async def test_batch_all_or_nothing(intake: Intake) -> None:
    items: list[object] = [
        event(name="ok-0"),
        event(name=None),
        event(name="ok-2"),
        event(recipient_id=True, colour="red"),
        event(name="ok-4"),
    ]
    answer = await intake.json(items, BATCH)
    assert answer.status == 400
    assert answer.fields() == {(1, "name"), (3, "recipient_id"), (3, "colour")}
    assert "2 of 5" in answer.body["error"]
    assert "nothing was queued" in answer.body["error"]
    assert len(intake.queue) == 0
    assert intake.stats.accepted == 0
    assert intake.stats.invalid_requests == 1


async def test_batch_ndjson_bad_line_is_named(intake: Intake) -> None:
    lines = [json.dumps(event()), "{not json", json.dumps(event()), '{"name": "x"']
    answer = await intake.ndjson(lines)
    assert answer.status == 400
    assert answer.fields() == {(1, ""), (3, "")}
    assert all("JSON" in e["message"] for e in answer.errors)
    assert len(intake.queue) == 0


async def test_batch_over_max_batch(make_intake: IntakeFactory) -> None:
    intake = await make_intake(max_batch=3)
    answer = await intake.json([event()] * 4, BATCH)
    assert answer.status == 400
    assert answer.fields() == {(-1, "batch")}
    assert "3" in answer.errors[0]["message"]
    ndjson = await intake.ndjson([json.dumps(event())] * 4)
    assert ndjson.status == 400
    assert ndjson.fields() == {(-1, "batch")}
    assert len(intake.queue) == 0
    exact = await intake.json([event()] * 3, BATCH)
    assert exact.status == 202
    assert exact.body["data"]["count"] == 3


@pytest.mark.parametrize(("body", "ctype"), [("[]", JSON), ("", NDJSON), ("\n \n\r\n", NDJSON)])
async def test_batch_empty(intake: Intake, body: str, ctype: str) -> None:
    answer = await intake.send("POST", BATCH, body, ctype)
    assert answer.status == 400
    assert answer.fields() == {(-1, "batch")}
    assert "no events" in answer.body["error"]


async def test_batch_duplicate_event_id(intake: Intake) -> None:
    items = [event(event_id=GIVEN_ID), event(), event(event_id=GIVEN_ID)]
    answer = await intake.json(items, BATCH)
    assert answer.status == 400
    assert answer.fields() == {(2, "event_id")}
    assert "item 0" in answer.errors[0]["message"]
    assert len(intake.queue) == 0


@pytest.mark.parametrize("payload", [{"recipient_id": "1", "name": "x"}, "text", 5, None])
async def test_batch_must_be_an_array(intake: Intake, payload: object) -> None:
    answer = await intake.json(payload, BATCH)
    assert answer.status == 400
    assert "array" in answer.body["error"]


async def test_batch_items_must_be_objects(intake: Intake) -> None:
    answer = await intake.json([1, "x", None, [], event()], BATCH)
    assert answer.status == 400
    assert answer.fields() == {(0, ""), (1, ""), (2, ""), (3, "")}
    assert "JSON object" in answer.errors[0]["message"]


async def test_batch_refuses_form_bodies(intake: Intake) -> None:
    answer = await intake.form([("recipient_id", "1"), ("name", "x")], BATCH)
    assert answer.status == 415
    assert len(intake.queue) == 0


# --- validation -----------------------------------------------------------------------------------

REJECTED: list[tuple[dict[str, object], str, str]] = [
    (event(recipient_id=None), "recipient_id", "required"),
    (event(name=None), "name", "required"),
    (event(name=""), "name", "empty"),
    (event(name="   "), "name", "empty"),
    (event(recipient_id=""), "recipient_id", "empty"),
    (event(recipient_id=True), "recipient_id", "boolean"),
    (event(recipient_id={"id": 1}), "recipient_id", "object"),
    (event(recipient_id=[1]), "recipient_id", "array"),
    (event(name={"n": 1}), "name", "object"),
    (event(value=False), "value", "boolean"),
    (event(value=[1]), "value", "array"),
    (event(ref=7), "ref", "number"),
    (event(data=7), "data", "number"),
    (event(data=True), "data", "boolean"),
    (event(conversion="maybe"), "conversion", "true/false"),
    (event(conversion=2), "conversion", "true/false"),
    (event(conversion=-1), "conversion", "true/false"),
    (event(conversion=0.5), "conversion", "true/false"),
    (event(conversion=[]), "conversion", "true/false"),
    (event(conversion={}), "conversion", "true/false"),
    (event(name="N" * (MAX_NAME_CHARS + 1)), "name", "255"),
    (event(recipient_id="r" * 256), "recipient_id", "255"),
    (event(value="1" * 1025), "value", "1024"),
    (event(ref="r" * 256), "ref", "255"),
    (event(data="d" * (MAX_DATA_BYTES + 1)), "data", str(MAX_DATA_BYTES)),
    (event(data="é" * (MAX_DATA_BYTES // 2 + 1)), "data", "bytes"),
    (event(data={"k": "d" * MAX_DATA_BYTES}), "data", str(MAX_DATA_BYTES)),
    (event(event_id="short"), "event_id", "10-255"),
    (event(event_id="has spaces in it"), "event_id", "10-255"),
    (event(event_id="slash/es/are/bad"), "event_id", "10-255"),
    (event(event_id="x" * 256), "event_id", "10-255"),
    (event(event_id=12345678901), "event_id", "10-255"),
    (event(name="a\x00b"), "name", "NUL"),
    (event(recipient_id="\x00"), "recipient_id", "NUL"),
]


# Refused by /v1/events only: the drop-in endpoint takes them as the remote does
# (tests/integration/test_input_fidelity.py).
STRICT_ONLY: list[tuple[dict[str, object], str, str]] = [
    (event(conversion=True, value="abc"), "value", "number"),
    (event(conversion="yes", value="12,50"), "value", "number"),
    (event(conversion=1, value="NaN"), "value", "number"),
    (event(conversion=1, value="inf"), "value", "number"),
    (event(colour="red"), "colour", "unknown field"),
]


@pytest.mark.parametrize(
    ("item", "field", "words", "path"),
    [(*case, path) for case in REJECTED for path in (CREATE, BATCH)]
    + [(*case, BATCH) for case in STRICT_ONLY],
)
async def test_validation_names_the_field(
    intake: Intake, path: str, item: dict[str, object], field: str, words: str
) -> None:
    payload: object = [event(name="fine"), item] if path == BATCH else item
    answer = await intake.json(payload, path)
    assert answer.status == 400, answer.body
    index = 1 if path == BATCH else 0
    assert (index, field) in answer.fields(), answer.errors
    assert all(e["index"] == index for e in answer.errors)
    message = next(e["message"] for e in answer.errors if e["field"] == field)
    assert words in message
    assert field in answer.body["error"] or path == BATCH
    assert len(intake.queue) == 0
    assert intake.stats.invalid_requests == 1


async def test_batch_does_not_take_api_key(intake: Intake) -> None:
    # Only the drop-in tolerates the remote's way of passing the key; the batch API is our own.
    answer = await intake.json([event(api_key="live-key-123")], BATCH)
    assert answer.status == 400
    assert answer.fields() == {(0, "api_key")}
    assert "live-key-123" not in json.dumps(answer.body)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ([("name", "x")], "recipient_id"),
        ([("recipient_id", "1")], "name"),
        ([("recipient_id", "1"), ("name", "")], "name"),
        ([("recipient_id", "1"), ("name", "x"), ("conversion", "2")], "conversion"),
        ([("recipient_id", "1"), ("name", "x" * 256)], "name"),
        ([("recipient_id", "1"), ("name", "x"), ("event_id", "a b c d e f g")], "event_id"),
        ([("recipient_id", "1"), ("name", "x\x00")], "name"),
        ([("recipient_id", "1"), ("recipient_id", "2"), ("name", "x")], "recipient_id"),
    ],
)
async def test_form_validation_names_the_field(
    intake: Intake, fields: list[tuple[str, str]], field: str
) -> None:
    answer = await intake.form(fields)
    assert answer.status == 400, answer.body
    assert answer.fields() == {(0, field)}
    assert field in answer.body["error"]
    assert len(intake.queue) == 0


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (True, True),
        (False, False),
        (1, True),
        (0, False),
        ("true", True),
        ("false", False),
        ("1", True),
        ("0", False),
        ("yes", True),
        ("no", False),
        (" TRUE ", True),
        ("No", False),
        ("", False),
        (None, False),
    ],
)
async def test_conversion_variants(intake: Intake, given: object, expected: bool) -> None:
    answer = await intake.json([event(conversion=given, value="24.99")], BATCH)
    assert answer.status == 202, answer.body
    if isinstance(given, str):
        form = await intake.form([("recipient_id", "1"), ("name", "x"), ("conversion", given)])
        assert form.status == 202, form.body
    assert [e.conversion for e in intake.queued()] == [expected] * (1 + isinstance(given, str))


@pytest.mark.parametrize(
    ("given", "expected"),
    [(12345, "12345"), ("00042", "00042"), (0, "0"), (-7, "-7"), (1.5, "1.5"), ("r-é", "r-é")],
)
async def test_recipient_id_numbers_become_strings(
    intake: Intake, given: object, expected: str
) -> None:
    answer = await intake.json(event(recipient_id=given))
    assert answer.status == 202, answer.body
    [queued] = intake.queued()
    assert queued.recipient_id == expected


async def test_data_object_is_serialised_compactly(intake: Intake) -> None:
    data = {"sku": "A-1", "qty": 2, "tags": ["x", "ü"], "nested": {"ok": True, "n": None}}
    answer = await intake.json(event(data=data))
    assert answer.status == 202, answer.body
    [queued] = intake.queued()
    assert queued.data == '{"sku":"A-1","qty":2,"tags":["x","ü"],"nested":{"ok":true,"n":null}}'
    assert json.loads(queued.data) == data


async def test_limits_are_inclusive(intake: Intake) -> None:
    item = event(
        name="N" * MAX_NAME_CHARS,
        recipient_id="r" * 255,
        value="9" * 1024,
        ref="f" * 255,
        data="d" * MAX_DATA_BYTES,
        event_id="e" * 255,
    )
    answer = await intake.json(item)
    assert answer.status == 202, answer.body
    [queued] = intake.queued()
    assert queued.name == "N" * MAX_NAME_CHARS
    assert len(queued.data) == MAX_DATA_BYTES
    assert queued.event_id == "e" * 255


async def test_null_optional_fields_are_absent(intake: Intake) -> None:
    answer = await intake.json(event(value=None, ref=None) | {"data": None, "event_id": None})
    assert answer.status == 202, answer.body
    [queued] = intake.queued()
    assert (queued.value, queued.ref, queued.data) == ("", "", "")
    assert is_uuid(queued.event_id)


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize("path", [CREATE, BATCH])
async def test_json_nan_and_infinity_are_refused(intake: Intake, constant: str, path: str) -> None:
    body = f'{{"recipient_id": "1", "name": "x", "value": {constant}, "conversion": 1}}'
    answer = await intake.send("POST", path, f"[{body}]" if path == BATCH else body, JSON)
    assert answer.status == 400, answer.body
    assert constant in json.dumps(answer.errors)
    assert len(intake.queue) == 0


@pytest.mark.parametrize("number", ["1e400", "-1e999"])
async def test_json_number_too_large_for_a_float_is_refused(intake: Intake, number: str) -> None:
    body = f'[{{"recipient_id": {number}, "name": "x"}}]'
    answer = await intake.send("POST", BATCH, body, JSON)
    assert answer.status == 400, answer.body
    assert answer.fields() == {(0, "recipient_id")}
    assert "finite" in answer.errors[0]["message"]


@pytest.mark.parametrize("path", [CREATE, BATCH])
async def test_malformed_json_is_400(intake: Intake, path: str) -> None:
    answer = await intake.send("POST", path, '{"recipient_id": "1", "name": ', JSON)
    assert answer.status == 400
    assert "JSON" in answer.body["error"]


# --- HTTP-level refusals --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "ctype", "build"),
    [
        (CREATE, FORM, "form"),
        (CREATE, JSON, "json"),
        (CREATE, multipart_type(), "multipart"),
        (BATCH, JSON, "json"),
        (BATCH, NDJSON, "ndjson"),
    ],
)
async def test_body_over_limit_is_413(
    make_intake: IntakeFactory, path: str, ctype: str, build: str
) -> None:
    intake = await make_intake(max_body_bytes=2048)
    big = "x" * 4096
    bodies: dict[str, str | bytes] = {
        "form": urlencode([("recipient_id", "1"), ("name", "x"), ("data", big)]),
        "json": json.dumps(event(data=big) if path == CREATE else [event(data=big)]),
        "multipart": multipart([("recipient_id", "1"), ("name", "x"), ("data", big)]),
        "ndjson": json.dumps(event(data=big)) + "\n",
    }
    answer = await intake.send("POST", path, bodies[build], ctype)
    assert answer.status == 413, answer.body
    assert "max_body_bytes" in answer.body["error"]
    assert "2048" in answer.body["error"]
    assert len(intake.queue) == 0
    assert intake.stats.invalid_requests == 1
    small = await intake.json(event() if path == CREATE else [event()], path)
    assert small.status == 202


async def test_chunked_body_over_limit_is_413(make_intake: IntakeFactory) -> None:
    intake = await make_intake(max_body_bytes=2048)

    async def chunks() -> AsyncIterator[bytes]:
        yield b'[{"recipient_id": "1", "name": "x", "data": "'
        for _ in range(8):
            yield b"y" * 512
        yield b'"}]'

    async with intake.client.post(BATCH, data=chunks(), headers={"Content-Type": JSON}) as response:
        assert response.status == 413
        assert (await response.json())["success"] is False
    assert len(intake.queue) == 0


@pytest.mark.parametrize(
    ("path", "ctype"),
    [
        (CREATE, None),
        (CREATE, "text/plain"),
        (CREATE, "application/octet-stream"),
        (CREATE, NDJSON),
        (CREATE, "application/xml"),
        (BATCH, None),
        (BATCH, FORM),
        (BATCH, multipart_type()),
        (BATCH, "text/plain"),
    ],
)
async def test_wrong_or_missing_content_type_is_415(
    intake: Intake, path: str, ctype: str | None
) -> None:
    body = json.dumps(event()) if path == CREATE else json.dumps([event()])
    answer = await intake.send("POST", path, body, ctype)
    assert answer.status == 415, answer.body
    assert "Content-Type" in answer.body["error"]
    assert len(intake.queue) == 0
    assert intake.stats.invalid_requests == 1


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("GET", CREATE, "POST"),
        ("GET", BATCH, "POST"),
        ("PUT", CREATE, "POST"),
        ("DELETE", BATCH, "POST"),
        ("PATCH", CREATE, "POST"),
        ("POST", "/healthz", "GET"),
        ("POST", "/metrics", "GET"),
        ("DELETE", "/v1/stats", "GET"),
    ],
)
async def test_wrong_method_is_405_with_allow(
    intake: Intake, method: str, path: str, allowed: str
) -> None:
    answer = await intake.send(method, path)
    assert answer.status == 405, answer.body
    assert allowed in answer.headers["Allow"]
    assert method in answer.body["error"]
    assert allowed in answer.body["error"]


@pytest.mark.parametrize("path", ["/", "/v1", "/v1/event", "/v2/events", "/healthz/x", "/admin"])
async def test_unknown_path_is_404_json(intake: Intake, path: str) -> None:
    for method in ("GET", "POST"):
        answer = await intake.send(method, path, "{}", JSON)
        assert answer.status == 404, answer.body
        assert path in answer.body["error"]


# --- refusal: a full queue, a stopping daemon -----------------------------------------------------


async def test_queue_full_refuses_single_event(make_intake: IntakeFactory) -> None:
    intake = await make_intake(max_events=2)
    for _ in range(2):
        assert (await intake.form(CURL_FIELDS)).status == 202
    answer = await intake.form(CURL_FIELDS)
    assert answer.status == 503, answer.body
    assert answer.body["reason"] == "queue_full"
    assert int(answer.headers["Retry-After"]) > 0
    assert len(intake.queue) == 2
    assert intake.stats.refused["queue_full"] == 1
    assert intake.stats.accepted == 2
    intake.queue.take_all()
    assert (await intake.form(CURL_FIELDS)).status == 202


async def test_queue_full_refuses_whole_batch(make_intake: IntakeFactory) -> None:
    intake = await make_intake(max_events=5)
    assert (await intake.json([event(name=f"first-{i}") for i in range(3)], BATCH)).status == 202
    answer = await intake.json([event(name=f"second-{i}") for i in range(3)], BATCH)
    assert answer.status == 503, answer.body
    assert answer.body["reason"] == "queue_full"
    assert "Retry-After" in answer.headers
    assert [e.name for e in intake.queue.take_all()] == ["first-0", "first-1", "first-2"]
    assert intake.stats.refused["queue_full"] == 3
    assert intake.stats.accepted == 3


async def test_queue_bytes_full_refuses_the_whole_request(make_intake: IntakeFactory) -> None:
    big = "x" * 30_000
    intake = await make_intake(max_bytes=100_000)
    first = [event(recipient_id=f"r{n}", data=big) for n in range(2)]
    assert (await intake.json(first, BATCH)).status == 202
    answer = await intake.json([event(recipient_id="r9", data=big) for _ in range(2)], BATCH)
    assert answer.status == 503, answer.body
    assert answer.body["reason"] == "queue_bytes_full"
    assert "queue.max_bytes" in answer.body["error"]
    assert int(answer.headers["Retry-After"]) > 0
    assert len(intake.queue) == 2  # nothing of the refused request
    assert intake.stats.refused["queue_bytes_full"] == 2
    stats = await intake.get("/v1/stats")
    assert stats.body["queue"]["max_bytes"] == 100_000
    assert 60_000 < stats.body["queue"]["bytes"] <= 100_000
    intake.queue.take_all()
    assert (await intake.form([*CURL_FIELDS, ("data", big)])).status == 202


async def test_events_that_could_never_fit_get_413_naming_queue_max_bytes(
    make_intake: IntakeFactory,
) -> None:
    intake = await make_intake(max_bytes=50_000)
    batch = [event(recipient_id=f"r{n}", data="y" * 30_000) for n in range(2)]
    answer = await intake.json(batch, BATCH)
    assert answer.status == 413, answer.body
    assert answer.body["reason"] == "too_large"
    assert "queue.max_bytes (50000)" in answer.body["error"]
    assert len(intake.queue) == 0
    assert intake.stats.refused == {}


async def test_batch_that_just_fits_is_accepted(make_intake: IntakeFactory) -> None:
    intake = await make_intake(max_events=5)
    assert (await intake.json([event()] * 3, BATCH)).status == 202
    answer = await intake.json([event()] * 2, BATCH)
    assert answer.status == 202
    assert len(intake.queue) == 5


@pytest.mark.parametrize(
    ("path", "ctype", "body"),
    [
        (CREATE, FORM, urlencode(CURL_FIELDS)),
        (CREATE, JSON, json.dumps(dict(CURL_FIELDS))),
        (BATCH, JSON, json.dumps([dict(CURL_FIELDS)])),
        (BATCH, NDJSON, json.dumps(dict(CURL_FIELDS)) + "\n"),
    ],
)
async def test_shutting_down_refuses(intake: Intake, path: str, ctype: str, body: str) -> None:
    intake.state.accepting = False
    answer = await intake.send("POST", path, body, ctype)
    assert answer.status == 503, answer.body
    assert answer.body["reason"] == "shutting_down"
    assert int(answer.headers["Retry-After"]) > 0
    assert len(intake.queue) == 0
    assert intake.stats.accepted == 0
    assert "shutting_down" in intake.stats.refused
    if path == CREATE:  # a batch is refused unread, so its events are not counted
        assert intake.stats.refused["shutting_down"] == 1


# --- health, readiness, metrics, stats ------------------------------------------------------------


async def test_healthz(intake: Intake) -> None:
    answer = await intake.get("/healthz")
    assert answer.status == 200
    assert answer.body == {"status": "ok"}
    head_status, _, _, _ = await intake.raw("HEAD", "/healthz")
    assert head_status == 200


async def test_readyz_follows_not_ready_reason(make_intake: IntakeFactory) -> None:
    reason = [""]
    intake = await make_intake(not_ready_reason=lambda: reason[0])
    ready = await intake.get("/readyz")
    assert ready.status == 200
    assert ready.body == {"ready": True}
    reason[0] = "delivery paused: remote refused the key (401)"
    paused = await intake.get("/readyz")
    assert paused.status == 503
    assert paused.body == {"ready": False, "reason": reason[0]}
    assert (await intake.get("/healthz")).status == 200  # alive, only not ready
    reason[0] = ""
    assert (await intake.get("/readyz")).status == 200


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


async def test_metrics_is_prometheus_text(make_intake: IntakeFactory) -> None:
    intake = await make_intake(max_events=3)
    assert (await intake.json([event(), event()], BATCH)).status == 202
    assert (await intake.form(CURL_FIELDS)).status == 202
    assert (await intake.form(CURL_FIELDS)).status == 503
    assert (await intake.json(event(name=None))).status == 400
    status, _, ctype, raw = await intake.raw("GET", "/metrics")
    assert status == 200
    assert ctype == "text/plain"
    text = raw.decode()
    assert "# TYPE forwarder_events_accepted_total counter" in text
    samples = metric_samples(text)
    assert samples[("forwarder_events_accepted_total", ())] == 3.0
    assert samples[("forwarder_events_refused_total", (("reason", "queue_full"),))] == 1.0
    assert samples[("forwarder_requests_invalid_total", ())] == 1.0
    assert samples[("forwarder_queue_depth", ())] == 3.0
    assert samples[("forwarder_events_delivered_total", ())] == 0.0


async def test_stats_json(make_intake: IntakeFactory) -> None:
    extra = {"in_flight": 0, "delivery": {"paused": False, "workers": 4}}
    intake = await make_intake(max_events=50, max_bytes=2 << 20, stats_extra=lambda: extra)
    assert (await intake.json([event(), event()], BATCH)).status == 202
    assert (await intake.form([("name", "x")])).status == 400
    answer = await intake.get("/v1/stats")
    assert answer.status == 200
    body = answer.body
    size = sum(event_size(e) for e in intake.queue.take_all())
    assert body["queue"] == {"depth": 2, "max_events": 50, "bytes": size, "max_bytes": 2 << 20}
    assert body["accepting"] is True
    assert body["counters"]["accepted"] == 2
    assert body["counters"]["invalid_requests"] == 1
    assert body["counters"]["refused"] == {}
    assert body["counters"]["delivered"] == 0
    assert body["in_flight"] == 0
    assert body["delivery"] == extra["delivery"]
    assert isinstance(body["version"], str)
    assert body["uptime_s"] >= 0
    intake.state.accepting = False
    assert (await intake.get("/v1/stats")).body["accepting"] is False


# --- the intake token ----------------------------------------------------------------------------

TOKEN = "intake-token-0123456789-abcdef"


@pytest.fixture
async def guarded(make_intake: IntakeFactory) -> Intake:
    intake = await make_intake()
    intake.state.auth_token = Secret(TOKEN)
    return intake


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.parametrize(
    "headers",
    [
        {},
        bearer("wrong-token-0123456789-abcdef"),
        bearer(TOKEN[:-1]),
        bearer(TOKEN + "x"),
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": TOKEN},
        {"X-Forwarder-Token": TOKEN.upper()},
        {"X-Forwarder-Token": "caf\u00e9-\udcff"},  # not ASCII: still 401, never 500
    ],
)
async def test_without_the_token_everything_but_healthz_is_401(
    guarded: Intake, headers: dict[str, str]
) -> None:
    for method, path, body, ctype in [
        ("POST", CREATE, urlencode(CURL_FIELDS), FORM),
        ("POST", BATCH, json.dumps([event()]), JSON),
        ("GET", "/readyz", "", None),
        ("GET", "/metrics", "", None),
        ("GET", "/v1/stats", "", None),
        ("GET", "/no-such-path", "", None),
    ]:
        status, got, ctype_back, raw = await guarded.raw(method, path, body, ctype, headers)
        assert status == 401, (path, raw)
        assert ctype_back == "application/json"
        answer = json.loads(raw)
        assert answer["success"] is False
        assert answer["reason"] == "unauthorized"
        assert "Authorization: Bearer" in answer["error"]
        assert got["WWW-Authenticate"] == 'Bearer realm="forwarder"'
        for sent in headers.values():
            assert sent.split()[-1] not in raw.decode("utf-8", "replace")
        assert TOKEN not in raw.decode()
    assert guarded.stats.unauthorized == 6
    assert guarded.stats.accepted == 0
    assert len(guarded.queue) == 0
    assert (await guarded.get("/healthz")).status == 200


async def test_the_token_as_bearer_or_in_its_own_header(guarded: Intake) -> None:
    assert (await guarded.form(CURL_FIELDS, headers=bearer(TOKEN))).status == 202
    assert (
        await guarded.form(CURL_FIELDS, headers={"authorization": f"bearer  {TOKEN} "})
    ).status == 202
    both = {**basic("the-apps-own-api-key"), "X-Forwarder-Token": TOKEN}
    assert (await guarded.form(CURL_FIELDS, headers=both)).status == 202
    either = {**bearer("wrong-0123456789-abcdef"), "X-Forwarder-Token": TOKEN}
    assert (await guarded.json([event()], BATCH, headers=either)).status == 202
    assert (await guarded.send("GET", "/v1/stats", headers=bearer(TOKEN))).status == 200
    assert len(guarded.queued()) == 4
    assert guarded.stats.unauthorized == 0


async def test_the_token_is_checked_before_the_body_is_read(make_intake: IntakeFactory) -> None:
    guarded = await make_intake(max_body_bytes=1024)
    guarded.state.auth_token = Secret(TOKEN)
    big = "x" * 4096  # past max_body_bytes: 413 for an authorised request
    status, _, _, raw = await guarded.raw("POST", BATCH, big, JSON)
    assert status == 401, raw
    status, _, _, raw = await guarded.raw("POST", BATCH, big, JSON, bearer(TOKEN))
    assert status == 413, raw


async def test_unauthorized_requests_are_counted_in_metrics(guarded: Intake) -> None:
    assert (await guarded.raw("GET", "/v1/stats"))[0] == 401
    status, _, _, raw = await guarded.raw("GET", "/metrics", headers=bearer(TOKEN))
    assert status == 200
    assert metric_samples(raw.decode())[("forwarder_requests_unauthorized_total", ())] == 1.0


def _form_request(body: bytes, content_type: str = FORM) -> web.Request:
    """A request whose whole body is here, as aiohttp hands it to a handler."""
    payload = StreamReader(mock.Mock(_reading_paused=False), 2**16, loop=asyncio.get_running_loop())
    payload.feed_data(body)
    payload.feed_eof()
    return make_mocked_request(
        "POST", CREATE, headers={"Content-Type": content_type}, payload=payload
    )


@settings(max_examples=300, deadline=None)
@given(
    body=st.lists(
        st.sampled_from(["a", "b", "=", "&", "+", " ", "%", "%41", "%zz", "é", "\t", "\r\n"]),
        max_size=12,
    ).map(lambda parts: "".join(parts).encode()),
    charset=st.sampled_from(["", "; charset=utf-8", "; charset=UTF8", "; charset=latin-1"]),
)
def test_simple_form_reads_what_the_long_way_reads_or_leaves_it_to_that(
    body: bytes, charset: str
) -> None:
    # The drop-in's short way for urlencoded forms must never read a form differently from the
    # long way (the remote's kind of parser); whatever it does not take (None) goes that way.
    async def check() -> None:
        simple = await simple_form(_form_request(body, FORM + charset))
        try:
            posted = parse_urlencoded(body, charset.partition("=")[2] or None)
        except (UnicodeDecodeError, LookupError):
            assert simple is None
            return
        if simple is None:
            repeated = len(set(posted.keys())) < len(posted)
            assert b"%" in body or repeated or "latin" in charset
        else:
            assert list(simple.items()) == list(posted.items())

    asyncio.run(check())


async def test_simple_form_leaves_a_body_not_all_here_to_aiohttp() -> None:
    payload = StreamReader(mock.Mock(_reading_paused=False), 2**16, loop=asyncio.get_running_loop())
    payload.feed_data(b"recipient_id=1&name=")  # and the rest is still on its way
    request = make_mocked_request("POST", CREATE, headers={"Content-Type": FORM}, payload=payload)
    assert await simple_form(request) is None
