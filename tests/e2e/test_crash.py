"""Crash test: `kill -9` the durable daemon at random moments while apps keep sending.

Four clients send events (single form posts and JSON batches of 1-20, each event with an event_id
the test chose) to `forwarder run` in durable mode, against `forwarder mock-remote` with faults
(5xx, dropped connections, requests created but never answered). The daemon is SIGKILLed several
times at seeded random moments and restarted on the same state dir; the clients carry on. At the
end the daemon is restarted once more and drains the spool. Then, at the mock:

- every event that got a 202 was created exactly once;
- an event whose request died with the daemon ("unknown": the app got no answer) was created at
  most once;
- no other event was created (refused ones, or ids never sent);
- nothing was dead-lettered.
"""

from __future__ import annotations

import asyncio
import random
import signal
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import DaemonProc, MockProc, dead_letters, spooled, unix_session

StartMock = Callable[..., Awaitable[MockProc]]
StartDaemon = Callable[..., Awaitable[DaemonProc]]

SEED = 20260611
CLIENTS = 4
KILLS = 5
MAX_EVENTS = 200  # the in-memory window: a backlog beyond it is read back from disk
RECIPIENTS_PER_CLIENT = 40
EVENTS_PER_S_PER_CLIENT = 150  # more than delivery keeps up with: the backlog outgrows the window
REQUEST_TIMEOUT_S = 5.0
DRAIN_TIMEOUT_S = 40.0
TIMEOUT = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)

# The daemon's settings for every start: durable, a small window, fast retries. An attempt the
# mock never answers (its timeout fault) is given up after 1 s and retried, meeting a 409.
SETTINGS: dict[str, dict[str, object]] = {
    "queue": {"mode": "durable", "max_events": MAX_EVENTS},
    "remote": {
        "timeout_s": 1.0,
        "connect_timeout_s": 1.0,
        "concurrency": 8,
        "rate_limit_per_minute": 1_000_000,
        "breaker_failures": 20,
        "breaker_probe_initial_s": 0.2,
        "breaker_probe_max_s": 1.0,
    },
    "retry": {"initial_backoff_s": 0.02, "max_backoff_s": 0.3, "max_elapsed_s": 120.0},
    "shutdown": {"timeout_s": 2.0},
}


@dataclass
class Ledger:
    """What the clients know about each event_id they used."""

    accepted: set[str] = field(default_factory=set)  # got a 202
    unknown: set[str] = field(default_factory=set)  # the request died without an answer
    refused: set[str] = field(default_factory=set)  # a refusal, or never reached a daemon
    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    requests: int = 0
    sent: dict[str, dict[str, str]] = field(default_factory=dict)  # every event, by event_id


@dataclass
class Watch:
    """The largest backlog /v1/stats reported while the clients sent."""

    spool_events: int = 0
    on_disk_only: int = 0


async def _send(
    http: aiohttp.ClientSession, rng: random.Random, client: int, ledger: Ledger
) -> tuple[list[str], int | None, str]:
    """One request of 1-20 events; returns (event ids, HTTP status or None, transport error)."""
    single = rng.random() < 0.3
    count = 1 if single else rng.randint(1, 20)
    ids: list[str] = []
    items: list[dict[str, str]] = []
    for _ in range(count):
        event_id = f"crash-c{client}-{len(ledger.sent) + 1:07d}"
        item = {
            "event_id": event_id,
            "recipient_id": f"r{client}-{rng.randrange(RECIPIENTS_PER_CLIENT)}",
            "name": rng.choice(("PAGE_VIEW", "SIGNUP", "PURCHASE")),
        }
        ledger.sent[event_id] = item
        ids.append(event_id)
        items.append(item)
    try:
        if single:
            response_ctx = http.post("/v1/recipientEvents/create", data=items[0], timeout=TIMEOUT)
        else:
            response_ctx = http.post("/v1/events", json=items, timeout=TIMEOUT)
        async with response_ctx as response:
            if response.status == 202:
                body: dict[str, Any] = await response.json()
                got = [body["data"]["id"]] if single else body["data"]["ids"]
                assert got == ids, f"202 for other ids: {got} != {ids}"
            return ids, response.status, ""
    except aiohttp.ClientConnectorError as exc:
        # No connection was made (the daemon is down or not listening yet): nothing was sent.
        return ids, None, f"connect:{type(exc.os_error).__name__}"
    except (aiohttp.ClientError, TimeoutError) as exc:
        return ids, None, type(exc).__name__


async def _client(
    client: int, socket_path: str, ledger: Ledger, stop: asyncio.Event, seed: int
) -> None:
    """Send until `stop`; a refusal or a dead connection moves on to new events, never resends."""
    rng = random.Random(seed)
    loop = asyncio.get_running_loop()
    next_at = loop.time()
    async with unix_session(socket_path) as http:
        while not stop.is_set():
            ids, status, error = await _send(http, rng, client, ledger)
            ledger.requests += 1
            if status == 202:
                ledger.accepted.update(ids)
            elif status is not None:
                ledger.statuses[status] += 1
                ledger.refused.update(ids)
            elif error.startswith("connect:"):
                ledger.errors[error] += 1
                ledger.refused.update(ids)
            else:
                ledger.errors[error] += 1
                ledger.unknown.update(ids)
            if status is None:
                await asyncio.sleep(0.05)  # the daemon is down or restarting
                continue
            # Paced, so a fast machine does not pile up a backlog that takes long to drain.
            next_at = max(next_at + len(ids) / EVENTS_PER_S_PER_CLIENT, loop.time())
            await asyncio.sleep(max(next_at - loop.time(), rng.uniform(0.001, 0.006)))


async def _watch(socket_path: str, watch: Watch, stop: asyncio.Event) -> None:
    """Poll /v1/stats for the backlog's size (errors while the daemon is down are expected)."""
    async with unix_session(socket_path) as http:
        while not stop.is_set():
            try:
                async with http.get("/v1/stats", timeout=aiohttp.ClientTimeout(total=2)) as r:
                    spool = (await r.json())["spool"]
                watch.spool_events = max(watch.spool_events, int(spool["spool_events"]))
                watch.on_disk_only = max(watch.on_disk_only, int(spool["spool_on_disk_only"]))
            except (aiohttp.ClientError, TimeoutError, ValueError, KeyError):
                pass
            await asyncio.sleep(0.1)


async def _wait_drained(state_dir: Path, daemon: DaemonProc, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        assert daemon.proc.process.returncode is None, daemon.proc.stderr[-20:]
        if spooled(state_dir) == []:
            return
        await asyncio.sleep(0.25)
    left = spooled(state_dir)
    raise AssertionError(f"{len(left)} events still spooled after {timeout}s: {left[:5]}")


@pytest.mark.timeout(120)
async def test_kill_9_loses_nothing_and_creates_nothing_twice(
    mock_remote: StartMock, daemon: StartDaemon, short_tmp: Path
) -> None:
    loop = asyncio.get_running_loop()
    began = loop.time()
    rng = random.Random(SEED)
    mock = await mock_remote(
        "--fail-rate", "0.2", "--reset-rate", "0.05", "--timeout-rate", "0.05",
        "--seed", str(SEED),
    )  # fmt: skip
    state_dir = short_tmp / "state"
    socket_path = str(short_tmp / "crash.sock")  # one path across restarts, for the clients
    settings = {**SETTINGS, "intake": {"unix_socket": socket_path}}

    async def start(concurrency: int = 8) -> DaemonProc:
        remote = {**SETTINGS["remote"], "concurrency": concurrency}
        return await daemon(mock.base_url, state_dir=state_dir, **{**settings, "remote": remote})

    d = await start()
    ledger = Ledger()
    watch = Watch()
    stop = asyncio.Event()
    clients = [
        asyncio.create_task(_client(n, socket_path, ledger, stop, SEED + n)) for n in range(CLIENTS)
    ]
    watcher = asyncio.create_task(_watch(socket_path, watch, stop))
    kills = 0
    accepted_at_kill: list[int] = []
    try:
        for k in range(KILLS):
            await asyncio.sleep(rng.uniform(0.6, 1.8))
            assert d.proc.process.returncode is None, d.proc.stderr[-20:]
            d.proc.process.kill()  # SIGKILL: no handler, no flush, no save
            assert await asyncio.wait_for(d.proc.process.wait(), 10) == -signal.SIGKILL
            kills += 1
            accepted_at_kill.append(len(ledger.accepted))
            if k < KILLS - 1:
                await asyncio.sleep(rng.uniform(0.0, 0.3))  # down a while: clients are refused
                d = await start()
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*clients, watcher), REQUEST_TIMEOUT_S + 5)
    sending_s = loop.time() - began

    # It meets the spool exactly as the last kill left it; more concurrency for a quick drain.
    final = await start(concurrency=64)
    await _wait_drained(state_dir, final, DRAIN_TIMEOUT_S)
    record = await mock.record()
    assert await final.stop() == 0
    assert dead_letters(state_dir) == []
    assert spooled(state_dir) == []

    created = Counter(event["idempotency_key"] for event in record["events"])
    twice = {key: n for key, n in created.items() if n > 1}
    missing = ledger.accepted - set(created)
    not_accepted = set(created) - ledger.accepted
    unexplained = not_accepted - ledger.unknown
    report = {
        "accepted": len(ledger.accepted),
        "unknown": len(ledger.unknown),
        "unknown_created": len(not_accepted & ledger.unknown),
        "refused": len(ledger.refused),
        "requests": ledger.requests,
        "created": sum(created.values()),
        "duplicates_409": record["stats"]["duplicates"],
        "mock_faults": {k: record["stats"][k] for k in ("failed", "resets", "timeouts")},
        "kills": kills,
        "accepted_at_kills": accepted_at_kill,
        "max_spooled": watch.spool_events,
        "max_on_disk_only": watch.on_disk_only,
        "errors": dict(ledger.errors),
        "refusal_statuses": dict(ledger.statuses),
        "sending_s": round(sending_s, 1),
        "total_s": round(loop.time() - began, 1),
    }
    print(f"\ncrash test: {report}")
    assert kills == KILLS
    # The backlog outgrew the in-memory window at some point, so events streamed from disk.
    assert watch.on_disk_only > 0, report
    assert ledger.accepted, report
    assert not (ledger.accepted & ledger.refused), "an id was both accepted and refused"
    assert not twice, f"created more than once: {dict(list(twice.items())[:10])} {report}"
    assert not missing, f"{len(missing)} accepted events never created: {sorted(missing)[:10]}"
    assert not unexplained, f"created but never accepted: {sorted(unexplained)[:10]} {report}"
    assert not (set(created) & ledger.refused), "a refused event was created"
    # What the mock created is what was sent, also when it was replayed from the spool.
    for event in record["events"]:
        sent = {k: v for k, v in ledger.sent[event["idempotency_key"]].items() if k != "event_id"}
        assert {k: event[k] for k in sent} == sent, event
    # Only our own ids, each created once: the mock saw nothing else.
    assert sum(created.values()) == len(ledger.accepted) + report["unknown_created"]
    # Every client request got a 202 or died with the daemon: nothing was refused by a live one.
    assert not ledger.statuses, report
