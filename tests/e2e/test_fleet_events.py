"""`GET /v1/events/{id}` in a fleet's shared queue: any host answers for any event.

Two `forwarder run` with queue.mode "fleet" share one real Redis and `forwarder mock-remote`.
Events sent to host A are delivered by whichever host holds their partition, so about half by
host B; host A still tells what became of each (by the number it answered, or the event_id),
with the remote's id, and so does host B, which never saw most of them. With Redis frozen, a
look-up that needs Redis is a 503 saying so, never a wrong 404. Host A restarted still knows
the numbers it answered.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from tests.conftest import DaemonProc
from tests.e2e.test_fleet_queue import Daemon, Mock, created_all, fleet, send, stats
from tests.redisserver import RedisServer

CREATE = "/v1/recipientEvents/create"
COUNT = 24


async def look_up(host: DaemonProc, key: str | int) -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{host.url}/v1/events/{key}") as response,
    ):
        body: dict[str, Any] = await response.json()
        return response.status, body


async def test_any_host_tells_what_became_of_an_event_another_delivered(
    daemon: Daemon, mock_remote: Mock, redis_server: RedisServer
) -> None:
    mock = await mock_remote()
    # The drop-in answer is the remote's: the event's number, as apps keep it.
    hosts = await fleet(daemon, mock, redis_server.url, 2, intake={"drop_in_answer": "remote"})
    a, b = hosts
    for _ in range(50):  # until both hold partitions
        held = [(await stats(h))["fleet"]["queue"]["partitions_held"] for h in hosts]
        if all(held):
            break
        await asyncio.sleep(0.2)
    assert all(held), held
    numbers = []
    async with aiohttp.ClientSession() as http:
        for n in range(COUNT):
            form = {"recipient_id": f"r-{n}", "name": "PURCHASE", "value": str(n)}
            async with http.post(f"{a.url}{CREATE}", data=form) as r:
                assert r.status == 200, await r.text()
                numbers.append((await r.json())["data"])
    await send(
        a,
        [
            {"event_id": f"evt-look-{n}", "recipient_id": f"s-{n}", "name": "SIGNUP"}
            for n in range(COUNT)
        ],
    )
    created = await created_all(mock, 2 * COUNT, timeout=15)
    remote_ids = {e["idempotency_key"]: e["id"] for e in created}
    queue_b = (await stats(b))["fleet"]["queue"]
    assert queue_b["settled"] > 0, queue_b

    # Host A, by the numbers it answered: each delivered, with the remote's id.
    for number in numbers:
        status, body = await look_up(a, number)
        assert status == 200, body
        data = body["data"]
        assert data["status"] == "delivered", data
        assert data["number"] == number
        assert data["remote_id"] == remote_ids[data["event_id"]]
    # Host B, by event_id, although A accepted them.
    for n in range(COUNT):
        status, body = await look_up(b, f"evt-look-{n}")
        assert status == 200, body
        assert body["data"]["status"] == "delivered"
        assert body["data"]["remote_id"] == remote_ids[f"evt-look-{n}"]
    status, body = await look_up(b, "evt-never-sent")
    assert status == 404
    assert body["reason"] == "unknown_event"

    # Redis frozen: what B delivered itself is still a 200; what it cannot know without Redis
    # is a 503 saying so (each takes the bounded Redis call, 2.5 s: the first one is enough).
    redis_server.freeze()
    try:
        answers = []
        for n in range(COUNT):
            answers.append((await look_up(b, f"evt-look-{n}"))[0])
            if answers[-1] != 200:
                break
    finally:
        redis_server.resume()
    assert answers[-1] == 503, answers
    assert set(answers) <= {200, 503}, answers

    # Host A restarted (same state dir, same member): the numbers it answered still resolve.
    await a.stop()
    a = await daemon(
        mock.base_url,
        state_dir=a.state_dir,
        queue={"mode": "fleet"},
        intake={"drop_in_answer": "remote"},
        remote={"timeout_s": 2.0, "connect_timeout_s": 1.0},
        fleet={"redis_url": redis_server.url, "member": "host-0", "partitions": 8},
    )
    for number in numbers:
        status, body = await look_up(a, number)
        assert status == 200, body
        assert body["data"]["status"] == "delivered"
        assert body["data"]["remote_id"] == remote_ids[body["data"]["event_id"]]
