"""The SQLite spool: durability, group commit, damaged files and rows, and the CLI's helpers."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import stat
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import pytest

import forwarder.storage.sqlite.upgrade as spoolupgrade
from forwarder.cli.spooldb import (
    get_dead_letter,
    list_dead_letters,
    purge_dead_letters,
    replay_dead_letters,
    spool_stats,
    spooled_events,
)
from forwarder.delivery.deadletter import DeadLetterNote
from forwarder.events import Event
from forwarder.storage.sqlite.codec import DeadLetter
from forwarder.storage.sqlite.file import (
    APPLICATION_ID,
    PAGE_SIZE,
    ROW_BITS,
    ROW_EVENTS,
    SCHEMA_VERSION,
    SPOOL_FILE,
    SpoolError,
)
from forwarder.storage.sqlite.opening import open_readonly_or_fail
from forwarder.storage.sqlite.spool import Spool, SpoolFull

DEAD: dict[str, Any] = {
    "status": 400,
    "error": "recipient_id unknown",
    "attempts": 2,
    "first_attempt_at": 1_700_000_100.0,
    "last_attempt_at": 1_700_000_160.0,
}


def note(reason: str) -> DeadLetterNote:
    return DeadLetterNote(reason=reason, **DEAD)


def ev(i: int, **fields: Any) -> Event:
    """Events that all have the same size (fixed-width ids)."""
    return Event(
        event_id=f"evt-{i:08d}",
        recipient_id=f"r{i:04d}",
        name="signup",
        value="1",
        accepted_at=1_700_000_000.0 + i,
        **fields,
    )


def size_of(*events: Event) -> int:
    """The size the spool counts for the row of one append: the bytes of its encoded events."""
    entries = [
        [
            e.event_id,
            e.recipient_id,
            e.name,
            e.value,
            e.conversion,
            e.data,
            e.ref,
            e.accepted_at,
            e.account,
        ]
        for e in events
    ]
    return len(json.dumps(entries, ensure_ascii=False, separators=(",", ":")).encode())


def row_of(seq: int) -> int:
    return seq >> ROW_BITS


def last_seq(row: int) -> int:
    """The highest seq row `row` can hold (what `max_seq` says after it)."""
    return (row << ROW_BITS) + ROW_EVENTS - 1


def connect(path: Path) -> sqlite3.Connection:
    """An independent connection, as another process would have."""
    return sqlite3.connect(path, isolation_level=None, timeout=5.0)


@contextmanager
def cli(state_dir: Path) -> Iterator[sqlite3.Connection]:
    conn = open_readonly_or_fail(state_dir)
    try:
        yield conn
    finally:
        conn.close()


@pytest.fixture
async def spool(tmp_path: Path) -> AsyncIterator[Spool]:
    opened = await Spool.open(tmp_path)
    yield opened
    await opened.close()


async def test_round_trip_and_seqs_never_reused(spool: Spool) -> None:
    events = [ev(1), ev(2), ev(3)]
    seqs = await spool.append(events)
    assert seqs == sorted(seqs)
    assert len(set(seqs)) == 3
    rows = await spool.read_after(0, 10)
    assert [row.seq for row in rows] == seqs
    assert [row.event for row in rows] == events
    assert (await spool.read_after(0, 2)) == rows[:2]
    assert (await spool.read_after(seqs[0], 10)) == rows[1:]
    assert spool.depth == 3
    assert spool.bytes == size_of(*events)  # one append, one row
    assert {row_of(seq) for seq in seqs} == {row_of(seqs[0])}
    assert spool.max_seq == last_seq(row_of(seqs[-1]))
    assert spool.oldest_accepted_at == events[0].accepted_at

    await spool.remove(seqs[:1])
    assert spool.depth == 2
    assert [row.seq for row in await spool.read_after(0, 10)] == seqs[1:]
    assert spool.bytes == size_of(*events)  # the row stays while it holds unsettled events
    await spool.remove(seqs[1:])
    await spool.remove(seqs)  # again: unknown seqs are ignored
    assert (spool.depth, spool.bytes) == (0, 0)
    assert spool.oldest_accepted_at is None
    assert spool.max_seq == last_seq(row_of(seqs[-1]))

    [seq] = await spool.append([ev(4)])
    assert seq > seqs[-1]  # the last seq was removed, and still not reused
    assert [row.event for row in await spool.read_after(0, 10)] == [ev(4)]
    assert await spool.read_after(seq, 10) == []
    assert spool.oldest_accepted_at == ev(4).accepted_at


async def test_reopen_keeps_the_counters(tmp_path: Path) -> None:
    first = await Spool.open(tmp_path)
    seqs = await first.append([ev(i) for i in range(1, 6)])
    await first.remove([seqs[0], seqs[-1]])
    before = (first.depth, first.bytes, first.max_seq, first.oldest_accepted_at)
    await first.close()

    second = await Spool.open(tmp_path)
    try:
        assert second.moved_aside is None
        assert (second.depth, second.bytes, second.max_seq, second.oldest_accepted_at) == before
        # The row stays whole (bytes) until every event in it is settled.
        assert before == (3, size_of(*map(ev, range(1, 6))), last_seq(1), ev(1).accepted_at)
        assert [row.seq for row in await second.read_after(0, 10)] == seqs[1:-1]
        [seq] = await second.append([ev(6)])
        assert seq == 2 << ROW_BITS
    finally:
        await second.close()


async def test_spool_full_is_all_or_nothing(tmp_path: Path) -> None:
    one = size_of(ev(1))
    assert size_of(ev(2), ev(3)) < 2 * one  # the test relies on it not fitting all the same
    spool = await Spool.open(tmp_path, max_bytes=2 * one + one // 2)
    try:
        await spool.append([ev(1)])
        with pytest.raises(SpoolFull):
            await spool.append([ev(2), ev(3)])
        assert spool.depth == 1
        assert [row.event for row in await spool.read_after(0, 10)] == [ev(1)]
        [seq2] = await spool.append([ev(2)])
        with pytest.raises(SpoolFull):
            await spool.append([ev(3)])
        await spool.remove([seq2])
        await spool.append([ev(3)])
        # force: a stop saving what is only in memory must not lose it to the bound
        await spool.append([ev(4)], force=True)
        assert spool.depth == 3
    finally:
        await spool.close()


async def test_concurrent_appends_reserve_their_bytes(tmp_path: Path) -> None:
    spool = await Spool.open(tmp_path, max_bytes=size_of(ev(1)) * 3 // 2)
    try:
        results = await asyncio.gather(
            spool.append([ev(1)]), spool.append([ev(2)]), return_exceptions=True
        )
        assert sorted(type(r).__name__ for r in results) == ["SpoolFull", "list"]
        assert spool.depth == 1
    finally:
        await spool.close()


async def test_group_commit_shares_transactions(tmp_path: Path) -> None:
    commits: list[float] = []
    spool = await Spool.open(tmp_path, group_window_s=0.01, on_commit=commits.append)
    try:
        results = await asyncio.gather(*(spool.append([ev(i)]) for i in range(50)))
        seqs = [r[0] for r in results]
        assert seqs == sorted(seqs)
        assert len(set(seqs)) == 50
        assert 1 <= len(commits) <= 5
        assert all(c >= 0 for c in commits)
        assert spool.depth == 50
    finally:
        await spool.close()


async def test_group_commit_batches_under_load_without_a_window(tmp_path: Path) -> None:
    commits: list[float] = []
    spool = await Spool.open(tmp_path, group_window_s=0.0, on_commit=commits.append)

    async def producer(base: int) -> None:
        for i in range(10):
            await spool.append([ev(base + i)])

    try:
        await asyncio.gather(*(producer(1000 * p) for p in range(20)))
        assert spool.depth == 200
        # While one commit runs in the thread, the next requests queue up for the one after.
        assert len(commits) <= 50
    finally:
        await spool.close()


async def test_a_group_is_cut_on_the_spool_thread_while_the_loop_is_busy(
    tmp_path: Path,
) -> None:
    """The window closes on the spool's thread: a loop busy with a burst (running no timer and
    no other task) does not hold the first group back until every request has joined it."""
    commits: list[float] = []
    spool = await Spool.open(tmp_path, group_window_s=0.05, on_commit=commits.append)
    try:

        async def busy() -> None:
            # Longer than the window, without yielding: a burst of requests being read.
            time.sleep(0.3)  # noqa: ASYNC251 - blocking the loop is the point here

        # Run in this order, none yielding before the next: a committer on the loop would only
        # get its turn after the second append, and take both in one group.
        first = asyncio.ensure_future(spool.append([ev(1)]))
        blocker = asyncio.ensure_future(busy())
        second = asyncio.ensure_future(spool.append([ev(2)]))
        seqs = await asyncio.gather(first, second, blocker)
        assert seqs[0] < seqs[1]
        assert len(commits) == 2  # the first group went while the loop was still busy
    finally:
        await spool.close()


async def test_removals_share_commits_with_appends(tmp_path: Path) -> None:
    commits: list[float] = []
    spool = await Spool.open(tmp_path, group_window_s=0.01, on_commit=commits.append)
    try:
        seqs = await spool.append([ev(1), ev(2)])
        commits.clear()
        spool.remove_soon(seqs[:1])
        await asyncio.gather(spool.append([ev(3)]), spool.remove(seqs[1:]))
        assert len(commits) == 1
        assert [row.event for row in await spool.read_after(0, 10)] == [ev(3)]
    finally:
        await spool.close()


async def test_committed_rows_are_in_the_file(spool: Spool) -> None:
    events = [ev(1), ev(2, conversion=True, data='{"k":"é"}', ref="spring", account="shop"), ev(3)]
    seqs = await spool.append(events)
    with closing(connect(spool.path)) as other:
        other.row_factory = sqlite3.Row
        rows = other.execute("SELECT * FROM batches ORDER BY seq").fetchall()
    # One row for the append, its events in order in one JSON body.
    assert [(r["seq"], r["count"], r["accepted_at"]) for r in rows] == [(1, 3, ev(1).accepted_at)]
    assert seqs == [1 << ROW_BITS, (1 << ROW_BITS) + 1, (1 << ROW_BITS) + 2]
    assert rows[0]["size"] == size_of(*events) == len(rows[0]["body"])
    fields = ("event_id", "recipient_id", "name", "value", "conversion", "data", "ref")
    assert [dict(zip(fields, entry, strict=False)) for entry in json.loads(rows[0]["body"])] == [
        {f: getattr(e, f) for f in fields} for e in events
    ]
    with cli(spool.path.parent) as conn:
        assert spooled_events(conn) == events


async def test_new_file_is_ours(spool: Spool) -> None:
    with closing(connect(spool.path)) as other:
        assert other.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
        assert other.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert other.execute("PRAGMA page_size").fetchone()[0] == PAGE_SIZE == 16384
        columns = [row[1] for row in other.execute("PRAGMA table_info(batches)")]
        settled = [row[1] for row in other.execute("PRAGMA table_info(settled)")]
    assert columns == ["seq", "count", "accepted_at", "size", "body"]
    assert settled == ["seq"]


async def test_file_modes_are_0600_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        spool = await Spool.open(tmp_path)
        try:
            await spool.append([ev(1)])
            for name in (SPOOL_FILE, SPOOL_FILE + "-wal", SPOOL_FILE + "-shm"):
                mode = stat.S_IMODE((tmp_path / name).stat().st_mode)
                assert mode == 0o600, (name, oct(mode))
        finally:
            await spool.close()
    finally:
        os.umask(old)


def _assert_moved(spool: Spool, tmp_path: Path, original: bytes | None = None) -> Path:
    moved = spool.moved_aside
    assert moved is not None
    assert moved.parent == tmp_path
    assert moved.name.startswith(SPOOL_FILE + ".damaged-")
    assert moved.is_file()
    if original is not None:
        assert moved.read_bytes() == original
    assert spool.depth == 0
    return moved


async def test_random_bytes_are_moved_aside_with_their_wal(tmp_path: Path) -> None:
    junk, wal = os.urandom(8192), os.urandom(4096)
    (tmp_path / SPOOL_FILE).write_bytes(junk)
    (tmp_path / (SPOOL_FILE + "-wal")).write_bytes(wal)
    spool = await Spool.open(tmp_path)
    try:
        moved = _assert_moved(spool, tmp_path, junk)
        assert Path(f"{moved}-wal").read_bytes() == wal
        assert "damaged" in (spool.moved_aside_reason or "")
        assert await spool.append([ev(1)]) == [1 << ROW_BITS]
    finally:
        await spool.close()


async def test_foreign_sqlite_file_is_moved_aside(tmp_path: Path) -> None:
    with closing(connect(tmp_path / SPOOL_FILE)) as other:
        other.execute("PRAGMA application_id = 4660")
        other.execute("CREATE TABLE notes (text TEXT)")
        other.execute("INSERT INTO notes VALUES ('keep me')")
    spool = await Spool.open(tmp_path)
    try:
        moved = _assert_moved(spool, tmp_path)
        assert "foreign" in (spool.moved_aside_reason or "")
        with closing(connect(moved)) as other:
            assert other.execute("SELECT text FROM notes").fetchall() == [("keep me",)]
        await spool.append([ev(1)])
        assert spool.depth == 1
    finally:
        await spool.close()


async def test_newer_schema_is_moved_aside(tmp_path: Path) -> None:
    first = await Spool.open(tmp_path)
    await first.append([ev(1)])
    await first.close()
    with closing(connect(tmp_path / SPOOL_FILE)) as other:
        other.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    spool = await Spool.open(tmp_path)
    try:
        moved = _assert_moved(spool, tmp_path)
        assert "newer" in (spool.moved_aside_reason or "")
        with closing(connect(moved)) as other:
            assert other.execute("SELECT count(*) FROM batches").fetchone()[0] == 1
        await spool.append([ev(2)])
    finally:
        await spool.close()


async def test_corrupt_pages_are_moved_aside(tmp_path: Path) -> None:
    first = await Spool.open(tmp_path)
    await first.append([ev(i) for i in range(500)])
    await first.close()
    path = tmp_path / SPOOL_FILE
    data = bytearray(path.read_bytes())
    page = 4096
    assert len(data) > 4 * page
    # Keep page 1 (header, schema) intact: only a full check can tell.
    data[page:] = os.urandom(len(data) - page)
    path.write_bytes(bytes(data))
    spool = await Spool.open(tmp_path)
    try:
        _assert_moved(spool, tmp_path, bytes(data))
        assert "damaged" in (spool.moved_aside_reason or "")
        await spool.append([ev(1)])
    finally:
        await spool.close()


async def test_empty_file_and_orphan_wal(tmp_path: Path) -> None:
    (tmp_path / SPOOL_FILE).write_bytes(b"")  # creation cut short: used, not moved
    spool = await Spool.open(tmp_path)
    assert spool.moved_aside is None
    await spool.close()

    other = tmp_path / "other"
    other.mkdir()
    (other / (SPOOL_FILE + "-wal")).write_bytes(os.urandom(4096))
    spool = await Spool.open(other)
    try:
        assert spool.moved_aside is not None
        assert Path(f"{spool.moved_aside}-wal").is_file()
        assert "without its database" in (spool.moved_aside_reason or "")
        await spool.append([ev(1)])
    finally:
        await spool.close()


async def test_settle_dead_moves_the_event_in_one_commit(tmp_path: Path) -> None:
    commits: list[float] = []
    spool = await Spool.open(tmp_path, on_commit=commits.append)
    try:
        seqs = await spool.append([ev(1), ev(2)])
        commits.clear()
        await spool.settle_dead(seqs[0], ev(1), note("rejected"))
        assert len(commits) == 1
        assert (spool.depth, spool.dead_letters) == (1, 1)
        assert spool.bytes == size_of(ev(1), ev(2))  # the row stays until both are settled
        assert [row.seq for row in await spool.read_after(0, 10)] == seqs[1:]
        await spool.settle_dead(None, ev(9), note("internal_error"))
        assert (spool.depth, spool.dead_letters) == (1, 2)
        with cli(tmp_path) as conn:
            first, second = list_dead_letters(conn)
            assert conn.execute("SELECT seq FROM settled").fetchall() == [(seqs[0],)]
    finally:
        await spool.close()
    assert first.event == ev(1)
    assert (first.reason, first.status, first.error, first.attempts) == (
        "rejected",
        400,
        "recipient_id unknown",
        2,
    )
    assert (first.first_attempt_at, first.last_attempt_at) == (1_700_000_100.0, 1_700_000_160.0)
    assert abs(first.dead_lettered_at - time.time()) < 60
    assert second.event == ev(9)
    record = first.to_dict()
    # The keys of the dead-letter record as the JSON-lines file had them, plus "id".
    assert set(record) == {
        "id",
        "event",
        "reason",
        "status",
        "error",
        "attempts",
        "first_attempt_at",
        "last_attempt_at",
        "dead_lettered_at",
    }
    assert record["event"] == ev(1).to_dict()
    assert record["id"] == first.id
    json.dumps(record)


async def test_soon_requests_are_flushed_by_close(tmp_path: Path) -> None:
    setup = await Spool.open(tmp_path)
    seqs = await setup.append([ev(1), ev(2)])
    await setup.close()
    spool = await Spool.open(tmp_path, group_window_s=5.0)
    spool.remove_soon(seqs[:1])
    spool.dead_letter_soon(seqs[1], ev(2), note("expired"))
    started = time.monotonic()
    await spool.close()
    await spool.close()  # idempotent
    assert time.monotonic() - started < 2.5  # close cuts the 5 s group window short
    with pytest.raises(SpoolError):
        await spool.append([ev(3)])
    with pytest.raises(SpoolError):
        await spool.read_after(0, 1)
    spool.remove_soon([1])  # after close: logged and dropped, never raised

    again = await Spool.open(tmp_path)
    try:
        assert (again.depth, again.dead_letters) == (0, 1)
    finally:
        await again.close()


async def test_cancelled_append_is_not_stored(tmp_path: Path) -> None:
    spool = await Spool.open(tmp_path, max_bytes=2 * size_of(ev(1)), group_window_s=0.5)
    try:
        [first] = await spool.append([ev(0)])  # the spool is busy now: the next waits its window
        task = asyncio.create_task(spool.append([ev(1)]))
        await asyncio.sleep(0)  # queued, waiting for the window
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # Its bytes are no longer reserved, and it never reaches the file.
        [seq] = await spool.append([ev(2)])
        assert [row.event for row in await spool.read_after(0, 10)] == [ev(0), ev(2)]
        assert seq == first + ROW_EVENTS
    finally:
        await spool.close()


async def test_an_idle_spool_commits_at_once_and_a_busy_one_waits_its_window(
    tmp_path: Path,
) -> None:
    commits: list[float] = []
    spool = await Spool.open(tmp_path, group_window_s=0.3, on_commit=commits.append)
    try:
        started = time.monotonic()
        await spool.append([ev(1)])
        idle = time.monotonic() - started
        # Right after a commit, while the loop takes a new request every turn: the window holds.
        started = time.monotonic()
        first = asyncio.ensure_future(spool.append([ev(2)]))
        more: list[asyncio.Future[list[int]]] = []
        while not first.done():
            more.append(asyncio.ensure_future(spool.append([ev(3 + len(more))])))
            time.sleep(0.01)  # noqa: ASYNC251 - a busy loop: reading a request takes time
            await asyncio.sleep(0)
        busy = time.monotonic() - started
        await asyncio.gather(*more)
        assert idle < 0.3 <= busy
        assert len(commits) <= 4  # dozens of requests, a few groups
        await asyncio.sleep(0.35)  # a window without commits: idle again
        started = time.monotonic()
        await spool.append([ev(4)])
        assert time.monotonic() - started < 0.3
    finally:
        await spool.close()


async def test_a_busy_spools_group_is_cut_when_the_loop_runs_out_of_requests(
    tmp_path: Path,
) -> None:
    commits: list[float] = []
    spool = await Spool.open(tmp_path, group_window_s=30.0, on_commit=commits.append)
    try:
        await spool.append([ev(1)])  # idle: at once
        # Right after a commit (under load, so a window applies) but nothing else to do: the
        # loop's two quiet turns cut the group long before its 30 s window.
        async with asyncio.timeout(5):
            results = await asyncio.gather(*(spool.append([ev(2 + i)]) for i in range(10)))
        assert len({seq for r in results for seq in r}) == 10
        assert len(commits) == 2  # the ten shared one group
    finally:
        await spool.close()


async def test_event_with_invalid_unicode_is_refused_alone(spool: Spool) -> None:
    with pytest.raises(ValueError, match="Unicode"):
        await spool.append([ev(1, data="\ud800")])
    assert await spool.append([ev(2)]) == [1 << ROW_BITS]


async def test_invalid_unicode_fails_only_its_own_append_in_a_shared_commit(
    tmp_path: Path,
) -> None:
    one = size_of(ev(1))
    bad = [ev(2), ev(3, ref="\udc80")]
    # Room for exactly what is offered: a reservation the refused append kept would show below.
    commits: list[float] = []
    spool = await Spool.open(
        tmp_path, max_bytes=4 * one + 1, group_window_s=0.05, on_commit=commits.append
    )
    try:
        results = await asyncio.gather(
            spool.append([ev(1)]), spool.append(bad), spool.append([ev(4)]), return_exceptions=True
        )
        assert isinstance(results[1], ValueError)
        assert "evt-00000003" in str(results[1])
        # In order of arrival, and no seq went to the refused rows.
        assert (results[0], results[2]) == ([1 << ROW_BITS], [2 << ROW_BITS])
        assert len(commits) == 1  # the others were still committed together
        assert (spool.depth, spool.bytes) == (2, 2 * one)
        assert [row.event for row in await spool.read_after(0, 10)] == [ev(1), ev(4)]
        assert await spool.append([ev(5), ev(6)]) == [3 << ROW_BITS, (3 << ROW_BITS) + 1]
    finally:
        await spool.close()


def damage(path: Path, seq: int, field: int, value: object) -> None:
    """Change one field of the event `seq` in its row's body, as another process could."""
    with closing(connect(path)) as other:
        [(body,)] = other.execute("SELECT body FROM batches WHERE seq = ?", (row_of(seq),))
        entries = json.loads(body)
        entries[seq & (ROW_EVENTS - 1)][field] = value
        other.execute(
            "UPDATE batches SET body = ? WHERE seq = ?", (json.dumps(entries), row_of(seq))
        )


async def test_read_after_moves_damaged_rows_to_dead_letters(spool: Spool) -> None:
    events = [ev(1), ev(2), ev(3), ev(4), ev(5)]
    seqs = await spool.append(events)
    damage(spool.path, seqs[0], 1, "")  # recipient_id
    damage(spool.path, seqs[1], 5, 255)  # data
    damage(spool.path, seqs[3], 4, 7)  # conversion
    size = spool.bytes
    # A page of only damaged events must not look like the end of the spool.
    rows = await spool.read_after(0, 1)
    assert [(row.seq, row.event) for row in rows] == [(seqs[2], ev(3))]
    assert spool.damaged == 2
    assert (spool.depth, spool.dead_letters) == (3, 2)
    assert spool.bytes == size  # the row holds unsettled events still
    assert [row.event for row in await spool.read_after(0, 10)] == [ev(3), ev(5)]
    assert (spool.damaged, spool.depth, spool.bytes) == (3, 2, size)

    with cli(spool.path.parent) as conn:
        damaged = list_dead_letters(conn, reason="damaged")
        assert [d.event.event_id for d in damaged] == [
            "evt-00000001",
            "evt-00000002",
            "evt-00000004",
        ]
        assert [d.event.recipient_id for d in damaged] == ["", "", ""]
        assert f"spool event {seqs[0]}" in damaged[0].error
        assert "empty event_id, recipient_id or name" in damaged[0].error
        assert "data not text" in damaged[1].error
        assert "conversion is 7" in damaged[2].error
        # The entry is kept, as it was, in the dead letter's body.
        kept = json.loads(damaged[1].event.data)["damaged_spool_row"]
        assert kept["seq"] == seqs[1]
        assert kept["event"][5] == 255
        assert kept["event"][2] == "signup"
        # Not an event: replay leaves them where they are.
        assert replay_dead_letters(conn, None) == 0
        assert len(list_dead_letters(conn)) == 3
        assert spool_stats(conn)["dead_letters"] == {"damaged": 3}


async def test_a_row_that_cannot_be_read_goes_whole_to_the_dead_letters(spool: Spool) -> None:
    first = await spool.append([ev(1), ev(2), ev(3)])
    second = await spool.append([ev(4)])
    await spool.remove(first[:1])
    with closing(connect(spool.path)) as other:
        other.execute("UPDATE batches SET body = x'00ff' WHERE seq = ?", (row_of(first[0]),))
    assert [(row.seq, row.event) for row in await spool.read_after(0, 10)] == [(second[0], ev(4))]
    # The two events it still held leave the counts; the row's settled entry goes with it.
    assert (spool.depth, spool.damaged, spool.dead_letters, spool.bytes) == (
        1,
        1,
        1,
        size_of(ev(4)),
    )
    assert spool.oldest_accepted_at == ev(4).accepted_at
    with cli(spool.path.parent) as conn:
        [dead] = list_dead_letters(conn)
        assert conn.execute("SELECT count(*) FROM settled").fetchone()[0] == 0
        assert f"spool row {row_of(first[0])}" in dead.error
        assert "body is not JSON" in dead.error
        kept = json.loads(dead.event.data)["damaged_spool_row"]
        assert (kept["seq"], kept["count"], kept["body"]) == (row_of(first[0]), 3, "\x00\\xff")
        assert replay_dead_letters(conn, None) == 0


async def test_appends_beyond_a_row_take_several_in_order(spool: Spool) -> None:
    events = [ev(i) for i in range(ROW_EVENTS + 5)]
    seqs = await spool.append(events)
    assert [row_of(seq) for seq in seqs] == [1] * ROW_EVENTS + [2] * 5
    assert [row.event for row in await spool.read_after(0, 2 * ROW_EVENTS)] == events
    assert [row.seq for row in await spool.read_after(seqs[ROW_EVENTS - 2], 3)] == seqs[
        ROW_EVENTS - 1 : ROW_EVENTS + 2
    ]
    await spool.remove(seqs[:ROW_EVENTS])
    assert (spool.depth, spool.bytes, spool.oldest_accepted_at) == (
        5,
        size_of(*events[ROW_EVENTS:]),
        events[ROW_EVENTS].accepted_at,
    )


async def test_spooled_events_names_a_damaged_event(spool: Spool) -> None:
    seqs = await spool.append([ev(1), ev(2)])
    damage(spool.path, seqs[1], 2, "")
    with cli(spool.path.parent) as conn, pytest.raises(ValueError, match=f"spool event {seqs[1]}"):
        spooled_events(conn)


# -- schema 1 (a JSON body per event), as an older forwarder wrote it ---------------------------

V1_SCHEMA = (
    """CREATE TABLE events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        account TEXT NOT NULL,
        body TEXT NOT NULL,
        size INTEGER NOT NULL,
        accepted_at REAL NOT NULL
    )""",
    """CREATE TABLE dead_letters (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        event_id TEXT,
        account TEXT,
        reason TEXT,
        status INTEGER,
        error TEXT,
        attempts INTEGER,
        first_attempt_at REAL,
        last_attempt_at REAL,
        dead_lettered_at REAL,
        body TEXT
    )""",
    "CREATE INDEX dead_letters_at ON dead_letters (dead_lettered_at)",
)


def v1_body(event: Event) -> str:
    return json.dumps(event.to_dict(), ensure_ascii=False, separators=(",", ":"))


def make_v1_spool(state_dir: Path, bodies: list[str], *, dead: Sequence[Event] = ()) -> None:
    """A spool.db as schema 1 left it: `bodies` as events (seq 1, 2, ...), `dead` dead letters."""
    with closing(connect(state_dir / SPOOL_FILE)) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        for statement in V1_SCHEMA:
            conn.execute(statement)
        conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
        conn.execute("PRAGMA user_version=1")
        conn.executemany(
            "INSERT INTO events (account, body, size, accepted_at) VALUES (?, ?, ?, ?)",
            [("", body, len(body.encode()), 1_700_000_000.0) for body in bodies],
        )
        conn.executemany(
            "INSERT INTO dead_letters (event_id, account, reason, status, error, attempts,"
            " first_attempt_at, last_attempt_at, dead_lettered_at, body)"
            " VALUES (?, '', 'rejected', 400, 'no', 1, 1.0, 2.0, 3.0, ?)",
            [(event.event_id, v1_body(event)) for event in dead],
        )


async def test_a_schema_1_spool_is_upgraded_in_place(tmp_path: Path) -> None:
    events = [ev(1), ev(2, conversion=True, data="ü" * 3, account="shop"), ev(3), ev(4), ev(5)]
    bodies = [v1_body(e) for e in events]
    bodies[1:1] = ["{not json"]  # seq 2
    bodies[3:3] = [json.dumps({"event_id": "evt-half-gone"})]  # seq 4
    # JSON can escape a lone surrogate, which SQLite cannot store as text: seq 7.
    bodies[6:6] = [json.dumps(ev(6, data="\ud800").to_dict())]
    make_v1_spool(tmp_path, bodies, dead=[ev(9)])
    with closing(connect(tmp_path / SPOOL_FILE)) as other:
        # The last event was delivered: its seq must still never be given out again.
        other.execute("DELETE FROM events WHERE seq = 8")
    with pytest.raises(SpoolError, match="older forwarder"):
        open_readonly_or_fail(tmp_path)  # the CLI never upgrades

    spool = await Spool.open(tmp_path)
    try:
        assert spool.moved_aside is None
        rows = await spool.read_after(0, 10)
        # Every readable event under its old seq; the damaged ones are dead letters.
        assert [(row.seq, row.event) for row in rows] == [
            (1 << ROW_BITS, events[0]),
            (3 << ROW_BITS, events[1]),
            (5 << ROW_BITS, events[2]),
            (6 << ROW_BITS, events[3]),
        ]
        assert (spool.depth, spool.dead_letters, spool.damaged) == (4, 4, 3)
        assert spool.bytes == sum(size_of(e) for e in events[:4])
        assert spool.max_seq == last_seq(8)
        assert spool.oldest_accepted_at == ev(1).accepted_at
        assert await spool.append([ev(10)]) == [9 << ROW_BITS]
    finally:
        await spool.close()

    with closing(connect(tmp_path / SPOOL_FILE)) as other:
        assert other.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4
        tables = {r[0] for r in other.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert tables == {"batches", "settled", "dead_letters", "outcomes", "sqlite_sequence"}
    with cli(tmp_path) as conn:
        dead = list_dead_letters(conn)
        assert [(d.reason, d.event.event_id) for d in dead] == [
            ("rejected", ev(9).event_id),
            ("damaged", ""),
            ("damaged", "evt-half-gone"),
            ("damaged", ev(6).event_id),
        ]
        assert dead[1].event.data == "{not json"  # the old body, as it was
        assert "spool row 2" in dead[1].error
        assert "spool row 4" in dead[2].error
        assert "spool row 7" in dead[3].error
        assert "Unicode" in dead[3].error
        # A dead letter of schema 1 replays into a new row; one that cannot be stored stays.
        assert replay_dead_letters(conn, [dead[0].id, dead[3].id]) == 1
        assert spooled_events(conn) == [*events[:4], ev(10), ev(9)]
        assert spool_stats(conn)["schema_version"] == SCHEMA_VERSION

    again = await Spool.open(tmp_path)  # upgraded once: opens as it is
    try:
        assert again.moved_aside is None
        assert (again.depth, again.damaged, again.max_seq) == (6, 0, last_seq(10))
    finally:
        await again.close()


@pytest.mark.parametrize("version", [1, 2, SCHEMA_VERSION])
async def test_an_events_table_without_its_columns_is_moved_aside(
    tmp_path: Path, version: int
) -> None:
    table = "events"
    if version == 1:
        make_v1_spool(tmp_path, [v1_body(ev(1))])
        renamed = "body"
    elif version == 2:
        make_v2_spool(tmp_path, [v2_row(ev(1))])
        renamed = "data"
    else:
        first = await Spool.open(tmp_path)
        await first.append([ev(1)])
        await first.close()
        table, renamed = "batches", "body"
    with closing(connect(tmp_path / SPOOL_FILE)) as other:
        other.execute(f"ALTER TABLE {table} RENAME COLUMN {renamed} TO payload")
    spool = await Spool.open(tmp_path)
    try:
        moved = _assert_moved(spool, tmp_path)
        assert f"{table} lack {renamed}" in (spool.moved_aside_reason or "")
        with closing(connect(moved)) as other:
            assert other.execute(f"SELECT count(*) FROM {table}").fetchone()[0] == 1
        assert await spool.append([ev(2)]) == [1 << ROW_BITS]
    finally:
        await spool.close()


# -- schema 2 (typed columns, an event per row), as an older forwarder wrote it ----------------

V2_EVENTS = """CREATE TABLE events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    account TEXT NOT NULL,
    event_id TEXT NOT NULL,
    recipient_id TEXT NOT NULL,
    name TEXT NOT NULL,
    value TEXT NOT NULL,
    conversion INTEGER NOT NULL,
    data TEXT NOT NULL,
    ref TEXT NOT NULL,
    accepted_at REAL NOT NULL,
    size INTEGER NOT NULL
)"""


def v2_row(event: Event) -> tuple[Any, ...]:
    e = event
    fields = (e.account, e.event_id, e.recipient_id, e.name, e.value)
    return (*fields, int(e.conversion), e.data, e.ref, e.accepted_at, 10)


def make_v2_spool(state_dir: Path, rows: list[tuple[Any, ...]]) -> None:
    """A spool.db as schema 2 left it: `rows` as events (seq 1, 2, ...)."""
    with closing(connect(state_dir / SPOOL_FILE)) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(V2_EVENTS)
        for statement in V1_SCHEMA[1:]:  # the dead letters did not change
            conn.execute(statement)
        conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
        conn.execute("PRAGMA user_version=2")
        conn.executemany(
            "INSERT INTO events (account, event_id, recipient_id, name, value, conversion, data,"
            " ref, accepted_at, size) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )


async def test_a_schema_2_spool_is_upgraded_in_place(tmp_path: Path) -> None:
    events = [ev(1), ev(2, conversion=True, data="ü" * 3, account="shop"), ev(3)]
    rows = [v2_row(e) for e in events]
    rows[1:1] = [(*v2_row(ev(7))[:2], "", *v2_row(ev(7))[3:])]  # seq 2: no recipient_id
    rows[3:3] = [(*v2_row(ev(8))[:5], 7, *v2_row(ev(8))[6:])]  # seq 4: conversion 7
    make_v2_spool(tmp_path, rows)
    with closing(connect(tmp_path / SPOOL_FILE)) as other:
        other.execute("DELETE FROM events WHERE seq = 5")  # delivered: seq 5 never again
    spool = await Spool.open(tmp_path)
    try:
        assert [(row.seq, row.event) for row in await spool.read_after(0, 10)] == [
            (1 << ROW_BITS, events[0]),
            (3 << ROW_BITS, events[1]),
        ]
        assert (spool.depth, spool.dead_letters, spool.damaged) == (2, 2, 2)
        assert spool.bytes == size_of(events[0]) + size_of(events[1])
        assert await spool.append([ev(10)]) == [6 << ROW_BITS]
    finally:
        await spool.close()
    with cli(tmp_path) as conn:
        dead = list_dead_letters(conn)
        assert [(d.reason, d.event.event_id) for d in dead] == [
            ("damaged", ev(7).event_id),
            ("damaged", ev(8).event_id),
        ]
        assert "spool row 2" in dead[0].error
        assert "found upgrading schema 2" in dead[0].error
        assert "conversion is 7" in dead[1].error
        assert json.loads(dead[1].event.data)["damaged_spool_row"]["conversion"] == 7
        assert spooled_events(conn) == [events[0], events[1], ev(10)]


async def test_a_failed_upgrade_leaves_the_schema_1_spool_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bodies = [v1_body(ev(i)) for i in range(1, 2500)] + ["{not json"]
    make_v1_spool(tmp_path, bodies)
    upgrade = spoolupgrade._UPGRADES[1]

    def cut_short(conn: sqlite3.Connection) -> tuple[int, int]:
        upgrade(conn)  # everything written, then the power goes
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setitem(spoolupgrade._UPGRADES, 1, cut_short)
    with pytest.raises(sqlite3.OperationalError):
        await Spool.open(tmp_path)
    monkeypatch.undo()
    with closing(connect(tmp_path / SPOOL_FILE)) as other:
        assert other.execute("PRAGMA user_version").fetchone()[0] == 1
        assert other.execute("SELECT count(*), max(seq) FROM events").fetchone() == (2500, 2500)
        assert other.execute("SELECT count(*) FROM dead_letters").fetchone()[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir() if ".damaged-" in p.name) == []

    spool = await Spool.open(tmp_path)
    try:
        assert (spool.depth, spool.damaged, spool.max_seq) == (2499, 1, last_seq(2500))
        rows = await spool.read_after(0, 5000)
        assert [row.event for row in rows] == [ev(i) for i in range(1, 2500)]
    finally:
        await spool.close()


async def _dead_lettered(spool: Spool, events: list[Event], reasons: list[str]) -> list[int]:
    """Append and dead-letter `events`; dead_lettered_at becomes 1000 + id. Returns the ids."""
    seqs = await spool.append(events)
    for seq, event, reason in zip(seqs, events, reasons, strict=True):
        await spool.settle_dead(seq, event, note(reason))
    with closing(connect(spool.path)) as other:
        other.execute("UPDATE dead_letters SET dead_lettered_at = 1000 + id")
        return [row[0] for row in other.execute("SELECT id FROM dead_letters ORDER BY id")]


async def test_cli_list_and_get(spool: Spool) -> None:
    ids = await _dead_lettered(spool, [ev(1), ev(2), ev(3)], ["rejected", "expired", "rejected"])
    with cli(spool.path.parent) as conn:
        everything = list_dead_letters(conn)
        assert [d.id for d in everything] == ids
        assert [d.event for d in everything] == [ev(1), ev(2), ev(3)]
        assert [d.id for d in list_dead_letters(conn, since=1000 + ids[1])] == ids[1:]
        assert [d.id for d in list_dead_letters(conn, reason="rejected")] == [ids[0], ids[2]]
        assert [d.id for d in list_dead_letters(conn, since=1000 + ids[1], reason="rejected")] == [
            ids[2]
        ]
        assert [d.id for d in list_dead_letters(conn, limit=2)] == ids[:2]
        got = get_dead_letter(conn, ids[1])
        assert isinstance(got, DeadLetter)
        assert got == everything[1]
        assert got.dead_lettered_at == 1000 + ids[1]
        assert get_dead_letter(conn, 999_999) is None


async def test_cli_replay_and_refresh(spool: Spool) -> None:
    await spool.append([ev(0)])
    ids = await _dead_lettered(spool, [ev(1), ev(2), ev(3)], ["rejected"] * 3)
    max_before = spool.max_seq
    with cli(spool.path.parent) as conn:
        seen: list[int] = []
        assert replay_dead_letters(conn, [ids[0], ids[2], 424242], progress=seen.append) == 2
        assert seen == [2]
        assert [d.id for d in list_dead_letters(conn)] == [ids[1]]
    assert await spool.refresh() == 2
    assert spool.added_after == max_before
    # One row for what one chunk of the replay moved.
    assert (spool.depth, spool.dead_letters, spool.max_seq) == (3, 1, max_before + ROW_EVENTS)
    rows = await spool.read_after(max_before, 10)
    assert [row.event for row in rows] == [ev(1), ev(3)]  # the same events, same event_ids
    assert all(row.seq > max_before for row in rows)
    assert await spool.refresh() == 0

    with cli(spool.path.parent) as conn:
        seen = []
        assert replay_dead_letters(conn, None, progress=seen.append, chunk=1) == 1
        assert seen == [1]
        assert list_dead_letters(conn) == []
    assert await spool.refresh() == 1
    assert spool.dead_letters == 0


async def test_replayed_rows_below_our_own_new_seqs_are_counted(spool: Spool) -> None:
    [first] = await spool.append([ev(1)])
    await _dead_lettered(spool, [ev(2), ev(3)], ["expired"] * 2)
    known = spool.max_seq
    with cli(spool.path.parent) as conn:
        assert replay_dead_letters(conn, None) == 2
    # The daemon appends before it refreshes: its new seq lands above the replayed ones.
    [mine] = await spool.append([ev(4)])
    assert row_of(mine) == row_of(known) + 2  # the replay's chunk took one row
    assert spool.depth == 4  # counted at once
    assert await spool.refresh() == 2
    assert spool.added_after == known
    rows = await spool.read_after(spool.added_after, 10)
    assert [row.event for row in rows] == [ev(2), ev(3), ev(4)]
    assert first < known


async def test_cli_purge_in_chunks(spool: Spool) -> None:
    ids = await _dead_lettered(spool, [ev(i) for i in range(1, 6)], ["rejected"] * 5)
    with cli(spool.path.parent) as conn:
        seen: list[int] = []
        assert purge_dead_letters(conn, 1000 + ids[3], seen.append, chunk=2) == 3
        assert seen == [2, 3]
        assert [d.id for d in list_dead_letters(conn)] == ids[3:]
        assert purge_dead_letters(conn, 0) == 0
    await spool.refresh()
    assert spool.dead_letters == 2


async def test_cli_stats(spool: Spool) -> None:
    seqs = await spool.append([ev(1), ev(2), ev(3)])
    await spool.remove(seqs[:1])
    await _dead_lettered(spool, [ev(4), ev(5), ev(6)], ["rejected", "expired", "rejected"])
    with cli(spool.path.parent) as conn:
        stats = spool_stats(conn)
    assert stats["path"] == str(spool.path.resolve())
    assert stats["events"] == spool.depth == 2
    assert stats["bytes"] == spool.bytes
    assert stats["oldest_accepted_at"] == ev(1).accepted_at  # the oldest row's
    assert stats["rows"] == 1
    assert stats["max_seq"] == spool.max_seq
    assert stats["schema_version"] == SCHEMA_VERSION
    assert stats["dead_letters"] == {"expired": 1, "rejected": 2}
    assert stats["file_bytes"] >= (spool.path.stat().st_size)
    json.dumps(stats)


def test_cli_open_fails_without_touching_the_file(tmp_path: Path) -> None:
    with pytest.raises(SpoolError, match="no spool"):
        open_readonly_or_fail(tmp_path)
    junk = os.urandom(4096)
    (tmp_path / SPOOL_FILE).write_bytes(junk)
    with pytest.raises(SpoolError, match="damaged"):
        open_readonly_or_fail(tmp_path)
    assert (tmp_path / SPOOL_FILE).read_bytes() == junk
    assert sorted(p.name for p in tmp_path.iterdir()) == [SPOOL_FILE]
    (tmp_path / SPOOL_FILE).unlink()
    with closing(connect(tmp_path / SPOOL_FILE)) as other:
        other.execute("PRAGMA application_id = 7")
        other.execute("CREATE TABLE t (x)")
    with pytest.raises(SpoolError, match="foreign"):
        open_readonly_or_fail(tmp_path)


async def test_spool_works_while_the_cli_reads_and_writes(spool: Spool) -> None:
    seqs = await spool.append([ev(i) for i in range(10)])
    with cli(spool.path.parent) as conn:
        conn.execute("BEGIN")
        assert len(spooled_events(conn)) == 10
        # A reader holds a snapshot; the daemon still commits.
        await spool.append([ev(i) for i in range(10, 20)])
        await spool.remove(seqs[:5])
        assert len(spooled_events(conn)) == 10
        assert list_dead_letters(conn) == []
        conn.execute("COMMIT")
        assert len(spooled_events(conn)) == 15

        # A writer holds the lock for a moment: the append waits in the thread, not the loop.
        conn.execute("BEGIN IMMEDIATE")
        loop = asyncio.get_running_loop()
        loop.call_later(0.1, conn.execute, "COMMIT")
        append = asyncio.create_task(spool.append([ev(99)]))
        ticks = 0
        while not append.done():
            await asyncio.sleep(0.01)
            ticks += 1
        assert ticks >= 5  # the loop kept running meanwhile
        assert len(append.result()) == 1
    assert spool.depth == 16


async def test_a_failed_commit_fails_its_callers_and_the_spool_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = await Spool.open(tmp_path, max_bytes=2 * size_of(ev(1)))
    try:

        def broken(ops: object) -> object:
            raise sqlite3.OperationalError("disk I/O error")

        monkeypatch.setattr(spool, "_commit", broken)
        results = await asyncio.gather(
            spool.append([ev(1)]), spool.append([ev(2)]), return_exceptions=True
        )
        assert all(isinstance(r, SpoolError) for r in results)
        assert "disk I/O error" in str(results[0])
        monkeypatch.undo()
        # Nothing was stored, and the failed appends hold no room any more.
        assert await spool.append([ev(3), ev(4)]) == [1 << ROW_BITS, (1 << ROW_BITS) + 1]
    finally:
        await spool.close()


async def test_a_row_is_settled_event_by_event_and_goes_with_its_last(spool: Spool) -> None:
    events = [ev(i) for i in range(50)]
    seqs = await spool.append(events)
    order = seqs[25:] + seqs[:25]
    for n, seq in enumerate(order[:-1], start=1):
        await spool.remove([seq, seq, order[0]])  # repeats, in one call and across calls
        assert spool.depth == 50 - n
    assert [row.seq for row in await spool.read_after(0, 100)] == [order[-1]]
    with cli(spool.path.parent) as conn:
        assert conn.execute("SELECT count(*) FROM settled").fetchone()[0] == 49
    await spool.remove([order[-1]])
    assert (spool.depth, spool.bytes, spool.oldest_accepted_at) == (0, 0, None)
    with cli(spool.path.parent) as conn:
        assert conn.execute("SELECT count(*) FROM settled").fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM batches").fetchone()[0] == 0
