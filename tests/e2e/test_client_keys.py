"""Client keys (intake.accept_client_keys) cannot harm other apps: a word for a key does not
mangle the log, made-up keys do not use up the client-account slots for good."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
import structlog
from prometheus_client import generate_latest

from forwarder.config.schema import Config, IntakeConfig, RemoteConfig, StateConfig
from forwarder.daemon.lifecycle import Daemon
from forwarder.intake import accounts as acc
from forwarder.intake.accounts import Accounts, client_account_name, configured_accounts
from forwarder.ops import logs
from forwarder.ops.credentials import MIN_KEY_CHARS, ApiKey, Secret, basic_token
from forwarder.ops.logs import REDACTED, Redactor, configure_logging
from tests.conftest import API_KEY, DaemonProc, MockProc, ServeIntake, intake_state
from tests.e2e.test_e2e import wait_until
from tests.integration.test_accounts import account
from tests.unit.test_logs import reset_logging  # noqa: F401 (a fixture)

CLIENT_KEY = "client-own-key-0123456789"
WORDS = ("4", "delivered", "x" * (MIN_KEY_CHARS - 1))


def basic(user: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:".encode()).decode()}


# --- the redactor ---------------------------------------------------------------------------


def test_the_redactor_takes_no_text_shorter_than_a_key() -> None:
    redactor = Redactor([*WORDS, CLIENT_KEY])
    assert set(redactor.secrets) == set(Redactor([CLIENT_KEY]).secrets)
    line = {"event": "retrying", "error": f"4 delivered; sent {CLIENT_KEY}", "attempt": 4}
    assert redactor(None, "info", line) == {
        "event": "retrying",
        "error": f"4 delivered; sent {REDACTED}",
        "attempt": 4,
    }


def test_redaction_never_takes_a_lines_name_or_ids() -> None:
    # Even a key that is (part of) a line's name or ids leaves them whole: a reader finds the
    # line by them. Every other value is still scrubbed.
    key = "delivered-4f9c2a-0123456789"
    redactor = Redactor([key])
    ids = {
        "event": "delivered",
        "event_id": f"{key}-1",
        "recipient_id": key,
        "name": key,
        "account": "client:0123456789abcdef",
        "level": "info",
        "timestamp": "2026-11-26T12:29:24.559627Z",
    }
    line = redactor(None, "info", {**ids, "error": key, "remote_id": key})
    assert line == {**ids, "error": REDACTED, "remote_id": REDACTED}


@pytest.mark.usefixtures("reset_logging")
def test_a_stdlib_records_message_is_still_scrubbed() -> None:
    # A stdlib record's `event` is free text (aiohttp's message), not one of our line names.
    out = io.StringIO()
    configure_logging("info", "json", secrets=[CLIENT_KEY, "4"], stream=out)
    logging.getLogger("aiohttp.server").error("handler failed for %s (4)", CLIENT_KEY)
    structlog.get_logger("t").info("delivered", event_id="e-4", error=CLIENT_KEY)
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["event"] == f"handler failed for {REDACTED} (4)"
    assert (second["event"], second["event_id"], second["error"]) == ("delivered", "e-4", REDACTED)


# --- intake: which requests make an account -------------------------------------------------


def _router(made: list[str]) -> Accounts:
    default = account("default")
    return Accounts(
        {"default": default},
        default="default",
        accept_client_keys=True,
        client_template=default,
        on_new_client=lambda a: made.append(a.name),
    )


async def test_a_word_for_a_client_key_is_refused_naming_the_field(
    serve_intake: ServeIntake,
) -> None:
    made: list[str] = []
    state = intake_state()
    state.accounts = _router(made)
    client = await serve_intake(state)
    for word in WORDS:
        response = await client.post(
            "/v1/recipientEvents/create",
            data={"recipient_id": "1", "name": "A"},
            headers=basic(word),
        )
        assert response.status == 400
        body = await response.json()
        assert body["errors"][0]["field"] == "Authorization"
        assert f"shorter than {MIN_KEY_CHARS} characters" in body["error"]
    assert made == []
    assert len(state.queue) == 0


async def test_invalid_requests_make_no_client_account(
    serve_intake: ServeIntake, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[str] = []
    state = intake_state()
    state.accounts = _router(made)
    client = await serve_intake(state)
    bodies: list[dict[str, str]] = [{}, {"recipient_id": "1"}, {"name": "A", "conversion": "x"}]
    for n in range(acc.MAX_CLIENT_KEYS + 10):  # past the bound, every one refused as invalid
        response = await client.post(
            "/v1/recipientEvents/create",
            data=bodies[n % len(bodies)],
            headers=basic(f"made-up-key-{n:08d}"),
        )
        assert response.status == 400, await response.text()
    assert made == []
    assert state.accounts.clients == {}
    # The next real app gets its account.
    response = await client.post(
        "/v1/recipientEvents/create",
        data={"recipient_id": "1", "name": "A"},
        headers=basic(CLIENT_KEY),
    )
    assert response.status == 202, await response.text()
    assert made == [client_account_name(CLIENT_KEY)]
    # Valid requests past the bound are refused, and counted.
    monkeypatch.setattr(acc, "MAX_CLIENT_KEYS", 5)
    for n in range(5):
        response = await client.post(
            "/v1/recipientEvents/create",
            data={"recipient_id": "1", "name": "A"},
            headers=basic(f"valid-request-key-{n:08d}"),
        )
        assert response.status == (202 if n < 4 else 503)
    assert response.headers["Retry-After"] == "5"
    assert state.accounts.refused_at_cap == 1


# --- the daemon: idle client accounts are freed, with their lanes, metrics and redaction ---


async def test_an_idle_client_account_is_freed_with_its_lane_metrics_and_secret(
    mock_remote: Callable[..., Awaitable[MockProc]],
    short_tmp: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    mock = await mock_remote(api_key=CLIENT_KEY)
    config = Config(
        intake=IntakeConfig(http_listen="127.0.0.1:0", accept_client_keys=True),
        remote=RemoteConfig(base_url=mock.base_url),
        state=StateConfig(dir=str(short_tmp / "state")),
    )
    keys = configured_accounts(config, ApiKey(Secret(API_KEY), "test"), {})
    daemon = Daemon(config, keys)
    task = asyncio.create_task(daemon.run())
    await asyncio.wait_for(daemon.ready.wait(), 10)
    name = client_account_name(CLIENT_KEY)
    try:
        url = daemon.addresses[0]
        async with aiohttp.ClientSession(base_url=url) as http:

            async def send() -> None:
                form = {"recipient_id": "7", "name": "SIGNUP"}
                async with http.post(
                    "/v1/recipientEvents/create", data=form, headers=basic(CLIENT_KEY)
                ) as response:
                    assert response.status == 200, await response.text()  # the remote's answer

            async def delivered(count: int) -> bool:
                return len((await mock.record())["events"]) == count

            await send()
            await wait_until(lambda: delivered(1), 10)
            assert daemon._dispatcher is not None
            lanes = daemon._dispatcher.lanes
            assert name in lanes
            assert CLIENT_KEY in logs._redactor.secrets
            daemon.accounts.free_idle()  # not idle for long enough yet
            assert name in daemon.accounts.clients
            monkeypatch.setattr(acc, "CLIENT_IDLE_S", 0.0)
            await wait_until(lambda: _settled(daemon, name), 10)
            assert [a.name for a in daemon.accounts.free_idle()] == [name]
            await asyncio.sleep(0)
            assert name not in lanes
            assert CLIENT_KEY not in logs._redactor.secrets
            assert basic_token(CLIENT_KEY).rstrip("=") not in logs._redactor.secrets
            assert daemon._metrics is not None
            metrics = generate_latest(daemon._metrics.registry).decode()
            assert name not in metrics
            assert "forwarder_client_accounts_freed_total 1.0" in metrics
            assert "forwarder_client_accounts 0.0" in metrics
            async with http.get("/v1/stats") as response:
                stats = await response.json()
            assert stats["client_accounts"]["freed"] == 1
            assert stats["client_accounts"]["open"] == 0
            # The key comes back: a new account, and its events are delivered.
            await send()
            await wait_until(lambda: delivered(2), 10)
            assert name in lanes
    finally:
        daemon.request_stop()
        assert await asyncio.wait_for(task, 15) == 0


async def _settled(daemon: Daemon, name: str) -> bool:
    assert daemon._dispatcher is not None
    lane = daemon._dispatcher.lanes.get(name)
    return lane is not None and lane.idle


# --- end to end: the log survives words sent as keys ----------------------------------------


async def test_words_as_client_keys_leave_the_log_whole(
    mock_remote: Callable[..., Awaitable[MockProc]],
    daemon: Callable[..., Awaitable[DaemonProc]],
) -> None:
    mock = await mock_remote(api_key=CLIENT_KEY)
    d = await daemon(mock.base_url, intake={"accept_client_keys": True})
    form = {"recipient_id": "4", "name": "delivered", "event_id": "evt-4-delivered-0001"}
    async with aiohttp.ClientSession(base_url=d.url) as http:
        for word in WORDS:
            async with http.post(
                "/v1/recipientEvents/create", data=form, headers=basic(word)
            ) as response:
                assert response.status == 400
        async with http.post(
            "/v1/recipientEvents/create", data=form, headers=basic(CLIENT_KEY)
        ) as response:
            assert response.status == 202

        async def created() -> bool:
            return len((await mock.record())["events"]) == 1

        await wait_until(created, 10)
    assert await d.stop() == 0
    (line,) = d.proc.events("delivered")
    assert line["event_id"] == "evt-4-delivered-0001"
    assert line["recipient_id"] == "4"
    assert line["account"] == client_account_name(CLIENT_KEY)
    text = "\n".join(d.proc.stdout)
    assert REDACTED not in text
    assert CLIENT_KEY not in text
