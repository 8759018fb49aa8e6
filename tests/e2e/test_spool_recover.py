"""A damaged spool: what SQLite can still read of it is recovered, the rest is counted.

The issue's case first (300 events in durable mode, a clean stop, the last page of spool.db cut
off: every readable event is delivered after the restart, the others are counted), then the
reader against pages lost in the middle, settled events, dead letters and rows that are not
events, and the `forwarder spool inspect|recover` commands.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
from collections.abc import Awaitable, Callable
from contextlib import closing
from pathlib import Path

import aiohttp
import pytest
import structlog

from forwarder.cli.main import main
from forwarder.cli.spooldb import list_dead_letters, spool_stats, spooled_events
from forwarder.delivery.deadletter import DeadLetterNote
from forwarder.events import Event
from forwarder.ops.statedir import StateLock
from forwarder.storage.sqlite.file import PAGE_SIZE, SPOOL_FILE
from forwarder.storage.sqlite.opening import open_readonly_or_fail
from forwarder.storage.sqlite.recover import salvage
from forwarder.storage.sqlite.spool import Spool
from tests.conftest import DaemonProc, MockProc, write_config

StartMock = Callable[..., Awaitable[MockProc]]
StartDaemon = Callable[..., Awaitable[DaemonProc]]


def ev(i: int) -> Event:
    return Event(
        event_id=f"evt-{i:08d}",
        recipient_id="r1",
        name="signup",
        value=str(i),
        data='{"pad":"' + "x" * 200 + '"}',
        accepted_at=1_700_000_000.0 + i,
        account="default",
    )


async def _spool_of(state: Path, count: int) -> None:
    """A spool of `count` one-event rows (one request each, as single posts make them)."""
    spool = await Spool.open(state)
    try:
        # Concurrent appends share commits, and each still gets its own row, in this order.
        await asyncio.gather(*(spool.append([ev(i)]) for i in range(count)))
    finally:
        await spool.close()


def _cut_last_page(path: Path) -> None:
    size = path.stat().st_size
    assert size % PAGE_SIZE == 0
    assert size > 4 * PAGE_SIZE
    os.truncate(path, size - PAGE_SIZE)


def _leaf_pages(path: Path, table: str) -> list[int]:
    with closing(sqlite3.connect(path)) as conn:
        return [
            page
            for (page,) in conn.execute(
                "SELECT pageno FROM dbstat WHERE name = ? AND pagetype = 'leaf' ORDER BY pageno",
                (table,),
            )
        ]


def _zero_page(path: Path, page: int) -> None:
    with path.open("r+b") as handle:
        handle.seek((page - 1) * PAGE_SIZE)
        handle.write(bytes(PAGE_SIZE))


def _ids(events: list[Event]) -> list[str]:
    return [e.event_id for e in events]


async def test_a_cut_off_last_page_keeps_every_row_sqlite_can_read(tmp_path: Path) -> None:
    await _spool_of(tmp_path, 300)
    _cut_last_page(tmp_path / SPOOL_FILE)
    spool = await Spool.open(tmp_path)
    try:
        assert spool.moved_aside is not None
        recovery = spool.recovery
        assert recovery is not None
        assert recovery.problem is None
        readable = recovery.rows
        # The lost page held the newest rows: the rest, most of them, are back, in order.
        assert 250 <= readable < 300
        assert recovery.events == readable
        assert recovery.rows_lost_at_most == 300 - readable  # nothing unaccounted for
        assert recovery.skipped == {"batches": [[readable + 1, None]]}
        assert not recovery.complete
        assert spool.depth == readable
        got = await spool.read_after(0, 1000)
        assert _ids([s.event for s in got]) == [f"evt-{i:08d}" for i in range(readable)]
        assert got[7].event == ev(7)
    finally:
        await spool.close()


async def test_a_lost_page_in_the_middle_is_skipped_and_what_follows_is_read(
    tmp_path: Path,
) -> None:
    await _spool_of(tmp_path, 300)
    path = tmp_path / SPOOL_FILE
    leaves = _leaf_pages(path, "batches")
    assert len(leaves) >= 4
    _zero_page(path, leaves[1])
    moved = tmp_path / "aside.db"
    path.rename(moved)
    seen: list[Event] = []

    def rows_to(rows: list[tuple[tuple[int, float, int, bytes], list[int]]]) -> None:
        for (_count, _at, _size, body), _done in rows:
            entry = json.loads(body)[0]
            seen.append(ev(int(entry[3])))

    recovery = salvage(moved, rows_to, lambda dead: None)
    (gap,) = recovery.skipped["batches"]
    first, last = gap
    assert first is not None
    assert last is not None
    expected = [i for i in range(300) if not first <= i + 1 <= last]
    assert _ids(seen) == [f"evt-{i:08d}" for i in expected]
    assert recovery.rows == len(expected)
    assert recovery.rows_lost_at_most == 300 - len(expected)
    assert 0 < recovery.rows_lost_at_most < 100


async def test_settled_events_dead_letters_and_undecodable_rows_are_kept_apart(
    tmp_path: Path,
) -> None:
    spool = await Spool.open(tmp_path)
    seqs = await spool.append([ev(i) for i in range(5)])  # one row of five
    await spool.remove([seqs[1]])
    await spool.settle_dead(seqs[2], ev(2), DeadLetterNote("rejected", 400, "no", 1, 1.0, 2.0))
    await asyncio.gather(*(spool.append([ev(i)]) for i in range(5, 300)))
    await spool.close()
    path = tmp_path / SPOOL_FILE
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute("UPDATE batches SET body = x'6e6f7065' WHERE seq = 3")  # not JSON
    _cut_last_page(path)
    with structlog.testing.capture_logs():
        spool = await Spool.open(tmp_path)
    try:
        recovery = spool.recovery
        assert recovery is not None
        assert recovery.settled == 2
        assert recovery.dead_letters == 1
        assert recovery.undecodable_rows == 1
        got = await spool.read_after(0, 1000)
        ids = _ids([s.event for s in got])
        # Settled ones stay settled; the undecodable row became a dead letter (damaged).
        assert ids[:4] == [ev(0).event_id, ev(3).event_id, ev(4).event_id, ev(5).event_id]
        assert ev(6).event_id not in ids  # the row that is no event
        assert len(ids) == recovery.events
    finally:
        await spool.close()
    with closing(open_readonly_or_fail(tmp_path)) as conn:
        letters = list_dead_letters(conn)
    assert [(d.reason, d.event.event_id) for d in letters] == [
        ("rejected", ev(2).event_id),
        ("damaged", ""),
    ]


async def test_a_file_that_is_not_readable_at_all_is_reported(tmp_path: Path) -> None:
    (tmp_path / SPOOL_FILE).write_bytes(b"not a database" * 1000)
    spool = await Spool.open(tmp_path)
    try:
        assert spool.recovery is not None
        assert spool.recovery.problem is not None
        assert spool.recovery.rows == 0
        assert not spool.recovery.complete
    finally:
        await spool.close()


async def test_inspect_changes_nothing_and_recover_respects_the_lock(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old = tmp_path / "old"
    old.mkdir()
    await _spool_of(old, 300)
    damaged = old / SPOOL_FILE
    _cut_last_page(damaged)
    before = damaged.read_bytes()
    assert main(["spool", "inspect", str(damaged), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    readable = report["rows"]
    assert 250 <= readable < 300
    assert report["rows_lost_at_most"] == 300 - readable
    assert main(["spool", "inspect", str(damaged), "--events"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["event_id"] for line in lines] == [
        f"evt-{i:08d}" for i in range(readable)
    ]
    assert damaged.read_bytes() == before
    assert sorted(p.name for p in old.iterdir()) == [SPOOL_FILE]  # no -wal, -shm made

    state = tmp_path / "state"
    config = tmp_path / "f.toml"
    write_config(config, {"state": {"dir": str(state)}})
    await _spool_of(state, 2)  # the live spool already holds two events
    lock = StateLock.acquire(state, "forwarder run")
    try:
        assert main(["spool", "recover", str(damaged), "--config", str(config)]) == 1
        err = capsys.readouterr().err
        assert f"PID {os.getpid()} (forwarder run) holds the lock" in err
    finally:
        lock.release()
    assert main(["spool", "recover", str(damaged), "--config", str(config)]) == 0
    assert f"rows readable:      {readable}" in capsys.readouterr().out
    with closing(open_readonly_or_fail(state)) as conn:
        events = spooled_events(conn)
        assert spool_stats(conn)["events"] == 2 + readable
    # After what the spool held, in their order.
    assert _ids(events) == [f"evt-{i:08d}" for i in (0, 1, *range(readable))]
    assert damaged.read_bytes() == before
    # `dlq replay` works beside a daemon: it only reads the lock file, to say who sends them.
    assert main(["dlq", "replay", "--all", "--config", str(config)]) == 0
    assert f"no forwarder runs on {state} now: the next start sends them" in (
        capsys.readouterr().out
    )


async def test_the_issue_case_end_to_end(
    mock_remote: StartMock, daemon: StartDaemon, short_tmp: Path
) -> None:
    """300 events accepted in durable mode, a clean stop, the last page cut: all readable ones
    are delivered after the restart, and the log accounts for the rest."""
    down = await daemon(  # nothing listens at the remote's address: every event stays
        "http://127.0.0.1:9/v1", queue={"mode": "durable"}, shutdown={"timeout_s": 0.2}
    )
    sem = asyncio.Semaphore(16)
    async with aiohttp.ClientSession(base_url=down.url) as http:

        async def post(i: int) -> None:
            async with sem:
                form = {"recipient_id": f"r{i}", "name": "SIGNUP", "event_id": f"issue-{i:05d}"}
                async with http.post("/v1/recipientEvents/create", data=form) as response:
                    assert response.status == 202

        await asyncio.gather(*(post(i) for i in range(300)))
    assert await down.stop() == 0
    _cut_last_page(down.state_dir / SPOOL_FILE)

    remote = await mock_remote()
    up = await daemon(remote.base_url, state_dir=down.state_dir, queue={"mode": "durable"})
    (recovered,) = up.proc.events("spool_recovered")
    readable, lost = recovered["rows"], recovered["rows_lost_at_most"]
    # The cut page held the newest rows (a leaf of 16 kB holds about 130 such small ones): they
    # are gone from the file; every other row is delivered, and the lost ones are counted.
    assert readable >= 100
    assert lost > 0
    assert readable + lost == 300
    assert recovered["level"] == "error"
    assert "forwarder spool inspect" in recovered["action"]
    for _ in range(200):
        created = (await remote.record())["events"]
        if len(created) >= readable:
            break
        await asyncio.sleep(0.05)
    created_ids = {e["idempotency_key"] for e in created}
    assert len(created) == readable == len(created_ids)
    assert created_ids <= {f"issue-{i:05d}" for i in range(300)}
    await up.stop()
    with closing(open_readonly_or_fail(up.state_dir)) as conn:
        stats = spool_stats(conn)
    assert stats["events"] == 0
    assert stats["dead_letters_total"] == 0


async def test_recover_never_follows_a_link_at_the_live_spools_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old = tmp_path / "old"
    old.mkdir()
    await _spool_of(old, 300)
    _cut_last_page(old / SPOOL_FILE)
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    target = tmp_path / "made-through-a-link.db"
    (state / SPOOL_FILE).symlink_to(target)  # dangling: SQLite would create the target
    config = tmp_path / "f.toml"
    write_config(config, {"state": {"dir": str(state)}})
    assert main(["spool", "recover", str(old / SPOOL_FILE), "--config", str(config)]) == 1
    assert "is a symbolic link" in capsys.readouterr().err
    assert not target.exists()


async def test_a_recovery_cut_short_by_a_crash_is_redone_or_completed(tmp_path: Path) -> None:
    # Cut before the swap: the damaged spool is still there, a half-built one beside it.
    await _spool_of(tmp_path, 300)
    _cut_last_page(tmp_path / SPOOL_FILE)
    half = tmp_path / (SPOOL_FILE + ".recovering")
    half.write_bytes(b"half-built")
    spool = await Spool.open(tmp_path)
    try:
        assert spool.recovery is not None
        readable = spool.recovery.rows
        assert readable >= 250
        assert spool.depth == readable  # redone once, not added to what was half done
    finally:
        await spool.close()
    assert not half.exists()

    # Cut between the renames: the damaged file is aside, the complete new one not yet in place.
    other = tmp_path / "other"
    other.mkdir()
    await _spool_of(other, 3)
    (other / SPOOL_FILE).rename(other / (SPOOL_FILE + ".recovering"))
    spool = await Spool.open(other)
    try:
        assert spool.moved_aside is None
        got = await spool.read_after(0, 10)
        assert _ids([s.event for s in got]) == _ids([ev(i) for i in range(3)])
    finally:
        await spool.close()
    assert sorted(p.name for p in other.iterdir()) == [SPOOL_FILE]


async def test_a_row_whose_body_is_lost_becomes_a_damaged_dead_letter(tmp_path: Path) -> None:
    spool = await Spool.open(tmp_path)
    await spool.append([ev(0)])
    await spool.append([ev(i) for i in range(1, 201)])  # one row of 200: over several pages
    await spool.append([ev(201)])
    await spool.close()
    path = tmp_path / SPOOL_FILE
    with closing(sqlite3.connect(path)) as conn:
        (overflow,) = conn.execute(
            "SELECT pageno FROM dbstat WHERE name = 'batches' AND pagetype = 'overflow'"
            " ORDER BY pageno LIMIT 1"
        ).fetchone()
    _zero_page(path, overflow)
    with structlog.testing.capture_logs():
        spool = await Spool.open(tmp_path)
    try:
        recovery = spool.recovery
        assert recovery is not None
        assert recovery.unreadable_bodies == 1
        assert recovery.rows == 2
        got = await spool.read_after(0, 1000)
        assert _ids([s.event for s in got]) == [ev(0).event_id, ev(201).event_id]
    finally:
        await spool.close()
    with closing(open_readonly_or_fail(tmp_path)) as conn:
        (letter,) = list_dead_letters(conn)
    assert letter.reason == "damaged"
    assert "its body is unreadable" in letter.error
    assert json.loads(letter.event.data)["damaged_spool_row"]["count"] == 200
