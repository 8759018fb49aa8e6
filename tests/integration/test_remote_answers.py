"""Broken and hostile answers of the remote, through the real client and a delivery lane.

A header the remote sends with a value that makes no sense is ignored (one warning line per
header name) and the answer's status is handled as usual: retried, delivered or
dead-lettered for its own reason, never an `internal_error`. The remote's answer never carries
the API key into a log line, whatever JSON it holds.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestServer

from forwarder.config.schema import RemoteConfig
from forwarder.delivery import dispatcher as dispatcher_module
from forwarder.delivery import gates as gates_module
from forwarder.delivery import lane as lane_module
from forwarder.delivery import outcomes as outcomes_module
from forwarder.delivery import remote as remote_module
from forwarder.delivery.dispatcher import Dispatcher
from forwarder.delivery.lane import LaneSettings
from forwarder.delivery.remote import RemoteClient, classify
from forwarder.events import Event
from forwarder.ops.credentials import Secret
from forwarder.ops.logs import Redactor, configure_logging, flush_logs
from forwarder.ops.metrics import Stats
from forwarder.storage.queue import EventQueue
from tests.unit.test_dispatcher import FAST, RecordingOutcomes
from tests.unit.test_limiter import FakeClock
from tests.unit.test_logs import reset_logging  # noqa: F401 (a fixture)

KEY = "sk-answers-0123456789abcdef"
TOKEN = base64.b64encode(f"{KEY}:".encode()).decode()
RATE_HEADERS = ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset")
# Every header forwarder reads from the remote's answers (Location: see its own test).
READ_HEADERS = ("Retry-After", *RATE_HEADERS)
# Headers only aiohttp reads: garbage there must not matter either.
OTHER_HEADERS = ("Content-Type", "Set-Cookie", "Content-Language", "X-Idempotency-Key")
NONSENSE = {
    "word": "soon",
    "empty": "",
    "blank": "   ",
    "negative": "-5",
    "negative-huge": "-1e300",
    "huge": "1e12",
    "huge-integer": "99999999999999999999999999",
    "overflow-exponent": "1e999",
    "overflow-digits": "9" * 400,
    "nan": "nan",
    "NaN": "NaN",
    "inf": "inf",
    "-Infinity": "-Infinity",
    "hex": "0x1F",
    "comma-list": "5, 7",
    "date-garbage": "Mon, 99 Foo 2024 99:99:99 GMT",
    "date-year-10000": "Sat, 01 Jan 10000 00:00:00 GMT",
    "date-no-zone": "Wed, 21 Oct 2015 07:28:00",
    "date-far-future": "Fri, 31 Dec 9999 23:59:59 GMT",
    "latin-1": "bientôt",
}


@dataclass
class Remote:
    """A remote that answers from a script of (status, headers, body), then 200s."""

    url: str = ""
    script: list[tuple[int, dict[str, str], object]] = field(default_factory=list)
    requests: int = 0

    async def create(self, request: web.Request) -> web.Response:
        self.requests += 1
        await request.read()
        status, headers, body = (
            self.script.pop(0) if self.script else (200, {}, {"success": True, "data": 266})
        )
        text = body if isinstance(body, str) else json.dumps(body)
        return web.Response(status=status, headers=headers, text=text)


@pytest.fixture
async def remote() -> AsyncIterator[Remote]:
    state = Remote()
    app = web.Application()
    app.router.add_post("/v1/recipientEvents/create", state.create)
    async with TestServer(app) as server:
        state.url = str(server.make_url("/v1"))
        yield state


@pytest.fixture(autouse=True)
def _fresh_reports(monkeypatch: pytest.MonkeyPatch) -> None:
    # Each test sees the "once per header" warning afresh.
    monkeypatch.setattr(remote_module, "_REPORTED", set(), raising=False)


@dataclass
class Run:
    stats: Stats
    outcomes: RecordingOutcomes


DeliverAll = Callable[[Remote, int], Awaitable[Run]]


@pytest.fixture
async def deliver_all() -> AsyncIterator[DeliverAll]:
    """Events through a lane with the real client; the lane's clock and sleeps are virtual, so a
    429's gate or a backoff takes no real time."""
    sessions: list[aiohttp.ClientSession] = []

    async def run(remote: Remote, count: int) -> Run:
        clock = FakeClock()

        async def sleep(seconds: float) -> None:
            clock.advance(max(seconds, 0.0))
            await asyncio.sleep(0)

        session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        sessions.append(session)
        queue, stats, outcomes = EventQueue(100), Stats(), RecordingOutcomes()
        dispatcher = Dispatcher(queue, outcomes=outcomes, stats=stats, sleep=sleep, clock=clock)
        settings = LaneSettings(per_minute=6000, remote=RemoteConfig(concurrency=1), retry=FAST)
        dispatcher.add("", RemoteClient(session, remote.url, Secret(KEY)), settings)
        dispatcher.start()
        queue.offer(
            [Event(event_id=f"evt-{n:010d}", recipient_id=str(n), name="A") for n in range(count)]
        )
        try:
            async with asyncio.timeout(10):
                while stats.delivered + sum(stats.dead_lettered.values()) < count:
                    await asyncio.sleep(0.005)
        finally:
            await dispatcher.stop()
        return Run(stats, outcomes)

    yield run
    for session in sessions:
        await session.close()


@pytest.mark.parametrize("value", list(NONSENSE.values()), ids=list(NONSENSE))
@pytest.mark.parametrize("header", READ_HEADERS + OTHER_HEADERS)
async def test_a_nonsense_header_is_ignored_and_the_status_handled_as_usual(
    remote: Remote, deliver_all: DeliverAll, header: str, value: str
) -> None:
    # The same header on a 429, a 503 and the 200 that delivers.
    body = {"success": False, "error": "try later"}
    remote.script = [
        (429, {header: value}, body),
        (503, {header: value}, body),
        (200, {header: value}, {"success": True, "data": 266}),
    ]
    run = await deliver_all(remote, 1)
    assert run.outcomes.records == []  # nothing dead-lettered, internal_error least of all
    assert run.outcomes.delivered_ids == ["evt-0000000000"]
    assert (run.stats.attempts, run.stats.retries, remote.requests) == (3, 2, 3)


@pytest.mark.parametrize("location", ["", "   ", "http://[::1", "::::", "http://a b/", "ÿ" * 300])
async def test_a_nonsense_location_is_still_a_redirect(
    remote: Remote, deliver_all: DeliverAll, location: str
) -> None:
    remote.script = [(301, {"Location": location}, "")]
    run = await deliver_all(remote, 1)
    assert [record["reason"] for record in run.outcomes.records] == ["redirected"]


@pytest.fixture
def log_output(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> io.StringIO:
    """JSON log lines of this test, the daemon's way (redactor included)."""
    request.getfixturevalue("reset_logging")
    out = io.StringIO()
    configure_logging("info", "json", secrets=[KEY], stream=out)
    # Module loggers keep the stream of the configuration they were first used under.
    for module in (dispatcher_module, lane_module, gates_module, outcomes_module, remote_module):
        monkeypatch.setattr(module, "log", structlog.get_logger(module.__name__), raising=False)
    return out


async def test_a_nonsense_header_is_logged_once_not_per_answer(
    remote: Remote, deliver_all: DeliverAll, log_output: io.StringIO
) -> None:
    out = log_output
    broken = {"Retry-After": "soon", "X-RateLimit-Reset": "nan", "X-RateLimit-Limit": "-1"}
    body: object = {"success": False, "error": "busy"}
    done: object = {"success": True, "data": 1}
    remote.script = [(503, broken, body)] * 4 + [(200, broken, done)] * 3
    run = await deliver_all(remote, 4)
    assert run.outcomes.records == []
    assert run.stats.delivered == 4
    flush_logs()
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    ignored = [line["header"] for line in lines if line["event"] == "remote_header_ignored"]
    assert sorted(ignored) == ["Retry-After", "X-RateLimit-Limit", "X-RateLimit-Reset"]
    assert not [line for line in lines if line["event"] == "internal_error"]


@pytest.mark.parametrize(
    "data",
    [
        {f"Basic {TOKEN}": 1},
        {"nested": {KEY: [1]}},
        [f"Authorization: Basic {TOKEN}"],
        f"Basic {TOKEN}",
        KEY,
    ],
    ids=["header-as-key", "key-as-nested-key", "header-in-list", "header-as-id", "key-as-id"],
)
async def test_the_key_never_reaches_the_log_through_the_remotes_answer(
    remote: Remote, deliver_all: DeliverAll, log_output: io.StringIO, data: object
) -> None:
    out = log_output
    remote.script = [(200, {}, {"success": True, "data": data})]
    run = await deliver_all(remote, 1)
    assert run.stats.delivered == 1
    flush_logs()
    text = out.getvalue()
    assert KEY not in text
    assert TOKEN.rstrip("=") not in text
    (delivered,) = [json.loads(line) for line in text.splitlines() if '"delivered"' in line]
    # Only a scalar is a remote id; a string one went through the client's scrubbing.
    assert delivered["remote_id"] is None or "[redacted]" in delivered["remote_id"]


def test_the_redactor_scrubs_keys_of_the_line_and_of_nested_objects() -> None:
    redactor = Redactor([KEY])
    line: dict[str, Any] = {
        "event": "x",
        f"field-{KEY}": 1,
        "answer": {f"Basic {TOKEN}": {KEY: [{KEY: KEY}]}, 7: "seven"},
    }
    rendered = json.dumps(redactor(None, "info", line))
    assert KEY not in rendered
    assert TOKEN.rstrip("=") not in rendered
    assert rendered.count("[redacted]") == 5
    assert redactor.scrub({7: "seven", (1, 2): "pair"}) == {7: "seven", (1, 2): "pair"}


@pytest.mark.parametrize(
    ("data", "remote_id"),
    [
        (266, 266),
        (0, 0),
        ("ev_266", "ev_266"),
        (2**63, None),
        (True, None),
        (2.5, None),
        ({"id": 266}, None),
        ([266], None),
        (None, None),
        ("x" * 65, None),
        ("266\n", None),
    ],
)
def test_only_a_scalar_is_a_remote_id(data: object, remote_id: object) -> None:
    body = json.dumps({"success": True, "data": data}).encode()
    assert classify(200, body, {}).remote_id == remote_id
    assert classify(409, body, {}).remote_id == remote_id


@pytest.mark.parametrize(
    ("headers", "wait"),
    [
        ({"X-RateLimit-Reset": "3600"}, 60.0),  # no window is longer than a minute
        ({"X-RateLimit-Reset": "3600", "Retry-After": "120"}, 120.0),  # explicit: honoured
        ({"X-RateLimit-Reset": "17"}, 17.0),
        ({"X-RateLimit-Reset": "1e12"}, None),  # nonsense: the limiter's default wait
    ],
)
def test_a_429_waits_for_its_reset_at_most_a_window(headers: dict[str, str], wait: object) -> None:
    assert classify(429, b"{}", headers).retry_after == wait
