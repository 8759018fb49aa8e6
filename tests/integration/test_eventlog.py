"""The event log seam: each backend of `storage.log.BACKENDS` against the `EventLog` Protocol.

One suite over both of today's backends (append, the next event in order, settle, dead-letter,
release and the restart's replay), and what only memory mode promises: no `spool.db` until
something must be written.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
import time
from pathlib import Path

import aiohttp
import pytest
import structlog

from forwarder.config.schema import Config, QueueConfig, RemoteConfig, ShutdownConfig, StateConfig
from forwarder.daemon.lifecycle import Daemon
from forwarder.delivery.deadletter import DeadLetterNote
from forwarder.events import Event
from forwarder.ops.logthrottle import LogThrottle
from forwarder.storage.durable import DurableLog
from forwarder.storage.log import BACKENDS, EventLog, LogDeps, backend, open_event_log
from forwarder.storage.memory import MemoryLog
from forwarder.storage.queue import EventQueue
from forwarder.storage.sqlite import opening, swap
from forwarder.storage.sqlite.file import SPOOL_FILE
from forwarder.storage.sqlite.spool import Spool
from tests.conftest import dead_letters, spooled
from tests.integration.test_daemon import _accounts, _config, _run_until_ready

MODES = ["memory", "durable"]


def ev(n: int, recipient: str = "r1") -> Event:
    return Event(
        event_id=f"log-{n:06d}", recipient_id=recipient, name="VIEW", account="default",
        accepted_at=time.time(),
    )  # fmt: skip


def note() -> DeadLetterNote:
    now = time.time()
    return DeadLetterNote("rejected", 422, "recipient not found", 1, now, now)


def config(state: Path, mode: str) -> Config:
    return Config(state=StateConfig(dir=str(state)), queue=QueueConfig(mode=mode))


async def opened(state: Path, mode: str) -> EventLog:
    state.mkdir(exist_ok=True)
    return await open_event_log(config(state, mode), LogDeps(EventQueue(100), LogThrottle()))


async def append(log: EventLog, events: list[Event]) -> str:
    """As intake appends: at once if the log can, else awaited."""
    reason = log.try_append(events)
    return await log.append(events) if reason is None else reason


async def next_event(log: EventLog) -> Event:
    """The next event of the account, as a lane takes it."""
    async with asyncio.timeout(5):
        return await log.queue.get("default")


async def take(log: EventLog) -> tuple[Event, int]:
    """The next event, handed back (with its row) as a lane does when it has its outcome."""
    event = await next_event(log)
    return event, log.queue.done(event)


async def stop(log: EventLog) -> int:
    """As the daemon stops: background work, then what is left released, then closed."""
    await log.stop()
    saved = await log.release(log.queue.take_all_spooled())
    await log.close()
    return saved


async def wait_queued(log: EventLog, count: int) -> None:
    async with asyncio.timeout(5):
        while len(log.queue) < count:
            await asyncio.sleep(0.01)


def test_the_registry_names_an_opener_for_every_mode() -> None:
    assert sorted(BACKENDS) == sorted(MODES)
    assert backend("memory").__module__ == "forwarder.storage.memory"
    assert backend("durable").__module__ == "forwarder.storage.durable"
    with pytest.raises(KeyError):
        backend("fleet")  # not registered (yet)


@pytest.mark.parametrize("mode", MODES)
async def test_the_backend_is_chosen_by_queue_mode(tmp_path: Path, mode: str) -> None:
    log = await opened(tmp_path, mode)
    try:
        assert isinstance(log, MemoryLog if mode == "memory" else DurableLog)
    finally:
        await log.close()


@pytest.mark.parametrize("mode", MODES)
async def test_appended_events_come_out_per_recipient_in_order(tmp_path: Path, mode: str) -> None:
    log = await opened(tmp_path, mode)
    log.start()
    try:
        assert await append(log, [ev(1, "a"), ev(2, "b")]) == ""
        assert await append(log, [ev(3, "a")]) == ""
        first = await next_event(log)
        second = await next_event(log)
        # A recipient's next event waits while one of its events is in delivery: 3 after 1.
        assert [first.event_id, second.event_id] == ["log-000001", "log-000002"]
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await log.queue.get("default")
        seq1 = log.queue.done(first)
        log.delivered(first, seq1)
        third, seq3 = await take(log)
        assert third.event_id == "log-000003"
        seq2 = log.queue.done(second)
        log.delivered(second, seq2)
        log.delivered(third, seq3)
        if mode == "durable":  # the receipt: each event's number is its position
            assert 0 < first.number < second.number < third.number
            assert (seq1, seq2, seq3) == (first.number, second.number, third.number)
        assert await stop(log) == 0
    finally:
        await log.close()
    again = await opened(tmp_path, mode)
    again.start()
    try:
        await asyncio.sleep(0.05)
        assert len(again.queue) == 0  # settled: nothing comes back
        assert again.stored().events == 0
    finally:
        await stop(again)


@pytest.mark.parametrize("mode", MODES)
async def test_a_dead_letter_is_kept_in_the_spool(tmp_path: Path, mode: str) -> None:
    log = await opened(tmp_path, mode)
    log.start()
    try:
        assert await append(log, [ev(1), ev(2, "r2")]) == ""
        event, seq = await take(log)
        log.dead_lettered(event, seq, note())
        other, seq2 = await take(log)
        log.delivered(other, seq2)
        await stop(log)
    finally:
        await log.close()
    letters = dead_letters(tmp_path)
    assert [(d["event"]["event_id"], d["reason"]) for d in letters] == [("log-000001", "rejected")]
    assert spooled(tmp_path) == []


@pytest.mark.parametrize("mode", MODES)
async def test_what_a_stop_leaves_comes_back_first_at_the_next_open(
    tmp_path: Path, mode: str
) -> None:
    log = await opened(tmp_path, mode)
    log.start()
    try:
        assert await append(log, [ev(1), ev(2, "r2"), ev(3, "r3")]) == ""
        event, seq = await take(log)
        log.delivered(event, seq)
        in_flight = await next_event(log)  # taken, not settled: released with the rest
        saved = await stop(log)
    finally:
        await log.close()
    # Memory mode writes the two at the stop; durable mode had them on disk already.
    assert saved == (2 if mode == "memory" else 0)
    assert [e["event_id"] for e in spooled(tmp_path)] == ["log-000002", "log-000003"]

    again = await opened(tmp_path, mode)
    again.start()
    try:
        assert again.restored == (2 if mode == "memory" else 0)
        await wait_queued(again, 2)
        first, seq1 = await take(again)
        second, seq2 = await take(again)
        assert [first.event_id, second.event_id] == [in_flight.event_id, "log-000003"]
        again.delivered(first, seq1)
        again.delivered(second, seq2)
        assert await stop(again) == 0
    finally:
        await again.close()
    assert spooled(tmp_path) == []


async def test_memory_mode_opens_no_spool_until_a_dead_letter(tmp_path: Path) -> None:
    log = await opened(tmp_path, "memory")
    assert isinstance(log, MemoryLog)
    log.start()
    try:
        assert await append(log, [ev(1), ev(2, "r2")]) == ""
        event, seq = await take(log)
        log.delivered(event, seq)
        assert log.spool is None
        assert not (tmp_path / SPOOL_FILE).exists()
        assert log.stored() == (0, 0, None, 0, 0, 0)
        event, seq = await take(log)
        log.dead_lettered(event, seq, note())  # the spool is opened for it
        async with asyncio.timeout(5):
            while log.stored().dead_letters != 1:
                await asyncio.sleep(0.01)
        assert (tmp_path / SPOOL_FILE).exists()
        assert await stop(log) == 0
    finally:
        await log.close()
    assert [d["event"]["event_id"] for d in dead_letters(tmp_path)] == ["log-000002"]


def _daemon(state: Path) -> Daemon:
    cfg = dataclasses.replace(
        _config(state),
        remote=RemoteConfig(base_url="http://127.0.0.1:9/v1"),  # nothing listens: events stay
        shutdown=ShutdownConfig(timeout_s=0.1),
    )
    return Daemon(cfg, _accounts(cfg))


async def _run(state: Path, events: int) -> tuple[Daemon, int]:
    """Start a memory-mode daemon, post `events` events, stop it; (daemon, exit code)."""
    daemon = _daemon(state)
    task = await _run_until_ready(daemon)
    try:
        if events:
            batch = [{"recipient_id": f"d{i}", "name": "PAGE_VIEW"} for i in range(events)]
            async with (
                aiohttp.ClientSession(base_url=daemon.addresses[0]) as http,
                http.post("/v1/events", json=batch) as response,
            ):
                assert response.status == 202
    finally:
        daemon.request_stop()
        code = await asyncio.wait_for(task, 15)
    return daemon, code


async def test_memory_mode_writes_spool_db_only_when_a_stop_has_events_left(
    short_tmp: Path,
) -> None:
    state = short_tmp / "s"
    _, code = await _run(state, 0)
    assert code == 0
    assert not (state / SPOOL_FILE).exists()  # nothing left, nothing dead-lettered: no file
    assert not list(state.glob("spool.db*"))

    _, code = await _run(state, 3)  # the remote is unreachable: the three are left
    assert code == 0
    assert (state / SPOOL_FILE).exists()
    assert len(spooled(state)) == 3

    daemon, code = await _run(state, 0)  # replayed first at the next start, saved again
    assert code == 0
    assert daemon.log is not None
    assert daemon.log.restored == 3
    assert len(spooled(state)) == 3


async def test_a_new_spool_file_appears_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Memory mode creates spool.db while the daemon runs: a `forwarder dlq` reading meanwhile
    # must find no file or a set-up one, never an empty file ("damaged: bad header").
    built: list[tuple[str, bool]] = []
    connect = opening.connect_daemon

    def watched(path: Path) -> sqlite3.Connection:
        built.append((path.name, (tmp_path / SPOOL_FILE).exists()))
        return connect(path)

    monkeypatch.setattr(swap, "connect_daemon", watched)
    spool = await Spool.open(tmp_path)
    await spool.close()
    assert built == [(SPOOL_FILE + swap.CREATING, False)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [SPOOL_FILE]
    spool = await Spool.open(tmp_path)  # an existing file is opened as it is
    await spool.close()
    assert len(built) == 1


async def test_memory_mode_journals_what_it_cannot_write(tmp_path: Path) -> None:
    # The spool cannot be created (a link where it would be): the dead letter and a stop's
    # leftovers are written whole into the log, the last place left.
    log = await opened(tmp_path, "memory")
    log.start()
    (tmp_path / SPOOL_FILE).symlink_to(tmp_path / "elsewhere.db")
    with structlog.testing.capture_logs() as logs:
        assert await append(log, [ev(1), ev(2, "r2")]) == ""
        event, seq = await take(log)
        log.dead_lettered(event, seq, note())
        async with asyncio.timeout(5):
            while not any(line["event"] == "dead_letters_unsaved" for line in logs):
                await asyncio.sleep(0.01)
        assert await stop(log) == 0
    (dead,) = [line for line in logs if line["event"] == "dead_letters_unsaved"]
    assert (dead["count"], dead["reasons"]) == (1, ["rejected"])
    assert dead["events"][0]["event_id"] == "log-000001"
    assert "symbolic link" in dead["error"]
    (unsaved,) = [line for line in logs if line["event"] == "pending_unsaved"]
    assert [e["event_id"] for e in unsaved["events"]] == ["log-000002"]
    assert "symbolic link" in unsaved["error"]
    assert not (tmp_path / "elsewhere.db").exists()  # the link was never followed
