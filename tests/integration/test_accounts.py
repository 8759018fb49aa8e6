"""Accounts: routing events by field, header and client key; keys loaded; keys never shown."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from forwarder.config.load import load_config
from forwarder.config.schema import ConfigError
from forwarder.intake import accounts as acc
from forwarder.intake.accounts import (
    Account,
    AccountError,
    Accounts,
    client_account_name,
    configured_accounts,
    load_accounts,
)
from forwarder.ops.credentials import MIN_KEY_CHARS, ApiKey, Secret
from tests.conftest import ServeIntake, intake_state

CLIENT_KEY = "client-key-0123456789"


def account(name: str, key: str = "k-0123456789") -> Account:
    return Account(name, "https://api-eu1.stannp.com/v1", Secret(key), 300, "test")


def router(*, accept: bool = False, made: list[Account] | None = None) -> Accounts:
    configured = {"default": account("default"), "us": account("us", "us-0123456789")}
    return Accounts(
        configured,
        default="default",
        accept_client_keys=accept,
        client_template=configured["default"],
        on_new_client=(made.append if made is not None else lambda a: None),
    )


def test_route_by_field_then_header_then_default() -> None:
    r = router()
    assert r.route("us") == "us"
    assert r.route("", header="us") == "us"
    assert r.route("default", header="us") == "default"  # the event's own field wins
    assert r.route("") == "default"


def test_unknown_account_names_the_field_and_lists_the_known_ones() -> None:
    r = router()
    with pytest.raises(AccountError) as field_error:
        r.route("eu")
    assert field_error.value.field == "account"
    assert "unknown account 'eu' (configured: default, us)" in str(field_error.value)
    with pytest.raises(AccountError) as header_error:
        r.route("", header="eu")
    assert header_error.value.field == "X-Forwarder-Account"


def test_client_keys_are_ignored_unless_accepted() -> None:
    made: list[Account] = []
    assert router(made=made).route("", client_key=CLIENT_KEY) == "default"
    assert made == []


def test_a_client_key_gets_one_account_named_by_a_digest() -> None:
    made: list[Account] = []
    r = router(accept=True, made=made)
    name = r.route("", client_key=CLIENT_KEY)
    assert name == client_account_name(CLIENT_KEY)
    assert name.startswith("client:")
    assert len(name) == len("client:") + 16
    assert CLIENT_KEY not in name
    assert made == []  # named, not created: intake validates the request first
    assert r.open_client(CLIENT_KEY) == name
    assert r.open_client(CLIENT_KEY) == name  # the same key, the same account
    assert r.route("", client_key=CLIENT_KEY) == name
    assert [a.name for a in made] == [name]
    assert made[0].key.reveal() == CLIENT_KEY
    assert made[0].base_url == "https://api-eu1.stannp.com/v1"
    assert CLIENT_KEY not in repr(made[0])
    # An explicit account wins over the key.
    assert r.route("us", client_key=CLIENT_KEY) == "us"


def test_a_malformed_client_key_is_refused_without_echoing_it() -> None:
    r = router(accept=True)
    with pytest.raises(AccountError) as error:
        r.route("", client_key="has space-secret")
    assert error.value.field == "Authorization"
    assert "secret" not in str(error.value)


def test_client_keys_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(acc, "MAX_CLIENT_KEYS", 2)
    r = router(accept=True)
    r.open_client("key-a-0123456789")
    r.open_client("key-b-0123456789")
    with pytest.raises(AccountError) as error:
        r.open_client("key-c-0123456789")
    assert error.value.status == 503
    assert r.refused_at_cap == 1  # counted
    assert r.open_client("key-a-0123456789").startswith("client:")  # known ones work


@pytest.mark.parametrize("short", ["4", "delivered", "k" * (MIN_KEY_CHARS - 1)])
def test_a_client_key_too_short_to_be_a_key_is_refused(short: str) -> None:
    made: list[Account] = []
    r = router(accept=True, made=made)
    attempts: list[Callable[[], str]] = [
        lambda: r.route("", client_key=short),
        lambda: r.open_client(short),
    ]
    for attempt in attempts:
        with pytest.raises(AccountError) as error:
            attempt()
        assert error.value.field == "Authorization"
        assert f"shorter than {MIN_KEY_CHARS} characters" in str(error.value)
        assert short not in str(error.value)
    assert made == []
    assert r.clients == {}
    assert r.open_client("k" * MIN_KEY_CHARS).startswith("client:")


def test_idle_client_accounts_are_freed_and_their_slots_reused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(acc, "MAX_CLIENT_KEYS", 2)
    now = [1000.0]
    busy: set[str] = set()
    freed: list[list[str]] = []
    template = account("default")
    r = Accounts(
        {"default": template},
        default="default",
        accept_client_keys=True,
        client_template=template,
        on_clients_freed=lambda accounts: freed.append([a.name for a in accounts]),
        busy=busy.__contains__,
        clock=lambda: now[0],
    )
    a = r.open_client("key-a-0123456789")
    b = r.open_client("key-b-0123456789")
    busy.add(a)  # a has events queued: never freed while it has
    now[0] += acc.CLIENT_IDLE_S - 1
    with pytest.raises(AccountError):
        r.open_client("key-c-0123456789")  # b is not idle long enough yet
    assert r.refused_at_cap == 1
    now[0] += acc.CLIENT_SWEEP_S  # b idle past CLIENT_IDLE_S; the bound looks again
    c = r.open_client("key-c-0123456789")
    assert freed == [[b]]
    assert sorted(r.clients) == sorted([a, c])
    assert r.freed == 1
    busy.discard(a)  # a's last event done: its idle time starts now, at the last sighting
    r.free_idle()
    assert a in r.clients
    now[0] += acc.CLIENT_IDLE_S
    r.free_idle()
    assert freed == [[b], [a, c]]
    assert r.clients == {}
    # A freed key is welcome back: a new account under the same name.
    assert r.open_client("key-b-0123456789") == b


def test_load_accounts_resolves_every_key(tmp_path: Path) -> None:
    key_file = tmp_path / "us.key"
    key_file.write_text("us-file-key-0123\n")
    config_path = tmp_path / "f.toml"
    config_path.write_text(
        "[accounts.us]\n"
        f'api_key_file = "{key_file}"\n'
        'base_url = "https://api-us1.stannp.com/v1"\n'
        "rate_limit_per_minute = 600\n"
    )
    config = load_config(config_path, env={})
    loaded = load_accounts(config, env={"FORWARDER_API_KEY": "eu-env-key-0123456"})
    assert sorted(loaded) == ["default", "us"]
    assert loaded["us"].key.reveal() == "us-file-key-0123"
    assert loaded["us"].per_minute == 600
    assert loaded["us"].base_url == "https://api-us1.stannp.com/v1"
    assert loaded["default"].per_minute == 300
    with pytest.raises(ConfigError, match="no API key"):
        load_accounts(config, env={})


def test_the_default_key_is_optional_when_another_account_is_the_default(tmp_path: Path) -> None:
    config_path = tmp_path / "f.toml"
    config_path.write_text(
        '[remote]\ndefault_account = "us"\n[accounts.us]\napi_key_env = "US_KEY"\n'
    )
    config = load_config(config_path, env={})
    assert sorted(load_accounts(config, env={"US_KEY": "us-env-key-0123456"})) == ["us"]


def test_configured_accounts_without_a_default_key() -> None:
    config = load_config(env={})
    assert configured_accounts(config, None, {}) == {}
    made = configured_accounts(config, ApiKey(Secret("k-0123456789"), "env"), {})
    assert made["default"].key_source == "env"


# --- through the intake --------------------------------------------------------------------


def basic(user: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:".encode()).decode()}


async def test_intake_routes_and_refuses_with_the_field(serve_intake: ServeIntake) -> None:
    state = intake_state()
    state.accounts = router(accept=True)
    client = await serve_intake(state)
    response = await client.post(
        "/v1/events",
        json=[
            {"recipient_id": "1", "name": "A", "account": "us"},
            {"recipient_id": "2", "name": "B"},
        ],
    )
    assert response.status == 202
    response = await client.post(
        "/v1/events",
        json=[{"recipient_id": "3", "name": "C"}],
        headers={"X-Forwarder-Account": "us"},
    )
    assert response.status == 202
    response = await client.post(
        "/v1/recipientEvents/create",
        data={"recipient_id": "4", "name": "D"},
        headers=basic(CLIENT_KEY),
    )
    assert response.status == 202
    queued = state.queue.take_all()
    assert [e.account for e in queued] == ["us", "default", "us", client_account_name(CLIENT_KEY)]

    response = await client.post(
        "/v1/events",
        json=[
            {"recipient_id": "5", "name": "E"},
            {"recipient_id": "6", "name": "F", "account": "no"},
        ],
    )
    assert response.status == 400
    body = await response.json()
    assert body["errors"] == [
        {
            "index": 1,
            "field": "account",
            "message": "unknown account 'no' (configured: default, us)",
        }
    ]
    response = await client.post(
        "/v1/recipientEvents/create",
        data={"recipient_id": "7", "name": "G"},
        headers={"X-Forwarder-Account": "no"},
    )
    assert response.status == 400
    assert (await response.json())["errors"][0]["field"] == "X-Forwarder-Account"
    response = await client.post(
        "/v1/events", json=[{"recipient_id": "8", "name": "H", "account": "bad name!"}]
    )
    assert response.status == 400
    assert (await response.json())["errors"][0]["field"] == "account"
    assert len(state.queue) == 0  # nothing of a refused request was queued
    assert CLIENT_KEY not in json.dumps(state.stats.counters())
