"""End to end: `forwarder run` as a subprocess, spoken to like an app, against the mock remote."""

from __future__ import annotations

import asyncio
import base64
import json
import signal
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from tests.conftest import API_KEY, DaemonProc, MockProc, dead_letters, spooled, unix_session

StartMock = Callable[..., Awaitable[MockProc]]
StartDaemon = Callable[..., Awaitable[DaemonProc]]
BASIC = "Basic " + base64.b64encode(b"app-own-key-0123456789:").decode()


async def _post(
    http: aiohttp.ClientSession, path: str, **kwargs: Any
) -> tuple[int, dict[str, Any]]:
    async with http.post(path, **kwargs) as response:
        return response.status, await response.json()


async def wait_until(predicate: Callable[[], Awaitable[bool]], timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if await predicate():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"condition not met within {timeout}s")


async def _send_mix(d: DaemonProc) -> dict[str, dict[str, str]]:
    """Send 40 events in every way an app can; returns what each accepted id should arrive as."""
    expected: dict[str, dict[str, str]] = {}

    def want(event_id: str, fields: dict[str, str]) -> None:
        full = {"value": "", "conversion": "0", "data": "", "ref": ""}
        full.update(fields)
        expected[event_id] = full

    async with aiohttp.ClientSession(base_url=d.url) as tcp, unix_session(d.socket_path) as unix:
        # The seed's own example: curl -u KEY: -d name=PURCHASE -d value=24.99 -d conversion=1 ...
        for n in range(10):
            form = {
                "name": "PURCHASE",
                "value": "24.99",
                "conversion": "1",
                "recipient_id": f"r{n}",
            }
            status, body = await _post(
                tcp, "/v1/recipientEvents/create", data=form, headers={"Authorization": BASIC}
            )
            assert status == 202, body
            assert body["data"]["status"] == "queued"
            want(body["data"]["id"], {**form})
        for n in range(10):  # JSON objects over the Unix socket, with structured data
            event = {"recipient_id": 500 + n, "name": "PAGE_VIEW", "data": {"page": f"/p/{n}"}}
            status, body = await _post(unix, "/v1/recipientEvents/create", json=event)
            assert status == 202, body
            want(
                body["data"]["id"],
                {"recipient_id": str(500 + n), "name": "PAGE_VIEW", "data": f'{{"page":"/p/{n}"}}'},
            )
        batch = [
            {"event_id": f"batch-event-{n:04d}", "recipient_id": f"b{n}", "name": "SIGNUP"}
            for n in range(10)
        ]
        status, body = await _post(tcp, "/v1/events", json=batch)
        assert status == 202, body
        assert body["data"]["ids"] == [e["event_id"] for e in batch]
        for item in batch:
            want(
                str(item["event_id"]), {"recipient_id": str(item["recipient_id"]), "name": "SIGNUP"}
            )
        lines = [
            {"recipient_id": f"n{n}", "name": "PRODUCT_TO_BASKET", "value": "sku-1", "ref": "c1"}
            for n in range(10)
        ]
        ndjson = "\n".join(json.dumps(x) for x in lines) + "\n"
        status, body = await _post(
            unix,
            "/v1/events",
            data=ndjson.encode(),
            headers={"Content-Type": "application/x-ndjson"},
        )
        assert status == 202, body
        for event_id, item in zip(body["data"]["ids"], lines, strict=True):
            want(event_id, {**item})
    return expected


async def test_every_accepted_event_arrives_exactly_once_across_a_restart(
    mock_remote: StartMock, daemon: StartDaemon
) -> None:
    mock = await mock_remote("--latency-ms", "150")
    first = await daemon(mock.base_url, remote={"concurrency": 2}, shutdown={"timeout_s": 0.5})
    expected = await _send_mix(first)
    assert len(expected) == 40
    # SIGTERM mid-flight: the remote is slow, so most events are still queued or in flight.
    assert await first.stop() == 0
    stopped = first.proc.events("stopped")[0]
    assert stopped["saved_pending"] > 0
    assert stopped["accepted"] == 40
    in_spool = spooled(first.state_dir)
    assert len(in_spool) == stopped["saved_pending"]

    second = await daemon(mock.base_url, state_dir=first.state_dir, remote={"concurrency": 8})
    assert second.proc.events("spool_replay")[0]["in_memory"] == stopped["saved_pending"]

    async def all_arrived() -> bool:
        return len((await mock.record())["events"]) >= 40

    await wait_until(all_arrived, 30)
    await asyncio.sleep(0.3)  # anything extra would show up now
    record = await mock.record()
    by_key: dict[str, list[dict[str, Any]]] = {}
    for event in record["events"]:
        by_key.setdefault(event["idempotency_key"], []).append(event)
    assert set(by_key) == set(expected)
    for key, arrived in by_key.items():
        assert len(arrived) == 1, f"{key} created {len(arrived)} times"
        got = arrived[0]
        assert got["auth_user"] == API_KEY  # the daemon's key, never the app's
        assert {f: got[f] for f in expected[key]} == expected[key]
    assert await second.stop() == 0
    assert spooled(first.state_dir) == []  # delivered rows are removed
    assert second.proc.events("stopped")[0]["saved_pending"] == 0


async def test_refused_key_pauses_delivery_until_the_key_works(
    mock_remote: StartMock, daemon: StartDaemon
) -> None:
    mock = await mock_remote(api_key="a-different-key-123")
    d = await daemon(mock.base_url, remote={"auth_retry_s": 0.2})
    async with aiohttp.ClientSession(base_url=d.url) as http:
        batch = [{"recipient_id": str(n), "name": "SIGNUP"} for n in range(5)]
        status, _ = await _post(http, "/v1/events", json=batch)
        assert status == 202

        async def paused() -> bool:
            async with http.get("/readyz") as response:
                return response.status == 503

        await wait_until(paused, 10)
        async with http.get("/readyz") as response:
            reason = (await response.json())["reason"]
        assert "delivery paused" in reason
        assert "401" in reason
        async with http.get("/v1/stats") as response:
            stats = await response.json()
        assert stats["accounts"]["default"]["paused"] is True
        assert stats["delivery"]["ready"] is False
        assert stats["counters"]["dead_lettered"] == {}
        assert len(d.proc.events("delivery_paused")) == 1  # logged once, not per probe

        await mock.set_faults(api_key=API_KEY)

        async def delivered() -> bool:
            return len((await mock.record())["events"]) == 5

        await wait_until(delivered, 10)
        async with http.get("/readyz") as response:
            assert response.status == 200
    assert dead_letters(d.state_dir) == []


async def test_permanent_failure_is_dead_lettered_with_reason(
    mock_remote: StartMock, daemon: StartDaemon
) -> None:
    mock = await mock_remote()
    d = await daemon(mock.base_url)
    async with aiohttp.ClientSession(base_url=d.url) as http:
        first = {"event_id": "order-0000000001", "recipient_id": "7", "name": "SIGNUP"}
        assert (await _post(http, "/v1/events", json=[first]))[0] == 202

        async def one() -> bool:
            return len((await mock.record())["events"]) == 1

        await wait_until(one, 10)
        # The same idempotency key for another event: the remote answers 422, for good.
        other = {**first, "name": "PURCHASE", "value": "5"}
        assert (await _post(http, "/v1/events", json=[other]))[0] == 202

        async def dead() -> bool:
            return bool(dead_letters(d.state_dir))

        await wait_until(dead, 10)
    record = dead_letters(d.state_dir)[0]
    assert record["reason"] == "rejected"
    assert record["status"] == 422
    assert record["event"]["name"] == "PURCHASE"
    assert record["attempts"] == 1
    assert "idempotency key" in record["error"]


async def test_second_signal_stops_at_once_and_saves(
    mock_remote: StartMock, daemon: StartDaemon
) -> None:
    mock = await mock_remote("--timeout-rate", "1")  # the remote never answers
    d = await daemon(mock.base_url, shutdown={"timeout_s": 60.0}, remote={"timeout_s": 60.0})
    async with aiohttp.ClientSession(base_url=d.url) as http:
        batch = [{"recipient_id": str(n), "name": "PAGE_VIEW"} for n in range(3)]
        assert (await _post(http, "/v1/events", json=batch))[0] == 202
        await asyncio.sleep(0.3)
        d.proc.process.send_signal(signal.SIGTERM)
        await d.proc.wait_for_line(lambda s: '"stopping"' in s, 5)
        # While draining, intake refuses new events with 503 and says why.
        status, body = await _post(http, "/v1/events", json=batch)
        assert status == 503
        assert body["reason"] == "shutting_down"
        async with http.get("/readyz") as response:
            assert response.status == 503
            assert (await response.json())["reason"] == "shutting down"
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await d.stop(signal.SIGINT, timeout=10) == 0
    assert loop.time() - started < 5
    assert len(spooled(d.state_dir)) == 3


async def test_send_command_and_check_config(mock_remote: StartMock, daemon: StartDaemon) -> None:
    from tests.conftest import spawn

    mock = await mock_remote()
    d = await daemon(mock.base_url)
    send = await spawn(
        "send", "--socket", d.socket_path, "--recipient-id", "42", "--name", "PURCHASE",
        "--value", "9.50", "--conversion", "--ref", "spring",
    )  # fmt: skip
    assert await send.wait(15) == 0
    assert json.loads(send.stdout[0])["data"]["status"] == "queued"

    async def arrived() -> bool:
        return len((await mock.record())["events"]) == 1

    await wait_until(arrived, 10)
    got = (await mock.record())["events"][0]
    assert (got["recipient_id"], got["name"], got["value"], got["conversion"], got["ref"]) == (
        "42", "PURCHASE", "9.50", "1", "spring",
    )  # fmt: skip

    check = await spawn(
        "check-config", "--config", str(d.config_path), env={"FORWARDER_API_KEY": API_KEY}
    )
    assert await check.wait(15) == 0
    assert any("concurrency = 0" in line for line in check.stdout)
    assert any("api key" in line and "FORWARDER_API_KEY" in line for line in check.stdout)

    bad = await spawn("check-config", "--config", str(d.config_path), env={
        "FORWARDER_API_KEY": API_KEY, "FORWARDER_REMOTE_CONCURRENCY": "lots"})  # fmt: skip
    assert await bad.wait(15) == 2
    assert any("FORWARDER_REMOTE_CONCURRENCY" in line for line in bad.stderr)


async def test_demo_runs_and_accounts_for_every_event() -> None:
    from tests.conftest import spawn

    demo = await spawn("demo", "--events", "12")
    assert await demo.wait(60) == 0, demo.stdout[-20:]
    out = "\n".join(demo.stdout)
    assert "every accepted event delivered or dead-lettered: yes" in out
    assert "dead letter: order-confirmation-0001 HTTP 422" in out
    assert "retrying" in out  # the mock's injected faults were met and retried
