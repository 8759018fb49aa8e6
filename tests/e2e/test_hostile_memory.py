"""Hostile input against a running daemon: always a 4xx, never a 5xx, and memory stays bounded.

The request-by-request corpus is in test_bad_input.py; this sends its heaviest kinds over and
over, several at a time, to a real `forwarder run`, and watches the process's resident memory:
it may grow to hold what is being parsed, but must not keep growing from round to round (a
leak), and the daemon must still take a valid event afterwards.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import DaemonProc, MockProc

StartMock = Callable[..., Awaitable[MockProc]]
StartDaemon = Callable[..., Awaitable[DaemonProc]]
MIB = 1024 * 1024
BODY_LIMIT = 256 * 1024  # intake.max_body_bytes for this test
ROUNDS = 20
IN_PARALLEL = 6


def rss_bytes(pid: int) -> int:
    """The process's resident set size, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS line")


def hostile_requests(rng: random.Random) -> list[tuple[str, str, bytes]]:
    """(path, content type, body): the heavy kinds of bad input, each just under the limit."""
    big = "x" * (BODY_LIMIT - 200)
    return [
        ("/v1/events", "application/json", rng.randbytes(BODY_LIMIT - 10)),
        ("/v1/events", "application/json", b"[" * (BODY_LIMIT - 10)),
        ("/v1/events", "application/json", b'{"a":' * 40_000 + b"1" + b"}" * 40_000),
        # A list of many small objects: parses into many Python objects, then is refused whole.
        ("/v1/events", "application/json", b"[" + b",".join([b"{}"] * 80_000) + b"]"),
        (
            "/v1/events",
            "application/json",
            json.dumps([{"recipient_id": big, "name": "PURCHASE"}]).encode(),
        ),
        ("/v1/events", "application/x-ndjson", b"{not json}\n" * 20_000),
        ("/v1/events", "application/json", b'"\\ud800' * 30_000 + b'"'),
        (
            "/v1/recipientEvents/create",
            "application/x-www-form-urlencoded",
            "&".join(f"k{n}=v" for n in range(20_000)).encode(),
        ),
        (
            "/v1/recipientEvents/create",
            "application/x-www-form-urlencoded",
            b"recipient_id=1&name=" + b"%ff" * 60_000,
        ),
        ("/v1/events", "application/json", b"[" + b"1," * (BODY_LIMIT // 2) + b"1]"),  # 413
        ("/v1/events", "text/plain", rng.randbytes(BODY_LIMIT - 10)),
    ]


@pytest.mark.timeout(120)
async def test_hostile_bodies_get_4xx_and_memory_stops_growing(
    mock_remote: StartMock, daemon: StartDaemon
) -> None:
    mock = await mock_remote()
    d = await daemon(mock.base_url, intake={"max_body_bytes": BODY_LIMIT, "max_batch": 1000})
    pid = d.proc.process.pid
    rng = random.Random(7)
    requests = hostile_requests(rng)
    statuses: dict[int, int] = {}
    rss: list[int] = []
    limit = asyncio.Semaphore(IN_PARALLEL)

    async def send(http: aiohttp.ClientSession, path: str, ctype: str, body: bytes) -> None:
        async with limit, http.post(path, data=body, headers={"Content-Type": ctype}) as answer:
            payload = await answer.read()
            statuses[answer.status] = statuses.get(answer.status, 0) + 1
            assert 400 <= answer.status < 500, (path, ctype, answer.status, payload[:200])
            assert json.loads(payload)["success"] is False

    async with aiohttp.ClientSession(base_url=d.url) as http:
        for _ in range(ROUNDS):
            await asyncio.gather(*(send(http, *request) for request in requests))
            rss.append(rss_bytes(pid))
        async with http.post("/v1/events", json=[{"recipient_id": "1", "name": "OK"}]) as ok:
            assert ok.status == 202
    assert set(statuses) <= {400, 413, 415}
    assert statuses.get(413, 0) >= ROUNDS
    # The first rounds grow the heap to what IN_PARALLEL requests need at once; after that the
    # same load must find its room again, not take more (a leak would add every round).
    settled = rss[4]
    assert max(rss[5:]) - settled < 8 * MIB, [round(r / MIB, 1) for r in rss]
    assert max(rss) < 512 * MIB, [round(r / MIB, 1) for r in rss]
    assert os.path.exists(f"/proc/{pid}")
