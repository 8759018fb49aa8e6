"""Fairness between accounts end to end: `forwarder run` (durable) against `forwarder mock-remote`.

One account whose key the remote refuses, with a backlog larger than the in-memory window, must
not hold back another account: the healthy one is delivered at its normal rate meanwhile, and
the refused one's events wait in the spool, none lost, until its key works.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from tests.conftest import API_KEY, DaemonProc, MockProc, spooled
from tests.e2e.test_flow import post_batch, stats_of, wait_until

StartMock = Callable[..., Awaitable[MockProc]]
StartDaemon = Callable[..., Awaitable[DaemonProc]]

WINDOW = 100
RATE_PER_MINUTE = 1200  # 20 a second: the default account's normal rate


def settings(key_env: str, rate: int = RATE_PER_MINUTE) -> dict[str, dict[str, object]]:
    return {
        "queue": {"mode": "durable", "max_events": WINDOW},
        "remote": {"rate_limit_per_minute": rate, "auth_retry_s": 60.0},
        "accounts.bad": {"api_key_env": key_env},
    }


async def test_a_refused_account_with_a_backlog_never_holds_back_the_default_account(
    mock_remote: StartMock, daemon: StartDaemon
) -> None:
    mock = await mock_remote()
    d = await daemon(
        mock.base_url, env={"FW_BAD_KEY": "wrong-key-0123456789"}, **settings("FW_BAD_KEY")
    )
    by_account: dict[str, list[dict[str, Any]]] = {}
    async with aiohttp.ClientSession(base_url=d.url) as http:
        # 150 events for the refused account: more than the whole window.
        for start in range(0, 150, 50):
            batch = [
                {"recipient_id": f"b{n % 10}", "name": "BAD", "value": str(n), "account": "bad"}
                for n in range(start, start + 50)
            ]
            assert (await post_batch(http, batch))[0] == 202

        async def paused() -> bool:
            return bool((await stats_of(http))["accounts"]["bad"]["paused"])

        await wait_until(paused, 10)
        # Then the default account, in two rounds while "bad" stays paused.
        for round_ in range(2):
            events = [
                {"recipient_id": f"d{n}", "name": "GOOD", "value": f"{round_}-{n}"}
                for n in range(20)
            ]
            sent_at = time.monotonic()
            assert (await post_batch(http, events))[0] == 202

            async def delivered(want: int = 20 * (round_ + 1)) -> bool:
                return len((await mock.record())["events"]) >= want

            # Its normal rate: 20 events at 20 a second take about a second; well within 5 s.
            await wait_until(delivered, 5 + 20 * 60 / RATE_PER_MINUTE)
            took = time.monotonic() - sent_at
            assert took < 5 + 20 * 60 / RATE_PER_MINUTE, took
        stats = await stats_of(http)
        assert stats["accounts"]["bad"]["paused"]
        assert stats["accounts"]["bad"]["delivered"] == 0
    record = await mock.record()
    assert sorted(e["value"] for e in record["events"]) == sorted(
        f"{r}-{n}" for r in range(2) for n in range(20)
    )
    assert await d.stop() == 0
    # Nothing of the refused account was lost: every event is in the spool, in order.
    kept = [e for e in spooled(d.state_dir) if e["account"] == "bad"]
    assert [int(e["value"]) for e in kept] == list(range(150))

    # Its key works after the restart: all 150 arrive, each recipient's in order.
    again = await daemon(
        mock.base_url,
        state_dir=d.state_dir,
        env={"FW_BAD_KEY": API_KEY},
        **settings("FW_BAD_KEY", 12_000),
    )

    async def all_arrived() -> bool:
        return len((await mock.record())["events"]) == 40 + 150

    await wait_until(all_arrived, 30)
    for created in sorted((await mock.record())["events"], key=lambda e: e["id"]):
        if created["name"] == "BAD":
            by_account.setdefault(created["recipient_id"], []).append(created)
    for recipient, events in by_account.items():
        values = [int(e["value"]) for e in events]
        assert values == sorted(values), recipient
    assert sum(len(events) for events in by_account.values()) == 150
    assert await again.stop() == 0
    assert spooled(d.state_dir) == []
