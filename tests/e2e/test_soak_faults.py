"""A short fault soak per queue mode: concurrent clients, a remote failing 20% of requests.

The engine and its checks are in `tests/benchmarks/soak_faults.py` (its docstring lists every
invariant); `make soak` runs the same at length. Here: 8 clients for 4 s against
`forwarder run` and `forwarder mock-remote` subprocesses, then the drain and the checks.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

from tests.benchmarks.soak_faults import (
    Plan,
    daemon_sections,
    drive,
    mock_flags,
    observe,
    settle,
    summary_line,
    verify,
)
from tests.conftest import DaemonProc, MockProc

StartMock = Callable[..., Awaitable[MockProc]]
StartDaemon = Callable[..., Awaitable[DaemonProc]]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["memory", "durable"])
async def test_fault_soak_creates_every_accepted_event_once(
    mock_remote: StartMock, daemon: StartDaemon, mode: str
) -> None:
    plan = Plan(mode, clients=8, seconds=4.0, concurrency=8)
    mock = await mock_remote(*mock_flags(plan.seed))
    d = await daemon(mock.base_url, **daemon_sections(mode, plan.concurrency))

    ledger = await drive(d.url, plan)
    await settle(d.url, timeout=40)
    seen = await observe(d.url, mock.root)
    assert await d.stop() == 0
    report, problems = verify(plan, ledger, seen, d.proc.logs())
    print(f"\n{summary_line(report, plan.seconds, not problems)}\n{report}")

    assert not problems, f"{problems} {report}"
    # The run exercised what it claims: every fault kind reached forwarder and was retried,
    # the bound refused requests, and hung answers were absorbed by 409s.
    assert set(report["retries_by_kind"]) == {"5xx", "dropped", "timeout", "429"}, report
    refusal = "spool_full" if mode == "durable" else "queue_full"
    assert report["refused"].get(refusal, 0) > 0, report
    assert report["duplicates_409"]["counted"] > 0, report
