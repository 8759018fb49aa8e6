"""What apps send arrives as sent, or is refused with a 400 naming the field (issues 14 and 15).

Deeply nested `data`, JSON numbers of every shape, and the drop-in endpoint's leniency where the
remote is lenient, through the intake app served in process.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote_plus

import pytest
from structlog.testing import capture_logs

from forwarder.events.model import MAX_DATA_DEPTH
from forwarder.intake.leniency import MAX_FIELD_NAMES, OTHER
from tests.conftest import IntakeClient, ServeIntake, intake_state

CREATE = "/v1/recipientEvents/create"
BATCH = "/v1/events"
FORM = "application/x-www-form-urlencoded"
JSON = "application/json"
NDJSON = "application/x-ndjson"


def nested(depth: int) -> str:
    return "[" * depth + "1" + "]" * depth


async def post(
    client: IntakeClient, path: str, body: str | bytes, ctype: str
) -> tuple[int, dict[str, Any]]:
    async with client.post(path, data=body, headers={"Content-Type": ctype}) as response:
        assert response.content_type == "application/json", await response.text()
        payload = await response.json()
        assert isinstance(payload, dict)
        return response.status, payload


@pytest.mark.parametrize("depth", [MAX_DATA_DEPTH + 1, 1000])
@pytest.mark.parametrize(
    ("path", "ctype", "wrap"),
    [
        (CREATE, JSON, "{}"),
        (BATCH, JSON, "[{}]"),
        (BATCH, NDJSON, "{}\n"),
    ],
    ids=["drop-in-json", "batch-json", "batch-ndjson"],
)
async def test_deeply_nested_data_is_a_400_naming_the_field(
    serve_intake: ServeIntake, depth: int, path: str, ctype: str, wrap: str
) -> None:
    state = intake_state()
    client = await serve_intake(state)
    item = f'{{"recipient_id": "1", "name": "x", "data": {{"a": {nested(depth - 1)}}}}}'
    status, answer = await post(client, path, wrap.replace("{}", item), ctype)
    assert status == 400, answer
    assert answer["success"] is False
    named = {e["field"] for e in answer.get("errors", [])}
    assert "data" in named or answer["error"].startswith("data:"), answer
    assert f"more than {MAX_DATA_DEPTH} levels" in json.dumps(answer)
    assert len(state.queue) == 0


async def test_data_nested_to_the_limit_is_accepted_on_both_endpoints(
    serve_intake: ServeIntake,
) -> None:
    state = intake_state()
    client = await serve_intake(state)
    item = f'{{"recipient_id": "1", "name": "x", "data": {{"a": {nested(MAX_DATA_DEPTH - 1)}}}}}'
    for path, ctype, body in [(CREATE, JSON, item), (BATCH, NDJSON, item + "\n")]:
        status, answer = await post(client, path, body, ctype)
        assert status < 300, answer
    assert [e.data for e in state.queue.take_all()] == [f'{{"a":{nested(MAX_DATA_DEPTH - 1)}}}'] * 2


async def test_deep_json_text_in_a_form_field_is_delivered_as_sent(
    serve_intake: ServeIntake,
) -> None:
    # data as a string (a form field, or a JSON string) is the app's own text: never parsed,
    # never re-encoded, so no depth applies and the remote gets it as sent.
    state = intake_state()
    client = await serve_intake(state)
    text = nested(1000)
    status, answer = await post(client, CREATE, f"recipient_id=1&name=x&data={text}", FORM)
    assert status < 300, answer
    [queued] = state.queue.take_all()
    assert queued.data == text


async def test_json_numbers_arrive_as_written_on_both_endpoints(
    serve_intake: ServeIntake,
) -> None:
    state = intake_state()
    client = await serve_intake(state)
    drop_in = '{"recipient_id": -9300000000000000001, "name": "x", "data": {"price": 1.10}}'
    batch = (
        '{"recipient_id": 12345678901234567.5, "name": "y", "value": 1E5,'
        ' "data": {"order": -9999999999999999999, "zero": -0}}\n'
    )
    assert (await post(client, CREATE, drop_in, JSON))[0] < 300
    assert (await post(client, BATCH, batch, NDJSON))[0] < 300
    first, second = state.queue.take_all()
    assert (first.recipient_id, first.data) == ("-9300000000000000001", '{"price":1.10}')
    assert (second.recipient_id, second.value) == ("12345678901234567.5", "1E5")
    assert second.data == '{"order":-9999999999999999999,"zero":-0}'


# --- the drop-in endpoint accepts what the remote accepts (issue 15.2) -----------------------


async def metrics_text(client: IntakeClient) -> str:
    async with client.get("/metrics") as response:
        return await response.text()


async def test_unknown_form_fields_are_ignored_counted_and_logged_once(
    serve_intake: ServeIntake,
) -> None:
    state = intake_state()
    client = await serve_intake(state)
    with capture_logs() as logs:
        for _ in range(2):
            status, answer = await post(
                client, CREATE, "recipient_id=1&name=x&campaign_id=77&utm%0Asource=a", FORM
            )
            assert status < 300, answer
    queued = state.queue.take_all()
    assert [e.form() for e in queued] == [{"recipient_id": "1", "name": "x", "conversion": "0"}] * 2
    assert dict(state.stats.unknown_fields) == {"campaign_id": 2, "utm_source": 2}
    ignored = [line["field"] for line in logs if line["event"] == "unknown field ignored"]
    assert sorted(ignored) == ["campaign_id", "utm_source"]  # once each, the name sanitised
    text = metrics_text(client)
    assert 'forwarder_unknown_fields_total{field="campaign_id"} 2.0' in await text


async def test_unknown_field_names_are_capped(serve_intake: ServeIntake) -> None:
    state = intake_state(max_events=1000)
    client = await serve_intake(state)
    with capture_logs() as logs:
        for n in range(MAX_FIELD_NAMES + 10):
            body = json.dumps({"recipient_id": "1", "name": "x", f"f{n}": 1})
            assert (await post(client, CREATE, body, JSON))[0] < 300
    counts = state.stats.unknown_fields
    assert len(counts) == MAX_FIELD_NAMES + 1
    assert counts[OTHER] == 10
    assert sum(1 for line in logs if line["event"] == "unknown field ignored") == len(counts)


@pytest.mark.parametrize("value", ["24,99", "abc", "€5"])
async def test_conversion_value_not_a_number_is_delivered_as_sent(
    serve_intake: ServeIntake, value: str
) -> None:
    state = intake_state()
    client = await serve_intake(state)
    body = f"recipient_id=1&name=PURCHASE&conversion=1&value={quote_plus(value)}"
    status, answer = await post(client, CREATE, body, FORM)
    assert status < 300, answer
    [queued] = state.queue.take_all()
    assert queued.form()["value"] == value
    assert state.stats.lenient_values == 1
    assert "forwarder_lenient_values_total 1.0" in await metrics_text(client)


@pytest.mark.parametrize(
    ("body", "ctype", "status"),
    [
        ("name=x&campaign_id=7", FORM, 400),  # no recipient_id
        ("recipient_id=1&campaign_id=7", FORM, 400),  # no name
        ("recipient_id=1&name=x", "text/plain", 415),  # not a form
    ],
)
async def test_drop_in_still_refuses_what_the_remote_refuses(
    serve_intake: ServeIntake, body: str, ctype: str, status: int
) -> None:
    state = intake_state()
    client = await serve_intake(state)
    assert (await post(client, CREATE, body, ctype))[0] == status
    assert len(state.queue) == 0


async def test_batch_endpoint_stays_strict(serve_intake: ServeIntake) -> None:
    state = intake_state()
    client = await serve_intake(state)
    for item in (
        {"recipient_id": "1", "name": "x", "campaign_id": 7},
        {"recipient_id": "1", "name": "x", "conversion": 1, "value": "24,99"},
    ):
        status, _ = await post(client, BATCH, json.dumps([item]), JSON)
        assert status == 400
    assert len(state.queue) == 0
    assert not state.stats.unknown_fields


@pytest.mark.parametrize(
    ("path", "ctype", "wrap"),
    [(CREATE, JSON, "{}"), (BATCH, JSON, "[{}]"), (BATCH, NDJSON, "{}\n")],
    ids=["drop-in-json", "batch-json", "batch-ndjson"],
)
async def test_data_too_deep_to_parse_is_a_400_that_says_so(
    serve_intake: ServeIntake, path: str, ctype: str, wrap: str
) -> None:
    # Past what any parser here reads (orjson: 1024 levels): the answer says why, not
    # "maximum recursion depth exceeded".
    state = intake_state()
    client = await serve_intake(state)
    item = f'{{"recipient_id": "1", "name": "x", "data": {nested(5000)}}}'
    status, answer = await post(client, path, wrap.replace("{}", item), ctype)
    assert status == 400, answer
    assert "nested too deeply" in json.dumps(answer)
    assert "recursion" not in json.dumps(answer)
