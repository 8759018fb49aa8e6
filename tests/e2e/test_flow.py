"""Flow control end to end: `forwarder run` against `forwarder mock-remote`, both subprocesses.

Per-recipient order through faults, the rate limit without 429 storms, the circuit breaker,
accounts and client keys, and a reload under load that neither loses nor duplicates an event.
"""

from __future__ import annotations

import asyncio
import base64
import json
import signal
from collections import defaultdict
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import aiohttp

from tests.conftest import API_KEY, DaemonProc, MockProc, spawn, write_config

StartMock = Callable[..., Awaitable[MockProc]]
StartDaemon = Callable[..., Awaitable[DaemonProc]]


async def wait_until(check: Callable[[], Awaitable[bool]], timeout: float) -> None:
    async def loop() -> None:
        while not await check():
            await asyncio.sleep(0.05)

    await asyncio.wait_for(loop(), timeout)


async def post_batch(
    http: aiohttp.ClientSession, events: list[dict[str, Any]], headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    async with http.post("/v1/events", json=events, headers=headers) as response:
        body: dict[str, Any] = await response.json()
        return response.status, body


async def stats_of(http: aiohttp.ClientSession) -> dict[str, Any]:
    async with http.get("/v1/stats") as response:
        body: dict[str, Any] = await response.json()
        return body


def received(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["received_at"]).timestamp()


async def test_each_recipient_keeps_its_order_through_transient_faults(
    mock_remote: StartMock, daemon: StartDaemon
) -> None:
    mock = await mock_remote("--fail-rate", "0.3", "--reset-rate", "0.1", "--seed", "3")
    d = await daemon(mock.base_url, remote={"max_concurrency": 16})
    recipients = [f"r{n}" for n in range(6)]
    per_recipient = 15
    async with aiohttp.ClientSession(base_url=d.url) as http:
        # Interleaved, in several requests: r0#0, r1#0, ..., r0#1, r1#1, ...
        for step in range(per_recipient):
            batch = [{"recipient_id": r, "name": "STEP", "value": str(step)} for r in recipients]
            assert (await post_batch(http, batch))[0] == 202

    async def all_created() -> bool:
        return len((await mock.record())["events"]) == len(recipients) * per_recipient

    await wait_until(all_created, 45)
    record = await mock.record()
    assert record["stats"]["failed"] + record["stats"]["resets"] > 10  # faults did happen
    by_recipient: dict[str, list[int]] = defaultdict(list)
    for created in sorted(record["events"], key=lambda e: e["id"]):
        by_recipient[created["recipient_id"]].append(int(created["value"]))
    for recipient in recipients:
        assert by_recipient[recipient] == list(range(per_recipient)), recipient


async def test_the_rate_limit_is_used_without_a_429_after_the_first_window(
    mock_remote: StartMock, daemon: StartDaemon
) -> None:
    # 600/minute in 1-second windows: 10 requests a second.
    mock = await mock_remote("--rate-limit", "600", "--window-s", "1")
    d = await daemon(mock.base_url, remote={"rate_limit_per_minute": 600})
    total = 50
    async with aiohttp.ClientSession(base_url=d.url) as http:
        batch = [{"recipient_id": str(n), "name": "PAGE_VIEW"} for n in range(total)]
        assert (await post_batch(http, batch))[0] == 202

        async def all_created() -> bool:
            return len((await mock.record())["events"]) == total

        await wait_until(all_created, 30)
        view = (await stats_of(http))["accounts"]["default"]
    record = await mock.record()
    times = sorted(received(e) for e in record["events"])
    rate = (total - 1) / (times[-1] - times[0])
    assert 8.0 <= rate <= 11.5, rate  # the window's quota, neither wasted nor exceeded
    stats = record["stats"]
    if stats["rate_limited"]:
        assert stats["last_rate_limited_at"] < times[0] + 1.0, "429s after the first window"
    assert view["rate_limit"]["limit_per_window"] == 10
    assert view["rate_limit"]["window_s"] == 1.0


async def test_the_breaker_opens_on_an_outage_says_why_and_closes_after(
    mock_remote: StartMock, daemon: StartDaemon
) -> None:
    mock = await mock_remote("--reset-rate", "1.0")
    d = await daemon(
        mock.base_url,
        remote={"breaker_failures": 3, "breaker_probe_initial_s": 0.2, "breaker_probe_max_s": 0.5},
    )
    async with aiohttp.ClientSession(base_url=d.url) as http:
        batch = [{"recipient_id": str(n), "name": "SIGNUP"} for n in range(20)]
        assert (await post_batch(http, batch))[0] == 202

        async def not_ready() -> bool:
            async with http.get("/readyz") as response:
                return response.status == 503

        await wait_until(not_ready, 15)
        async with http.get("/readyz") as response:
            assert "circuit breaker open" in (await response.json())["reason"]
        # Intake still accepts while the breaker is open.
        assert (await post_batch(http, [{"recipient_id": "x", "name": "SIGNUP"}]))[0] == 202
        async with http.get("/metrics") as response:
            text = await response.text()
        assert 'forwarder_account_breaker_state{account="default",state="closed"} 0.0' in text
        attempts_while_open = (await stats_of(http))["counters"]["attempts"]
        await asyncio.sleep(1.0)
        # Only probes go out while open: a handful of attempts, not a retry storm.
        assert (await stats_of(http))["counters"]["attempts"] - attempts_while_open <= 6

        await mock.set_faults(reset_rate=0.0)

        async def all_created() -> bool:
            return len((await mock.record())["events"]) == 21

        await wait_until(all_created, 20)
        async with http.get("/readyz") as response:
            assert response.status == 200
        view = (await stats_of(http))["accounts"]["default"]
    assert view["breaker"]["state"] == "closed"
    assert view["breaker"]["opened"] >= 1
    assert d.proc.events("breaker_open")
    assert d.proc.events("breaker_closed")


async def test_events_go_to_the_account_they_name(
    mock_remote: StartMock, daemon: StartDaemon
) -> None:
    eu = await mock_remote()
    us = await mock_remote(api_key="us-key-0123456789")
    d = await daemon(
        eu.base_url,
        **{"accounts.us": {"base_url": us.base_url, "api_key_env": "FW_TEST_US_KEY"}},
        env={"FW_TEST_US_KEY": "us-key-0123456789"},
    )
    async with aiohttp.ClientSession(base_url=d.url) as http:
        status, _ = await post_batch(
            http,
            [
                {"recipient_id": "1", "name": "A", "account": "us"},
                {"recipient_id": "2", "name": "B"},
            ],
        )
        assert status == 202
        status, _ = await post_batch(
            http, [{"recipient_id": "3", "name": "C"}], headers={"X-Forwarder-Account": "us"}
        )
        assert status == 202
        async with http.post(
            "/v1/recipientEvents/create", data={"recipient_id": "4", "name": "D", "account": "us"}
        ) as response:
            assert response.status == 202
        status, body = await post_batch(http, [{"recipient_id": "5", "name": "E", "account": "x"}])
        assert status == 400
        assert body["errors"][0]["field"] == "account"
        assert "unknown account 'x'" in body["errors"][0]["message"]
        status, body = await post_batch(
            http, [{"recipient_id": "6", "name": "F"}], headers={"X-Forwarder-Account": "nope"}
        )
        assert status == 400
        assert body["errors"][0]["field"] == "X-Forwarder-Account"

        async def arrived() -> bool:
            return (
                len((await eu.record())["events"]) == 1 and len((await us.record())["events"]) == 3
            )

        await wait_until(arrived, 15)
        accounts = (await stats_of(http))["accounts"]
    assert sorted(e["name"] for e in (await us.record())["events"]) == ["A", "C", "D"]
    assert [e["name"] for e in (await eu.record())["events"]] == ["B"]
    assert set(accounts) == {"default", "us"}
    logs = "\n".join(d.proc.stdout)
    assert "us-key-0123456789" not in logs
    assert API_KEY not in logs


async def test_client_keys_are_used_only_when_allowed_and_never_shown(
    mock_remote: StartMock, daemon: StartDaemon
) -> None:
    client_key = "client-own-key-42"
    mock = await mock_remote(api_key=client_key)
    d = await daemon(mock.base_url, intake={"accept_client_keys": True})
    token = base64.b64encode(f"{client_key}:".encode()).decode()
    async with aiohttp.ClientSession(base_url=d.url) as http:
        async with http.post(
            "/v1/recipientEvents/create",
            data={"recipient_id": "7", "name": "PURCHASE", "value": "5"},
            headers={"Authorization": f"Basic {token}"},
        ) as response:
            assert response.status == 202

        async def arrived() -> bool:
            return len((await mock.record())["events"]) == 1

        await wait_until(arrived, 15)
        stats_text = json.dumps(await stats_of(http))
        async with http.get("/metrics") as response:
            metrics_text = await response.text()
    created = (await mock.record())["events"][0]
    assert created["auth_user"] == client_key
    assert "client:" in stats_text  # its own account (and bucket), named by a digest
    for text in (stats_text, metrics_text, "\n".join(d.proc.stdout)):
        assert client_key not in text
    await d.stop()
    for path in d.state_dir.iterdir():
        assert client_key.encode() not in path.read_bytes(), path


async def test_a_client_key_is_ignored_unless_allowed(
    mock_remote: StartMock, daemon: StartDaemon
) -> None:
    mock = await mock_remote()
    d = await daemon(mock.base_url)  # accept_client_keys defaults to false
    token = base64.b64encode(b"someone-elses-key:").decode()
    async with aiohttp.ClientSession(base_url=d.url) as http:
        async with http.post(
            "/v1/recipientEvents/create",
            data={"recipient_id": "8", "name": "SIGNUP"},
            headers={"Authorization": f"Basic {token}"},
        ) as response:
            assert response.status == 202

        async def arrived() -> bool:
            return len((await mock.record())["events"]) == 1

        await wait_until(arrived, 15)
    assert (await mock.record())["events"][0]["auth_user"] == API_KEY


async def test_reload_under_load_loses_and_duplicates_nothing(
    mock_remote: StartMock, daemon: StartDaemon
) -> None:
    mock = await mock_remote("--latency-ms", "20")
    second = await mock_remote(api_key="second-key-0123456789")
    d = await daemon(
        mock.base_url,
        remote={"max_concurrency": 4},
        env={"FW_TEST_SECOND": "second-key-0123456789"},
    )
    original = d.config_path.read_text()
    accepted: list[str] = []
    stop = asyncio.Event()

    async def client(http: aiohttp.ClientSession, n: int) -> None:
        i = 0
        while not stop.is_set():
            batch = [{"recipient_id": f"c{n}-{i % 7}", "name": "VIEW", "value": str(i)}]
            status, body = await post_batch(http, batch)
            assert status == 202, body
            accepted.extend(body["data"]["ids"])
            i += 1
            await asyncio.sleep(0.005)

    async def reload() -> None:
        proc = await spawn("reload", "--config", str(d.config_path))
        assert await proc.wait(15) == 0, proc.stderr
        assert "asked PID" in proc.stdout[0]

    async with aiohttp.ClientSession(base_url=d.url) as http:
        clients = [asyncio.create_task(client(http, n)) for n in range(3)]
        try:
            await asyncio.sleep(0.5)
            d.config_path.write_text(
                original.replace("max_concurrency = 4", "max_concurrency = 2")
                + "\n[accounts.second]\n"
                + f'base_url = "{second.base_url}"\napi_key_env = "FW_TEST_SECOND"\n'
                + "rate_limit_per_minute = 1200\n"
            )
            await reload()
            await wait_until(lambda: _has(d, "reloaded", 1), 10)
            await asyncio.sleep(0.3)
            d.config_path.write_text(original.replace("[remote]\n", "[remote]\nbogus = 1\n"))
            # `forwarder reload` checks the file first and signals nothing when it is bad...
            check = await spawn("reload", "--config", str(d.config_path))
            assert await check.wait(15) == 2
            assert "unknown key remote.bogus" in check.stderr[0]
            # ...and a plain SIGHUP (systemctl reload) is refused by the daemon itself.
            d.proc.process.send_signal(signal.SIGHUP)
            await wait_until(lambda: _has(d, "reload_refused", 1), 10)
            await asyncio.sleep(0.3)
            d.config_path.write_text(original.replace('level = "info"', 'level = "debug"'))
            await reload()
            await wait_until(lambda: _has(d, "reloaded", 2), 10)
            await asyncio.sleep(0.3)
        finally:
            stop.set()
            await asyncio.gather(*clients)
        # The refused config named the bad key; the running config stayed in force.
        refused = d.proc.events("reload_refused")[0]
        assert "remote.bogus" in refused["error"]
        reloaded = d.proc.events("reloaded")[0]
        assert "remote.max_concurrency" in reloaded["changed"]
        assert reloaded["accounts_added"] == ["second"]

        async def all_created() -> bool:
            return len((await mock.record())["events"]) == len(accepted)

        await wait_until(all_created, 30)
        body = await stats_of(http)
    record = await mock.record()
    keys = [e["idempotency_key"] for e in record["events"]]
    assert sorted(keys) == sorted(accepted)  # every accepted event, once
    assert record["stats"]["duplicates"] == 0  # and nothing sent twice
    assert body["accounts"]["default"]["concurrency"]["max"] == 4  # the last reload restored it
    assert "second" not in body["accounts"]  # removed again by the last reload
    assert body["delivery"]["config_reloads"] == 2


async def _has(d: DaemonProc, name: str, count: int) -> bool:
    return len(d.proc.events(name)) >= count


def test_write_config_writes_account_tables(tmp_path: Any) -> None:
    # The helper the tests above rely on: a dotted section becomes a nested TOML table.
    import tomllib

    path = tmp_path / "c.toml"
    write_config(path, {"accounts.us": {"base_url": "https://x/v1"}})
    assert tomllib.loads(path.read_text()) == {"accounts": {"us": {"base_url": "https://x/v1"}}}
