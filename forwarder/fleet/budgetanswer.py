"""The remote's answers a `RedisRateBudget` has not written to Redis yet, and their script args.

A host writes the newest answer it saw with its next call to the budget script. Concurrent
requests' answers arrive out of order, so "newest" is what the remote counted most in the window
and the earliest end it gave, not the last answer seen (`merged`).
"""

from __future__ import annotations

from dataclasses import dataclass

from forwarder.delivery.flow.ratelimit import RESET_GRANULARITY_S


@dataclass(slots=True)
class Answer:
    """The newest answer not yet written to Redis (of the fleet's window `epoch`)."""

    epoch: int
    local_epoch: int  # this host's limiter's window (tells fallback windows apart)
    at: float  # this host's monotonic clock
    limit: int | None
    remaining: int | None
    reset_s: float | None
    rate_limited: bool
    retry_after: float | None


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


def merged(old: Answer | None, new: Answer) -> Answer:
    """The answer to write: `new`, or, when both tell of the same window, the most the remote
    counted in it and the earliest end (concurrent requests' answers arrive out of order: the
    last one seen is not the newest count)."""
    if old is None or (old.epoch, old.local_epoch) != (new.epoch, new.local_epoch):
        return new
    if (
        new.reset_s is not None
        and old.reset_s is not None
        and new.at + new.reset_s > old.at + old.reset_s + RESET_GRANULARITY_S
    ):
        return new  # the remote started its next window in between
    remaining = new.remaining
    if old.remaining is not None:
        remaining = old.remaining if remaining is None else min(remaining, old.remaining)
    reset_s = new.reset_s
    if old.reset_s is not None:
        old_reset = old.reset_s - (new.at - old.at)  # as seen from the new answer's time
        reset_s = old_reset if reset_s is None else min(reset_s, old_reset)
    return Answer(
        new.epoch,
        new.local_epoch,
        new.at,
        new.limit if new.limit is not None else old.limit,
        remaining,
        None if reset_s is None else max(0.0, reset_s),
        new.rate_limited or old.rate_limited,
        new.retry_after if new.retry_after is not None else old.retry_after,
    )


def answer_args(answer: Answer | None, now: float) -> list[int | str]:
    if answer is None:
        return ["0", 0, 0, -1, -1, -1, "0", -1]
    return [
        "1",
        answer.epoch,
        max(0, _ms(now - answer.at)),
        answer.limit if answer.limit is not None else -1,
        answer.remaining if answer.remaining is not None else -1,
        _ms(answer.reset_s) if answer.reset_s is not None else -1,
        "1" if answer.rate_limited else "0",
        _ms(answer.retry_after) if answer.retry_after is not None else -1,
    ]
