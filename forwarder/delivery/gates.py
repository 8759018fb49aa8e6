"""An account's gates: the circuit breaker and the refused-key gate, and who probes them.

Before each attempt a lane asks its `Gates` for a `Pass`; with both gates closed (the normal
case) `try_pass` hands out the shared open pass without a coroutine. While a gate is open,
`wait_pass` waits until it lets one attempt through as its probe, and the pass says so: the
answer to that attempt (`learn`) or its cancellation (`abandon`) goes back with the pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from forwarder.config.schema import RemoteConfig
from forwarder.delivery.flow.breaker import BreakerState, CircuitBreaker
from forwarder.delivery.flow.budget import MAX_WAIT_SLICE_S
from forwarder.delivery.remote import Result, Verdict
from forwarder.ops.metrics import Stats

log = structlog.get_logger("forwarder.dispatcher")


@dataclass(frozen=True, slots=True)
class Pass:
    """Leave for one attempt; says whether it is the probe of the key gate or the breaker."""

    auth_probe: bool = False
    breaker_probe: bool = False


OPEN = Pass()  # both gates closed: no probe


class Gates:
    """The breaker and the refused-key gate of one account, and the probe decisions."""

    def __init__(
        self,
        name: str,
        remote: RemoteConfig,
        *,
        stats: Stats,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._name = name
        self._stats = stats
        self.breaker = CircuitBreaker(
            failures=remote.breaker_failures,
            probe_initial_s=remote.breaker_probe_initial_s,
            probe_max_s=remote.breaker_probe_max_s,
            clock=clock,
        )
        # A refused key is true for every event: one failure closes the gate, one probe reopens.
        self.auth = CircuitBreaker(
            failures=1,
            probe_initial_s=remote.auth_retry_s,
            probe_max_s=remote.auth_retry_s,
            clock=clock,
        )
        self.auth_reason = ""
        self._changed = asyncio.Event()

    def configure(self, remote: RemoteConfig) -> None:
        """Apply reloaded settings; waiters look again at once."""
        self.breaker.configure(
            failures=remote.breaker_failures,
            probe_initial_s=remote.breaker_probe_initial_s,
            probe_max_s=remote.breaker_probe_max_s,
        )
        self.auth.configure(
            failures=1, probe_initial_s=remote.auth_retry_s, probe_max_s=remote.auth_retry_s
        )
        self.notify()

    def not_ready_reason(self) -> str:
        """Why this account cannot deliver now, or ""."""
        if self.auth.is_open:
            return f"account {self._name}: delivery paused: {self.auth_reason}"
        if self.breaker.is_open:
            return (
                f"account {self._name}: circuit breaker open after "
                f"{self.breaker.consecutive} consecutive failures (last: {self.breaker.last_error})"
            )
        return ""

    def view(self) -> dict[str, Any]:
        """The gates' part of the account's /v1/stats."""
        return {
            "breaker": {
                "state": self.breaker.state.value,
                "consecutive_failures": self.breaker.consecutive,
                "opened": self.breaker.opened,
                "probe_interval_s": self.breaker.interval_s,
            },
            "paused": self.auth.is_open,
            "pause_reason": self.auth_reason if self.auth.is_open else "",
        }

    # --- passes -------------------------------------------------------------------------------

    def try_pass(self) -> Pass | None:
        """The open pass when both gates are closed (no coroutine), else None: `wait_pass`."""
        if self.auth.state is BreakerState.CLOSED and self.breaker.state is BreakerState.CLOSED:
            return OPEN
        return None

    async def wait_pass(self) -> Pass:
        """Wait until the key gate and the breaker let an attempt through; say if it probes."""
        while True:
            auth_was_open = self.auth.is_open
            auth = self.auth.permit()
            if auth is True:
                breaker_was_open = self.breaker.is_open
                breaker = self.breaker.permit()
                if breaker is True:
                    return Pass(auth_was_open, breaker_was_open)
                if auth_was_open:
                    self.auth.abandon()
                wait = float(breaker)
            else:
                wait = float(auth)
            await self._wait(wait)

    def abandon(self, gate_pass: Pass) -> None:
        """The attempt ended without an answer: a probe it carried can go to another."""
        if gate_pass.auth_probe:
            self.auth.abandon()
        if gate_pass.breaker_probe:
            self.breaker.abandon()

    def learn(self, gate_pass: Pass, result: Result) -> bool:
        """Record the answer to an attempt made with `gate_pass`; True when it opened the
        breaker afresh (not a failed probe): sending should ramp up from low again."""
        if result.verdict is Verdict.AUTH:
            self._stats.auth_failures += 1
            self.auth_reason = f"remote refused the API key (HTTP {result.status}): {result.error}"
            self._stats.note_error(self._name, self.auth_reason)
            if self.auth.failure(result.error, probe=gate_pass.auth_probe):
                log.error(
                    "delivery_paused",
                    status=result.status,
                    error=result.error,
                    probe_every_s=self.auth.interval_s,
                )
            return False
        if self.auth.success():
            log.info("delivery_resumed")
            self.notify()
        if result.transient_failure:
            self._stats.note_error(self._name, result.error)
            probe = gate_pass.breaker_probe
            if self.breaker.failure(result.error, probe=probe):
                # Logged when it opens; a failed probe only says when the next one goes.
                line = log.warning if probe else log.error
                line(
                    "breaker_probe_failed" if probe else "breaker_open",
                    consecutive_failures=self.breaker.consecutive,
                    error=result.error,
                    probe_in_s=self.breaker.interval_s,
                )
                return not probe
        elif self.breaker.success():
            log.info("breaker_closed", outage_s=round(time.monotonic() - self.breaker.opened_at, 1))
            self.notify()
        return False

    async def _wait(self, seconds: float) -> None:
        changed = self._changed
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
        # arrives as the event is set, and a stop must never be lost.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(min(seconds, MAX_WAIT_SLICE_S)):
                await changed.wait()

    def notify(self) -> None:
        """Wake every attempt waiting on a gate (a gate closed, or the settings changed)."""
        self._changed.set()
        self._changed = asyncio.Event()
