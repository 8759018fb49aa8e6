"""The bounded queue and the pending file."""

from __future__ import annotations

from pathlib import Path

from forwarder.events import Event
from forwarder.queue import EventQueue, load_pending, remove_pending, save_pending


def event(n: int) -> Event:
    return Event(event_id=f"evt-{n:010d}", recipient_id=str(n), name="SIGNUP", data='{"a":1}')


async def test_admission_is_all_or_nothing() -> None:
    queue = EventQueue(3)
    assert queue.offer([event(1), event(2)])
    assert not queue.offer([event(3), event(4)])
    assert len(queue) == 2
    assert queue.free == 1
    assert queue.offer([event(3)])
    assert not queue.offer([event(4)])
    assert [e.event_id for e in queue.take_all()] == [event(n).event_id for n in (1, 2, 3)]


async def test_restore_may_exceed_the_bound_and_keeps_order() -> None:
    queue = EventQueue(1)
    assert queue.restore([event(n) for n in range(3)]) == 3
    assert len(queue) == 3
    assert not queue.offer([event(9)])
    assert (await queue.get()).event_id == event(0).event_id


def test_pending_round_trip_appends_and_keeps_damaged_lines(tmp_path: Path) -> None:
    save_pending(tmp_path, [event(1), event(2)])
    save_pending(tmp_path, [event(3)])  # appends: an unconsumed file is never overwritten
    with (tmp_path / "pending.jsonl").open("a") as handle:
        handle.write('{"torn": \n')
    loaded = load_pending(tmp_path)
    assert loaded.events == [event(1), event(2), event(3)]
    assert loaded.damaged_lines == 1
    assert (tmp_path / "pending.rejected.jsonl").read_text() == '{"torn": \n'
    assert oct((tmp_path / "pending.jsonl").stat().st_mode & 0o777) == "0o600"
    remove_pending(tmp_path)
    assert load_pending(tmp_path).events == []
