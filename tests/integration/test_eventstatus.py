"""GET /v1/events/{id}: the StatusBook, outcomes in the spool, intake's answers (15.1, 15.4)."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from forwarder.delivery.deadletter import DeadLetterNote
from forwarder.events import Event
from forwarder.storage.eventstatus import Outcome, StatusBook, StatusUnavailable, parse_key
from forwarder.storage.queue import EventQueue
from forwarder.storage.sqlite import outcomes as outcomestore
from forwarder.storage.sqlite.file import ROW_BITS, SCHEMA_VERSION, SPOOL_FILE
from forwarder.storage.sqlite.opening import open_readonly_or_fail
from forwarder.storage.sqlite.spool import Spool
from tests.conftest import ServeIntake, intake_state


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


class Tally:
    def __init__(self, attempts: int = 0, next_at: float | None = None) -> None:
        self.attempts = attempts
        self.next_at = next_at


def ev(i: int, number: int = 0) -> Event:
    event = Event(f"evt-{i:08d}", f"r{i}", "SIGNUP", accepted_at=1_700_000_000.0)
    event.number = number
    return event


def delivered(event: Event, at: float, remote_id: object = 266) -> Outcome:
    return Outcome("delivered", event.event_id, event.number, "", 1, at, remote_id)


def book(clock: Clock, *, max_count: int = 10, spool: Spool | None = None) -> StatusBook:
    status = StatusBook(retention_s=100.0, max_count=max_count, clock=clock)
    status.spool = spool  # the durable backend's choice: outcomes kept in the spool too
    return status


def test_parse_key() -> None:
    assert parse_key("266") == 266
    assert parse_key("evt-00000001") == "evt-00000001"
    assert parse_key("short") is None  # not a number, not a valid event_id
    assert parse_key("1" * 17) == "1" * 17  # past 2**53: only an event_id
    assert parse_key("١٢٣٤٥") is None  # digits, but not ASCII ones


async def test_queued_in_delivery_delivered_forgotten() -> None:
    clock = Clock()
    status = book(clock)
    queue = EventQueue(10)
    status.queue = queue
    event = ev(1, number=7)
    assert queue.admit([event]) == ""
    assert await status.lookup(7) == {"event_id": event.event_id, "number": 7,
                                      "status": "queued", "account": ""}  # fmt: skip
    assert (await status.lookup(event.event_id) or {})["status"] == "queued"
    assert await status.lookup(8) is None

    taken = await queue.get("")
    tally = Tally()
    status.delivering(taken, tally)
    assert (await status.lookup(7) or {})["status"] == "queued"  # taken, not attempted yet
    tally.attempts, tally.next_at = 2, clock.now + 1.5
    found = await status.lookup(7)
    assert found == {
        "event_id": event.event_id, "number": 7, "status": "in_delivery", "account": "",
        "attempts": 2, "next_attempt_at": "2027-01-15T08:00:01.500Z",
    }  # fmt: skip

    queue.done(taken)
    status.settled(taken, 0, delivered(taken, clock.now))
    found = await status.lookup(event.event_id)
    assert found is not None
    assert (found["status"], found["remote_id"], found["attempts"]) == ("delivered", 266, 1)
    assert await status.lookup(7) == found

    # An event_id of digits is found as one when no event has that number.
    digits = Event("2026112601", "r", "SIGNUP")
    status.settled(digits, 0, delivered(digits, clock.now))
    assert (await status.lookup_text("2026112601") or {})["event_id"] == "2026112601"
    assert await status.lookup_text("no such") is None

    clock.now += 101  # past state.outcome_retention_s
    assert await status.lookup(7) is None
    assert status.kept == 2
    assert status.purge_memory() == 2
    assert status.kept == 0


async def test_memory_holds_at_most_max_count_outcomes() -> None:
    clock = Clock()
    status = book(clock, max_count=3)
    for i in range(1, 6):
        status.settled(ev(i, i), 0, delivered(ev(i, i), clock.now))
    assert status.kept == 3
    assert await status.lookup(2) is None  # the oldest went first
    assert (await status.lookup(5) or {})["status"] == "delivered"
    assert (await status.lookup(ev(3).event_id) or {})["number"] == 3


async def test_an_event_id_settled_again_is_kept_once_under_its_new_number_as_the_newest() -> None:
    clock = Clock()
    status = book(clock, max_count=2)
    status.settled(ev(1, 1), 0, delivered(ev(1, 1), clock.now, remote_id=1))
    status.settled(ev(2, 2), 0, delivered(ev(2, 2), clock.now))
    again = ev(1, 7)  # the app sent evt-00000001 again; it was numbered 7
    status.settled(again, 0, delivered(again, clock.now, remote_id=9))
    assert status.kept == 2
    assert await status.lookup(1) is None  # its old number no longer leads to it
    assert (await status.lookup(7) or {})["remote_id"] == 9
    status.settled(ev(3, 3), 0, delivered(ev(3, 3), clock.now))  # one must go: the oldest
    assert await status.lookup(2) is None
    assert (await status.lookup(again.event_id) or {})["number"] == 7


async def test_durable_outcomes_are_settled_with_the_event_and_found_in_the_spool(
    tmp_path: Path,
) -> None:
    clock = Clock()
    spool = await Spool.open(tmp_path)
    try:
        events = [ev(i) for i in range(1, 5)]
        one = await spool.append(events[:1])
        rest = await spool.append(events[1:])  # one row of three
        seqs = one + rest
        for event, seq in zip(events, seqs, strict=True):
            event.number = seq
        assert seqs[1:] == [rest[0], rest[0] + 1, rest[0] + 2]
        # Settled as the lanes do: the outcome goes with the row's removal / the dead letter.
        status = book(clock, spool=spool)
        status.settled(events[0], seqs[0], delivered(events[0], clock.now, remote_id=901))
        spool.remove_soon([seqs[0]], status.take_unsaved(events[0]))
        note = DeadLetterNote("rejected", 422, "recipient not found", 1, clock.now, clock.now)
        dead = Outcome(
            "dead_lettered", events[2].event_id, seqs[2], "", 1, clock.now, None, "rejected",
            422, "recipient not found",
        )  # fmt: skip
        status.settled(events[2], seqs[2], dead)
        spool.dead_letter_soon(seqs[2], events[2], note, status.take_unsaved(events[2]))
        await spool.remove([1 << 40])  # a commit after theirs

        # A fresh book (a restart): nothing in memory, everything from the spool.
        fresh = book(clock, spool=spool)
        found = await fresh.lookup(seqs[0])
        assert found is not None
        assert (found["status"], found["remote_id"]) == ("delivered", 901)
        assert await fresh.lookup(events[0].event_id) == found
        found = await fresh.lookup(events[2].event_id)
        assert found is not None
        assert (found["status"], found["reason"], found["remote_status"]) == (
            "dead_lettered", "rejected", 422,
        )  # fmt: skip
        assert found["error"] == "recipient not found"
        # Queued events on disk only (a backlog beyond the window): by number, by event_id.
        assert await fresh.lookup(seqs[1]) == {
            "event_id": events[1].event_id, "number": seqs[1], "status": "queued",
        }  # fmt: skip
        assert await fresh.lookup(events[3].event_id) == {
            "event_id": events[3].event_id, "number": seqs[3], "status": "queued",
        }  # fmt: skip
        assert await fresh.lookup(seqs[3] + 1) is None  # past the row's events
        assert await fresh.lookup((seqs[3] >> ROW_BITS) + 7 << ROW_BITS) is None

        clock.now += 101
        assert await fresh.lookup(seqs[0]) is None  # expired, even before the purge
        assert await fresh.purge() == 2
        assert await spool.query(outcomestore.outcome_by_number, seqs[0]) is None
    finally:
        await spool.close()


async def test_a_schema_3_spool_gains_the_outcomes_table(tmp_path: Path) -> None:
    spool = await Spool.open(tmp_path)
    [seq] = await spool.append([ev(1)])
    await spool.close()
    with closing(sqlite3.connect(tmp_path / SPOOL_FILE)) as conn:
        conn.execute("DROP TABLE outcomes")
        conn.execute("PRAGMA user_version=3")
        conn.commit()
    with pytest.raises(Exception, match="older forwarder"):
        open_readonly_or_fail(tmp_path)  # the CLI never upgrades
    spool = await Spool.open(tmp_path)
    try:
        assert spool.moved_aside is None
        assert [row.seq for row in await spool.read_after(0, 10)] == [seq]
        assert await spool.query(outcomestore.outcome_by_number, seq) is None
    finally:
        await spool.close()
    with closing(sqlite3.connect(tmp_path / SPOOL_FILE)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4
        assert conn.execute("SELECT count(*) FROM outcomes").fetchone()[0] == 0


async def test_lift_seq_puts_positions_above_a_number(tmp_path: Path) -> None:
    spool = await Spool.open(tmp_path)
    try:
        await spool.lift_seq(5_000_000)
        assert spool.max_seq >= 5_000_000
        [seq] = await spool.append([ev(1)])
        assert seq > 5_000_000
    finally:
        await spool.close()


# --- intake ------------------------------------------------------------------------------------


async def _post(client: Any, body: str, ctype: str = "application/x-www-form-urlencoded") -> Any:
    return await client.post(
        "/v1/recipientEvents/create", data=body, headers={"Content-Type": ctype}
    )


async def test_the_drop_in_answers_like_the_remote(serve_intake: ServeIntake) -> None:
    state = intake_state(drop_in_answer="remote", max_events=2)
    client = await serve_intake(state)
    numbers = []
    for n in range(2):
        response = await _post(client, f"recipient_id={n}&name=SIGNUP")
        assert response.status == 200
        body = await response.json()
        assert set(body) == {"success", "data"}
        assert body["success"] is True
        assert type(body["data"]) is int
        numbers.append(body["data"])
        event_id = response.headers["X-Forwarder-Event-Id"]
        assert response.headers["Location"] == f"/v1/events/{event_id}"
    assert numbers == [1, 2]
    queued = state.queue.take_all()
    assert [e.number for e in queued] == numbers
    state.queue.admit(queued)

    # The remote's error shape, with the statuses its clients expect.
    response = await _post(client, "name=SIGNUP")
    assert response.status == 400
    body = await response.json()
    assert (body["success"], "recipient_id" in body["error"]) == (False, True)
    response = await _post(client, "x", "text/plain")
    assert response.status == 400  # 415 in the "accepted" mode
    assert (await response.json())["success"] is False
    response = await _post(client, "recipient_id=9&name=SIGNUP")
    assert response.status == 503  # full
    assert response.headers["Retry-After"]
    assert (await response.json())["success"] is False

    # Its number and its event_id both look it up.
    response = await client.get(f"/v1/events/{numbers[1]}")
    assert response.status == 200
    data = (await response.json())["data"]
    assert (data["status"], data["number"]) == ("queued", numbers[1])
    response = await client.get(f"/v1/events/{data['event_id']}")
    assert (await response.json())["data"] == data
    response = await client.get("/v1/events/99")
    assert response.status == 404
    assert (await response.json())["reason"] == "unknown_event"
    response = await client.get("/v1/events/no%20such")
    assert response.status == 400
    assert "event number" in (await response.json())["error"]


async def test_the_accepted_answer_is_kept(serve_intake: ServeIntake) -> None:
    client = await serve_intake(intake_state(drop_in_answer="accepted"))
    response = await _post(client, "recipient_id=1&name=SIGNUP")
    assert response.status == 202
    data = (await response.json())["data"]
    assert data["status"] == "queued"
    assert "X-Forwarder-Event-Id" not in response.headers
    response = await _post(client, "x", "text/plain")
    assert response.status == 415


async def test_a_spool_that_cannot_be_read_is_a_503_not_a_500(
    serve_intake: ServeIntake, tmp_path: Path
) -> None:
    state = intake_state(drop_in_answer="remote")
    assert state.status is not None
    state.status.spool = await Spool.open(tmp_path)
    await state.status.spool.close()
    client = await serve_intake(state)
    response = await client.get("/v1/events/12345")
    assert response.status == 503
    assert (await response.json())["reason"] == "spool_error"


class Shared:
    """A fleet's outcomes in Redis, as the book sees them (fleet/outcomes.py is tested on a
    real server in test_fleet_outcomes.py)."""

    def __init__(self) -> None:
        self.rows: dict[str, Any] = {}
        self.asked: list[tuple[str, str | None]] = []
        self.down = False

    async def find(self, event_id: str, account: str | None) -> Any:
        self.asked.append((event_id, account))
        if self.down:
            raise StatusUnavailable("redis outcomes: ConnectionError")
        return self.rows.get(event_id)


def fleet_book(clock: Clock, max_count: int = 10) -> tuple[StatusBook, Shared]:
    status = StatusBook(retention_s=100.0, max_count=max_count, clock=clock)
    shared = Shared()
    status.shared = shared
    return status, shared


async def test_a_fleet_host_answers_for_what_it_accepted_and_another_host_delivered() -> None:
    clock = Clock()
    status, shared = fleet_book(clock)
    mine = ev(1, number=16777217)
    mine.account = "acme"
    status.accepted([mine])
    # Not settled by any host yet: queued, with this host's number, asked in its account only.
    assert await status.lookup(16777217) == {
        "event_id": mine.event_id, "number": 16777217, "status": "queued", "account": "acme",
    }  # fmt: skip
    assert shared.asked == [(mine.event_id, "acme")]
    # Another host delivered it: its outcome (written without a number) gets ours back.
    shared.rows[mine.event_id] = Outcome(
        "delivered", mine.event_id, 0, "acme", 2, clock.now, 4711
    ).row()
    found = await status.lookup(16777217)
    assert found is not None
    assert (found["status"], found["number"], found["remote_id"]) == ("delivered", 16777217, 4711)
    assert (await status.lookup(mine.event_id) or {})["number"] == 16777217
    # Accepted elsewhere: found by event_id (every account asked), unknown by a number.
    shared.rows["evt-elsewhere"] = Outcome(
        "delivered", "evt-elsewhere", 0, "a", 1, clock.now, 9
    ).row()
    assert (await status.lookup("evt-elsewhere") or {})["remote_id"] == 9
    assert shared.asked[-1] == ("evt-elsewhere", None)
    assert await status.lookup(99) is None
    assert await status.lookup("evt-nowhere") is None
    # Past the retention: forgotten, as the spool's are.
    clock.now += 101
    assert await status.lookup("evt-elsewhere") is None


async def test_a_fleet_host_remembers_at_most_max_count_accepted_events() -> None:
    status, _ = fleet_book(Clock(), max_count=3)
    events = [ev(i, number=100 + i) for i in range(5)]
    status.accepted(events)
    assert await status.lookup(100) is None  # pushed out: its number is not known any more
    assert (await status.lookup(104) or {})["status"] == "queued"


async def test_a_fleet_look_up_without_redis_is_unavailable_not_unknown() -> None:
    clock = Clock()
    status, shared = fleet_book(clock)
    status.accepted([ev(1, number=5)])
    shared.down = True
    with pytest.raises(StatusUnavailable):
        await status.lookup(5)
    with pytest.raises(StatusUnavailable):
        await status.lookup("evt-elsewhere")
    # What this host settled itself is answered without Redis.
    status.settled(ev(2), 7, delivered(ev(2), clock.now))
    assert (await status.lookup("evt-00000002") or {})["status"] == "delivered"
    assert shared.asked[-1] == ("evt-elsewhere", None)
