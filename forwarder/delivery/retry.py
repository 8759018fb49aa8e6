"""The retry policy: which attempts are retried, how long to wait, when to give up (tenacity)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_result,
    stop_before_delay,
    wait_random_exponential,
)

from forwarder.config.schema import RetryConfig
from forwarder.delivery.remote import Result, Verdict


class wait_jitter_or_hint:
    """Exponential backoff with full jitter, but never shorter than the server's wait hint.

    A 503 may say how long to wait (Retry-After); coming back sooner only earns another refusal.
    """

    def __init__(self, initial_s: float, max_s: float) -> None:
        self._jitter = wait_random_exponential(multiplier=initial_s, min=initial_s, max=max_s)

    def __call__(self, retry_state: RetryCallState) -> float:
        wait = float(self._jitter(retry_state))
        outcome = retry_state.outcome
        if outcome is not None and not outcome.failed:
            result = outcome.result()
            if isinstance(result, Result) and result.rate_limited:
                # A 429 is the account's, not the event's: the rate limiter's gate holds every
                # attempt of the account until the reset, so no per-request backoff on top.
                return 0.0
            if isinstance(result, Result) and result.retry_after is not None:
                wait = max(wait, result.retry_after)
        return wait


def _is_retry(result: object) -> bool:
    return isinstance(result, Result) and result.verdict is Verdict.RETRY


def _last_result(retry_state: RetryCallState) -> Result:
    # When the policy gives up, hand back the last attempt's result instead of raising RetryError.
    assert retry_state.outcome is not None
    result = retry_state.outcome.result()
    assert isinstance(result, Result)
    return result


async def run_with_retries(
    attempt: Callable[[], Awaitable[Result]],
    config: RetryConfig,
    *,
    first: Result | None = None,
    spent_s: float = 0.0,
    before_sleep: Callable[[RetryCallState], Awaitable[None] | None] | None = None,
    sleep: Callable[[float], Awaitable[None]] | None = None,
) -> Result:
    """Run `attempt` until its Result is final or the policy gives up; the last Result.

    The first attempt runs outside tenacity: most events are delivered at once, and building and
    driving an AsyncRetrying cost more than the rest of a delivery's own bookkeeping. Only a
    first answer that asks for a retry enters tenacity, which is handed that answer as its first
    attempt (so backoff, hints and logging see it) and a deadline shortened by its duration. A
    caller that made the first attempt itself passes its answer as `first`, with the seconds it
    took as `spent_s`.
    """
    if first is None:
        started = time.monotonic()
        first = await attempt()
        spent_s = time.monotonic() - started
    if not _is_retry(first):
        return first
    handed: list[Result] = [first]

    async def again() -> Result:
        return handed.pop() if handed else await attempt()

    retrying = build_retrying(config, before_sleep=before_sleep, sleep=sleep, spent_s=spent_s)
    result: Result = await retrying(again)
    return result


def build_retrying(
    config: RetryConfig,
    *,
    before_sleep: Callable[[RetryCallState], Awaitable[None] | None] | None = None,
    sleep: Callable[[float], Awaitable[None]] | None = None,
    spent_s: float = 0.0,
) -> AsyncRetrying:
    """A fresh AsyncRetrying for one event's delivery.

    Stops *before* an attempt that would start after `max_elapsed_s`, so an event is never held
    past its deadline by a long final wait; `spent_s` of it went before tenacity took over.
    Exceptions are not retried: transport failures arrive as RETRY results, so an exception here
    is a bug and must surface.
    """
    kwargs: dict[str, object] = {}
    if sleep is not None:
        kwargs["sleep"] = sleep
    return AsyncRetrying(
        stop=stop_before_delay(max(config.max_elapsed_s - spent_s, 0.0)),
        wait=wait_jitter_or_hint(config.initial_backoff_s, config.max_backoff_s),
        retry=retry_if_result(_is_retry),
        retry_error_callback=_last_result,
        before_sleep=before_sleep,
        reraise=True,
        **kwargs,  # type: ignore[arg-type]
    )
