"""`RedisRateBudget`: an account's rate budget shared by every host of the fleet.

It implements the `RateBudget` seam (delivery/flow/budget.py), so the lane does not know it is
shared. The shared state lives in `{P:A}:budget` and changes only through one Lua script
(`budgetscript.py`, on Redis's clock). A host takes tokens a few at a time (about `BATCH_S` of
the account's rate, at least one), reserved up to `AHEAD_S` before they may be sent, so
`try_acquire` is a local decrement on the fast path and only `acquire` waits for a round trip
(and for the reserved batch's time). Tokens not used within `TOKEN_TTL_S`, or by the end of the
window they were counted in, are dropped and given back with the next call (an idle host does
not hoard). What the remote answers (`X-RateLimit-*`, a 429 and its wait) goes to Redis with the
next call; a 429 at once, so it pauses the whole fleet.

Every answer also feeds this host's own `RateLimiter`: it learns the window's length (the
fleet's script is told it) and is the fallback. When Redis does not answer (`FleetMode`), the
budget serves from that limiter with its quota set to the learnt limit divided by the live
members last seen; the host goes back to Redis once the heartbeat reaches it again. Both ways
the window the switch falls in is counted once: on entering fallback the limiter counts on in
the fleet's current window with this host's share of what the fleet had left in it, and on
coming back the newest answer seen in fallback (the remote's count, every host's requests in
it) goes to Redis with the first call, with what this host sent alone in its window and its
members' shares, so the shared window resumes from it and holds back what the members still in
fallback may send (budgetscript.py says how no window goes over the quota then). In fallback a
host's share caps its own requests; the remote's count (everyone's) still stops it when the
window is spent, so the others' requests do not shrink its share a second time.

One module although just over 400 lines: the tokens in hand, the answers not written yet and
the switch to and from fallback change one state together (the script is in budgetscript.py,
the answers' merging in budgetanswer.py).
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from dataclasses import dataclass
from typing import Any

from forwarder.delivery.flow.budget import MAX_WAIT_SLICE_S, Sleep
from forwarder.delivery.flow.ratelimit import (
    BURST_S,
    DEFAULT_429_WAIT_S,
    RESET_GRANULARITY_S,
    Clock,
    RateLimiter,
    Ticket,
)
from forwarder.delivery.flow.ratewindow import DEFAULT_WINDOW_S
from forwarder.delivery.flow.ratewindow import MAX_WINDOW_S as MAX_PACED_WINDOW_S
from forwarder.fleet.budgetanswer import Answer, answer_args, merged
from forwarder.fleet.budgetscript import BUDGET_LUA
from forwarder.fleet.connection import CALL_TIMEOUT_S, FleetClient, RedisUnavailable, as_text
from forwarder.fleet.members import HEARTBEAT_S
from forwarder.fleet.mode import FleetMode

# A host takes this long's worth of the account's rate per round trip (at least one token,
# at most the burst: BURST_S).
BATCH_S = 0.2
# A batch may be reserved this far ahead of when it may be sent (the host waits for it).
AHEAD_S = 0.5
# Tokens not used within this are dropped (and given back): an idle host does not hoard.
TOKEN_TTL_S = 0.5
# The budget hash outlives its last use by this long (an account gone from every host).
KEY_TTL_MS = 24 * 3600 * 1000
# Once one host is back from fallback, every live member's heartbeat reaches Redis within this
# (its next beat, bounded): until then the fleet holds back the shares of the others.
BACK_S = HEARTBEAT_S + CALL_TIMEOUT_S


@dataclass(frozen=True, slots=True)
class SharedTicket(Ticket):
    """A ticket counted in the fleet's window `epoch`; `local_epoch` is this host's limiter's."""

    local_epoch: int


class RedisRateBudget:
    """One account's budget, shared through Redis (see the module docstring)."""

    def __init__(
        self,
        account: str,
        per_minute: int,
        *,
        fleet: FleetClient,
        mode: FleetMode,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.account = account
        self.local = RateLimiter(per_minute, clock=clock)
        self._fleet = fleet
        self._mode = mode
        self._clock = clock
        self._sleep = sleep
        self._key = fleet.account_key(account, "budget")
        self._script = fleet.client.register_script(BUDGET_LUA)
        self._lock = asyncio.Lock()
        self._tokens = 0
        self._epoch = 0  # the fleet's window the tokens in hand count in
        self._tokens_from = 0.0
        self._tokens_until = 0.0
        self._give_back = 0
        self._give_back_epoch = 0
        self._answer: Answer | None = None
        # The account's quota per window as last learnt (the shared state, a remote's header).
        self._limit = self.local.limit
        self._window_s = self.local.window_s  # the fleet's, as of the last call
        self._paused_until = 0.0
        self._pushes: set[asyncio.Task[None]] = set()
        self._registered = False
        # The shared state as of the last call (for `view`).
        self._shared: dict[str, Any] = {}
        # The fleet's current window as last known: its end (this host's clock) and what was
        # left in it (the shared count, or a later X-RateLimit-Remaining); None: never known.
        self._fleet_window_end = 0.0
        self._fleet_remaining: int | None = None
        self._fleet_seen_at = 0.0
        self._serving_locally = False  # in fallback, the local limiter took over
        self._back_share = 0  # back from serving locally: the share to tell Redis (0: not)
        self.taken = 0  # tokens taken from Redis
        self.calls = 0  # script calls

    # --- the RateBudget seam --------------------------------------------------------------------

    def try_acquire(self) -> Ticket | float:
        """A token in hand now, else 0.0 (`acquire` takes the next batch from Redis)."""
        if self._lock.locked():
            return 0.0
        return self._take_local()

    async def acquire(self) -> Ticket:
        """Wait for a ticket, one waiter at a time in arrival order; every wait bounded."""
        async with self._lock:
            while True:
                got = self._take_local()
                if isinstance(got, Ticket):
                    return got
                if not got and not self._mode.fallback:
                    got = await self._call(self._batch())
                    if not got:
                        continue  # tokens in hand now
                if got:
                    await self._sleep(min(got, MAX_WAIT_SLICE_S))

    def observe(
        self,
        ticket: Ticket,
        *,
        limit: int | None = None,
        remaining: int | None = None,
        reset_s: float | None = None,
        rate_limited: bool = False,
        retry_after: float | None = None,
    ) -> None:
        """Learn locally at once; write the answer to the shared state (a 429 right away)."""
        local_ticket = ticket
        # A fallback ticket's answer tells the remote's count too: written with the first call
        # back, to the fleet's last known window (the script places it by its reset).
        epoch = self._epoch
        if isinstance(ticket, SharedTicket):
            local_ticket, epoch = Ticket(ticket.local_epoch), ticket.epoch
            if remaining is not None and epoch == self._epoch and self._fleet_remaining is not None:
                self._fleet_remaining = min(self._fleet_remaining, remaining)
        answer = Answer(
            epoch,
            local_ticket.epoch,
            self._clock(),
            limit,
            remaining,
            reset_s,
            rate_limited,
            retry_after,
        )
        # A 429 stays queued until written: a later plain answer must not hide it.
        if self._answer is None or not self._answer.rate_limited or rate_limited:
            self._answer = merged(self._answer, answer)
        if rate_limited and not self._mode.fallback:
            push = asyncio.get_running_loop().create_task(self._push())
            self._pushes.add(push)
            push.add_done_callback(self._pushes.discard)
        if limit is not None and limit > 0:
            self._limit = limit
        self.local.observe(
            local_ticket,
            limit=limit,
            remaining=remaining,
            reset_s=reset_s,
            rate_limited=rate_limited,
            retry_after=retry_after,
        )
        if rate_limited:
            self._drop_tokens()

    @property
    def paused_until(self) -> float:
        """Until when (this host's monotonic clock) a 429 pauses the account, fleet-wide."""
        return max(self._paused_until, self.local.gate_until)

    def view(self) -> dict[str, Any]:
        """The shared state as of the last call, for /v1/stats (the keys of the local view)."""
        shared = self._shared
        now = self._clock()
        return {
            "limit_per_window": self._limit,
            "window_s": self._window_s,
            "remaining": shared.get("remaining", self.local.remaining),
            "tokens": self._tokens,
            "rate_limited": self.local.rate_limited,
            "paused_for_s": round(max(0.0, self.paused_until - now), 3),
            "shared": True,
            "fleet_rate_limited": shared.get("rate_limited", 0),
            "fallback_limit": self._fallback_limit(),
            "tokens_taken": self.taken,
            "redis_calls": self.calls,
        }

    def set_per_minute(self, per_minute: int) -> None:
        """Apply a configured quota (reload): the start value; the remote's headers win."""
        self.local.set_per_minute(per_minute)
        self._limit = self.local.limit

    def relearn_window(self) -> None:
        """Forget the learned window length (reload)."""
        self.local.relearn_window()

    # --- tokens in hand -------------------------------------------------------------------------

    def _take_local(self) -> Ticket | float:
        """A token in hand (or, in fallback, from the local limiter), else the wait (0.0: ask
        Redis)."""
        now = self._clock()
        if not self._mode.fallback:
            if self._serving_locally:
                # The first call back tells Redis, which holds back the others' shares.
                self._back_share = self._fallback_limit()
            self._serving_locally = False
            self.local.share = None
        if now < self.paused_until:
            return self.paused_until - now
        if self._tokens and now >= self._tokens_until:
            self._drop_tokens()
        if self._tokens and now < self._tokens_from:
            return self._tokens_from - now  # reserved, not to be sent yet
        if self._tokens:
            self._tokens -= 1
            return SharedTicket(self._epoch, self.local.epoch)
        if self._mode.fallback:
            # The host's share caps its own requests; the remote's count (every host's, learnt
            # from X-RateLimit-Remaining against the whole limit) still stops it at the quota.
            self.local.limit = self._limit
            self.local.share = self._fallback_limit()
            if not self._serving_locally:
                self._serving_locally = True
                self._take_over()
            return self.local.reserve()
        return 0.0

    def _take_over(self) -> None:
        """Entering fallback: the local limiter counts on in the fleet's current window with this
        host's share of what was left in it, so the fleet stays under the quota there."""
        if self._fleet_remaining is None:
            return  # Redis never answered this budget: nothing is known of the fleet's window
        # Since this host's last call the others took at most what the shared pacing (GCRA,
        # reserved up to AHEAD_S ahead, with its burst) let through: the rest is what is left.
        since = self._clock() - self._fleet_seen_at + AHEAD_S + BURST_S
        left = max(0, self._fleet_remaining - math.ceil(self._limit / self._window_s * since))
        own = left // self._mode.live_members
        self.local.take_over_window(self._fleet_window_end, left, own=own)

    def _drop_tokens(self) -> None:
        if self._tokens:
            self._give_back, self._give_back_epoch = self._give_back + self._tokens, self._epoch
            self._tokens = 0

    def _batch(self) -> int:
        return max(1, math.floor(self._limit / self._window_s * BATCH_S))

    def _window_ms(self) -> int:
        """The window's length this host learnt, or 0 while it has learnt none (the fleet's
        counts then: a host that just started must not pace the fleet by a minute)."""
        window = self.local.window_s
        return 0 if window == DEFAULT_WINDOW_S else _ms(window)

    def _fallback_limit(self) -> int:
        """The quota this host takes alone when Redis is out: its share of the fleet's limit."""
        return max(1, self._limit // self._mode.live_members)

    # --- Redis ----------------------------------------------------------------------------------

    async def _push(self) -> None:
        """Write a 429 to the shared state at once (the fleet pauses)."""
        # Not behind the waiters' lock: a call taking no tokens may overlap theirs (each
        # takes what it sends before its first await, and each reply is a whole snapshot).
        if self._answer is not None and not self._mode.fallback:
            await self._call(0)

    async def _call(self, want: int) -> float:
        """One script call: give back, tell the newest answer, take up to `want` tokens.

        Returns 0.0 when tokens were granted, else the seconds to wait; Redis failing puts the
        host in fallback and returns 0.0 (the caller serves locally then).
        """
        if not self._registered:
            await self._register()
            if self._mode.fallback:
                return 0.0
        answer, self._answer = self._answer, None
        back, self._give_back = self._give_back, 0
        now = self._clock()
        args: list[int | str] = [
            want,
            back,
            self._give_back_epoch,
            self._limit,
            self._window_ms(),
            _ms(BURST_S),
            _ms(RESET_GRANULARITY_S),
            _ms(DEFAULT_429_WAIT_S),
            _ms(MAX_PACED_WINDOW_S),
            KEY_TTL_MS,
            *answer_args(answer, now),
            _ms(AHEAD_S),
            self._back_share,
            self._mode.live_members - 1,
            _ms(BACK_S),
            self.local.started if self._back_share else 0,
        ]
        try:
            self.calls += 1
            result = await self._fleet.call(
                "budget", lambda: self._script(keys=[self._key], args=args)
            )
        except RedisUnavailable as exc:
            self._mode.lost(str(exc))
            return 0.0
        self._back_share = 0
        (
            granted,
            epoch,
            wait_ms,
            window_left_ms,
            paused_ms,
            limit,
            remaining,
            window_ms,
            limited,
            delay_ms,
            certain_ms,
        ) = (int(x) for x in result)
        now = self._clock()
        self._limit = limit
        self._window_s = window_ms / 1000
        self._shared = {"remaining": remaining, "rate_limited": limited}
        self._fleet_window_end = now + window_left_ms / 1000
        self._fleet_remaining, self._fleet_seen_at = remaining, now
        self._paused_until = now + paused_ms / 1000 if paused_ms else 0.0
        if granted:
            self.taken += granted
            self._tokens, self._epoch = granted, epoch
            self._tokens_from = now + delay_ms / 1000
            # Sent only while surely in the window they were counted in (its end is uncertain
            # by up to the reset's rounding): tokens of a window must not count in the next.
            self._tokens_until = now + min(delay_ms / 1000 + TOKEN_TTL_S, certain_ms / 1000)
            return 0.0
        return max(wait_ms / 1000, 0.001)

    async def _register(self) -> None:
        """Name the account in `P:accounts` (for `forwarder fleet status`), once."""
        try:
            await self._fleet.call(
                "accounts",
                lambda: self._fleet.client.sadd(self._fleet.key("accounts"), self.account),
            )
            self._registered = True
        except RedisUnavailable as exc:
            self._mode.lost(str(exc))


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


async def read_budgets(fleet: FleetClient) -> dict[str, dict[str, Any]]:
    """Every account's shared budget as it stands (for `forwarder fleet status`), by name."""
    client = fleet.client
    seconds, micros = await fleet.call("time", client.time)
    now = int(seconds) * 1000 + int(micros) // 1000
    accounts = fleet.key("accounts")
    names = sorted(
        as_text(n) for n in await fleet.call("accounts", lambda: client.smembers(accounts))
    )
    budgets = {}
    for name in names:
        key = fleet.account_key(name, "budget")
        raw = await fleet.call("budget_read", functools.partial(client.hgetall, key))
        state = {as_text(k): float(as_text(v)) for k, v in raw.items()}
        if not state:
            continue  # expired: the account has not been used for a day
        limit = int(state.get("limit", 0))
        budgets[name] = {
            "limit_per_window": limit,
            "window_s": state.get("window_ms", 0.0) / 1000,
            "remaining": max(0, limit - int(state.get("used", 0)) - int(state.get("external", 0))),
            "window_ends_in_s": round(max(0.0, state.get("window_end", 0.0) - now) / 1000, 3),
            "paused_for_s": round(max(0.0, state.get("paused_until", 0.0) - now) / 1000, 3),
            "rate_limited": int(state.get("rate_limited", 0)),
            "updated_s_ago": round(max(0.0, now - state.get("updated", now)) / 1000, 3),
        }
    return budgets
