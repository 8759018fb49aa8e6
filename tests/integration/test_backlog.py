"""The backlog in durable mode: the queue is a window over the spool, bounded in bytes too."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from forwarder.events import Event
from forwarder.storage import backlog as backlog_module
from forwarder.storage.backlog import Backlog
from forwarder.storage.queue import TOO_LARGE, EventQueue, event_size
from forwarder.storage.sqlite.committer import SpooledEvent
from forwarder.storage.sqlite.spool import Spool


def ev(n: int, data_chars: int = 100) -> Event:
    return Event(
        event_id=f"evt-{n:06d}", recipient_id=f"r{n:03d}", name="VIEW", data="d" * data_chars,
        account="default",
    )  # fmt: skip


@pytest.fixture
async def spool(tmp_path: Path) -> AsyncIterator[Spool]:
    opened = await Spool.open(tmp_path)
    yield opened
    await opened.close()


async def until(condition: object, timeout: float = 5.0) -> None:
    assert callable(condition)
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


async def deliver_one(queue: EventQueue, backlog: Backlog) -> str:
    """What a lane does with one event: take it, and settle it as delivered."""
    async with asyncio.timeout(5):
        got = await queue.get("default")
    assert queue.bytes <= queue.max_bytes or (len(queue), queue.in_delivery) == (0, 1)
    backlog.delivered(got, queue.done(got))
    return got.event_id


async def test_the_window_holds_no_more_than_max_bytes_and_keeps_the_order(spool: Spool) -> None:
    one = event_size(ev(0))
    queue = EventQueue(100, max_bytes=3 * one)
    backlog = Backlog(queue, spool)
    backlog.start()
    try:
        for n in range(10):
            assert await backlog.admit([ev(n)]) == ""
        # Events of one request are never split between memory and disk; here each is its own.
        assert (len(queue), queue.bytes, backlog.on_disk_only) == (3, 3 * one, 7)
        delivered = [await deliver_one(queue, backlog) for _ in range(10)]
        assert delivered == [ev(n).event_id for n in range(10)]
        await until(lambda: spool.depth == 0)
    finally:
        await backlog.stop()


async def test_a_big_event_on_disk_waits_for_room_without_rereading_the_spool(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    small = event_size(ev(0))
    queue = EventQueue(100, max_bytes=3 * small)
    backlog = Backlog(queue, spool)
    reads: list[int] = []
    read_after = spool.read_after

    async def counted(seq: int, limit: int) -> list[SpooledEvent]:
        reads.append(seq)
        return await read_after(seq, limit)

    monkeypatch.setattr(spool, "read_after", counted)
    big = ev(3, data_chars=small * 2)  # 2 small events' worth and more: needs 3 free
    assert small * 2 < event_size(big) <= 3 * small
    for item in [ev(0), ev(1), ev(2), big, ev(4)]:
        assert await backlog.admit([item]) == ""
    assert (len(queue), backlog.on_disk_only) == (3, 2)
    backlog.start()
    try:
        await until(lambda: len(reads) >= 1)  # found the big one too big for the room left
        await asyncio.sleep(0.05)
        seen = len(reads)
        assert await deliver_one(queue, backlog) == ev(0).event_id
        await asyncio.sleep(0.05)
        assert len(reads) == seen  # one event's room is not enough: the spool is not read again
        assert await deliver_one(queue, backlog) == ev(1).event_id
        assert await deliver_one(queue, backlog) == ev(2).event_id
        assert await deliver_one(queue, backlog) == big.event_id
        assert await deliver_one(queue, backlog) == ev(4).event_id
        assert backlog.on_disk_only == 0
    finally:
        await backlog.stop()


async def test_an_event_bigger_than_a_lowered_bound_still_comes_in_alone(spool: Spool) -> None:
    queue = EventQueue(100, max_bytes=10 * event_size(ev(0, 5000)))
    backlog = Backlog(queue, spool)
    assert await backlog.admit([ev(0, 5000), ev(1, 5000)]) == ""
    taken = queue.take_all()  # as if a restart: on disk only
    assert len(taken) == 2
    fresh = EventQueue(100, max_bytes=event_size(ev(0, 100)))  # a reload lowered the bound
    again = Backlog(fresh, spool)
    again.start()
    try:
        assert await deliver_one(fresh, again) == ev(0).event_id
        assert await deliver_one(fresh, again) == ev(1).event_id
    finally:
        await again.stop()


async def test_a_request_bigger_than_max_bytes_is_refused_before_the_spool(spool: Spool) -> None:
    queue = EventQueue(100, max_bytes=event_size(ev(0, 1000)))
    backlog = Backlog(queue, spool)
    assert await backlog.admit([ev(0, 1001)]) == TOO_LARGE
    assert spool.depth == 0
    assert await backlog.admit([ev(0, 1000)]) == ""
    assert spool.depth == 1


async def test_the_save_at_a_stop_commits_in_chunks_of_bytes(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Encoded all at once, a full queue's rows would take as much memory again as its events.
    monkeypatch.setattr(backlog_module, "SAVE_CHUNK_BYTES", 3 * event_size(ev(0)))
    appended: list[int] = []
    append = spool.append

    async def counting(events: list[Event], *, force: bool = False) -> list[int]:
        appended.append(len(events))
        return await append(events, force=force)

    monkeypatch.setattr(spool, "append", counting)
    backlog = Backlog(EventQueue(100), spool)
    events = [ev(n) for n in range(10)]
    assert await backlog.save([(e, 0) for e in events] + [(ev(99), 7)]) == 10
    assert appended == [3, 3, 3, 1]
    rows = await spool.read_after(0, 100)
    assert [row.event.event_id for row in rows] == [e.event_id for e in events]


async def test_the_window_counts_an_event_as_it_was_before_the_spool_encoded_it(
    spool: Spool,
) -> None:
    # The spool's orjson encoding makes CPython cache each non-ASCII str's UTF-8 form, which
    # event_size counts as possible already: measured again afterwards it would come out larger.
    queue = EventQueue(100, max_bytes=0)
    backlog = Backlog(queue, spool)
    events = [replace(ev(n), data="\u00e9" * 1000) for n in range(3)]
    sizes = [event_size(e) for e in events]
    assert await backlog.admit(events) == ""
    assert queue.bytes == sum(sizes)
    assert event_size(events[0]) > sizes[0]  # the encoding did cache it
    for _ in events:
        got = await queue.get("default")
        backlog.delivered(got, queue.done(got))
    assert queue.bytes == 0


def of(account: str, n: int) -> Event:
    return Event(
        event_id=f"{account}-{n:06d}", recipient_id=f"r{n % 7}", name="VIEW", account=account
    )


async def take(queue: EventQueue, backlog: Backlog, account: str) -> str:
    async with asyncio.timeout(2):
        got = await queue.get(account)
    backlog.delivered(got, queue.done(got))
    return got.event_id


async def test_a_stuck_account_holds_its_share_of_the_window_and_no_more(spool: Spool) -> None:
    # "b" is paused (nobody takes its events) with a backlog three times the window; "default"
    # comes after all of it and must still flow, then "b" resumes and loses nothing, in order.
    queue = EventQueue(10)
    backlog = Backlog(queue, spool)
    backlog.start()
    try:
        for n in range(30):
            assert await backlog.admit([of("b", n)]) == ""
        await until(lambda: queue.depth("b") == 10)  # alone, it may use the whole window
        for n in range(5):
            assert await backlog.admit([of("default", n)]) == ""
        got = [await take(queue, backlog, "default") for _ in range(5)]
        assert got == [of("default", n).event_id for n in range(5)]
        for n in range(5, 40):  # default keeps flowing with b still stuck
            assert await backlog.admit([of("default", n)]) == ""
            assert await take(queue, backlog, "default") == of("default", n).event_id
            assert queue.depth("b") <= 5  # its share with default there
        assert backlog.evicted >= 5  # room was made: b's newest went back to the spool
        resumed = [await take(queue, backlog, "b") for _ in range(30)]
        assert resumed == [of("b", n).event_id for n in range(30)]
        await until(lambda: spool.depth == 0)
        assert backlog.on_disk_only == 0
    finally:
        await backlog.stop()


async def test_an_account_behind_a_full_window_finds_room_in_memory_too(spool: Spool) -> None:
    queue = EventQueue(100, max_bytes=10 * event_size(ev(0)))
    backlog = Backlog(queue, spool)
    backlog.start()
    try:
        for n in range(30):
            big = Event(event_id=f"b-{n}", recipient_id="r", name="V", data="d" * 100, account="b")
            assert await backlog.admit([big]) == ""
        for n in range(3):
            assert await backlog.admit([of("default", n)]) == ""
        got = [await take(queue, backlog, "default") for _ in range(3)]
        assert got == [of("default", n).event_id for n in range(3)]
        assert queue.bytes <= queue.max_bytes
    finally:
        await backlog.stop()
