"""The log throttle (ops/logthrottle.py): first line at once, then one summary per key and
interval."""

from __future__ import annotations

import asyncio
from collections.abc import MutableMapping
from typing import Any

import structlog
from structlog.testing import capture_logs

from forwarder.ops.logthrottle import OVERFLOW_KEY, LogThrottle

log = structlog.get_logger("tests.logthrottle")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _lines(
    logs: list[MutableMapping[str, Any]], event: str = "refused"
) -> list[MutableMapping[str, Any]]:
    return [line for line in logs if line["event"] == event]


def test_the_first_line_goes_out_then_one_summary_counts_the_rest() -> None:
    clock = Clock()
    throttle = LogThrottle(interval_s=60.0, clock=clock)
    with capture_logs() as logs:
        assert throttle.log(
            log, "warning", "refused", key="queue_full", reason="queue_full", count=3
        )
        for n in range(1999):
            clock.now += 0.01
            assert not throttle.log(
                log, "warning", "refused", key="queue_full", reason="queue_full", count=2, n=n
            )
        throttle.flush()  # not yet: the window has 40 s to go
        assert len(logs) == 1
        clock.now = 1060.0
        throttle.flush()
    first, summary = _lines(logs)
    assert first == {"event": "refused", "log_level": "warning", "reason": "queue_full", "count": 3}
    assert summary["log_level"] == "warning"
    assert summary["suppressed"] == 1999
    assert summary["count"] == 2 * 1999  # summed over what was held back
    assert summary["n"] == 1998  # the latest occurrence's other fields
    assert summary["summary"] == "refused queue_full: 1999 more in the last 60 s"


def test_a_flood_that_goes_on_gets_one_summary_per_interval_and_a_quiet_key_is_forgotten() -> None:
    clock = Clock()
    throttle = LogThrottle(interval_s=60.0, clock=clock)
    with capture_logs() as logs:
        for _ in range(3 * 60 * 10):  # ten a second for three minutes
            throttle.log(log, "error", "spool_write_failed", error="disk full")
            clock.now += 0.1
            throttle.flush()  # as the timer would, often
        clock.now += 60
        throttle.flush()  # the last window's summary
        clock.now += 60
        throttle.flush()  # nothing new: the key is forgotten
        assert len(throttle) == 0
        throttle.log(log, "error", "spool_write_failed", error="disk full again")
    lines = _lines(logs, "spool_write_failed")
    assert len(lines) == 5  # the first, then one per minute (the third also holds the tail)
    assert "suppressed" not in lines[0]
    assert sum(line.get("suppressed", 0) for line in lines) == 3 * 60 * 10 - 1
    assert all(line["log_level"] == "error" for line in lines)
    assert lines[-1] == {
        "event": "spool_write_failed",
        "log_level": "error",
        "error": "disk full again",
    }


def test_keys_are_independent_and_bounded() -> None:
    clock = Clock()
    throttle = LogThrottle(interval_s=60.0, max_keys=3, clock=clock)
    with capture_logs() as logs:
        for key in ("a", "b", "c"):
            throttle.log(log, "warning", "bad_request", key=key, kind=key)
        # Past max_keys new keys share one overflow key: its first line, then silence.
        for key in ("d", "e", "f"):
            throttle.log(log, "warning", "bad_request", key=key, kind=key)
        throttle.log(log, "warning", "bad_request", key="a", kind="a")
        assert len(throttle) == 4
        clock.now += 60
        throttle.flush()
    kinds = [(line["kind"], line.get("suppressed")) for line in _lines(logs, "bad_request")]
    assert kinds[:4] == [("a", None), ("b", None), ("c", None), ("d", None)]
    assert sorted(kinds[4:]) == [("a", 1), ("f", 2)]
    overflow = [line for line in _lines(logs, "bad_request") if line.get("suppressed") == 2]
    assert overflow[0]["summary"] == f"bad_request {OVERFLOW_KEY}: 2 more in the last 60 s"
    # Idle keys are forgotten once their window is over, which makes room again.
    clock.now += 60
    throttle.flush()
    assert len(throttle) == 0


def test_a_summary_carries_no_traceback_and_close_writes_what_is_pending() -> None:
    clock = Clock()
    throttle = LogThrottle(interval_s=60.0, clock=clock)
    error = ValueError("boom")
    with capture_logs() as logs:
        throttle.log(log, "error", "request_failed", key="ValueError", exc_info=error)
        throttle.log(log, "error", "request_failed", key="ValueError", exc_info=error)
        clock.now += 5
        throttle.close()  # a stop: the count goes out before the window ends
    first, summary = _lines(logs, "request_failed")
    assert first["exc_info"] is error
    assert "exc_info" not in summary
    assert summary["suppressed"] == 1


async def test_the_summary_comes_by_itself_once_the_flood_stops() -> None:
    throttle = LogThrottle(interval_s=0.2)
    with capture_logs() as logs:
        for _ in range(50):
            throttle.log(log, "warning", "refused", key="spool_full", reason="spool_full")
        await asyncio.sleep(0.5)  # no further call: the loop's timer writes the summary
    _first, summary = _lines(logs)
    assert summary["suppressed"] == 49
    assert summary["summary"] == "refused spool_full: 49 more in the last 0.2 s"
