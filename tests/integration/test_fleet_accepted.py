"""The numbers a fleet host answered, kept across its restarts (fleet/accepted.py): saved while
they change and at the stop, read back without what is past the retention, a damaged file
ignored with a warning."""

from __future__ import annotations

import os
from pathlib import Path

import structlog

from forwarder.events import Event
from forwarder.fleet import accepted
from forwarder.fleet.accepted import AcceptedSaver
from forwarder.storage.eventstatus import StatusBook


class Clock:
    now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def event(n: int, at: float) -> Event:
    e = Event(f"evt-acc-{n:06d}", f"r{n}", "SIGNUP", accepted_at=at, account="acme")
    e.number = 16_777_216 + n
    return e


async def test_a_restarted_host_finds_the_numbers_it_answered(tmp_path: Path) -> None:
    clock = Clock()
    before = StatusBook(retention_s=100.0, max_count=3, clock=clock)
    saver = AcceptedSaver(before, tmp_path / accepted.FILE_NAME, every_s=3600)
    saver.start()
    before.accepted([event(n, clock.now - 125 + 10 * n) for n in range(5)])  # 3 kept
    await saver.stop()
    assert os.stat(saver.path).st_mode & 0o777 == 0o600
    rows = accepted.load(saver.path)
    assert [r[0] for r in rows] == ["evt-acc-000002", "evt-acc-000003", "evt-acc-000004"]

    after = StatusBook(retention_s=100.0, max_count=3, clock=clock)
    # Accepted 105 s ago: past the retention, not brought back; the two younger are.
    assert after.restore_accepted(rows) == 2
    assert after.accepted_rows() == rows[1:]
    assert after._accepted_numbers[16_777_216 + 4] == "evt-acc-000004"


async def test_the_map_is_saved_only_when_it_changed(tmp_path: Path) -> None:
    status = StatusBook(retention_s=100.0, max_count=10, clock=Clock())
    saver = AcceptedSaver(status, tmp_path / accepted.FILE_NAME)
    await saver.save_if_changed()
    assert not saver.path.exists()  # nothing accepted: nothing written
    status.accepted([event(1, Clock.now)])
    await saver.save_if_changed()
    first = saver.path.stat().st_mtime_ns
    await saver.save_if_changed()
    assert saver.path.stat().st_mtime_ns == first


def test_a_damaged_or_missing_file_is_an_empty_map(tmp_path: Path) -> None:
    path = tmp_path / accepted.FILE_NAME
    assert accepted.load(path) == []
    path.write_bytes(b'[["evt-1", 5, "acme"]]')  # a row of three: not the saved map
    with structlog.testing.capture_logs() as logs:
        assert accepted.load(path) == []
    assert [line["event"] for line in logs] == ["fleet_accepted_unreadable"]
