"""The rate budget seam: what a lane needs of its account's rate limit, and the local backend.

A lane is handed a `RateBudget` and never builds one: today every budget is a `LocalRateBudget`
(the `RateLimiter` state machine of this host, plus the waiting), and a budget shared by many
hosts (issue 17: Redis) implements the same Protocol without touching the lane. The fast path
is `try_acquire`, which must not await: a shared backend serves it from tokens it took ahead.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from forwarder.delivery.flow.ratelimit import Clock, RateLimiter, Ticket

Sleep = Callable[[float], Awaitable[None]]
# Longest single wait on a gate or the budget: a reload or a stop is noticed within it.
MAX_WAIT_SLICE_S = 1.0


class RateBudget(Protocol):
    """One account's rate budget, as a lane uses it (see the module docstring)."""

    def try_acquire(self) -> Ticket | float:
        """A ticket for one request now, without awaiting; else seconds to wait (0.0 when
        others already wait: then `acquire` queues behind them)."""
        ...

    async def acquire(self) -> Ticket:
        """Wait (fairly, in arrival order, each wait bounded) for a ticket."""
        ...

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
        """Learn from the remote's answer to the request `ticket` let through: its
        `X-RateLimit-*` headers and whether it was a 429 (and its wait)."""
        ...

    @property
    def paused_until(self) -> float:
        """Until when (on the budget's monotonic clock) a 429 pauses the whole account."""
        ...

    def view(self) -> dict[str, Any]:
        """The budget's state for /v1/stats (`rate_limit` of an account) and the metrics."""
        ...

    def set_per_minute(self, per_minute: int) -> None:
        """Apply a configured quota (reload)."""
        ...

    def relearn_window(self) -> None:
        """Forget the learned window length (reload)."""
        ...


class LocalRateBudget:
    """This host's budget for one account: the `RateLimiter`, with its waiters in a queue."""

    def __init__(
        self, per_minute: int, *, clock: Clock = time.monotonic, sleep: Sleep = asyncio.sleep
    ) -> None:
        self.limiter = RateLimiter(per_minute, clock=clock)
        self._clock = clock
        self._sleep = sleep
        self._lock = asyncio.Lock()

    def try_acquire(self) -> Ticket | float:
        """A ticket now, else seconds to wait (see `RateBudget`)."""
        # The lock only orders waiters: with none, take a token at once.
        if self._lock.locked():
            return 0.0
        return self.limiter.reserve()

    async def acquire(self) -> Ticket:
        """Wait for a ticket, one waiter at a time in arrival order: tokens go out fairly."""
        async with self._lock:
            while True:
                reserved = self.limiter.reserve()
                if isinstance(reserved, Ticket):
                    return reserved
                await self._sleep(min(reserved, MAX_WAIT_SLICE_S))

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
        """Correct the limiter from one answer (see `RateLimiter.observe`)."""
        self.limiter.observe(
            ticket,
            limit=limit,
            remaining=remaining,
            reset_s=reset_s,
            rate_limited=rate_limited,
            retry_after=retry_after,
        )

    @property
    def paused_until(self) -> float:
        """Until when a 429 closes the account's gate."""
        return self.limiter.gate_until

    def view(self) -> dict[str, Any]:
        """The limiter's state for /v1/stats."""
        limiter = self.limiter
        return {
            "limit_per_window": limiter.limit,
            "window_s": limiter.window_s,
            "remaining": limiter.remaining,
            "tokens": round(limiter.tokens, 3),
            "rate_limited": limiter.rate_limited,
            # Seconds left of a pause a 429 imposed on the whole account (0: none).
            "paused_for_s": round(max(0.0, limiter.gate_until - self._clock()), 3),
        }

    def set_per_minute(self, per_minute: int) -> None:
        """Apply a configured quota (reload); the server's headers still correct it."""
        self.limiter.set_per_minute(per_minute)

    def relearn_window(self) -> None:
        """Forget the learned window length (reload): answers teach it anew."""
        self.limiter.relearn_window()


def local_budget(per_minute: int, *, clock: Clock, sleep: Sleep) -> RateBudget:
    """The default budget factory: a `LocalRateBudget` per account."""
    return LocalRateBudget(per_minute, clock=clock, sleep=sleep)
