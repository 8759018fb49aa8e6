"""`forwarder status`: the verdict logic, and the command against real daemons in four states."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from forwarder.cli.status import Reading, Verdict, assess
from tests.conftest import DaemonProc, MockProc

StartMock = Callable[..., Awaitable[MockProc]]
StartDaemon = Callable[..., Awaitable[DaemonProc]]


def _stats(**overrides: Any) -> dict[str, Any]:
    account = {
        "queued": 0,
        "in_delivery": 0,
        "delivered": 10,
        "delivered_per_min": 120.0,
        "rate_limit": {"limit_per_window": 300, "window_s": 60.0, "rate_limited": 0},
        "concurrency": {"limit": 4, "sending": 1},
        "breaker": {"state": "closed"},
        "paused": False,
        "retired": False,
    }
    stats: dict[str, Any] = {
        "version": "0.1.0",
        "uptime_s": 30.0,
        "delivery": {"ready": True, "reason": ""},
        "accounts": {"default": account},
        "oldest_event_age_s": 2.0,
    }
    stats.update(overrides)
    return stats


def test_healthy_when_ready_and_young() -> None:
    report = assess(Reading(_stats(), 0.0), None, "here")
    assert report.verdict is Verdict.HEALTHY
    assert report.problems == []
    assert report.rates == {"default": 120.0}  # the daemon's own per-minute figure


def test_degraded_when_not_ready_breaker_open_key_refused_or_old() -> None:
    not_ready = _stats(delivery={"ready": False, "reason": "starting"})
    assert assess(Reading(not_ready, 0.0), None, "x").problems == ["not ready: starting"]
    open_breaker = _stats()
    open_breaker["accounts"]["default"]["breaker"]["state"] = "open"
    assert assess(Reading(open_breaker, 0.0), None, "x").problems == [
        "account default: circuit breaker open"
    ]
    refused = _stats()
    refused["accounts"]["default"].update(paused=True, pause_reason="HTTP 401")
    assert assess(Reading(refused, 0.0), None, "x").problems == [
        "account default: key refused: HTTP 401"
    ]
    old = assess(Reading(_stats(oldest_event_age_s=7200.0), 0.0), None, "x", max_age_s=3600)
    assert old.verdict is Verdict.DEGRADED
    assert old.problems == ["oldest undelivered event is 2h 00m old (threshold 1h 00m)"]
    young = assess(Reading(_stats(oldest_event_age_s=7200.0), 0.0), None, "x", max_age_s=9000)
    assert young.verdict is Verdict.HEALTHY


def test_watch_rates_come_from_successive_reads() -> None:
    before = Reading(_stats(), 100.0)
    later = _stats()
    later["accounts"]["default"]["delivered"] = 40  # 30 more in 6 s: 300 a minute
    report = assess(Reading(later, 106.0), before, "x")
    assert report.rates == {"default": pytest.approx(300.0)}


async def _status(*args: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORWARDER_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "forwarder",
        "status",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**env, "COLUMNS": "120"},
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def _until_status(code: int, *args: str, timeout: float = 15.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        got, out, err = await _status(*args)
        if got == code:
            return out
        if time.monotonic() > deadline:
            raise AssertionError(f"status exit {got}, wanted {code}:\n{out}{err}")
        await asyncio.sleep(0.3)


async def test_status_of_a_healthy_daemon(mock_remote: StartMock, daemon: StartDaemon) -> None:
    mock = await mock_remote()
    d = await daemon(mock.base_url)
    async with aiohttp.ClientSession(base_url=d.url) as http:
        for n in range(3):
            form = {"recipient_id": str(n), "name": "SIGNUP"}
            async with http.post("/v1/recipientEvents/create", data=form) as response:
                assert response.status < 300
    out = await _until_status(0, "--config", str(d.config_path))
    assert out.startswith("HEALTHY  forwarder")
    assert "unix:" in out  # found through the config's Unix socket
    assert "default" in out
    assert "closed" in out
    assert "last error: none since start" in out
    code, out, _ = await _status("--url", d.url, "--json")
    assert code == 0
    report = json.loads(out)
    assert report["verdict"] == "healthy"
    assert report["stats"]["counters"]["delivered"] == 3


async def test_status_when_the_remote_is_down(mock_remote: StartMock, daemon: StartDaemon) -> None:
    mock = await mock_remote()
    # It cannot deliver, so its stop waits out shutdown.timeout_s: keep that short.
    d = await daemon(mock.base_url, remote={"breaker_failures": 2}, shutdown={"timeout_s": 0.5})
    await mock.proc.stop()  # connections refused from now on: transient failures
    async with aiohttp.ClientSession(base_url=d.url) as http:
        form = {"recipient_id": "1", "name": "SIGNUP"}
        async with http.post("/v1/recipientEvents/create", data=form) as response:
            assert response.status < 300
    out = await _until_status(1, "--url", d.url)
    assert out.startswith("DEGRADED")
    assert "not ready: account default: circuit breaker open" in out
    assert re.search(r"default .* open ", out)
    assert re.search(r"last error \d+s ago \(default\): ClientConnectorError", out)


async def test_status_when_the_key_is_refused(mock_remote: StartMock, daemon: StartDaemon) -> None:
    mock = await mock_remote(api_key="a-different-key-123")
    d = await daemon(mock.base_url, remote={"auth_retry_s": 30.0}, shutdown={"timeout_s": 0.5})
    async with aiohttp.ClientSession(base_url=d.url) as http:
        form = {"recipient_id": "1", "name": "SIGNUP"}
        async with http.post("/v1/recipientEvents/create", data=form) as response:
            assert response.status < 300
    out = await _until_status(1, "--socket", d.socket_path, "--json")
    report = json.loads(out)
    assert report["verdict"] == "degraded"
    assert any("delivery paused" in p and "401" in p for p in report["problems"])
    assert report["stats"]["not_ready"] == ["key_refused"]


async def test_status_when_nothing_runs(short_tmp: Any) -> None:
    code, out, _ = await _status("--socket", str(short_tmp / "none.sock"))
    assert code == 2
    assert out.startswith("UNREACHABLE")
    code, out, _ = await _status("--url", "http://127.0.0.1:9", "--json")
    assert code == 2
    assert json.loads(out)["verdict"] == "unreachable"


async def test_watch_refuses_a_standard_output_that_is_no_terminal() -> None:
    code, out, err = await _status("--url", "http://127.0.0.1:9", "--watch")
    assert code == 64
    assert out == ""
    assert "--watch redraws a terminal" in err
