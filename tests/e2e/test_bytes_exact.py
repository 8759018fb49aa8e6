"""Bytes exact, end to end (issue 15.3): what an app sends in recipient_id, name, value, data and
ref is what the remote receives, after form decoding as the remote's own kind decodes it (PHP:
urllib.parse.parse_qsl(keep_blank_values=True) on the raw body).

Hypothesis makes the events; one `forwarder mock-remote` and one daemon per queue mode (memory,
and durable: through the spool) take all of them, so the whole test stays a few seconds.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from functools import partial
from typing import Any
from urllib.parse import parse_qsl, quote, quote_plus

import aiohttp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from forwarder.ops.credentials import basic_token
from tests.conftest import API_KEY, DaemonProc, MockProc

CREATE = "/v1/recipientEvents/create"
# Nothing listens there: connections are refused at once.
UNREACHABLE = "http://127.0.0.1:9/v1"
FIELDS = ("recipient_id", "name", "value", "data", "ref")
# Text of every kind a form can carry: spaces (trailing too), +, %, &, =, line ends, unicode
# beyond the BMP. Not NUL (refused with a 400) nor lone surrogates (not UTF-8).
_TEXT = st.lists(
    st.one_of(
        st.sampled_from([" ", "+", "%", "%2B", "&", "=", "\t", "\r\n", "é", "☕", "😀", "a", "0"]),
        st.characters(exclude_categories=["Cs"], exclude_characters="\x00"),
    ),
    max_size=12,
).map("".join)
_REQUIRED = _TEXT.filter(lambda text: text.strip() != "")
# How an app may write a value: quote_plus (urlencode), quote ("%20"), or raw where that is
# still a form (no & = + %: e.g. a trailing space as it is). The event_id goes first, so
# that the app's own last field ends the body.


def _raw(value: str) -> str:
    return value if not set(value) & set("&=+%#") else quote_plus(value, safe="")


_ENCODERS: dict[str, Callable[[str], str]] = {
    "plus": partial(quote_plus, safe=""),
    "percent": partial(quote, safe=""),
    "raw": _raw,
}


@st.composite
def form_bodies(draw: st.DrawFn) -> bytes:
    values = {"recipient_id": draw(_REQUIRED), "name": draw(_REQUIRED)}
    for optional in ("value", "data", "ref"):
        if draw(st.booleans()):
            values[optional] = draw(_TEXT)
    if draw(st.booleans()):
        values["conversion"] = draw(st.sampled_from(["0", "1", "true", "false"]))
    order = draw(st.permutations(list(values)))
    encode = _ENCODERS[draw(st.sampled_from(sorted(_ENCODERS)))]
    return "&".join(f"{k}={encode(values[k])}" for k in order).encode()


def sent_fields(body: bytes) -> dict[str, str]:
    """The app's fields as the remote's kind of parser reads its body."""
    return dict(parse_qsl(body.decode(), keep_blank_values=True))


def collect_bodies(count: int) -> list[bytes]:
    bodies: list[bytes] = []

    @settings(
        max_examples=count,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow],
    )
    @given(form_bodies())
    def collect(body: bytes) -> None:
        bodies.append(body)

    collect()
    # The issue's own examples, always among them.
    bodies.append(b"recipient_id=1&name=PURCHASE&ref=abc ")
    bodies.append(b"recipient_id=a+b%2Bc&name=%F0%9F%98%80&value=&data=%7B%7D&ref= x ")
    return bodies


async def _delivered(mock: MockProc, count: int) -> dict[str, dict[str, Any]]:
    async with asyncio.timeout(30):
        while True:
            record = await mock.record()
            events = {e["idempotency_key"]: e for e in record["events"]}
            if len(events) >= count:
                return events
            await asyncio.sleep(0.1)


async def _send_all(proc: DaemonProc, bodies: list[bytes], prefix: str) -> list[str]:
    ids = []
    async with aiohttp.ClientSession() as http:
        for n, body in enumerate(bodies):
            event_id = f"{prefix}-{n:06d}"
            ids.append(event_id)
            async with http.post(
                f"{proc.url}{CREATE}",
                data=f"event_id={event_id}&".encode() + body,
                headers={"Content-Type": "application/x-www-form-urlencoded"},
            ) as response:
                assert response.status < 300, (body, await response.text())
    return ids


async def test_fields_reach_the_remote_byte_for_byte(mock_remote: Any, daemon: Any) -> None:
    mock: MockProc = await mock_remote()
    bodies = collect_bodies(40)
    memory: DaemonProc = await daemon(mock.base_url)
    # Durable: accepted while the remote is unreachable, so that the events are read back from
    # the spool by the next start, which delivers them.
    durable: DaemonProc = await daemon(
        UNREACHABLE, queue={"mode": "durable"}, shutdown={"timeout_s": 0.5}
    )
    sent = {}
    for proc, prefix in ((memory, "memory"), (durable, "durable")):
        for event_id, body in zip(await _send_all(proc, bodies, prefix), bodies, strict=True):
            sent[event_id] = body
    assert await durable.stop() == 0
    await daemon(mock.base_url, state_dir=durable.state_dir, queue={"mode": "durable"})
    received = await _delivered(mock, len(sent))
    for event_id, body in sent.items():
        fields = sent_fields(body)
        got = received[event_id]
        # An empty value, data or ref is left out, which the remote takes as empty (its default).
        assert {f: got[f] for f in FIELDS} == {f: fields.get(f, "") for f in FIELDS}, body
        # A missing conversion is sent as 0 (the remote's default), true as 1.
        expected = "1" if fields.get("conversion", "0") in ("1", "true") else "0"
        assert got["conversion"] == expected, body


async def test_json_strings_reach_the_remote_as_sent(mock_remote: Any, daemon: Any) -> None:
    mock: MockProc = await mock_remote()
    proc: DaemonProc = await daemon(mock.base_url)
    items = [
        {"event_id": "json-000001", "recipient_id": " r+1 ", "name": "A%2B", "ref": "abc "},
        {"event_id": "json-000002", "recipient_id": 12345678901234567.5, "name": "x"},
        {
            "event_id": "json-000003",
            "recipient_id": -9300000000000000001,
            "name": "x",
            "data": {"price": 1.10, "order": -9999999999999999999},
        },
    ]
    # Numbers written as the app wrote them (json.dumps would write 12345678901234567.5 as
    # 1.2345678901234568e+16, and 1.10 as 1.1).
    body = (
        json.dumps(items[0])
        + "\n"
        + '{"event_id": "json-000002", "recipient_id": 12345678901234567.5, "name": "x"}\n'
        + '{"event_id": "json-000003", "recipient_id": -9300000000000000001, "name": "x",'
        + ' "data": {"price": 1.10, "order": -9999999999999999999}}\n'
    )
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{proc.url}/v1/events", data=body, headers={"Content-Type": "application/x-ndjson"}
        ) as response,
    ):
        assert response.status < 300, await response.text()
    got = await _delivered(mock, 3)
    assert (got["json-000001"]["recipient_id"], got["json-000001"]["name"]) == (" r+1 ", "A%2B")
    assert got["json-000001"]["ref"] == "abc "
    assert got["json-000002"]["recipient_id"] == "12345678901234567.5"
    assert got["json-000003"]["recipient_id"] == "-9300000000000000001"
    assert got["json-000003"]["data"] == '{"price":1.10,"order":-9999999999999999999}'


async def test_mock_remote_reads_a_raw_body_as_php_does(mock_remote: Any) -> None:
    # A trailing space, as curl --data sends it, is the last value's (request.post() stripped
    # it); a repeated field's last value wins.
    mock: MockProc = await mock_remote()
    body = b"recipient_id=1&name=X&name=PURCHASE&value=&ref=abc "
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{mock.root}{CREATE}",
            data=body,
            headers={
                "Content-Type": "application/x-www-form-urlencoded",
                "Authorization": f"Basic {basic_token(API_KEY)}",
            },
        ) as response,
    ):
        assert response.status == 200, await response.text()
    [got] = (await mock.record())["events"]
    assert {f: got[f] for f in FIELDS} == sent_fields(body) | {"data": ""}
    assert got["ref"] == "abc "
