"""Events held without an account: apart from the queue's bound, bounded, with a deadline."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import time
from pathlib import Path

import aiohttp

from forwarder.config.schema import QueueConfig, RemoteConfig, ShutdownConfig
from forwarder.daemon.lifecycle import Daemon
from forwarder.delivery.deadletter import REASONS, DeadLetterNote
from forwarder.events import Event
from forwarder.intake.accounts import client_account_name
from forwarder.ops.metrics import DEAD_LETTER_REASONS, Stats
from forwarder.storage.held import HELD, HeldEvents
from forwarder.storage.queue import EventQueue
from forwarder.storage.sqlite.spool import Spool
from tests.conftest import dead_letters, spooled
from tests.integration.test_daemon import _accounts, _config, _run_until_ready

CLIENT = "client:0123456789abcdef"


def ev(n: int, account: str = CLIENT, accepted_at: float = 1000.0) -> Event:
    return Event(
        event_id=f"held-{n:06d}", recipient_id=f"r{n}", name="VIEW", account=account,
        accepted_at=accepted_at + n,
    )  # fmt: skip


class Outcomes:
    def __init__(self) -> None:
        self.dead: list[tuple[Event, int, DeadLetterNote]] = []

    def delivered(self, event: Event, spool_seq: int) -> None:
        raise AssertionError("a held event is never delivered")

    def dead_lettered(self, event: Event, spool_seq: int, note: DeadLetterNote) -> None:
        self.dead.append((event, spool_seq, note))


def store(
    queue: EventQueue, outcomes: Outcomes, lanes: set[str], now: list[float], *, trim: bool
) -> HeldEvents:
    return HeldEvents(
        queue, outcomes, Stats(), max_events=5, max_age_s=100.0, has_lane=lanes.__contains__,
        trim=trim, clock=lambda: now[0],
    )  # fmt: skip


def test_the_reason_is_exported() -> None:
    assert HELD in REASONS
    assert HELD in DEAD_LETTER_REASONS


def test_held_events_leave_the_queue_and_come_back_with_their_account() -> None:
    queue = EventQueue(10)
    outcomes = Outcomes()
    lanes = {"default"}
    now = [1010.0]
    held = store(queue, outcomes, lanes, now, trim=False)
    queue.restore([ev(n) for n in range(4)], [n + 1 for n in range(4)])
    queue.restore([ev(9, account="default")])
    assert held.sweep() == 0
    assert (len(queue), len(held), held.view()) == (1, 4, {CLIENT: 4})
    assert queue.free == 9  # they no longer count against max_events
    assert not held.full(CLIENT)
    lanes.add(CLIENT)  # its key is presented again
    assert held.release(CLIENT) == 4
    assert (queue.depth(CLIENT), len(held)) == (4, 0)
    assert outcomes.dead == []


def test_past_the_deadline_a_held_event_is_dead_lettered_with_the_reason() -> None:
    queue = EventQueue(10)
    outcomes = Outcomes()
    now = [1050.0]
    held = store(queue, outcomes, {"default"}, now, trim=False)
    queue.restore([ev(n) for n in range(4)], [n + 1 for n in range(4)])
    assert held.sweep() == 0
    now[0] = 1101.5  # ev(0) and ev(1) were accepted at 1000 and 1001: past 100 s
    assert held.sweep() == 2
    assert [(e.event_id, seq) for e, seq, _ in outcomes.dead] == [
        ("held-000000", 1),
        ("held-000001", 2),
    ]
    note = outcomes.dead[0][2]
    assert note.reason == HELD
    assert "queue.held_max_age_s" in note.error
    assert len(held) == 2


def test_past_the_bound_memory_mode_dead_letters_the_oldest_and_durable_mode_reads_no_more() -> (
    None
):
    queue = EventQueue(10)
    outcomes = Outcomes()
    held = store(queue, outcomes, {"default"}, [1010.0], trim=True)
    queue.restore([ev(n) for n in range(8)], [n + 1 for n in range(8)])
    assert held.sweep() == 3
    assert [e.event_id for e, _, _ in outcomes.dead] == [f"held-{n:06d}" for n in range(3)]
    assert "queue.held_max_events (5)" in outcomes.dead[0][2].error
    assert len(held) == 5

    durable = store(EventQueue(10), Outcomes(), {"default"}, [1010.0], trim=False)
    durable.queue.restore([ev(n) for n in range(5)], [n + 1 for n in range(5)])
    assert durable.sweep() == 0
    assert durable.full(CLIENT)  # the spool window leaves its other rows on disk
    assert not durable.full("default")


async def _prefill(state: Path, events: list[Event]) -> None:
    spool = await Spool.open(state)
    try:
        await spool.append(events)
    finally:
        await spool.close()


def _daemon(state: Path, queue: QueueConfig) -> Daemon:
    config = dataclasses.replace(
        _config(state),
        remote=RemoteConfig(base_url="http://127.0.0.1:9/v1"),  # nothing listens: events stay
        queue=queue,
        shutdown=ShutdownConfig(timeout_s=0.1),
    )
    return Daemon(config, _accounts(config))


async def _post(daemon: Daemon, n: int) -> tuple[int, dict[str, object]]:
    batch = [{"recipient_id": f"d{i}", "name": "PAGE_VIEW"} for i in range(n)]
    async with (
        aiohttp.ClientSession(base_url=daemon.addresses[0]) as http,
        http.post("/v1/events", json=batch) as response,
    ):
        return response.status, await response.json()


async def test_after_a_restart_held_events_do_not_fill_the_queue(short_tmp: Path) -> None:
    # 200 events of a client key not presented since the restart; memory mode, max_events 100.
    state = short_tmp / "s"
    now = time.time()
    await _prefill(state, [ev(n, accepted_at=now) for n in range(200)])
    daemon = _daemon(state, QueueConfig(mode="memory", max_events=100, held_max_events=150))
    task = await _run_until_ready(daemon)
    try:
        status, body = await _post(daemon, 10)
        assert status == 202, body  # the default account is not refused
        async with (
            aiohttp.ClientSession(base_url=daemon.addresses[0]) as http,
            http.get("/v1/stats") as response,
        ):
            stats = await response.json()
        assert stats["held_without_account"] == {CLIENT: 150}
        assert daemon.stats.dead_lettered[HELD] == 50
    finally:
        daemon.request_stop()
        assert await asyncio.wait_for(task, 10) == 0
    dead = dead_letters(state)
    assert [d["event"]["event_id"] for d in dead] == [f"held-{n:06d}" for n in range(50)]
    assert {d["reason"] for d in dead} == {HELD}
    kept = [e["event_id"] for e in spooled(state) if e["account"] == CLIENT]
    assert kept == [f"held-{n:06d}" for n in range(50, 200)]  # the held ones are still saved


async def test_durable_held_events_are_dead_lettered_at_their_deadline(short_tmp: Path) -> None:
    state = short_tmp / "s"
    old = time.time() - 1000
    await _prefill(state, [ev(n, accepted_at=old) for n in range(200)])
    queue = QueueConfig(mode="durable", max_events=100, held_max_events=60, held_max_age_s=500.0)
    daemon = _daemon(state, queue)
    task = await _run_until_ready(daemon)
    try:
        assert (await _post(daemon, 10))[0] == 202
        async with asyncio.timeout(15):
            while daemon.stats.dead_lettered[HELD] < 200:
                await asyncio.sleep(0.05)
        assert daemon.held is not None
        assert len(daemon.held) == 0
    finally:
        daemon.request_stop()
        assert await asyncio.wait_for(task, 10) == 0
    dead = dead_letters(state)
    assert len(dead) == 200
    assert {d["reason"] for d in dead} == {HELD}
    assert "queue.held_max_age_s (500 s)" in dead[0]["error"]
    assert [e["account"] for e in spooled(state)] == ["default"] * 10


async def test_held_events_go_back_to_their_account_when_its_key_is_presented(
    short_tmp: Path,
) -> None:
    key = "client-own-key-0123456789"
    client = client_account_name(key)
    state = short_tmp / "s"
    await _prefill(state, [ev(n, account=client, accepted_at=time.time()) for n in range(30)])
    config = dataclasses.replace(
        _config(state),
        intake=dataclasses.replace(_config(state).intake, accept_client_keys=True),
        remote=RemoteConfig(base_url="http://127.0.0.1:9/v1"),
        queue=QueueConfig(mode="memory", max_events=100, held_max_events=150),
        shutdown=ShutdownConfig(timeout_s=0.1),
    )
    daemon = Daemon(config, _accounts(config))
    task = await _run_until_ready(daemon)
    try:
        assert daemon.held is not None
        assert daemon.held.view() == {client: 30}
        token = base64.b64encode(f"{key}:".encode()).decode()
        async with (
            aiohttp.ClientSession(base_url=daemon.addresses[0]) as http,
            http.post(
                "/v1/recipientEvents/create",
                data={"recipient_id": "new", "name": "PURCHASE"},
                headers={"Authorization": f"Basic {token}"},
            ) as response,
        ):
            assert response.status == 200  # the drop-in answers as the remote does
        assert daemon.held.view() == {}
        # The 30 held ones and the new one: all of them its lane's now.
        assert daemon.queue.depth(client) + daemon.queue.in_delivery == 31
    finally:
        daemon.request_stop()
        assert await asyncio.wait_for(task, 10) == 0
    assert dead_letters(state) == []
    assert len([e for e in spooled(state) if e["account"] == client]) == 31
