"""The bounded, account-aware queue (order per recipient) and the pending file."""

from __future__ import annotations

import asyncio
import sys
import tracemalloc
from collections import Counter
from dataclasses import replace
from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from forwarder.events import Event
from forwarder.storage.queue import (
    EVENT_OVERHEAD_BYTES,
    QUEUE_BYTES_FULL,
    QUEUE_FULL,
    TOO_LARGE,
    EventQueue,
    _Entry,
    _Recipient,
    _State,
    event_size,
)
from forwarder.storage.sqlite.upgrade import load_pending, remove_pending, save_pending


def event(n: int) -> Event:
    return Event(event_id=f"evt-{n:010d}", recipient_id=str(n), name="SIGNUP", data='{"a":1}')


def ev(name: str, recipient: str = "r1", account: str = "") -> Event:
    """An event whose event_id is `name`, so a failing assertion reads plainly."""
    return Event(event_id=name, recipient_id=recipient, name="SIGNUP", account=account)


def ids(events: list[Event]) -> list[str]:
    return [e.event_id for e in events]


async def settle() -> None:
    # Zero-time yields: lets tasks woken by the queue run; nothing here waits on a clock.
    for _ in range(3):
        await asyncio.sleep(0)


async def woken(task: asyncio.Task[Event]) -> Event:
    """The event a waiting get was woken with; fails at once (no hang) if it was not woken."""
    await settle()
    assert task.done(), "the waiting get was not woken"
    return task.result()


def take_and_done(queue: EventQueue, account: str, count: int) -> list[str]:
    """Take `count` events one by one, each done before the next (a lane with one worker)."""
    taken: list[str] = []

    async def run() -> None:
        for _ in range(count):
            got = await queue.get(account)
            taken.append(got.event_id)
            queue.done(got)

    # No event is waited for: every get finds one, so the coroutine never suspends.
    coro = run()
    with pytest.raises(StopIteration):
        coro.send(None)
    return taken


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
    assert queue.free == 0
    assert not queue.offer([event(9)])
    assert (await queue.get("")).event_id == event(0).event_id
    same_recipient = EventQueue(1)
    assert same_recipient.restore([ev("a1"), ev("a2"), ev("a3")]) == 3
    assert ids(same_recipient.take_all()) == ["a1", "a2", "a3"]


async def test_the_bound_counts_events_in_delivery() -> None:
    queue = EventQueue(2)
    assert queue.offer([ev("a1", "r1"), ev("b1", "r2")])
    got = await queue.get("")
    assert (len(queue), queue.in_delivery, queue.free) == (1, 1, 0)
    assert not queue.offer([ev("c1", "r3")])  # still in memory while it is being delivered
    queue.done(got)
    assert (len(queue), queue.in_delivery, queue.free) == (1, 0, 1)
    assert queue.offer([ev("c1", "r3")])
    queue.max_events = 5  # a reload may change it
    assert queue.free == 3


def sized(name: str, data_chars: int, recipient: str = "r1", account: str = "") -> Event:
    return Event(
        event_id=name, recipient_id=recipient, name="VIEW", data="d" * data_chars, account=account
    )


def test_event_size_is_the_text_plus_a_fixed_overhead() -> None:
    e = Event(
        event_id="evt-000001", recipient_id="r42", name="PURCHASE", value="24.99",
        data='{"a":1}', ref="camp-9", account="us",
    )  # fmt: skip
    assert event_size(e) == 10 + 3 + 8 + 5 + 7 + 6 + 2 + EVENT_OVERHEAD_BYTES


@pytest.mark.parametrize("char", ["\u00e9", "\u20ac", "\U0001f600"])
def test_event_size_counts_non_ascii_text_as_it_is_held_in_memory(char: str) -> None:
    # Latin-1, BMP and astral text: 1, 2 and 4 bytes a character in a str, and its UTF-8 copy
    # (2, 3 and 4 bytes) once orjson has encoded it (the spool, the save at a stop).
    wide = replace(sized("a1", 0), recipient_id=char * 255, value=char * 1024, data=char * 5000)
    size = event_size(wide)
    orjson.dumps(wide.to_dict())  # the UTF-8 copies are cached now
    held = sum(sys.getsizeof(text) for text in (wide.recipient_id, wide.value, wide.data))
    extra = size - event_size(sized("a1", 0))
    assert held - 8 <= extra <= held + 16  # every byte it holds, and hardly more


async def test_the_byte_count_gives_back_what_it_took_when_text_grows_its_utf8_copy() -> None:
    queue = EventQueue(100, max_bytes=0)
    texts = ["\u00e9" * 100, "\u20ac" * 100, "\U0001f600" * 100]
    events = [replace(sized(f"a{n}", 0, f"r{n}"), data=text) for n, text in enumerate(texts)]
    before = list(map(event_size, events))
    assert queue.admit(events[:2]) == ""
    assert queue.admit(events[2:]) == ""
    assert queue.bytes == sum(before)
    for event in events:
        orjson.dumps(event.data)  # as the spool or the save would, while they are queued
    # Their text takes more memory now, so event_size says more; what was added must still be
    # what is given back, or the count would drift below what the queue holds.
    assert all(event_size(e) > size for e, size in zip(events[:2], before, strict=False))
    got = await queue.get("")
    queue.done(got)
    assert queue.bytes == sum(before) - before[0]
    assert ids(queue.take_account("")) == ["a1", "a2"]
    assert queue.bytes == 0


async def test_the_byte_bound_refuses_what_does_not_fit_and_counts_events_in_delivery() -> None:
    one = event_size(sized("a1", 1000))
    queue = EventQueue(100, max_bytes=3 * one)
    assert queue.admit([sized("a1", 1000, "r1"), sized("b1", 1000, "r2")]) == ""
    assert queue.bytes == 2 * one
    assert queue.bytes_free == one
    # All or nothing: two more do not fit, so neither is queued.
    assert queue.admit([sized("c1", 1000, "r3"), sized("d1", 1000, "r4")]) == QUEUE_BYTES_FULL
    assert (len(queue), queue.bytes) == (2, 2 * one)
    assert queue.admit([sized("c1", 1000, "r3")]) == ""
    assert queue.admit([sized("tiny", 0, "r5")]) == QUEUE_BYTES_FULL
    got = await queue.get("")
    assert queue.bytes == 3 * one  # in delivery: still in memory
    assert not queue.offer([sized("tiny", 0, "r5")])
    queue.done(got)
    assert queue.bytes == 2 * one
    assert queue.offer([sized("tiny", 0, "r5")])


async def test_the_event_bound_is_reported_apart_from_the_byte_bound() -> None:
    queue = EventQueue(1, max_bytes=10 * event_size(sized("a1", 0)))
    assert queue.admit([sized("a1", 0)]) == ""
    assert queue.admit([sized("a2", 0)]) == QUEUE_FULL


async def test_events_larger_than_the_whole_bound_are_too_large_even_when_empty() -> None:
    queue = EventQueue(100, max_bytes=event_size(sized("a1", 100)))
    assert queue.admit([sized("a1", 101)]) == TOO_LARGE
    assert queue.admit([sized("a1", 60), sized("a2", 60, "r2")]) == TOO_LARGE
    assert queue.admit([sized("a1", 100)]) == ""
    assert queue.admit([sized("a2", 100, "r2")]) == QUEUE_BYTES_FULL  # it would fit when empty


async def test_take_account_and_take_all_give_bytes_back_and_restore_ignores_the_bound() -> None:
    one = event_size(sized("a1", 500, account="a"))
    queue = EventQueue(100, max_bytes=2 * one)
    restored = [sized(f"a{n}", 500, f"r{n}", "a") for n in range(3)] + [sized("b1", 500, "x1", "b")]
    assert queue.restore(restored) == 4
    assert queue.bytes == 4 * one
    assert queue.bytes_free == 0
    got = await queue.get("a")
    assert ids(queue.take_account("a")) == ["a1", "a2"]
    assert queue.bytes == 2 * one  # the one in delivery and b1
    queue.done(got)
    assert queue.bytes == one
    assert ids(queue.take_all()) == ["b1"]
    assert queue.bytes == 0
    queue.max_bytes = 0  # no byte bound
    assert queue.offer([sized(f"c{n}", 10_000, f"r{n}") for n in range(50)])


async def test_a_recipient_is_held_while_its_event_is_in_delivery() -> None:
    queue = EventQueue(10)
    assert queue.offer([ev("a1", "r1"), ev("a2", "r1"), ev("b1", "r2")])
    first = await queue.get("")
    assert first.event_id == "a1"
    # a2 waits for a1; the other recipient flows meanwhile.
    assert (await queue.get("")).event_id == "b1"
    waiter = asyncio.create_task(queue.get(""))
    await settle()
    assert not waiter.done()
    assert (len(queue), queue.depth(""), queue.in_delivery) == (1, 1, 2)
    queue.done(first)  # e.g. after its retries, delivered or dead-lettered
    assert (await woken(waiter)).event_id == "a2"


async def test_other_recipients_flow_while_one_is_retried() -> None:
    queue = EventQueue(10)
    assert queue.offer([ev("a1", "r1"), ev("a2", "r1"), ev("b1", "r2"), ev("c1", "r3")])
    stuck = await queue.get("")
    assert take_and_done(queue, "", 2) == ["b1", "c1"]
    assert ids(queue.take_all()) == ["a1", "a2"]
    assert stuck.event_id == "a1"


async def test_ready_recipients_are_served_round_robin() -> None:
    queue = EventQueue(10)
    chatty = [ev(f"a{n}", "r1") for n in range(1, 4)]
    assert queue.offer([*chatty, ev("b1", "r2"), ev("c1", "r3")])
    # r1 goes to the back of the line each time one of its events is done.
    assert take_and_done(queue, "", 5) == ["a1", "b1", "c1", "a2", "a3"]


async def test_unordered_is_fifo_per_account() -> None:
    queue = EventQueue(10, ordered=False)
    assert not queue.ordered
    assert queue.offer([ev("a1", "r1"), ev("a2", "r1"), ev("b1", "r2"), ev("x1", "r1", "x")])
    taken = [await queue.get("") for _ in range(3)]
    assert ids(taken) == ["a1", "a2", "b1"]  # no hold: two of r1 in delivery at once
    assert queue.in_delivery == 3
    assert (await queue.get("x")).event_id == "x1"


async def test_turning_ordering_off_releases_held_events() -> None:
    queue = EventQueue(10)
    assert queue.offer([ev("a1", "r1"), ev("a2", "r1"), ev("a3", "r1")])
    first = await queue.get("")
    waiter = asyncio.create_task(queue.get(""))
    await settle()
    assert not waiter.done()
    queue.set_ordered(False)
    assert (await woken(waiter)).event_id == "a2"
    assert (await queue.get("")).event_id == "a3"
    assert queue.in_delivery == 3
    queue.done(first)


async def test_turning_ordering_on_holds_busy_recipients() -> None:
    queue = EventQueue(10, ordered=False)
    assert queue.offer([ev("a1", "r1"), ev("a2", "r1"), ev("a3", "r1"), ev("b1", "r2")])
    a1 = await queue.get("")
    a2 = await queue.get("")
    queue.set_ordered(True)
    assert queue.ordered
    assert (await queue.get("")).event_id == "b1"
    waiter = asyncio.create_task(queue.get(""))
    await settle()
    queue.done(a1)
    await settle()
    assert not waiter.done()  # a2 of the same recipient is still in delivery
    queue.done(a2)
    assert (await woken(waiter)).event_id == "a3"


async def test_toggling_keeps_the_acceptance_order() -> None:
    queue = EventQueue(20)
    events = [ev("a1", "r1"), ev("b1", "r2"), ev("a2", "r1"), ev("c1", "r3"), ev("b2", "r2")]
    assert queue.offer(events)
    queue.set_ordered(False)
    queue.set_ordered(True)
    queue.set_ordered(False)
    assert take_and_done(queue, "", 2) == ["a1", "b1"]
    queue.set_ordered(True)
    assert ids(queue.take_all()) == ["a2", "c1", "b2"]


async def test_accounts_wait_independently() -> None:
    queue = EventQueue(10)
    lane_a = asyncio.create_task(queue.get("a"))
    await settle()
    assert queue.offer([ev("b1", account="b")])
    await settle()
    assert not lane_a.done()  # an event of "b" does not wake the lane of "a"
    assert (queue.depth("a"), queue.depth("b"), queue.accounts()) == (0, 1, {"b"})
    b1 = await queue.get("b")
    assert queue.accounts() == {"b"}  # in delivery still counts
    queue.done(b1)
    assert queue.accounts() == set()
    assert queue.offer([ev("a1", account="a")])
    assert (await woken(lane_a)).event_id == "a1"


async def test_concurrent_waiters_each_get_a_distinct_event() -> None:
    queue = EventQueue(10)
    waiters = [asyncio.create_task(queue.get("")) for _ in range(4)]
    await settle()
    assert queue.offer([ev("a1", "r1"), ev("b1", "r2"), ev("c1", "r3")])
    await settle()
    finished = [w for w in waiters if w.done()]
    assert sorted(ids([w.result() for w in finished])) == ["a1", "b1", "c1"]
    [last] = [w for w in waiters if not w.done()]
    assert queue.offer([ev("d1", "r4")])
    assert (await woken(last)).event_id == "d1"


async def test_concurrent_waiters_get_one_event_of_a_recipient_at_a_time() -> None:
    queue = EventQueue(10)
    waiters = [asyncio.create_task(queue.get("")) for _ in range(3)]
    await settle()
    assert queue.offer([ev("a1"), ev("a2"), ev("a3")])
    await settle()
    assert [w.done() for w in waiters] == [True, False, False]  # the oldest waiter first
    queue.done(waiters[0].result())
    assert (await woken(waiters[1])).event_id == "a2"
    queue.done(waiters[1].result())
    assert (await woken(waiters[2])).event_id == "a3"


async def test_cancelling_a_waiting_get_loses_nothing() -> None:
    queue = EventQueue(10)
    waiter = asyncio.create_task(queue.get(""))
    await settle()
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert queue.accounts() == set()
    assert queue.offer([ev("a1")])
    assert (await queue.get("")).event_id == "a1"


async def test_a_get_cancelled_after_being_handed_an_event_puts_it_back_first() -> None:
    queue = EventQueue(10)
    waiter = asyncio.create_task(queue.get(""))
    await settle()
    # a1 is handed to the waiter right here.
    assert queue.offer([ev("a1", "r1"), ev("b1", "r2"), ev("a2", "r1")])
    assert queue.in_delivery == 1
    waiter.cancel()  # before it ran again
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert (len(queue), queue.in_delivery) == (3, 0)
    # Back at the head of its recipient, and the recipient keeps its turn.
    assert take_and_done(queue, "", 3) == ["a1", "b1", "a2"]


async def test_an_event_handed_to_a_cancelled_get_goes_to_the_next_waiter() -> None:
    queue = EventQueue(10)
    first = asyncio.create_task(queue.get(""))
    second = asyncio.create_task(queue.get(""))
    await settle()
    assert queue.offer([ev("a1")])
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert (await woken(second)).event_id == "a1"
    assert (len(queue), queue.in_delivery) == (0, 1)


async def test_an_event_offered_before_a_cancelled_get_cleaned_up_stays_queued() -> None:
    queue = EventQueue(10)
    waiter = asyncio.create_task(queue.get(""))
    await settle()
    waiter.cancel()
    assert queue.offer([ev("a1")])  # the cancelled get has not run its cleanup yet
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert (len(queue), queue.in_delivery) == (1, 0)
    assert (await queue.get("")).event_id == "a1"


async def test_unordered_gets_cancelled_after_being_handed_keep_the_acceptance_order() -> None:
    queue = EventQueue(10, ordered=False)
    waiters = [asyncio.create_task(queue.get("")) for _ in range(2)]
    await settle()
    assert queue.offer([ev("a1", "r1"), ev("a2", "r2"), ev("a3", "r1")])
    for waiter in waiters:
        waiter.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)
    assert take_and_done(queue, "", 3) == ["a1", "a2", "a3"]


async def test_take_all_returns_in_delivery_first_then_acceptance_order() -> None:
    queue = EventQueue(20)
    assert queue.offer([ev("a1", "r1", "a"), ev("b1", "r1", "b"), ev("a2", "r2", "a")])
    assert queue.offer([ev("b2", "r1", "b"), ev("c1", "r1"), ev("a3", "r1", "a")])
    b1 = await queue.get("b")
    a1 = await queue.get("a")
    assert ids(queue.take_all()) == ["b1", "a1", "a2", "b2", "c1", "a3"]
    assert (len(queue), queue.in_delivery, queue.free, queue.accounts()) == (0, 0, 20, set())
    assert all(queue.depth(name) == 0 for name in ("", "a", "b"))
    with pytest.raises(ValueError, match="not in delivery"):
        queue.done(b1)
    with pytest.raises(ValueError, match="not in delivery"):
        queue.done(a1)


async def test_take_all_takes_back_an_event_handed_to_a_get_that_has_not_run_yet() -> None:
    queue = EventQueue(10)
    waiter = asyncio.create_task(queue.get(""))
    await settle()
    assert queue.offer([ev("a1")])
    assert ids(queue.take_all()) == ["a1"]  # the shutdown path: it is saved, not delivered
    await settle()
    assert not waiter.done()  # it waits on instead of returning a taken-back event
    assert queue.offer([ev("a2")])
    assert (await woken(waiter)).event_id == "a2"


async def test_take_account_takes_only_waiting_events_of_that_account() -> None:
    queue = EventQueue(20)
    assert queue.offer([ev("a1", "r1", "a"), ev("a2", "r2", "a"), ev("b1", "r1", "b")])
    assert queue.offer([ev("a3", "r1", "a")])
    a1 = await queue.get("a")
    assert ids(queue.take_account("a")) == ["a2", "a3"]
    assert (queue.depth("a"), len(queue), queue.in_delivery) == (0, 1, 1)
    assert queue.accounts() == {"a", "b"}
    assert queue.take_account("nobody") == []
    queue.done(a1)
    assert queue.accounts() == {"b"}
    assert ids(queue.take_all()) == ["b1"]


async def test_done_of_an_event_not_in_delivery_raises() -> None:
    queue = EventQueue(10)
    with pytest.raises(ValueError, match="not in delivery"):
        queue.done(ev("a1"))
    assert queue.offer([ev("a1")])
    got = await queue.get("")
    queue.done(got)
    with pytest.raises(ValueError, match="not in delivery"):
        queue.done(got)


async def test_equal_events_are_tracked_by_identity() -> None:
    queue = EventQueue(10)
    first, resent = ev("a1"), ev("a1")  # an app resent the same event
    assert first == resent
    assert first is not resent
    assert queue.offer([first, resent])
    got = await queue.get("")
    assert got is first
    waiter = asyncio.create_task(queue.get(""))
    await settle()
    with pytest.raises(ValueError, match="not in delivery"):
        queue.done(resent)  # equal by value, but not the one in delivery
    assert not waiter.done()
    queue.done(first)
    assert (await woken(waiter)) is resent
    queue.done(resent)
    assert queue.in_delivery == 0


async def test_the_same_object_queued_twice_is_two_deliveries() -> None:
    queue = EventQueue(10, ordered=False)
    same = ev("a1")
    assert queue.offer([same, same])
    assert (await queue.get("")) is same
    assert (await queue.get("")) is same
    queue.done(same)
    assert queue.in_delivery == 1
    queue.done(same)
    with pytest.raises(ValueError, match="not in delivery"):
        queue.done(same)


async def test_a_recipient_grows_from_one_waiting_event_to_many_and_back() -> None:
    queue = EventQueue(100)
    assert queue.offer([ev("a01", "r1")])
    first = await queue.get("")  # r1 busy, nothing of it waiting
    assert queue.offer([ev("a02", "r1")])  # one waiting
    assert queue.offer([*(ev(f"a{n:02d}", "r1") for n in range(3, 8)), ev("b1", "r2")])  # many
    assert (queue.depth(""), queue.in_delivery) == (7, 1)
    assert take_and_done(queue, "", 1) == ["b1"]  # r2 is not held behind r1
    queue.done(first)
    # Down to one waiting, then none, keeping the acceptance order all the way.
    assert take_and_done(queue, "", 5) == [f"a{n:02d}" for n in range(2, 7)]
    assert queue.offer([ev("a08", "r1")])
    assert take_and_done(queue, "", 2) == ["a07", "a08"]
    assert (len(queue), queue.in_delivery, queue.accounts(), queue.bytes) == (0, 0, set(), 0)
    # And up again: the recipient starts afresh.
    assert queue.offer([ev("a09", "r1"), ev("a10", "r1")])
    assert take_and_done(queue, "", 2) == ["a09", "a10"]


async def test_a_get_cancelled_after_being_handed_the_head_of_a_long_wait_puts_it_first() -> None:
    queue = EventQueue(20)
    waiter = asyncio.create_task(queue.get(""))
    await settle()
    assert queue.offer([ev(f"a{n}", "r1") for n in range(1, 6)])  # a1 handed to the waiter
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert queue.offer([ev("a6", "r1")])  # appended after the one put back is still last
    assert take_and_done(queue, "", 6) == [f"a{n}" for n in range(1, 7)]


async def test_recipients_are_dropped_once_nothing_of_theirs_waits_or_is_in_delivery() -> None:
    queue = EventQueue(20)
    assert queue.offer([ev("a1", "r1"), ev("a2", "r1"), ev("b1", "r2")])
    recipients = queue._accounts[""].recipients
    a1, b1 = await queue.get(""), await queue.get("")
    queue.done(b1)
    assert set(recipients) == {"r1"}  # r2: nothing waiting, nothing out
    queue.done(a1)
    a2 = await queue.get("")
    assert set(recipients) == {"r1"}  # a2 is out
    queue.done(a2)
    assert queue.accounts() == set()
    assert "" not in queue._accounts


def test_restored_events_count_their_bytes_until_done_or_taken() -> None:
    # restore has no sizes from admission: the queue computes them, and gives back the same.
    queue = EventQueue(10, max_bytes=1)
    events = [sized("a1", 300, "r1"), sized("a2", 7, "r1"), sized("b1", 0, "r2", "b")]
    assert queue.restore(events) == 3
    assert queue.bytes == sum(map(event_size, events))
    assert ids(queue.take_account("b")) == ["b1"]
    assert queue.bytes == sum(map(event_size, events[:2]))
    assert take_and_done(queue, "", 2) == ["a1", "a2"]
    assert queue.bytes == 0


def test_a_queued_event_costs_the_queue_little_memory() -> None:
    # Each of these events has a recipient of its own (a campaign burst). A deque per recipient
    # cost ~1 KB an event here; the queue's own share is now ~220 B (tracemalloc's count).
    count = 20_000
    events = [event(n) for n in range(count)]
    queue = EventQueue(count)
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        assert queue.offer(events)
        per_event = (tracemalloc.get_traced_memory()[0] - before) / count
    finally:
        if started:
            tracemalloc.stop()
    assert per_event < 320, per_event


def chain(rec: _Recipient) -> list[_Entry]:
    """A recipient's waiting entries, oldest first, without changing them."""
    entries: list[_Entry] = []
    entry = rec.first
    while entry is not None:
        entries.append(entry)
        entry = entry.next
    return entries


# (kind, x): push a new entry, pop the oldest, put back the x-th popped one, or drain.
CHAIN_OPS = st.lists(
    st.tuples(st.sampled_from(["push", "push", "pop", "insert", "drain"]), st.integers(0, 9)),
    max_size=60,
)


@settings(max_examples=300, deadline=None, database=None, derandomize=True)
@given(ops=CHAIN_OPS)
def test_a_recipients_chain_behaves_as_a_list_kept_in_acceptance_order(
    ops: list[tuple[str, int]],
) -> None:
    rec = _Recipient()
    model: list[_Entry] = []  # what the chain should hold, oldest first
    out: list[_Entry] = []  # popped, so they may be put back
    seq = 0
    for kind, x in ops:
        if kind == "push":
            seq += 1
            entry = _Entry(ev(f"e{seq}"), seq)
            rec.push(entry)
            model.append(entry)
        elif kind == "pop":
            if not model:
                with pytest.raises(IndexError):
                    rec.pop()
                continue
            got = rec.pop()
            assert got is model.pop(0)
            assert got.next is None
            out.append(got)
        elif kind == "insert" and out:
            back = out.pop(x % len(out))
            rec.insert(back)
            model.append(back)
            model.sort(key=lambda e: e.seq)
        elif kind == "drain":
            drained = rec.drain()
            assert drained == model
            assert all(e.next is None for e in drained)
            out.extend(drained)
            model.clear()
        assert chain(rec) == model
        assert rec.last is (model[-1] if model else None)


def check_structure(queue: EventQueue) -> None:
    """The queue's internals agree with each other and with its counts.

    Each waiting entry is in exactly one place (its account's FIFO, or its recipient's chain in
    acceptance order); a recipient is kept only while it has waiting or in-delivery events; and in
    ordered mode a recipient is in the line exactly when it has waiting events and none out.
    """
    waiting = 0
    for acct in queue._accounts.values():
        if queue.ordered:
            assert not acct.fifo
        entries = list(acct.fifo)
        for rec in acct.recipients.values():
            mine = chain(rec)
            assert rec.last is (mine[-1] if mine else None)
            assert [e.seq for e in mine] == sorted(e.seq for e in mine)
            assert mine or rec.busy, "an idle recipient is kept"
            assert not mine or queue.ordered
            assert rec.in_line == (bool(mine) and not rec.busy)
            entries.extend(mine)
        assert all(e.state is _State.WAITING for e in entries)
        assert len({id(e) for e in entries}) == len(entries) == acct.depth
        in_line = [rec for rec in acct.recipients.values() if rec.in_line]
        assert len(acct.line) == len(in_line)
        assert {id(rec) for rec in acct.line} == {id(rec) for rec in in_line}
        assert acct.busy == sum(rec.busy for rec in acct.recipients.values())
        out = [e for es in queue._delivering.values() for e in es if e.event.account == acct.name]
        assert acct.bytes == sum(event_size(e.event) for e in entries + out)
        waiting += acct.depth
    assert waiting == len(queue)
    for delivering in queue._delivering.values():
        assert all(e.state is _State.DELIVERING and e.next is None for e in delivering)


ACCOUNTS = ("", "a", "b")


def leaves_kept_room(queue: EventQueue, account: str, batch: list[Event]) -> bool:
    """The rule, written out: past half the bound, each other account the queue knows keeps
    room for max_events / (2 * accounts) of its own events."""
    total = len(queue) + queue.in_delivery + len(batch)
    others = [name for name in queue._accounts if name != account]
    keep = queue.max_events // (2 * (len(others) + 1))
    kept = sum(max(0, keep - queue.held(name)[0]) for name in others)
    return total <= queue.max_events // 2 or total + kept <= queue.max_events


RECIPIENTS = ("r1", "r2", "r3")
# (kind, x, y): x and y pick the account, recipients, batch size, task or held event; the loop
# then runs the woken tasks when y >= 8, so cancels hit both waiting and just-handed gets.
OPS = st.lists(
    st.tuples(
        st.sampled_from(["offer", "offer", "get", "get", "done", "done", "cancel", "toggle"]),
        st.integers(0, 11),
        st.integers(0, 11),
    ),
    min_size=10,
    max_size=100,
)


async def run_ops(
    ops: list[tuple[str, int, int]], *, ordered: bool, max_events: int, toggles: bool
) -> None:
    """Play random offer/get/done/cancel interleavings against the queue and check it throughout.

    The order and one-at-a-time checks only hold while the mode stays put, so they are off when
    `toggles` lets the ordering flip.
    """
    queue = EventQueue(max_events, ordered=ordered)
    accepted: list[Event] = []
    handed: list[Event] = []  # in the order gets returned them
    held: list[Event] = []  # returned and not yet done
    done_ids: set[str] = set()
    tasks: list[asyncio.Task[None]] = []
    serial = 0
    checks = ordered and not toggles

    async def take(account: str) -> None:
        got = await queue.get(account)
        assert got.account == account
        if checks:
            key = (got.account, got.recipient_id)
            assert all((e.account, e.recipient_id) != key for e in held), f"two of {key} out"
        handed.append(got)
        held.append(got)

    for kind, x, y in ops:
        if kind == "offer":
            batch = [
                Event(
                    event_id=f"evt-{serial + n:06d}",
                    recipient_id=RECIPIENTS[(y + n) % len(RECIPIENTS)],
                    name="SIGNUP",
                    account=ACCOUNTS[x % len(ACCOUNTS)],
                )
                for n in range(1 + y % 2)
            ]
            serial += len(batch)
            fits = len(batch) <= queue.free and leaves_kept_room(queue, batch[0].account, batch)
            assert queue.offer(batch) is fits
            if fits:
                accepted.extend(batch)
        elif kind == "get":
            tasks.append(asyncio.create_task(take(ACCOUNTS[x % len(ACCOUNTS)])))
        elif kind == "done" and held:
            finished = held.pop(x % len(held))
            queue.done(finished)
            done_ids.add(finished.event_id)
        elif kind == "cancel":
            pending = [t for t in tasks if not t.done()]
            if pending:
                pending[x % len(pending)].cancel()
        elif kind == "toggle" and toggles:
            queue.set_ordered(not queue.ordered)
        if y >= 8:
            await settle()
        assert len(queue) + queue.in_delivery == len(accepted) - len(done_ids)
        assert sum(queue.depth(name) for name in ACCOUNTS) == len(queue)
        assert queue.free == max(0, max_events - len(queue) - queue.in_delivery)
        assert queue.bytes == sum(event_size(e) for e in accepted if e.event_id not in done_ids)
        check_structure(queue)

    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    in_delivery = queue.in_delivery
    remaining = queue.take_all()
    assert (len(queue), queue.in_delivery, queue.accounts(), queue.bytes) == (0, 0, set(), 0)

    # Every event handed out at most once, and each accepted event ends up exactly once either
    # done or given back by take_all (in delivery first: exactly those still held).
    assert all(n == 1 for n in Counter(ids(handed)).values())
    assert all(n == 1 for n in Counter(ids(remaining)).values())
    assert set(ids(handed)) <= set(ids(accepted))
    assert done_ids | set(ids(remaining)) == set(ids(accepted))
    assert not done_ids & set(ids(remaining))
    assert set(ids(remaining[:in_delivery])) == {e.event_id for e in held}
    if checks:
        for account in ACCOUNTS:
            for recipient in RECIPIENTS:
                mine = [
                    e.event_id
                    for e in accepted
                    if (e.account, e.recipient_id) == (account, recipient)
                ]
                out = [
                    e.event_id
                    for e in handed
                    if (e.account, e.recipient_id) == (account, recipient)
                ]
                assert out == mine[: len(out)], (account, recipient)


@settings(max_examples=300, deadline=None, database=None, derandomize=True)
@given(ops=OPS, ordered=st.booleans(), max_events=st.integers(1, 12))
def test_random_interleavings_hand_out_each_event_once_in_order(
    ops: list[tuple[str, int, int]], ordered: bool, max_events: int
) -> None:
    asyncio.run(run_ops(ops, ordered=ordered, max_events=max_events, toggles=False))


@settings(max_examples=200, deadline=None, database=None, derandomize=True)
@given(ops=OPS, ordered=st.booleans(), max_events=st.integers(1, 12))
def test_random_interleavings_with_mode_switches_lose_nothing(
    ops: list[tuple[str, int, int]], ordered: bool, max_events: int
) -> None:
    asyncio.run(run_ops(ops, ordered=ordered, max_events=max_events, toggles=True))


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


@pytest.mark.parametrize("ordered", [True, False])
async def test_one_event_admits_queue_count_and_wake_like_a_batch(ordered: bool) -> None:
    # A one-event admit takes its own short way (intake's drop-in endpoint): the same order,
    # depth, bytes and hand-over to a waiting lane as the same events admitted as a batch.
    events = [ev("a1", "r1"), ev("b1", "r2", "acme"), ev("a2", "r1"), ev("c1", "r3")]
    one, batch = EventQueue(10, ordered=ordered), EventQueue(10, ordered=ordered)
    waiting = asyncio.create_task(one.get("acme"))
    await settle()
    for item in events:
        assert one.admit([item]) == ""
    assert batch.admit(events) == ""
    assert (await woken(waiting)).event_id == "b1"
    assert one.bytes == batch.bytes == sum(map(event_size, events))
    assert (len(one), one.in_delivery) == (3, 1)
    assert (one.depth(""), one.depth("acme")) == (3, 0)
    one.done(waiting.result())
    expected = ["a1", "c1", "a2"] if ordered else ["a1", "a2", "c1"]  # round-robin, or FIFO
    assert take_and_done(one, "", 3) == take_and_done(batch, "", 3) == expected


async def test_a_paused_account_cannot_take_the_room_kept_for_the_others() -> None:
    # Memory mode: "b" is paused (nothing of it is taken) while the default account's lane waits.
    queue = EventQueue(100, max_bytes=0)
    lane = asyncio.create_task(queue.get(""))  # the default account's lane, idle
    await asyncio.sleep(0)
    try:
        accepted = sum(queue.offer([ev(f"b-{n}", f"r{n}", account="b")]) for n in range(150))
        assert accepted == 75  # half shared, and the other half kept: 25 each for 2 accounts
        assert queue.admit([ev("b-late", account="b")]) == QUEUE_FULL
        # The default account still gets in: the first event goes to its lane at once.
        assert queue.offer([ev("d-0", "d0")])
        assert (await asyncio.wait_for(lane, 1)).event_id == "d-0"
        assert all(queue.offer([ev(f"d-{n}", f"d{n}")]) for n in range(1, 25))
        assert queue.admit([ev("d-late", "dx")]) == QUEUE_FULL  # the bound itself still holds
        assert len(queue) + queue.in_delivery == 100
    finally:
        lane.cancel()
        await asyncio.gather(lane, return_exceptions=True)


def test_one_account_alone_may_use_the_whole_bound() -> None:
    queue = EventQueue(10, max_bytes=0)
    assert all(queue.offer([ev(f"b-{n}", f"r{n}", account="b")]) for n in range(10))
    assert queue.admit([ev("b-late", account="b")]) == QUEUE_FULL


def test_the_byte_bound_keeps_room_for_the_others_too() -> None:
    one = event_size(ev("x-0", "r0", account="b"))
    queue = EventQueue(1000, max_bytes=40 * one)
    queue.offer([ev("d-0", "d0")])
    accepted = sum(queue.offer([ev(f"x-{n}", f"r{n}", account="b")]) for n in range(60))
    assert accepted < 39  # room is kept for the default account's bytes
    assert queue.admit([ev("x-late", "r", account="b")]) == QUEUE_BYTES_FULL
    assert queue.offer([ev("d-1", "d1")])


@pytest.mark.parametrize("ordered", [True, False])
async def test_evict_gives_back_the_newest_waiting_events_and_keeps_the_rest_in_order(
    ordered: bool,
) -> None:
    queue = EventQueue(100, ordered=ordered)
    events = [ev(f"b-{n}", f"r{n % 3}", account="b") for n in range(9)]
    queue.restore(events, range(1, 10))
    first = await queue.get("b")  # in delivery: never evicted
    assert first.event_id == "b-0"
    taken = queue.evict("b", 4)
    assert [(e.event_id, seq) for e, seq in taken] == [(f"b-{n}", n + 1) for n in range(4, 9)]
    assert queue.held("b") == (4, sum(event_size(e) for e in events[:4]))
    check_structure(queue)
    queue.done(first)
    rest = []
    for _ in range(3):
        got = await queue.get("b")
        rest.append(got.event_id)
        queue.done(got)
    assert sorted(rest) == ["b-1", "b-2", "b-3"]
    assert queue.held("b") == (0, 0)
    assert queue.bytes == 0
    check_structure(queue)
