"""`forwarder demo`: a mock remote and the daemon in one process, a mix of events, a summary.

The mock injects transient faults (5xx, dropped connections, unanswered requests) so the retries,
the idempotency key (409 absorbed) and a dead letter can all be seen in the log.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import tempfile
from pathlib import Path
from typing import Any

import aiohttp

from forwarder.cli.spooldb import list_dead_letters
from forwarder.config.load import load_config
from forwarder.daemon.lifecycle import Daemon
from forwarder.intake.accounts import configured_accounts
from forwarder.ops.credentials import ApiKey, Secret
from forwarder.ops.logs import configure_logging
from forwarder.storage.sqlite.opening import open_readonly_or_fail
from forwarder.testing.mock_options import MockOptions
from forwarder.testing.mock_server import start_mock

DEMO_KEY = "demo-key-not-secret"
NAMES = ("PAGE_VIEW", "PRODUCT_VIEW", "PRODUCT_TO_BASKET", "SIGNUP")


def _demo_config(state_dir: Path, base_url: str) -> str:
    return f"""
[intake]
http_listen = "127.0.0.1:0"
[remote]
base_url = "{base_url}"
concurrency = 4
timeout_s = 1.0
connect_timeout_s = 1.0
auth_retry_s = 1.0
[retry]
initial_backoff_s = 0.05
max_backoff_s = 0.5
max_elapsed_s = 20.0
[state]
dir = "{state_dir}"
[shutdown]
timeout_s = 5.0
[log]
level = "info"
format = "console"
"""


def _event(rng: random.Random, n: int) -> dict[str, Any]:
    recipient = str(1000 + rng.randrange(20))
    if n % 7 == 6:
        return {
            "recipient_id": recipient,
            "name": "PURCHASE",
            "value": f"{rng.uniform(5, 200):.2f}",
            "conversion": True,
            "data": {"order": f"A-{n:05d}", "items": rng.randrange(1, 4)},
        }
    return {"recipient_id": recipient, "name": NAMES[n % len(NAMES)], "value": f"sku-{n}"}


def _dead_letters(state_dir: Path) -> list[dict[str, Any]]:
    conn = open_readonly_or_fail(state_dir)
    try:
        return [letter.to_dict() for letter in list_dead_letters(conn)]
    finally:
        conn.close()


async def run_demo(events: int = 40) -> int:
    """Run the demo; returns 0 when every accepted event was delivered or dead-lettered."""
    rng = random.Random(7)
    mock = await start_mock(
        MockOptions(
            api_key=DEMO_KEY,
            rate_limit=0,
            latency_ms=20,
            fail_rate=0.15,
            reset_rate=0.05,
            timeout_rate=0.05,
            seed=7,
        )
    )
    with tempfile.TemporaryDirectory(prefix="forwarder-demo-") as tmp:
        state_dir = Path(tmp)
        config_path = state_dir / "demo.toml"
        config_path.write_text(_demo_config(state_dir, mock.base_url))
        config = load_config(config_path, env={})
        configure_logging("info", "console", secrets=[DEMO_KEY])
        daemon = Daemon(config, configured_accounts(config, ApiKey(Secret(DEMO_KEY), "demo"), {}))
        task = asyncio.create_task(daemon.run(), name="demo-daemon")
        try:
            await asyncio.wait_for(daemon.ready.wait(), timeout=10)
            url = daemon.addresses[0]
            print(f"\n== demo: forwarder on {url}, mock remote on {mock.base_url}\n", flush=True)
            answers = await _send_mix(url, rng, events)
            await _wait_settled(daemon, timeout=60)
        finally:
            daemon.request_stop()
            code = await task
            await mock.close()
        dead_lines = await asyncio.to_thread(_dead_letters, state_dir)
    record = mock.mock
    counters = daemon.stats.counters()
    print("\n== demo summary")
    print(f"  requests answered by forwarder: {answers}")
    print(
        f"  accepted {counters['accepted']}, delivered {counters['delivered']} "
        f"(of which {counters['duplicates']} answered 409: already at the remote), "
        f"dead-lettered {counters['dead_lettered']}"
    )
    print(
        f"  attempts {counters['attempts']}, retried {counters['retries']}, "
        f"invalid requests refused {counters['invalid_requests']}"
    )
    faults = dataclasses.asdict(record.stats)
    print(
        f"  mock remote: created {len(record.events)} events; answered 5xx {faults['failed']}, "
        f"dropped {faults['resets']} connections, left {faults['timeouts']} unanswered, "
        f"409 {faults['duplicates']}, 422 {faults['conflicts']}"
    )
    for dead in dead_lines:
        print(f"  dead letter: {dead['event']['event_id']} HTTP {dead['status']}: {dead['error']}")
    stats = daemon.stats
    settled = stats.accepted == stats.delivered + sum(stats.dead_lettered.values())
    print(f"  every accepted event delivered or dead-lettered: {'yes' if settled else 'NO'}")
    return 0 if settled and code == 0 else 1


async def _send_mix(url: str, rng: random.Random, events: int) -> dict[str, int]:
    answers: dict[str, int] = {}
    async with aiohttp.ClientSession(base_url=url) as http:

        async def post(path: str, **kwargs: Any) -> None:
            async with http.post(path, **kwargs) as response:
                key = str(response.status)
                answers[key] = answers.get(key, 0) + 1
                if response.status >= 400:
                    print(f"   app got {response.status}: {await response.text()}", flush=True)

        singles = events // 2
        for n in range(singles):  # one event per request, as forms (the drop-in way)
            event = _event(rng, n)
            if isinstance(event.get("data"), dict):
                event["data"] = json.dumps(event["data"])
            event["conversion"] = "1" if event.get("conversion") else "0"
            await post("/v1/recipientEvents/create", data=event)
        batch = [_event(rng, n) for n in range(singles, events)]
        await post("/v1/events", json=batch)
        # An app bug: a conversion whose value is not a number. Refused with 400, never queued.
        await post(
            "/v1/recipientEvents/create",
            data={"recipient_id": "1001", "name": "PURCHASE", "value": "lots", "conversion": "1"},
        )
        # Another app bug: one event_id reused for a different event. The remote answers 422
        # for the second (same idempotency key, other body): a permanent error, dead-lettered.
        reused = {"event_id": "order-confirmation-0001", "recipient_id": "1002", "name": "SIGNUP"}
        await post("/v1/events", json=[reused])
        await asyncio.sleep(0.5)
        await post("/v1/events", json=[{**reused, "name": "PURCHASE", "value": "9.99"}])
    return answers


async def _wait_settled(daemon: Daemon, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    stats = daemon.stats
    while loop.time() < deadline:
        if stats.accepted == stats.delivered + sum(stats.dead_lettered.values()):
            return
        await asyncio.sleep(0.1)
