"""The tenacity retry policy: backoff bounds, server hints, giving up in time."""

from __future__ import annotations

import asyncio

from tenacity import RetryCallState

from forwarder.config.schema import RetryConfig
from forwarder.delivery.remote import Result, Verdict
from forwarder.delivery.retry import build_retrying, run_with_retries

RETRY = Result(Verdict.RETRY, 503, error="unavailable")


class Clock:
    """Fake sleep that records what the policy asked for."""

    def __init__(self) -> None:
        self.sleeps: list[float] = []

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)


async def test_retries_until_success_with_growing_jittered_waits() -> None:
    clock = Clock()
    answers = [RETRY] * 5 + [Result(Verdict.DELIVERED, 200)]

    async def attempt() -> Result:
        return answers.pop(0)

    policy = RetryConfig(initial_backoff_s=0.5, max_backoff_s=3.0, max_elapsed_s=3600)
    result: Result = await build_retrying(policy, sleep=clock.sleep)(attempt)
    assert result.verdict is Verdict.DELIVERED
    assert len(clock.sleeps) == 5
    assert clock.sleeps[0] == 0.5  # the first window is [initial, initial]
    assert all(0.5 <= s <= 3.0 for s in clock.sleeps)
    # Each wait is drawn from [initial, min(max, initial * 2**n)].
    for n, wait in enumerate(clock.sleeps):
        assert wait <= min(3.0, 0.5 * 2**n)


async def test_permanent_and_auth_are_not_retried() -> None:
    for verdict in (Verdict.PERMANENT, Verdict.AUTH, Verdict.DELIVERED):
        clock = Clock()
        calls = 0

        async def attempt(v: Verdict = verdict) -> Result:
            nonlocal calls
            calls += 1
            return Result(v, 400)

        result: Result = await build_retrying(RetryConfig(), sleep=clock.sleep)(attempt)
        assert result.verdict is verdict
        assert calls == 1
        assert clock.sleeps == []


async def test_server_hint_is_a_floor() -> None:
    clock = Clock()
    answers = [Result(Verdict.RETRY, 503, retry_after=7.0), Result(Verdict.DELIVERED, 200)]

    async def attempt() -> Result:
        return answers.pop(0)

    await build_retrying(RetryConfig(initial_backoff_s=0.1), sleep=clock.sleep)(attempt)
    assert clock.sleeps == [7.0]


async def test_a_429_is_retried_without_backoff_the_rate_limiter_holds_it() -> None:
    clock = Clock()
    answers = [Result(Verdict.RETRY, 429, retry_after=30.0), Result(Verdict.DELIVERED, 200)]

    async def attempt() -> Result:
        return answers.pop(0)

    result: Result = await build_retrying(RetryConfig(), sleep=clock.sleep)(attempt)
    assert result.verdict is Verdict.DELIVERED
    # No per-request wait: the account's gate in the rate limiter makes the next attempt wait.
    assert clock.sleeps == [0.0]


async def test_gives_up_before_an_attempt_past_max_elapsed() -> None:
    clock = Clock()
    calls = 0

    async def attempt() -> Result:
        nonlocal calls
        calls += 1
        return Result(Verdict.RETRY, 503, retry_after=10.0)

    # The first wait (10 s) would already pass max_elapsed_s: give up with the last result.
    policy = RetryConfig(initial_backoff_s=0.1, max_backoff_s=1.0, max_elapsed_s=5.0)
    result: Result = await build_retrying(policy, sleep=clock.sleep)(attempt)
    assert result.verdict is Verdict.RETRY
    assert result.status == 503
    assert calls == 1
    assert clock.sleeps == []


async def test_a_final_first_answer_never_enters_tenacity() -> None:
    clock = Clock()
    calls: list[int] = []
    slept: list[int] = []

    async def attempt() -> Result:
        calls.append(1)
        return Result(Verdict.DELIVERED, 200)

    def before_sleep(state: RetryCallState) -> None:
        slept.append(state.attempt_number)

    result = await run_with_retries(
        attempt, RetryConfig(), before_sleep=before_sleep, sleep=clock.sleep
    )
    assert result.verdict is Verdict.DELIVERED
    assert (calls, slept, clock.sleeps) == ([1], [], [])


async def test_a_retried_first_answer_is_tenacitys_first_attempt() -> None:
    clock = Clock()
    answers = [Result(Verdict.RETRY, 503, retry_after=7.0), RETRY, Result(Verdict.DELIVERED, 200)]
    slept: list[tuple[int, int | None]] = []

    async def attempt() -> Result:
        return answers.pop(0)

    def before_sleep(state: RetryCallState) -> None:
        assert state.outcome is not None
        slept.append((state.attempt_number, state.outcome.result().status))

    policy = RetryConfig(initial_backoff_s=0.5, max_backoff_s=30.0, max_elapsed_s=3600)
    result = await run_with_retries(attempt, policy, before_sleep=before_sleep, sleep=clock.sleep)
    assert result.verdict is Verdict.DELIVERED
    assert answers == []
    # The first answer's Retry-After steered the first wait, as if tenacity had sent it.
    assert slept == [(1, 503), (2, 503)]
    assert clock.sleeps[0] == 7.0


async def test_the_first_attempts_time_counts_against_the_deadline() -> None:
    calls: list[int] = []

    async def attempt() -> Result:
        calls.append(1)
        await asyncio.sleep(0.06)  # longer than the whole budget
        return RETRY

    policy = RetryConfig(initial_backoff_s=0.001, max_backoff_s=0.001, max_elapsed_s=0.05)
    result = await run_with_retries(attempt, policy, sleep=Clock().sleep)
    assert result.verdict is Verdict.RETRY
    assert calls == [1]  # tenacity's own clock would have allowed a second one


async def test_a_first_answer_made_by_the_caller_is_not_asked_again() -> None:
    clock = Clock()
    answers = [RETRY, Result(Verdict.DELIVERED, 200)]

    async def attempt() -> Result:
        return answers.pop(0)

    policy = RetryConfig(initial_backoff_s=0.5, max_backoff_s=30.0, max_elapsed_s=3600)
    first = Result(Verdict.RETRY, 503, retry_after=7.0)
    result = await run_with_retries(attempt, policy, first=first, spent_s=1.0, sleep=clock.sleep)
    assert result.verdict is Verdict.DELIVERED
    assert answers == []  # two attempts of ours after the caller's one
    assert clock.sleeps[0] == 7.0  # the caller's answer steered the first wait


async def test_the_callers_time_counts_against_the_deadline() -> None:
    calls: list[int] = []

    async def attempt() -> Result:
        calls.append(1)
        return RETRY

    policy = RetryConfig(initial_backoff_s=0.001, max_backoff_s=0.001, max_elapsed_s=0.05)
    result = await run_with_retries(attempt, policy, first=RETRY, spent_s=0.06, sleep=Clock().sleep)
    assert result.verdict is Verdict.RETRY
    assert calls == []  # the caller spent the whole budget on its own attempt
