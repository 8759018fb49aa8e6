"""The gates hand out passes: open without a coroutine, a probe when a gate is open."""

from __future__ import annotations

import asyncio

from forwarder.config.schema import RemoteConfig
from forwarder.delivery.gates import OPEN, Gates
from forwarder.delivery.remote import Result, Verdict
from forwarder.ops.metrics import Stats
from tests.unit.test_limiter import FakeClock

DOWN = Result(Verdict.RETRY, 503, error="HTTP 503")
REFUSED = Result(Verdict.AUTH, 401, error="bad key")
UP = Result(Verdict.DELIVERED, 200, remote_id=1)


def gates(clock: FakeClock) -> Gates:
    remote = RemoteConfig(breaker_failures=2, breaker_probe_initial_s=1.0, auth_retry_s=5.0)
    return Gates("acct", remote, stats=Stats(), clock=clock)


async def test_closed_gates_hand_out_the_open_pass_at_once() -> None:
    g = gates(FakeClock())
    assert g.try_pass() is OPEN
    assert not g.learn(OPEN, UP)
    assert g.not_ready_reason() == ""


async def test_the_breaker_opens_then_one_probe_passes_and_a_cancelled_probe_is_handed_on() -> None:
    clock = FakeClock()
    g = gates(clock)
    assert not g.learn(OPEN, DOWN)
    assert g.learn(OPEN, DOWN)  # opened afresh: the lane ramps its concurrency down
    assert g.try_pass() is None
    assert "circuit breaker open after 2 consecutive failures" in g.not_ready_reason()
    clock.now += 1.0
    probe = await asyncio.wait_for(g.wait_pass(), 1)
    assert probe.breaker_probe
    assert not probe.auth_probe
    assert g.breaker.permit() is not True  # one probe at a time
    g.abandon(probe)  # cancelled before its answer: the next attempt probes
    probe = await asyncio.wait_for(g.wait_pass(), 1)
    assert probe.breaker_probe
    assert not g.learn(probe, DOWN)  # a failed probe reopens, logged, no ramp-down again
    clock.now += 2.0
    probe = await asyncio.wait_for(g.wait_pass(), 1)
    assert not g.learn(probe, UP)
    assert g.try_pass() is OPEN


async def test_a_refused_key_pauses_until_a_probe_gets_through() -> None:
    clock = FakeClock()
    g = gates(clock)
    assert not g.learn(OPEN, REFUSED)
    assert g.try_pass() is None
    assert g.not_ready_reason() == (
        "account acct: delivery paused: remote refused the API key (HTTP 401): bad key"
    )
    assert g.view()["paused"] is True
    clock.now += 5.0
    probe = await asyncio.wait_for(g.wait_pass(), 1)
    assert probe.auth_probe
    assert not probe.breaker_probe
    g.learn(probe, UP)
    assert g.try_pass() is OPEN
    assert g.view()["pause_reason"] == ""
