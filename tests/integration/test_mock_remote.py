"""Integration tests for the mock remote, against a real server on an ephemeral port."""

from __future__ import annotations

import asyncio
import base64
import logging
import math
import re
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest

from forwarder.cli.main import build_parser, cmd_mock_remote
from forwarder.testing.mock_options import MockOptions
from forwarder.testing.mock_platform import IDEMPOTENCY_TTL_S
from forwarder.testing.mock_server import RunningMock, start_mock

MockFactory = Callable[..., Awaitable[RunningMock]]

KEY = "test-key"
EVENT = {"recipient_id": "r-1", "name": "PURCHASE"}
IDEM = "idem-key-0001"
RATE_HEADERS = ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset")


def basic(user: str, password: str = "") -> dict[str, str]:
    """An HTTP Basic Authorization header (aiohttp 3.14 deprecates BasicAuth)."""
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


AUTH = basic(KEY)


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def start() -> AsyncIterator[MockFactory]:
    """Start mocks with MockOptions(**kwargs); closes every one it started."""
    started: list[RunningMock] = []

    async def factory(**kwargs: Any) -> RunningMock:
        running = await start_mock(MockOptions(**kwargs))
        started.append(running)
        return running

    yield factory
    for running in started:
        await running.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """A client session with a short default timeout so a stuck test fails fast."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as s:
        yield s


def url(running: RunningMock) -> str:
    return f"{running.base_url}/recipientEvents/create"


def root(running: RunningMock) -> str:
    return f"http://{running.host}:{running.port}"


async def post(
    session: aiohttp.ClientSession,
    running: RunningMock,
    data: Any = None,
    *,
    auth: dict[str, str] | None = AUTH,
    idem: str | None = None,
    **kwargs: Any,
) -> tuple[int, Any, aiohttp.ClientResponse]:
    """POST an event; return (status, JSON body, response)."""
    headers = dict(auth or {})
    if idem is not None:
        headers["X-Idempotency-Key"] = idem
    async with session.post(
        url(running), data=EVENT if data is None else data, headers=headers, **kwargs
    ) as resp:
        return resp.status, await resp.json(), resp


def assert_rate_headers(resp: aiohttp.ClientResponse) -> tuple[int, int, int]:
    for name in RATE_HEADERS:
        assert resp.headers[name].isdigit(), name
    limit, remaining, reset = (int(resp.headers[name]) for name in RATE_HEADERS)
    assert 0 <= remaining <= limit
    assert 0 <= reset <= 60
    return limit, remaining, reset


async def test_create_records_exact_fields(
    start: MockFactory, session: aiohttp.ClientSession
) -> None:
    running = await start()
    data = {
        "recipient_id": "r-42",
        "name": "PURCHASE",
        "value": "19.99",
        "conversion": "1",
        "data": '{"sku": "A1"}',
        "ref": "camp-7",
        "unknown_field": "ignored",
    }
    status, body, resp = await post(session, running, data, idem=IDEM)
    assert (status, body) == (200, {"success": True, "data": 1})
    assert_rate_headers(resp)
    status, body, _ = await post(session, running)
    assert (status, body) == (200, {"success": True, "data": 2})

    first, second = running.mock.events
    # UTC with millisecond precision: enough to place events within a benchmark's windows.
    assert re.fullmatch(r".*T\d\d:\d\d:\d\d\.\d{3}\+00:00", first["received_at"])
    assert datetime.fromisoformat(first["received_at"]).tzinfo == UTC
    assert {k: v for k, v in first.items() if k != "received_at"} == {
        "id": 1,
        "recipient_id": "r-42",
        "name": "PURCHASE",
        "value": "19.99",
        "conversion": "1",
        "data": '{"sku": "A1"}',
        "ref": "camp-7",
        "idempotency_key": IDEM,
        "auth_user": KEY,
    }
    assert second["value"] == second["conversion"] == second["ref"] == ""
    assert second["idempotency_key"] == ""


async def test_multipart_form_accepted(start: MockFactory, session: aiohttp.ClientSession) -> None:
    running = await start()
    form = aiohttp.FormData(EVENT, default_to_multipart=True)
    status, body, _ = await post(session, running, form)
    assert (status, body) == (200, {"success": True, "data": 1})
    assert running.mock.events[0]["recipient_id"] == "r-1"


async def test_auth(start: MockFactory, session: aiohttp.ClientSession) -> None:
    running = await start()
    for auth in (None, basic("wrong-key"), basic("", KEY), {"Authorization": "Basic !!!"}):
        status, body, resp = await post(session, running, auth=auth)
        assert status == 401
        assert body == {
            "success": False,
            "error": "You need an API key or token to access this service",
        }
        assert_rate_headers(resp)

    # The password is ignored; the query parameter works too.
    status, _, _ = await post(session, running, auth=basic(KEY, "anything"))
    assert status == 200
    status, _, _ = await post(session, running, auth=None, params={"api_key": KEY})
    assert status == 200
    status, _, _ = await post(session, running, auth=None, params={"api_key": "nope"})
    assert status == 401

    assert [e["auth_user"] for e in running.mock.events] == [KEY, "query"]
    assert running.mock.stats.unauthorized == 5


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"name": "PURCHASE"}, "recipient_id"),
        ({"recipient_id": "r-1"}, "name"),
        ({"recipient_id": "  ", "name": "PURCHASE"}, "recipient_id"),
        ({"recipient_id": "r-1", "name": ""}, "name"),
        ({**EVENT, "conversion": "yes"}, "conversion"),
        ({**EVENT, "conversion": ""}, "conversion"),
    ],
)
async def test_invalid_requests(
    start: MockFactory, session: aiohttp.ClientSession, data: dict[str, str], field: str
) -> None:
    running = await start()
    status, body, resp = await post(session, running, data)
    assert status == 400
    assert body["success"] is False
    assert field in body["error"]
    assert_rate_headers(resp)
    assert running.mock.events == []
    assert running.mock.stats.invalid == 1


async def test_conversion_values(start: MockFactory, session: aiohttp.ClientSession) -> None:
    running = await start()
    for value in ("1", "0", "true", "false"):
        status, _, _ = await post(session, running, {**EVENT, "conversion": value})
        assert status == 200
    assert [e["conversion"] for e in running.mock.events] == ["1", "0", "true", "false"]


async def test_idempotency(start: MockFactory, session: aiohttp.ClientSession) -> None:
    running = await start()
    status, body, _ = await post(session, running, idem=IDEM)
    assert (status, body) == (200, {"success": True, "data": 1})

    status, body, resp = await post(session, running, idem=IDEM)
    assert (status, body) == (409, {"success": True, "data": 1})
    assert_rate_headers(resp)

    status, body, resp = await post(session, running, {**EVENT, "value": "2"}, idem=IDEM)
    assert (status, body) == (
        422,
        {"success": False, "error": "idempotency key reused with a different request"},
    )
    assert_rate_headers(resp)

    for bad in ("short", "x" * 1025, ""):
        status, body, _ = await post(session, running, idem=bad)
        assert status == 400
        assert "X-Idempotency-Key" in body["error"]

    status, body, _ = await post(session, running, idem="y" * 1024)
    assert (status, body) == (200, {"success": True, "data": 2})

    assert len(running.mock.events) == 2
    stats = running.mock.stats
    assert (stats.created, stats.duplicates, stats.conflicts, stats.invalid) == (2, 1, 1, 3)


async def test_idempotency_keys_expire(start: MockFactory, session: aiohttp.ClientSession) -> None:
    running = await start()
    clock = FakeClock()
    running.mock.clock = clock
    assert (await post(session, running, idem=IDEM))[0] == 200
    clock.now += IDEMPOTENCY_TTL_S - 1
    assert (await post(session, running, idem=IDEM))[0] == 409
    clock.now += 2
    status, body, _ = await post(session, running, idem=IDEM)
    assert (status, body) == (200, {"success": True, "data": 2})


async def test_rate_limit(start: MockFactory, session: aiohttp.ClientSession) -> None:
    running = await start(rate_limit=3)
    clock = FakeClock()
    running.mock.clock = clock
    remaining = []
    for _ in range(3):
        status, _, resp = await post(session, running)
        assert status == 200
        limit, left, reset = assert_rate_headers(resp)
        assert (limit, reset) == (3, 60)
        remaining.append(left)
    assert remaining == [2, 1, 0]

    clock.now += 20.5
    status, body, resp = await post(session, running)
    assert status == 429
    assert body["success"] is False
    assert body["error"]
    assert assert_rate_headers(resp) == (3, 0, 40)
    assert len(running.mock.events) == 3
    assert running.mock.stats.rate_limited == 1

    # A 401 does not count against the quota but still shows the headers.
    status, _, resp = await post(session, running, auth=None)
    assert status == 401
    assert_rate_headers(resp)

    clock.now += 40
    status, _, resp = await post(session, running)
    assert status == 200
    assert assert_rate_headers(resp) == (3, 2, 60)


async def test_unlimited_rate_shows_large_limit(
    start: MockFactory, session: aiohttp.ClientSession
) -> None:
    running = await start(rate_limit=0)
    _, _, resp = await post(session, running)
    assert assert_rate_headers(resp)[0] >= 1_000_000

    # A short window does not make "unlimited" limited.
    running.mock.options.window_s = 0.1
    for _ in range(5):
        status, _, resp = await post(session, running)
        assert status == 200
        assert assert_rate_headers(resp)[0] >= 1_000_000
    assert running.mock.stats.rate_limited == 0


async def test_fail_fault(start: MockFactory, session: aiohttp.ClientSession) -> None:
    running = await start(fail_rate=1.0, seed=7)
    statuses = []
    for _ in range(6):
        status, body, resp = await post(session, running)
        assert body["success"] is False
        assert body["error"]
        assert_rate_headers(resp)
        statuses.append(status)
    assert set(statuses) <= {500, 502, 503}
    assert running.mock.events == []
    assert running.mock.stats.failed == 6


async def test_seed_replays_faults(start: MockFactory, session: aiohttp.ClientSession) -> None:
    runs = []
    for _ in range(2):
        running = await start(fail_rate=0.5, seed=123)
        runs.append([(await post(session, running))[0] for _ in range(12)])
    assert runs[0] == runs[1]
    assert len(set(runs[0])) > 1


async def test_throttle_fault_is_a_429_that_creates_nothing(
    start: MockFactory, session: aiohttp.ClientSession
) -> None:
    running = await start(throttle_rate=1.0, rate_limit=0, window_s=10, seed=3)
    clock = FakeClock()
    running.mock.clock = clock
    status, body, resp = await post(session, running, idem=IDEM)
    assert status == 429
    assert body["success"] is False
    assert "Rate limit" in body["error"]
    # Quota spent as far as the answer says, and when to come back: the rest of the window.
    assert resp.headers["X-RateLimit-Remaining"] == "0"
    assert resp.headers["X-RateLimit-Reset"] == "10"
    assert resp.headers["Retry-After"] == "10"
    assert int(resp.headers["X-RateLimit-Limit"]) >= 1_000_000
    clock.now += 3.5
    status, _, resp = await post(session, running, idem=IDEM)
    assert status == 429
    assert resp.headers["Retry-After"] == resp.headers["X-RateLimit-Reset"] == "7"
    assert running.mock.events == []
    assert (running.mock.stats.throttled, running.mock.stats.rate_limited) == (2, 0)
    assert running.mock.stats.first_rate_limited_at is None

    # Nothing was performed, so the same key now creates the event (not a 409).
    running.mock.options.throttle_rate = 0.0
    status, body, _ = await post(session, running, idem=IDEM)
    assert (status, body) == (200, {"success": True, "data": 1})


async def test_throttle_fault_share(start: MockFactory, session: aiohttp.ClientSession) -> None:
    running = await start(throttle_rate=0.5, rate_limit=0, seed=11)
    statuses = [(await post(session, running))[0] for _ in range(40)]
    assert set(statuses) == {200, 429}
    assert statuses.count(429) == running.mock.stats.throttled
    assert len(running.mock.events) == statuses.count(200)


def test_cli_throttle_rate_flag() -> None:
    parser = build_parser()
    assert parser.parse_args(["mock-remote", "--throttle-rate", "0.05"]).throttle_rate == 0.05
    assert parser.parse_args(["mock-remote"]).throttle_rate == 0.0
    with pytest.raises(SystemExit):
        parser.parse_args(["mock-remote", "--throttle-rate", "1.5"])


async def test_duplicates_are_recorded(start: MockFactory, session: aiohttp.ClientSession) -> None:
    running = await start()
    await post(session, running, idem=IDEM)
    await post(session, running, idem="idem-key-0002")
    for _ in range(2):
        assert (await post(session, running, idem=IDEM))[0] == 409
    async with session.get(f"{root(running)}/_mock/events") as resp:
        listed = await resp.json()
    assert [(d["idempotency_key"], d["id"]) for d in listed["duplicates"]] == [(IDEM, 1)] * 2
    assert all(d["received_at"].endswith("+00:00") for d in listed["duplicates"])
    assert listed["stats"]["duplicates"] == 2
    async with session.post(f"{root(running)}/_mock/reset") as resp:
        assert resp.status == 200
    assert running.mock.duplicates == []


async def test_reset_fault_drops_connection(
    start: MockFactory, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    running = await start(reset_rate=1.0)
    with caplog.at_level(logging.DEBUG):
        for _ in range(2):
            with pytest.raises(aiohttp.ServerDisconnectedError):
                await post(session, running, idem=IDEM)
    assert running.mock.events == []
    assert running.mock.stats.resets == 2
    # aiohttp must not treat the drop as a handler error.
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []

    running.mock.options.reset_rate = 0.0
    status, body, _ = await post(session, running, idem=IDEM)
    assert (status, body) == (200, {"success": True, "data": 1})


async def test_timeout_fault_records_then_retry_is_duplicate(
    start: MockFactory, session: aiohttp.ClientSession
) -> None:
    running = await start(timeout_rate=1.0)
    with pytest.raises(TimeoutError):
        await post(session, running, idem=IDEM, timeout=aiohttp.ClientTimeout(total=0.2))
    assert len(running.mock.events) == 1
    assert running.mock.stats.timeouts == 1

    # The client gave up: the held handler is freed rather than kept for hang_s.
    for _ in range(100):
        if running.mock.hanging == 0:
            break
        await asyncio.sleep(0.01)
    assert running.mock.hanging == 0

    running.mock.options.timeout_rate = 0.0
    status, body, _ = await post(session, running, idem=IDEM)
    assert (status, body) == (409, {"success": True, "data": 1})
    assert len(running.mock.events) == 1


async def test_close_with_hanging_request_is_quick(session: aiohttp.ClientSession) -> None:
    running = await start_mock(MockOptions(timeout_rate=1.0))
    try:
        request = asyncio.create_task(post(session, running))
        for _ in range(100):
            if running.mock.hanging:
                break
            await asyncio.sleep(0.01)
        assert running.mock.hanging == 1
    finally:
        began = time.monotonic()
        await running.close()
        elapsed = time.monotonic() - began
    assert elapsed < 1.0
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await request
    await running.close()  # idempotent


async def test_close_during_latency_is_quick(session: aiohttp.ClientSession) -> None:
    running = await start_mock(MockOptions(latency_ms=30_000))
    request = asyncio.create_task(post(session, running))
    await asyncio.sleep(0.1)
    began = time.monotonic()
    await running.close()
    assert time.monotonic() - began < 1.0
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await request
    assert running.mock.events == []


async def test_latency(start: MockFactory, session: aiohttp.ClientSession) -> None:
    running = await start(latency_ms=100)
    began = time.monotonic()
    status, _, _ = await post(session, running)
    assert status == 200
    assert time.monotonic() - began >= 0.09


async def test_faults_endpoint(start: MockFactory, session: aiohttp.ClientSession) -> None:
    running = await start()
    faults = f"{root(running)}/_mock/faults"
    async with session.post(faults, json={"fail_rate": 1, "rate_limit": 10}) as resp:
        assert resp.status == 200
        shown = await resp.json()
    assert shown["fail_rate"] == 1.0
    assert shown["rate_limit"] == 10
    assert shown["api_key"] == "<set>"
    assert KEY not in str(shown)
    status, _, resp = await post(session, running)
    assert status in (500, 502, 503)
    assert assert_rate_headers(resp)[0] == 10

    async with session.post(faults, json={"fail_rate": 0, "api_key": "new-key"}) as resp:
        assert resp.status == 200
    assert (await post(session, running))[0] == 401
    assert (await post(session, running, auth=basic("new-key")))[0] == 200

    async with session.get(faults) as resp:
        assert (await resp.json())["api_key"] == "<set>"


@pytest.mark.parametrize(
    "update",
    [
        {"fail_rate": 1.5},
        {"reset_rate": -0.1},
        {"timeout_rate": "0.5"},
        {"throttle_rate": 1.01},
        {"rate_limit": -1},
        {"rate_limit": 2.5},
        {"rate_limit": True},
        {"latency_ms": -1},
        {"hang_s": 0},
        {"window_s": 0},
        {"window_s": -1},
        {"window_s": 0.05},
        {"window_s": 3601},
        {"window_s": float("nan")},
        {"window_s": float("inf")},
        {"window_s": "6"},
        {"window_s": True},
        {"api_key": ""},
        {"api_key": 5},
        {"seed": 1},
        {"nope": 1},
        {"fail_rate": 0.5, "rate_limit": -1},
        [1, 2],
        "not json",
    ],
)
async def test_faults_rejects_bad_input(
    start: MockFactory, session: aiohttp.ClientSession, update: Any
) -> None:
    running = await start()
    before = running.mock.options.public()
    kwargs: dict[str, Any] = {"data": update} if isinstance(update, str) else {"json": update}
    async with session.post(f"{root(running)}/_mock/faults", **kwargs) as resp:
        assert resp.status == 400
        body = await resp.json()
    assert body["success"] is False
    assert body["error"]
    assert running.mock.options.public() == before


def test_options_validated_on_construction() -> None:
    with pytest.raises(ValueError, match="fail_rate"):
        MockOptions(fail_rate=2.0)
    with pytest.raises(ValueError, match="rate_limit"):
        MockOptions(rate_limit=-5)


@pytest.mark.parametrize("window_s", [0, -1, 0.05, 3600.5, math.nan, math.inf, "6", True, None])
def test_window_s_validated_on_construction(window_s: Any) -> None:
    with pytest.raises(ValueError, match="window_s"):
        MockOptions(window_s=window_s)


@pytest.mark.parametrize(
    ("rate_limit", "window_s", "quota"),
    [
        (300, 60, 300),
        (6000, 6, 600),
        (600, 1, 10),
        (120, 2.5, 5),
        (1, 1, 1),  # 1/60 of a request rounds up to one per window
        (0, 1, 0),  # unlimited
        (7, 3600, 420),
    ],
)
def test_quota_per_window(rate_limit: int, window_s: float, quota: int) -> None:
    options = MockOptions(rate_limit=rate_limit, window_s=window_s)
    assert isinstance(options.window_s, float)
    assert options.quota() == quota


def test_window_s_bounds_accepted() -> None:
    assert MockOptions(window_s=0.1).window_s == 0.1
    assert MockOptions(window_s=3600).window_s == 3600.0
    assert MockOptions().window_s == 60.0


async def test_short_window(start: MockFactory, session: aiohttp.ClientSession) -> None:
    running = await start(rate_limit=600, window_s=1)
    clock = FakeClock()
    running.mock.clock = clock
    remaining = []
    for _ in range(10):
        status, _, resp = await post(session, running)
        assert status == 200
        limit, left, reset = assert_rate_headers(resp)
        assert (limit, reset) == (10, 1)
        remaining.append(left)
    assert remaining == list(range(9, -1, -1))

    clock.now += 0.4
    status, body, resp = await post(session, running)
    assert status == 429
    assert body == {"success": False, "error": "Rate limit exceeded: 10 requests per second"}
    # Reset rounds up: 0.6 s left says 1.
    assert assert_rate_headers(resp) == (10, 0, 1)
    assert len(running.mock.events) == 10
    assert running.mock.stats.rate_limited == 1

    # Once the window has passed the whole quota is back.
    clock.now += 0.6
    status, _, resp = await post(session, running)
    assert status == 200
    assert assert_rate_headers(resp) == (10, 9, 1)


@pytest.mark.parametrize(
    ("rate_limit", "window_s", "error", "reset"),
    [
        (60, 6, "Rate limit exceeded: 6 requests per 6 seconds", 6),
        (120, 2.5, "Rate limit exceeded: 5 requests per 2.5 seconds", 3),
        (600, 0.5, "Rate limit exceeded: 5 requests per 0.5 seconds", 1),
        (3, 60, "Rate limit exceeded: 3 requests per minute", 60),
    ],
)
async def test_window_quota_message_and_reset(
    start: MockFactory,
    session: aiohttp.ClientSession,
    rate_limit: int,
    window_s: float,
    error: str,
    reset: int,
) -> None:
    running = await start(rate_limit=rate_limit, window_s=window_s)
    running.mock.clock = FakeClock()
    quota = running.mock.options.quota()
    for _ in range(quota):
        status, _, resp = await post(session, running)
        assert status == 200
        # A fresh window's Reset is its length rounded up to whole seconds.
        assert assert_rate_headers(resp)[2] == reset
    status, body, resp = await post(session, running)
    assert (status, body["error"]) == (429, error)
    assert assert_rate_headers(resp) == (quota, 0, reset)


async def test_window_s_through_faults_endpoint(
    start: MockFactory, session: aiohttp.ClientSession
) -> None:
    running = await start(rate_limit=60)
    clock = FakeClock()
    running.mock.clock = clock
    status, _, resp = await post(session, running)
    assert assert_rate_headers(resp) == (60, 59, 60)

    faults = f"{root(running)}/_mock/faults"
    async with session.post(faults, json={"window_s": 6}) as resp:
        assert resp.status == 200
        assert (await resp.json())["window_s"] == 6.0
    async with session.get(faults) as resp:
        assert (await resp.json())["window_s"] == 6.0

    # The running window is judged by the new length: 10 s in, a 6 s window has ended.
    clock.now += 10
    status, _, resp = await post(session, running)
    assert status == 200
    assert assert_rate_headers(resp) == (6, 5, 6)


async def test_rate_limited_times(start: MockFactory, session: aiohttp.ClientSession) -> None:
    running = await start(rate_limit=60, window_s=1)
    stats = running.mock.stats
    assert (stats.first_rate_limited_at, stats.last_rate_limited_at) == (None, None)
    running.mock.clock = FakeClock()
    began = time.time()
    assert (await post(session, running))[0] == 200
    assert stats.first_rate_limited_at is None
    assert (await post(session, running))[0] == 429
    first = stats.first_rate_limited_at
    assert first is not None
    assert stats.last_rate_limited_at == first
    await asyncio.sleep(0.01)
    assert (await post(session, running))[0] == 429
    ended = time.time()
    last = stats.last_rate_limited_at
    assert last is not None
    assert stats.first_rate_limited_at == first
    assert began <= first < last <= ended
    assert stats.rate_limited == 2

    async with session.get(f"{root(running)}/_mock/events") as resp:
        shown = (await resp.json())["stats"]
    assert (shown["first_rate_limited_at"], shown["last_rate_limited_at"]) == (first, last)

    running.mock.reset()
    assert running.mock.stats.first_rate_limited_at is None
    assert running.mock.stats.last_rate_limited_at is None


def test_cli_window_s_flag() -> None:
    parser = build_parser()
    args = parser.parse_args(["mock-remote", "--rate-limit", "6000", "--window-s", "6"])
    assert (args.rate_limit, args.window_s) == (6000, 6.0)
    assert parser.parse_args(["mock-remote"]).window_s == 60.0
    with pytest.raises(SystemExit):
        parser.parse_args(["mock-remote", "--window-s", "soon"])


@pytest.mark.parametrize("window_s", ["0", "-1", "nan", "3601"])
def test_cli_rejects_bad_window_s(window_s: str, capsys: pytest.CaptureFixture[str]) -> None:
    # Rejected before anything is served: cmd_mock_remote returns instead of blocking.
    args = build_parser().parse_args(["mock-remote", "--port", "0", "--window-s", window_s])
    assert cmd_mock_remote(args) == 2
    assert "window_s" in capsys.readouterr().err


async def test_events_and_reset_endpoints(
    start: MockFactory, session: aiohttp.ClientSession
) -> None:
    running = await start(rate_limit=2)
    await post(session, running, idem=IDEM)
    await post(session, running, auth=None)
    base = root(running)
    async with session.get(f"{base}/_mock/events") as resp:
        listed = await resp.json()
    assert [e["id"] for e in listed["events"]] == [1]
    assert listed["events"][0]["recipient_id"] == "r-1"
    assert listed["duplicates"] == []
    assert listed["stats"] == {
        "requests": 2,
        "created": 1,
        "duplicates": 0,
        "conflicts": 0,
        "rate_limited": 0,
        "throttled": 0,
        "unauthorized": 1,
        "invalid": 0,
        "failed": 0,
        "resets": 0,
        "timeouts": 0,
        "first_rate_limited_at": None,
        "last_rate_limited_at": None,
        # One rate window so far, with the one authenticated request in it.
        "window_counts": [1],
    }

    async with session.post(f"{base}/_mock/reset") as resp:
        assert resp.status == 200
    async with session.get(f"{base}/_mock/events") as resp:
        listed = await resp.json()
    assert listed["events"] == []
    counters = {
        k: v for k, v in listed["stats"].items() if not k.endswith("_at") and k != "window_counts"
    }
    assert set(counters.values()) == {0}
    assert listed["stats"]["window_counts"] == []
    assert listed["stats"]["first_rate_limited_at"] is None

    # Idempotency store and rate window are forgotten; ids restart.
    status, body, resp = await post(session, running, idem=IDEM)
    assert (status, body) == (200, {"success": True, "data": 1})
    assert assert_rate_headers(resp)[1] == 1


async def test_not_found_and_wrong_method_are_json(
    start: MockFactory, session: aiohttp.ClientSession
) -> None:
    running = await start()
    async with session.get(url(running), headers=AUTH) as resp:
        assert resp.status == 405
        assert "POST" in resp.headers["Allow"]
        assert_rate_headers(resp)
        body = await resp.json()
        assert body["success"] is False
        assert body["error"]
    async with session.post(f"{running.base_url}/nope", headers=AUTH) as resp:
        assert resp.status == 404
        assert_rate_headers(resp)
        assert (await resp.json())["success"] is False
    async with session.get(f"{root(running)}/elsewhere") as resp:
        assert resp.status == 404
        assert (await resp.json())["success"] is False
    async with session.get(f"{root(running)}/_mock/reset") as resp:
        assert resp.status == 405
        assert (await resp.json())["success"] is False


async def test_key_never_logged(
    start: MockFactory, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "sekrit-0123456789"
    running = await start(api_key=secret)
    with caplog.at_level(logging.DEBUG):
        await post(session, running, auth=basic(secret))
        await post(session, running, auth=None, params={"api_key": secret})
        await post(session, running, auth=None)
    ours = [r for r in caplog.records if r.name == "forwarder.mock_remote"]
    assert len(ours) == 3
    # Any logger, including aiohttp's access log, which would show the query string.
    assert all(secret not in r.getMessage() for r in caplog.records)


async def test_serve_mock_cli_contract(session: aiohttp.ClientSession) -> None:
    code = (
        "import asyncio\n"
        "from forwarder.testing.mock_options import MockOptions\n"
        "from forwarder.testing.mock_server import serve_mock\n"
        "asyncio.run(serve_mock(MockOptions(), '127.0.0.1', 0))\n"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 10)).decode()
        prefix = "mock-remote listening on "
        assert line.startswith(prefix)
        base_url = line[len(prefix) :].strip()
        assert base_url.startswith("http://127.0.0.1:")
        assert base_url.endswith("/v1")
        async with session.post(
            f"{base_url}/recipientEvents/create", data=EVENT, headers=AUTH
        ) as resp:
            assert resp.status == 200
        proc.terminate()
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 10)
        assert proc.returncode == 0, stderr.decode()
        assert stdout == b""
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
