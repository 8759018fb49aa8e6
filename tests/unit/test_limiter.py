"""The flow-control state machines of `forwarder/delivery/flow/`, driven by a fake clock.

No test sleeps: time is a number the test advances. Besides unit tests of each rule,
simulations drive the limiters against models of a remote: a fixed-window rate limiter like
`forwarder mock-remote`'s; a server whose latency grows in proportion past a concurrency knee
(more concurrency only adds latency); and one whose latency grows less than in proportion
(like local CPU queueing: more concurrency still adds throughput).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import heapq
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from forwarder.delivery.flow.breaker import BreakerState, CircuitBreaker
from forwarder.delivery.flow.concurrency import ConcurrencyController
from forwarder.delivery.flow.ratelimit import DEFAULT_429_WAIT_S, RateLimiter, Ticket
from forwarder.delivery.flow.ratewindow import KEEP


class FakeClock:
    """Monotonic seconds that only move when a test says so."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        assert seconds >= 0
        self.now += seconds


def take(limiter: RateLimiter) -> Ticket:
    reserved = limiter.reserve()
    assert isinstance(reserved, Ticket), f"expected a ticket, got a wait of {reserved}s"
    return reserved


def wait_of(limiter: RateLimiter) -> float:
    reserved = limiter.reserve()
    assert not isinstance(reserved, Ticket), "expected a wait, got a ticket"
    assert reserved > 0
    return reserved


def take_waiting(limiter: RateLimiter, clock: FakeClock) -> Ticket:
    """Like a lane: wait as long as told until a ticket comes."""
    for _ in range(1000):
        reserved = limiter.reserve()
        if isinstance(reserved, Ticket):
            return reserved
        clock.advance(reserved)
    raise AssertionError("no ticket after 1000 waits")


# --- RateLimiter: pacing ------------------------------------------------------------------------


def test_a_new_limiter_starts_from_per_minute() -> None:
    clock = FakeClock()
    limiter = RateLimiter(600, clock=clock)
    assert limiter.limit == 600
    assert limiter.window_s == 60.0
    assert limiter.rate == pytest.approx(10.0)
    assert limiter.capacity == pytest.approx(2.5)  # a quarter second's worth
    assert limiter.remaining == 600
    assert limiter.tokens == pytest.approx(1.0)
    assert limiter.gate_until == 0.0
    assert limiter.rate_limited == 0


def test_the_bucket_holds_at_least_one_token() -> None:
    limiter = RateLimiter(30, clock=FakeClock())
    assert limiter.rate == pytest.approx(0.5)
    assert limiter.capacity == 1.0


@pytest.mark.parametrize("start", [0.0, 1000.0, 1_000_000.0])
@pytest.mark.parametrize("per_minute", [7, 600, 6000, 60000])
def test_waiting_exactly_as_long_as_told_then_succeeds(start: float, per_minute: int) -> None:
    # Float rounding of `now + wait` must not leave the waiter a hair short of a whole token.
    clock = FakeClock(start)
    limiter = RateLimiter(per_minute, clock=clock)
    take(limiter)
    for _ in range(min(200, per_minute - 1)):  # within the first window's quota
        wait = wait_of(limiter)
        assert wait == pytest.approx(1 / limiter.rate, rel=1e-3)
        clock.advance(wait)
        take(limiter)


def test_tokens_refill_at_the_rate_up_to_the_capacity() -> None:
    clock = FakeClock()
    limiter = RateLimiter(600, clock=clock)  # 10 per second
    take(limiter)
    assert limiter.tokens == pytest.approx(0.0)
    clock.advance(0.15)
    assert limiter.tokens == pytest.approx(1.5)
    clock.advance(100.0)
    assert limiter.tokens == pytest.approx(limiter.capacity)  # 2.5: a long pause is no burst
    for _ in range(2):  # a quarter second's worth goes at once ...
        take(limiter)
    assert wait_of(limiter) == pytest.approx(0.05, abs=1e-5)  # ... then the pace holds


def test_never_more_than_the_quota_in_one_window_even_with_tokens_to_spare() -> None:
    clock = FakeClock()
    limiter = RateLimiter(6000, clock=clock)
    ticket = take(limiter)
    limiter.observe(ticket, limit=20, remaining=19, reset_s=2)  # 20 per 2 s: 10 per second
    assert limiter.rate == pytest.approx(10.0)
    clock.advance(3.0)  # idle: that window is over, and the bucket is full
    start = clock.now
    first = take(limiter)  # opens the next window (2 s) with 10 tokens, 20 more to come in it
    tickets = [first]
    while len(tickets) < 20:
        tickets.append(take_waiting(limiter, clock))
    assert {t.epoch for t in tickets} == {first.epoch}
    # 2.5 at once, then 10 per second: the 20th after 1.75 s.
    assert clock.now == pytest.approx(start + 1.75, abs=1e-3)
    # The quota holds, not the bucket: the wait runs to the window's end ...
    assert clock.now + wait_of(limiter) == pytest.approx(start + 2.0, abs=1e-5)
    clock.advance(0.2)
    assert limiter.tokens >= 2.0
    assert wait_of(limiter) == pytest.approx(0.05, abs=1e-5)  # ... tokens or not
    clock.advance(wait_of(limiter))
    # A new window, with the full quota (less the ticket just taken).
    assert take(limiter).epoch == first.epoch + 1
    assert limiter.remaining == 19


# --- RateLimiter: corrections from the headers ---------------------------------------------------


def test_a_smaller_limit_header_lowers_the_quota() -> None:
    clock = FakeClock()
    limiter = RateLimiter(600, clock=clock)
    window_end = clock.now + 60.0
    ticket = take(limiter)
    limiter.observe(ticket, limit=5)
    assert limiter.limit == 5
    assert limiter.rate == pytest.approx(5 / 60)  # the pace follows
    assert limiter.remaining == 4
    for _ in range(4):
        take_waiting(limiter, clock)
    assert limiter.remaining == 0
    # Nothing more until the 60 s window ends.
    assert clock.now + wait_of(limiter) == pytest.approx(window_end, abs=1e-5)


def test_remaining_below_our_own_count_means_another_client_uses_the_key() -> None:
    clock = FakeClock()
    limiter = RateLimiter(600, clock=clock)
    tickets = [take_waiting(limiter, clock) for _ in range(3)]
    assert limiter.remaining == 597
    # The server counted 10 requests in this window; we sent 3 of them.
    limiter.observe(tickets[-1], limit=600, remaining=590)
    assert limiter.remaining == 590
    take_waiting(limiter, clock)
    assert limiter.remaining == 589
    # An older answer (it left before some of ours) does not give the quota back.
    limiter.observe(tickets[0], limit=600, remaining=598)
    assert limiter.remaining == 589


def test_the_window_length_is_the_longest_reset_seen() -> None:
    clock = FakeClock()
    limiter = RateLimiter(6000, clock=clock)  # configured as 6000 per 60 s
    ticket = take(limiter)
    limiter.observe(ticket, limit=600, remaining=599, reset_s=6)
    assert limiter.window_s == 6.0  # a single answer may shorten the assumed 60 s
    assert limiter.limit == 600
    assert limiter.rate == pytest.approx(100.0)
    assert limiter.capacity == pytest.approx(25.0)
    clock.advance(3.0)
    ticket = take(limiter)
    limiter.observe(ticket, limit=600, remaining=598, reset_s=3)  # later in the same window
    assert limiter.window_s == 6.0


def test_the_window_end_is_the_lowest_estimate_within_a_window() -> None:
    clock = FakeClock()
    start = clock.now
    limiter = RateLimiter(6000, clock=clock)
    ticket = take(limiter)
    limiter.observe(ticket, limit=600, remaining=599, reset_s=6)  # ends by start + 6
    clock.advance(0.4)
    ticket = take(limiter)
    limiter.observe(ticket, limit=600, remaining=598, reset_s=6)  # says start + 6.4: later
    clock.advance(0.3)
    ticket = take(limiter)
    # Reset is rounded up: 5 here means the window really ends by start + 5.7.
    limiter.observe(ticket, limit=600, remaining=0, reset_s=5)
    assert limiter.remaining == 0
    assert clock.now + wait_of(limiter) == pytest.approx(start + 5.7, abs=1e-5)
    clock.advance(wait_of(limiter))
    fresh = take(limiter)
    assert fresh.epoch == ticket.epoch + 1
    assert limiter.remaining == 599


def test_a_later_end_means_the_server_started_a_window_we_did_not_see() -> None:
    clock = FakeClock()
    limiter = RateLimiter(6000, clock=clock)
    ticket = take(limiter)
    limiter.observe(ticket, limit=600, remaining=599, reset_s=6)
    clock.advance(5.5)
    ticket = take(limiter)
    limiter.observe(ticket, limit=600, reset_s=6)  # ends 5.5 s later than we thought
    later = take(limiter)
    assert later.epoch == ticket.epoch + 1
    assert limiter.remaining == 599


def test_an_answer_from_an_old_window_does_not_corrupt_the_new_one() -> None:
    clock = FakeClock()
    limiter = RateLimiter(6000, clock=clock)
    first = take(limiter)
    limiter.observe(first, limit=600, remaining=599, reset_s=6)
    clock.advance(1.0)
    straggler = take(limiter)
    clock.advance(5.5)  # past the window's end
    current = take(limiter)
    assert current.epoch == straggler.epoch + 1
    assert limiter.remaining == 599
    # The straggler's late answer speaks of the old window: full, ending in a second.
    limiter.observe(straggler, limit=600, remaining=0, reset_s=1)
    assert limiter.remaining == 599
    assert isinstance(limiter.reserve(), Ticket)
    # The new window's end is still a whole window from its start, not a second from now.
    limiter.observe(current, limit=600, remaining=0)
    assert wait_of(limiter) == pytest.approx(6.0, abs=1e-5)


# --- RateLimiter: 429 ---------------------------------------------------------------------------


def test_a_429_closes_the_gate_for_everybody_until_the_reset() -> None:
    clock = FakeClock()
    limiter = RateLimiter(600, clock=clock)
    ticket = take(limiter)
    limiter.observe(ticket, limit=600, remaining=0, reset_s=5, rate_limited=True)
    assert limiter.rate_limited == 1
    assert limiter.gate_until == pytest.approx(clock.now + 5)
    assert limiter.remaining == 0
    assert wait_of(limiter) == pytest.approx(5.0, abs=1e-5)
    assert wait_of(limiter) == pytest.approx(5.0, abs=1e-5)  # every caller, not just one
    clock.advance(2.0)
    assert wait_of(limiter) == pytest.approx(3.0, abs=1e-5)
    clock.advance(wait_of(limiter))
    # After the gate: a whole new window with the full quota.
    after = take(limiter)
    assert after.epoch > ticket.epoch
    assert limiter.remaining == 599


@pytest.mark.parametrize(
    ("reset_s", "retry_after", "expected"),
    [
        (5, 8.0, 8.0),  # a longer Retry-After wins
        (5, 2.0, 5.0),  # ... a shorter one does not
        (None, 3.0, 3.0),
        (None, None, DEFAULT_429_WAIT_S),  # no hint at all
        (3600, None, 60.0),  # a spent quota is back within a window: a minute at most
        (3600, 120.0, 120.0),  # ... but an explicit Retry-After is honoured
    ],
)
def test_a_429_waits_for_the_longest_hint(
    reset_s: int | None, retry_after: float | None, expected: float
) -> None:
    clock = FakeClock()
    limiter = RateLimiter(600, clock=clock)
    ticket = take(limiter)
    limiter.observe(ticket, reset_s=reset_s, retry_after=retry_after, rate_limited=True)
    assert wait_of(limiter) == pytest.approx(expected, abs=1e-5)
    clock.advance(wait_of(limiter))
    take(limiter)


def test_429s_are_counted_and_the_gate_never_shrinks() -> None:
    clock = FakeClock()
    limiter = RateLimiter(600, clock=clock)
    first, second = take(limiter), take_waiting(limiter, clock)
    limiter.observe(first, reset_s=5, rate_limited=True)
    gate = limiter.gate_until
    limiter.observe(second, reset_s=1, rate_limited=True)
    assert limiter.rate_limited == 2
    assert limiter.gate_until == gate


# --- RateLimiter: reload ------------------------------------------------------------------------


def test_set_per_minute_applies_the_configured_quota_to_the_learned_window() -> None:
    clock = FakeClock()
    limiter = RateLimiter(600, clock=clock)
    limiter.set_per_minute(1200)
    assert limiter.limit == 1200
    assert limiter.rate == pytest.approx(20.0)
    ticket = take(limiter)
    limiter.observe(ticket, limit=60, remaining=59, reset_s=6)
    limiter.set_per_minute(1200)
    assert limiter.limit == 120  # per 6 s window
    assert limiter.rate == pytest.approx(20.0)
    limiter.set_per_minute(1)
    assert limiter.limit == 1  # never zero
    # Headers still correct a reloaded quota.
    limiter.observe(ticket, limit=60)
    assert limiter.limit == 60


def test_taking_over_a_window_counts_on_with_what_was_left_in_it() -> None:
    # The fleet's shared budget kept the window until now: 5 of this limiter's 20 are left.
    clock = FakeClock()
    limiter = RateLimiter(20, clock=clock)
    before = limiter.epoch
    limiter.take_over_window(clock.now + 30.0, 5)
    assert limiter.epoch == before + 1  # answers to earlier tickets counted elsewhere
    assert limiter.remaining == 5
    for _ in range(5):
        take_waiting(limiter, clock)
    assert clock.now < 1030.0
    assert wait_of(limiter) == pytest.approx(1030.0 - clock.now, abs=1e-3)
    clock.advance(wait_of(limiter))
    assert limiter.remaining == 0
    take(limiter)  # the next window is a whole one
    assert limiter.remaining == 19


def test_a_window_already_over_is_not_taken_over() -> None:
    clock = FakeClock()
    limiter = RateLimiter(20, clock=clock)
    limiter.take_over_window(clock.now, 0)
    assert limiter.epoch == 0
    assert limiter.remaining == 20


def test_a_share_counts_this_clients_own_requests_and_the_remotes_count_still_stops_it() -> None:
    # A fleet member alone while Redis is out: 40 a one-minute window, 3 members, a share of 13.
    clock = FakeClock()
    limiter = RateLimiter(40, clock=clock)
    limiter.share = 13
    ticket = take_waiting(limiter, clock)
    # The others sent 19 meanwhile: the remote counts 20. They narrow the window's remainder (20
    # left), not this member's share as well: it still starts its 13.
    limiter.observe(ticket, limit=40, remaining=20, reset_s=60.0)
    for _ in range(12):
        take_waiting(limiter, clock)
    assert limiter.remaining == 0  # its share is spent, 7 of the window are the others'
    assert clock.now < 1060.0
    # Paced at its share, not at the whole limit: 13 in the window take 12 intervals of 60/13 s.
    assert clock.now - 1000.0 == pytest.approx(12 * 60 / 13, abs=0.5)
    # The next window: a whole share again; an answer saying the window is spent stops it at
    # once, whatever is left of the share.
    clock.advance(wait_of(limiter))
    ticket = take_waiting(limiter, clock)
    assert limiter.remaining == 12
    limiter.observe(ticket, limit=40, remaining=0, reset_s=55.0)
    assert limiter.remaining == 0
    assert wait_of(limiter) == pytest.approx(55.0, abs=1e-3)


def test_a_share_taken_over_mid_window_caps_this_clients_part_of_what_was_left() -> None:
    clock = FakeClock()
    limiter = RateLimiter(40, clock=clock)
    limiter.share = 13
    # The fleet left 12 in the window: this member's part is 4, the remote's count says 28 used.
    limiter.take_over_window(clock.now + 30.0, 12, own=4)
    assert limiter.remaining == 4
    for _ in range(4):
        take_waiting(limiter, clock)
    assert limiter.remaining == 0
    clock.advance(wait_of(limiter))
    take_waiting(limiter, clock)  # the next window is a whole share
    assert limiter.remaining == 12


# --- RateLimiter: simulation against a fixed-window server ---------------------------------------


@dataclass
class Answer:
    ok: bool
    limit: int
    remaining: int
    reset_s: int


@dataclass
class WindowTally:
    started: float
    delivered: int = 0
    rate_limited: int = 0


@dataclass
class FixedWindowServer:
    """The mock remote's rate limit (`MockRemote._window`, `_rate_headers`).

    Fixed windows of `quota` requests per `window_s`; a window starts with the first request after
    the previous one expired; every request counts, 429s included. Reset is whole seconds until
    the window ends, rounded up.
    """

    quota: int
    window_s: float
    windows: list[WindowTally] = field(default_factory=list)
    _started: float = -math.inf
    _count: int = 0

    def hit(self, now: float) -> Answer:
        if now - self._started >= self.window_s:
            self._started, self._count = now, 0
            self.windows.append(WindowTally(now))
        self._count += 1
        ok = self._count <= self.quota
        if ok:
            self.windows[-1].delivered += 1
        else:
            self.windows[-1].rate_limited += 1
        longest = math.ceil(self.window_s)
        reset = math.ceil(self.window_s - (now - self._started))
        return Answer(ok, self.quota, max(0, self.quota - self._count), min(longest, max(0, reset)))


def simulate_rate(
    per_minute: int,
    *,
    windows: int = 20,
    quota: int = 600,
    window_s: float = 6.0,
    latency_s: float = 0.005,
    concurrency: int = 8,
    outliers: dict[int, int] | None = None,
) -> FixedWindowServer:
    """A client with an endless backlog: reserve, send, observe the answer `latency_s` later.

    Up to `concurrency` requests are in flight; the server sees each halfway through its round
    trip. The fake clock jumps from one event to the next for `windows` * `window_s` seconds.
    `outliers` maps a request's number (from 1) to the reset its answer claims instead.
    """
    clock = FakeClock()
    limiter = RateLimiter(per_minute, clock=clock)
    server = FixedWindowServer(quota, window_s)
    end = clock.now + windows * window_s
    in_flight: list[tuple[float, int, Ticket, Answer]] = []  # by time of answer
    sent = 0
    next_try = clock.now
    for _ in range(1_000_000):
        if clock.now >= end:
            return server
        while in_flight and in_flight[0][0] <= clock.now:
            _, _, ticket, answer = heapq.heappop(in_flight)
            limiter.observe(
                ticket,
                limit=answer.limit,
                remaining=answer.remaining,
                reset_s=answer.reset_s,
                rate_limited=not answer.ok,
            )
        if len(in_flight) < concurrency and clock.now >= next_try:
            reserved = limiter.reserve()
            if isinstance(reserved, Ticket):
                sent += 1
                answer = server.hit(clock.now + latency_s / 2)
                if outliers and sent in outliers:
                    answer = dataclasses.replace(answer, reset_s=outliers[sent])
                heapq.heappush(in_flight, (clock.now + latency_s, sent, reserved, answer))
                continue
            next_try = clock.now + reserved
        due = [end]
        if in_flight:
            due.append(in_flight[0][0])
        if len(in_flight) < concurrency:
            due.append(next_try)
        clock.advance(max(0.0, min(due) - clock.now))
    raise AssertionError("the simulation made no progress")


@pytest.mark.parametrize("concurrency", [1, 8])
def test_simulation_a_well_configured_limiter_uses_the_whole_quota(concurrency: int) -> None:
    windows, quota = 20, 600
    server = simulate_rate(6000, windows=windows, quota=quota, concurrency=concurrency)
    delivered = sum(w.delivered for w in server.windows)
    assert [w.rate_limited for w in server.windows] == [0] * len(server.windows)
    assert delivered >= 0.99 * quota * windows


def test_simulation_a_limiter_configured_too_high_is_corrected_at_once() -> None:
    windows, quota = 20, 600
    server = simulate_rate(60000, windows=windows, quota=quota)
    assert server.windows[0].rate_limited <= 5
    assert [w.rate_limited for w in server.windows[1:]] == [0] * (len(server.windows) - 1)
    assert sum(w.delivered for w in server.windows) >= 0.99 * quota * windows


def test_simulation_a_limiter_configured_too_low_is_corrected() -> None:
    windows, quota = 20, 600
    server = simulate_rate(60, windows=windows, quota=quota)
    assert sum(w.rate_limited for w in server.windows) == 0
    assert sum(w.delivered for w in server.windows[2:]) >= 0.99 * quota * (windows - 2)


def test_simulation_with_a_longer_round_trip_still_no_429() -> None:
    # 50 ms round trips: the window end is learned 25 ms late, so every window starts a bit late.
    windows, quota = 20, 600
    server = simulate_rate(6000, windows=windows, quota=quota, latency_s=0.05)
    assert sum(w.rate_limited for w in server.windows) == 0
    assert sum(w.delivered for w in server.windows) >= 0.98 * quota * windows


@pytest.mark.parametrize(("quota", "window_s", "windows"), [(300, 60.0, 5), (600, 6.0, 20)])
def test_simulation_one_outlier_reset_does_not_slow_delivery(
    quota: int, window_s: float, windows: int
) -> None:
    # One answer says the quota resets in an hour. Taken as the window's length, it paced the
    # real remote's 300 a minute at one request every 12 s, until a restart.
    per_minute = round(quota * 60 / window_s)
    server = simulate_rate(
        per_minute, windows=windows, quota=quota, window_s=window_s, outliers={30: 3600}
    )
    assert sum(w.rate_limited for w in server.windows) == 0
    assert sum(w.delivered for w in server.windows) >= 0.98 * quota * windows


def test_simulation_outliers_that_agree_are_outvoted() -> None:
    # Two answers in a row claim an hour; the next ones of their window say it ends sooner.
    windows, quota = 20, 600
    server = simulate_rate(
        6000, windows=windows, quota=quota, concurrency=1, outliers={30: 3600, 31: 3600}
    )
    assert sum(w.rate_limited for w in server.windows) == 0
    assert sum(w.delivered for w in server.windows) >= 0.98 * quota * windows


def feed_window(limiter: RateLimiter, clock: FakeClock, length_s: float) -> None:
    """A server window of `length_s` from its start: three answers 0.1 s apart, then its end."""
    start = clock.now
    for _ in range(3):
        ticket = take_waiting(limiter, clock)
        reset = math.ceil(length_s - (clock.now - start))
        limiter.observe(ticket, limit=600, remaining=599, reset_s=reset)
        clock.advance(0.1)
    clock.advance(max(0.0, start + length_s - clock.now))


def test_a_single_answer_never_lengthens_the_window_and_an_outlier_agrees_with_nobody() -> None:
    clock = FakeClock()
    limiter = RateLimiter(600, clock=clock)
    ticket = take(limiter)
    limiter.observe(ticket, limit=600, reset_s=3600)  # alone: no more than the assumed minute
    assert limiter.window_s == 60.0
    clock.advance(0.5)
    ticket = take_waiting(limiter, clock)
    limiter.observe(ticket, limit=600, reset_s=6)  # the hour's window ends 6 s from now
    assert limiter.window_s == 6.0
    clock.advance(1.0)
    ticket = take_waiting(limiter, clock)
    limiter.observe(ticket, limit=600, reset_s=5)  # agrees with the last answer, not the first
    assert limiter.window_s == 6.0
    assert limiter.rate == pytest.approx(100.0)


def test_a_learned_window_decays_when_the_remote_changes_it() -> None:
    clock = FakeClock()
    limiter = RateLimiter(600, clock=clock)
    for _ in range(2):
        feed_window(limiter, clock, 60.0)
    assert limiter.window_s == 60.0
    for _ in range(KEEP):  # the remote now counts per 6 s: the minute is still remembered ...
        feed_window(limiter, clock, 6.0)
        assert limiter.window_s == 60.0
    feed_window(limiter, clock, 6.0)  # ... for KEEP windows, no longer
    assert limiter.window_s == 6.0


def test_a_reload_forgets_the_window_lengths_of_past_windows() -> None:
    clock = FakeClock()
    limiter = RateLimiter(600, clock=clock)
    for length in (60.0, 60.0, 6.0):
        feed_window(limiter, clock, length)
    ticket = take_waiting(limiter, clock)  # the next 6 s window begins
    limiter.observe(ticket, limit=600, reset_s=6)
    assert limiter.window_s == 60.0
    limiter.relearn_window()
    assert limiter.window_s == 6.0  # what the current window shows
    assert limiter.rate == pytest.approx(100.0)


# --- ConcurrencyController ----------------------------------------------------------------------

# Binary fractions of a second: the fake clock adds them up exactly, so a round trip lasts exactly
# as long as the latency it reports and windows end where the tests expect.
RTT = 0.125
EARLY = 1 / 128  # too soon after a window starts to end it


def round_trip(
    controller: ConcurrencyController,
    clock: FakeClock,
    *,
    requests: int | None = None,
    rtt: float = RTT,
    backpressure: bool = False,
) -> int:
    """One round trip: `requests` (default: the limit) go out together, and come back by `rtt`.

    All answers but the last come back early, and the last one, `rtt` after the round began,
    ends the window (for a latency that does not fall), so each round is one window holding its
    own answers, and the throughput is `requests / rtt`. Returns the limit after it.
    """
    count = controller.limit if requests is None else requests
    for _ in range(count):
        controller.request_started()
    clock.advance(EARLY)
    for _ in range(count - 1):
        controller.request_finished(rtt, backpressure=backpressure)
    clock.advance(rtt - EARLY)
    controller.request_finished(rtt, backpressure=backpressure)
    return controller.limit


def round_trips(
    controller: ConcurrencyController, clock: FakeClock, count: int, latency: Callable[[int], float]
) -> list[int]:
    """`count` round trips at the latency `latency(limit)`; the limit after each."""
    return [round_trip(controller, clock, rtt=latency(controller.limit)) for _ in range(count)]


def knee(at: int) -> Callable[[int], float]:
    """Steady latency up to `at` in flight, then in proportion: the throughput stops growing."""
    return lambda limit: RTT * max(1.0, limit / at)


def probing(limit: int, *, maximum: int = 100, clock: FakeClock) -> ConcurrencyController:
    """An adaptive controller at `limit`, past its slow start."""
    controller = ConcurrencyController(minimum=limit, maximum=maximum, clock=clock)
    controller.configure(minimum=1, maximum=maximum, fixed=0)
    controller.slow_start = False
    return controller


def test_a_fixed_concurrency_stays_fixed() -> None:
    clock = FakeClock()
    controller = ConcurrencyController(minimum=1, maximum=50, fixed=5, clock=clock)
    assert not controller.adaptive
    assert controller.limit == 5
    assert [round_trip(controller, clock) for _ in range(5)] == [5] * 5
    assert round_trip(controller, clock, backpressure=True) == 5
    assert round_trip(controller, clock, rtt=1.0) == 5


def test_slow_start_doubles_every_round_trip_while_the_latency_holds() -> None:
    clock = FakeClock()
    controller = ConcurrencyController(minimum=1, maximum=500, clock=clock)
    assert controller.adaptive
    assert controller.slow_start
    assert controller.limit == 1
    assert [round_trip(controller, clock) for _ in range(6)] == [2, 4, 8, 16, 32, 64]
    assert controller.past_rtt == pytest.approx(RTT)
    assert controller.base_rtt == pytest.approx(RTT)
    assert controller.sending == 0
    assert controller.slow_start


@pytest.mark.parametrize("slow_start", [True, False])
def test_no_growth_when_the_limit_is_not_reached(slow_start: bool) -> None:
    clock = FakeClock()
    controller = ConcurrencyController(minimum=4, maximum=50, clock=clock)
    controller.slow_start = slow_start
    assert [round_trip(controller, clock, requests=3) for _ in range(20)] == [4] * 20


async def test_a_request_waiting_for_a_slot_counts_as_reaching_the_limit() -> None:
    # Slots held by requests not yet sending (passing the gates): the demand is still there.
    clock = FakeClock()
    controller = ConcurrencyController(minimum=2, maximum=50, clock=clock)
    await controller.acquire()
    await controller.acquire()
    waiter = asyncio.create_task(controller.acquire())
    await settle()
    controller.request_started()  # one of two slots sends: below the limit
    clock.advance(RTT)
    controller.request_finished(RTT, backpressure=False)
    assert controller.limit == 4
    await settle()
    assert waiter.done()


def test_growth_stops_at_the_maximum() -> None:
    clock = FakeClock()
    controller = ConcurrencyController(minimum=1, maximum=3, clock=clock)
    limits = [round_trip(controller, clock) for _ in range(30)]
    assert limits[:2] == [2, 3]
    assert max(limits) == 3
    assert not controller.slow_start
    # Only probes below it, which do not pay, leave the maximum (and less often each time).
    assert limits.count(3) >= 2 * limits.count(2)
    assert limits[-1] == 3


def test_once_the_latency_rises_the_slow_start_measures_each_doubling() -> None:
    # Past 16 in flight the latency grows in proportion: 32 brings no more than 16.
    clock = FakeClock()
    controller = ConcurrencyController(minimum=1, maximum=500, clock=clock)
    limits = round_trips(controller, clock, 10, knee(16))
    # The latency rises at 32: back to 16, measured (a warm-up round, then one round), then
    # 32 measured the same way; it does not pay, so the slow start ends at 16.
    assert limits == [2, 4, 8, 16, 32, 16, 16, 32, 32, 16]
    assert not controller.slow_start
    # Probes on either side (20, 12) do not pay either: the limit stays at the knee.
    limits = round_trips(controller, clock, 60, knee(16))
    assert set(limits) <= {12, 16, 20}
    assert limits.count(16) >= 40
    assert limits[-1] == 16


def test_growth_goes_on_while_it_pays_though_the_latency_rises() -> None:
    # Local CPU queueing, or a remote with capacity to spare: at 256 in flight the latency has
    # doubled, yet each step up still brings more throughput. The limit grows to the maximum.
    clock = FakeClock()
    controller = ConcurrencyController(minimum=1, maximum=256, clock=clock)
    limits = round_trips(controller, clock, 60, lambda limit: RTT * (1 + limit / 256))
    assert max(limits) == 256
    reached = limits.index(256)
    assert reached < 20
    assert min(limits[reached:]) >= 204  # only probes below it
    assert limits[-1] == 256


def test_probes_step_up_while_each_step_pays() -> None:
    clock = FakeClock()
    controller = probing(10, clock=clock)
    limits = round_trips(controller, clock, 60, lambda _: RTT)
    # Measure 10 (a warm-up round and three), then step up by a quarter, measured the same way.
    assert limits[:4] == [10, 10, 10, 13]
    top = limits.index(100)
    assert sorted(set(limits[:top])) == [10, 13, 17, 22, 28, 35, 44, 55, 69, 87]
    assert limits[:top] == sorted(limits[:top])
    # At the maximum, only probes below it (80), which do not pay.
    assert set(limits[top:]) == {80, 100}
    assert limits[top:].count(100) > limits[top:].count(80)


def test_a_lower_limit_that_loses_nothing_is_taken() -> None:
    # Past the knee at 16 the throughput is flat: 40 in flight only queue at the remote.
    clock = FakeClock()
    controller = probing(40, clock=clock)
    limits = round_trips(controller, clock, 120, knee(16))
    # A step up first (50: it does not pay), then down step by step to the knee.
    assert 50 in limits
    assert [step for step in (32, 25, 20, 16) if step in limits] == [32, 25, 20, 16]
    settled = limits[limits.index(16) :]
    assert set(settled) == {12, 16, 20}
    assert settled.count(16) > 2 * (len(settled) - settled.count(16))


def test_backpressure_halves_the_limit_down_to_the_minimum() -> None:
    clock = FakeClock()
    controller = ConcurrencyController(minimum=3, maximum=50, clock=clock)
    assert [round_trip(controller, clock) for _ in range(5)] == [6, 12, 24, 48, 50]
    errors = [round_trip(controller, clock, backpressure=True) for _ in range(5)]
    assert errors == [25, 12, 6, 3, 3]
    assert not controller.slow_start


def test_after_backpressure_growth_resumes_by_probing() -> None:
    clock = FakeClock()
    controller = ConcurrencyController(minimum=1, maximum=40, clock=clock)
    for _ in range(6):
        round_trip(controller, clock)
    assert controller.limit == 40
    # Errors come back fast (too fast to end the window: the next round trip does); that is
    # no latency to learn.
    round_trip(controller, clock, rtt=EARLY * 2, backpressure=True)
    assert round_trip(controller, clock) == 20
    assert controller.base_rtt == 0.0
    assert not controller.slow_start
    limits = round_trips(controller, clock, 20, lambda _: RTT)
    assert controller.base_rtt == pytest.approx(RTT)
    # Measured, then a quarter up per probe (a warm-up round and three measured) while it pays,
    # to the maximum.
    assert limits[:12] == [20] * 3 + [25] * 4 + [32] * 4 + [40]


def test_slow_start_ends_on_backpressure_with_a_halving() -> None:
    clock = FakeClock()
    controller = ConcurrencyController(minimum=1, maximum=500, clock=clock)
    for _ in range(4):
        round_trip(controller, clock)
    assert controller.limit == 16
    assert round_trip(controller, clock, backpressure=True) == 8
    assert not controller.slow_start


def test_restart_goes_back_to_the_minimum_only_when_adaptive() -> None:
    clock = FakeClock()
    adaptive = probing(30, clock=clock)
    adaptive.configure(minimum=2, maximum=100, fixed=0)
    adaptive.restart()
    assert adaptive.limit == 2
    assert adaptive.slow_start  # a new ramp: doubling again
    assert [round_trip(adaptive, clock) for _ in range(3)] == [4, 8, 16]
    fixed = ConcurrencyController(minimum=2, maximum=50, fixed=12, clock=FakeClock())
    fixed.restart()
    assert fixed.limit == 12


def test_configure_clamps_the_limit() -> None:
    clock = FakeClock()
    controller = ConcurrencyController(minimum=1, maximum=50, clock=clock)
    for _ in range(5):
        round_trip(controller, clock)
    assert controller.limit == 32
    controller.configure(minimum=1, maximum=10, fixed=0)
    assert controller.limit == 10
    controller.configure(minimum=15, maximum=30, fixed=0)
    assert controller.limit == 15
    controller.configure(minimum=1, maximum=30, fixed=7)
    assert (controller.limit, controller.adaptive) == (7, False)
    controller.configure(minimum=1, maximum=30, fixed=0)
    assert (controller.limit, controller.adaptive) == (7, True)
    assert max(round_trip(controller, clock) for _ in range(40)) <= 30


async def settle() -> None:
    """Let woken tasks run (no time passes)."""
    for _ in range(5):
        await asyncio.sleep(0)


async def test_slots_are_handed_out_first_come_first_served() -> None:
    controller = ConcurrencyController(minimum=1, maximum=10, fixed=1)
    await controller.acquire()
    order: list[int] = []

    async def worker(n: int) -> None:
        await controller.acquire()
        order.append(n)

    tasks = [asyncio.create_task(worker(n)) for n in range(3)]
    await settle()
    assert order == []
    for expected in ([0], [0, 1], [0, 1, 2]):
        controller.release()
        await settle()
        assert order == expected
    assert controller.in_use == 1
    await asyncio.gather(*tasks)


async def test_a_freed_slot_goes_to_a_waiter_not_to_a_newcomer() -> None:
    controller = ConcurrencyController(minimum=1, maximum=10, fixed=1)
    await controller.acquire()
    waiter = asyncio.create_task(controller.acquire())
    await settle()
    controller.release()
    newcomer = asyncio.create_task(controller.acquire())
    await settle()
    assert waiter.done()
    assert not newcomer.done()
    controller.release()
    await settle()
    assert newcomer.done()


async def test_waiters_are_woken_when_the_limit_grows() -> None:
    clock = FakeClock()
    controller = ConcurrencyController(minimum=1, maximum=10, clock=clock)
    await controller.acquire()
    waiter = asyncio.create_task(controller.acquire())
    await settle()
    assert not waiter.done()
    controller.request_started()  # the slot holder sends: the limit is reached
    clock.advance(0.1)
    controller.request_finished(0.1, backpressure=False)  # ends a window: the limit grows
    assert controller.limit == 2
    await settle()
    assert waiter.done()
    assert controller.in_use == 2


async def test_waiters_are_woken_when_configure_raises_the_limit() -> None:
    controller = ConcurrencyController(minimum=1, maximum=10, fixed=1)
    await controller.acquire()
    waiter = asyncio.create_task(controller.acquire())
    await settle()
    controller.configure(minimum=1, maximum=10, fixed=2)
    await settle()
    assert waiter.done()


async def test_a_cancelled_waiter_takes_no_slot() -> None:
    controller = ConcurrencyController(minimum=1, maximum=10, fixed=1)
    await controller.acquire()
    waiter = asyncio.create_task(controller.acquire())
    await settle()
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    controller.release()
    assert controller.in_use == 0
    await controller.acquire()  # the slot is free for the next one
    assert controller.in_use == 1


async def test_a_waiter_cancelled_as_a_slot_is_released_ends_cancelled() -> None:
    # Cancelled first, then the release runs before the waiter does: it must not fail.
    controller = ConcurrencyController(minimum=1, maximum=10, fixed=1)
    await controller.acquire()
    waiter = asyncio.create_task(controller.acquire())
    await settle()
    waiter.cancel()
    controller.release()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert controller.in_use == 0


async def test_a_waiter_cancelled_after_the_handover_passes_the_slot_on() -> None:
    controller = ConcurrencyController(minimum=1, maximum=10, fixed=1)
    await controller.acquire()
    first = asyncio.create_task(controller.acquire())
    second = asyncio.create_task(controller.acquire())
    await settle()
    controller.release()  # hands the slot to `first` ...
    first.cancel()  # ... which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await first
    await settle()
    assert second.done()
    assert controller.in_use == 1
    controller.release()
    assert controller.in_use == 0


# --- ConcurrencyController: simulation against servers with and without a knee ------------------


def knee_latency(inflight: int) -> float:
    """0.1 s up to 40 in flight, then in proportion: beyond 40 the throughput is flat."""
    return 0.1 * max(1.0, inflight / 40)


def sublinear_latency(inflight: int) -> float:
    """Latency that grows with the load but less than in proportion: more in flight pays."""
    return 0.1 * (1 + inflight / 400)


def simulate_concurrency(
    *,
    latency: Callable[[int], float] = knee_latency,
    fixed: int = 0,
    maximum: int = 200,
    duration_s: float = 60.0,
    jitter: float = 0.0,
    slowdown_at: float = math.inf,
) -> tuple[float, list[tuple[float, int]]]:
    """A client with an endless backlog against a server whose latency is `latency(in flight)`,
    each request's drawn as it leaves; from `slowdown_at` seconds on, the server is twice as slow.

    Returns the throughput (requests per second) and the limit after every answer.
    """
    rng = random.Random(7)
    clock = FakeClock()
    start = clock.now
    controller = ConcurrencyController(minimum=1, maximum=maximum, fixed=fixed, clock=clock)
    in_flight: list[tuple[float, int, float]] = []
    sent = done = 0
    limits: list[tuple[float, int]] = []
    while True:
        while controller.sending < controller.limit:
            controller.request_started()
            took = latency(controller.sending) * (1 + rng.uniform(-jitter, jitter))
            if clock.now - start >= slowdown_at:
                took *= 2
            sent += 1
            heapq.heappush(in_flight, (clock.now + took, sent, took))
        answer_at, _, took = heapq.heappop(in_flight)
        if answer_at > start + duration_s:
            return done / duration_s, limits
        clock.advance(answer_at - clock.now)
        controller.request_finished(took, backpressure=False)
        done += 1
        limits.append((clock.now - start, controller.limit))


@functools.cache
def best_fixed_throughput(latency: Callable[[int], float], levels: tuple[int, ...]) -> float:
    return max(simulate_concurrency(latency=latency, fixed=n, duration_s=20.0)[0] for n in levels)


@pytest.mark.parametrize("jitter", [0.0, 0.2])
def test_simulation_adaptive_concurrency_settles_at_the_knee(jitter: float) -> None:
    best_fixed = best_fixed_throughput(knee_latency, (20, 40, 60, 80))
    throughput, limits = simulate_concurrency(jitter=jitter)
    settled = [limit for at, limit in limits if at >= 20.0]
    # Probes go a step either side of the knee (32, 50); between probes the limit sits on it
    # or, without jitter, a step or two above (flat throughput: no reason to move either way).
    assert min(settled) >= 30
    assert max(settled) <= 90
    assert throughput >= 0.9 * best_fixed


@pytest.mark.parametrize("jitter", [0.0, 0.2])
def test_simulation_adaptive_concurrency_grows_while_it_pays(jitter: float) -> None:
    # The latency rises with every step (at 256 in flight it is 64% up), but less than in
    # proportion: each step still brings more throughput, so the limit goes to the maximum.
    levels = (64, 128, 192, 256)
    best_fixed = best_fixed_throughput(sublinear_latency, levels)
    throughput, limits = simulate_concurrency(latency=sublinear_latency, maximum=256, jitter=jitter)
    settled = [limit for at, limit in limits if at >= 10.0]
    assert min(settled) >= 0.75 * 256  # the maximum, but for probes a step below
    assert max(settled) == 256
    assert throughput >= 0.9 * best_fixed


@pytest.mark.parametrize(
    ("latency", "low", "high"), [(knee_latency, 30, 90), (sublinear_latency, 0.75 * 256, 256)]
)
def test_simulation_a_remote_that_slows_down_does_not_ratchet_the_limit_down(
    latency: Callable[[int], float], low: float, high: int
) -> None:
    # Twice the latency at every load from 30 s on: the knee stays where it was, and so should
    # the limit (a controller that takes a latency rise for queueing would cut it for good).
    _, limits = simulate_concurrency(
        latency=latency, maximum=256, jitter=0.2, slowdown_at=30.0, duration_s=90.0
    )
    settled = [limit for at, limit in limits if at >= 50.0]
    assert min(settled) >= low
    assert max(settled) <= high


# --- CircuitBreaker -----------------------------------------------------------------------------


def make_breaker(clock: FakeClock, *, failures: int = 3) -> CircuitBreaker:
    return CircuitBreaker(failures=failures, probe_initial_s=1.0, probe_max_s=5.0, clock=clock)


def open_breaker(breaker: CircuitBreaker) -> None:
    for _ in range(breaker.threshold - 1):
        assert breaker.failure("boom") is False
    assert breaker.failure("boom") is True


def test_the_breaker_opens_after_consecutive_failures() -> None:
    clock = FakeClock()
    breaker = make_breaker(clock)
    assert breaker.permit() is True
    breaker.failure("a")
    breaker.failure("b")
    assert breaker.success() is False  # closed already: nothing to report
    assert breaker.consecutive == 0
    breaker.failure("c")
    breaker.failure("d")
    assert not breaker.is_open
    assert breaker.failure("e") is True
    assert breaker.state is BreakerState.OPEN
    assert breaker.is_open
    assert breaker.opened == 1
    assert breaker.opened_at == clock.now
    assert breaker.last_error == "e"


def test_an_open_breaker_lets_exactly_one_probe_through_after_the_interval() -> None:
    clock = FakeClock()
    breaker = make_breaker(clock)
    open_breaker(breaker)
    assert breaker.permit() == pytest.approx(1.0)
    clock.advance(0.4)
    assert breaker.permit() == pytest.approx(0.6)
    clock.advance(0.6)
    assert breaker.permit() is True  # the probe
    assert breaker.state is BreakerState.HALF_OPEN
    other = breaker.permit()
    assert other is not True
    assert other > 0
    clock.advance(10.0)
    assert breaker.permit() is not True  # still only the one probe


def test_a_successful_probe_closes_the_breaker() -> None:
    clock = FakeClock()
    breaker = make_breaker(clock)
    open_breaker(breaker)
    clock.advance(1.0)
    assert breaker.permit() is True
    assert breaker.success() is True
    assert breaker.state is BreakerState.CLOSED
    assert breaker.success() is False  # reported once
    assert breaker.permit() is True
    assert breaker.interval_s == 1.0


def test_a_failed_probe_reopens_with_a_doubled_interval_up_to_the_maximum() -> None:
    clock = FakeClock()
    breaker = make_breaker(clock)
    open_breaker(breaker)
    intervals = []
    for _ in range(5):
        clock.advance(breaker.interval_s)
        assert breaker.permit() is True
        assert breaker.failure("still down", probe=True) is True
        assert breaker.state is BreakerState.OPEN
        intervals.append(breaker.interval_s)
        assert breaker.permit() == pytest.approx(breaker.interval_s)
    assert intervals == [2.0, 4.0, 5.0, 5.0, 5.0]
    assert breaker.opened == 1  # reopening is not opening


def test_an_abandoned_probe_lets_another_attempt_probe() -> None:
    clock = FakeClock()
    breaker = make_breaker(clock)
    open_breaker(breaker)
    clock.advance(1.0)
    assert breaker.permit() is True
    assert breaker.permit() is not True
    breaker.abandon()
    assert breaker.permit() is True
    assert breaker.permit() is not True


def test_failures_of_other_requests_change_nothing_while_open() -> None:
    clock = FakeClock()
    breaker = make_breaker(clock)
    open_breaker(breaker)
    # Requests sent before the breaker opened come back failed: no reopening, same interval.
    assert breaker.failure("late") is False
    clock.advance(1.0)
    assert breaker.permit() is True
    assert breaker.failure("late too") is False  # not the probe
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.interval_s == 1.0
    assert breaker.permit() is not True  # the probe is still out
    assert breaker.success() is True


def test_configure_applies_new_settings_and_an_open_breaker_stays_open() -> None:
    clock = FakeClock()
    breaker = make_breaker(clock)
    open_breaker(breaker)
    breaker.configure(failures=1, probe_initial_s=2.0, probe_max_s=3.0)
    assert breaker.is_open
    assert breaker.interval_s == 2.0  # clamped into the new bounds
    clock.advance(1.0)
    assert breaker.permit() is True  # the retry time set when it opened still holds
    assert breaker.failure("x", probe=True) is True
    assert breaker.interval_s == 3.0
    clock.advance(3.0)
    assert breaker.permit() is True
    assert breaker.success() is True
    assert breaker.interval_s == 2.0
    assert breaker.failure("once") is True  # the new threshold: one failure opens it
