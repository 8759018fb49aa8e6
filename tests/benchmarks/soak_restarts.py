"""Restart soak: clients send while the daemon is SIGTERMed and restarted, against a faulty remote.

At the end, from the mock's record: every event that got a 202 was created exactly once (a repeat
with the same idempotency key is absorbed by the mock's 409), nothing was created that no client
was told about, and nothing was dead-lettered. Not part of `make test` (it runs for a while).

    .venv/bin/python tests/benchmarks/soak_restarts.py [--seconds 30] [--clients 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from forwarder.cli.spooldb import list_dead_letters
from forwarder.storage.sqlite.opening import open_readonly_or_fail

KEY = "soak-key-0123456789"


async def _spawn(
    args: list[str], env: dict[str, str], log: Path | None
) -> asyncio.subprocess.Process:
    out = log.open("ab") if log else asyncio.subprocess.PIPE
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "forwarder", *args,
        env={**os.environ, **env}, stdout=out, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def soak(seconds: float, clients: int, state: Path) -> dict[str, Any]:
    mock = await _spawn(
        ["mock-remote", "--port", "0", "--api-key", KEY, "--rate-limit", "0", "--latency-ms", "20",
         "--fail-rate", "0.2", "--reset-rate", "0.05", "--timeout-rate", "0.05", "--seed", "3"],
        {}, None,
    )  # fmt: skip
    assert mock.stdout is not None
    base_url = (await mock.stdout.readline()).decode().split()[-1]
    port = _free_port()
    env = {
        "FORWARDER_API_KEY": KEY,
        "FORWARDER_REMOTE_BASE_URL": base_url,
        "FORWARDER_STATE_DIR": str(state),
        "FORWARDER_INTAKE_HTTP_LISTEN": f"127.0.0.1:{port}",
        "FORWARDER_INTAKE_DROP_IN_ANSWER": "accepted",  # the ledger reads data.id
        "FORWARDER_REMOTE_TIMEOUT_S": "1",
        "FORWARDER_REMOTE_CONCURRENCY": "4",
        "FORWARDER_RETRY_INITIAL_BACKOFF_S": "0.05",
        "FORWARDER_RETRY_MAX_BACKOFF_S": "0.5",
        "FORWARDER_SHUTDOWN_TIMEOUT_S": "0.5",
        "FORWARDER_LOG_LEVEL": os.environ.get("SOAK_LOG_LEVEL", "warning"),
    }
    log = state / "daemon.log"
    accepted: set[str] = set()
    unanswered: set[str] = set()
    refused = 0
    restarts = 0
    stop_at = time.monotonic() + seconds

    async def client(n: int) -> None:
        nonlocal refused
        url = f"http://127.0.0.1:{port}/v1/recipientEvents/create"
        seq = 0
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
            while time.monotonic() < stop_at:
                seq += 1
                event_id = f"soak-{n}-{seq:07d}"
                form = {"recipient_id": str(n), "name": "PAGE_VIEW", "event_id": event_id}
                try:
                    async with http.post(url, data=form) as response:
                        if response.status == 202:
                            accepted.add(event_id)
                        else:
                            refused += 1
                except aiohttp.ClientConnectorError:  # the daemon is restarting
                    refused += 1
                    await asyncio.sleep(0.05)
                except (aiohttp.ClientError, TimeoutError):
                    unanswered.add(event_id)  # cut off by a stop: the app cannot know
                await asyncio.sleep(random.uniform(0, 0.01))

    async def listening(daemon: asyncio.subprocess.Process) -> None:
        # A SIGTERM before the daemon installs its handlers (Python still starting, nothing
        # accepted yet) kills it with the default action: on a loaded machine start-up can take
        # longer than 1.5 s, so the stop is timed from when it serves, not from the spawn.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and daemon.returncode is None:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.close()
            await writer.wait_closed()
            return
        raise AssertionError("the daemon did not start listening within 30 s")

    async def chaos() -> None:
        nonlocal restarts
        while time.monotonic() < stop_at:
            daemon = await _spawn(["run"], env, log)
            await listening(daemon)
            await asyncio.sleep(random.uniform(1.5, 3.0))
            daemon.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(daemon.wait(), 30) == 0
            restarts += 1

    try:
        await asyncio.gather(chaos(), *(client(n) for n in range(clients)))
    except BaseException:
        mock.kill()  # a failed run must not leave the mock behind
        raise
    final = await _spawn(["run"], {**env, "FORWARDER_REMOTE_CONCURRENCY": "32"}, log)
    record: dict[str, Any] = {}
    async with aiohttp.ClientSession() as http:
        # Under this remote's faults (30 % failed, reset or hung for the 1 s timeout) the final
        # drain runs at about 40 events/s: the deadline grows with what there is to drain.
        deadline = time.monotonic() + 120 + len(accepted) / 20
        while time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            async with http.get(base_url.removesuffix("/v1") + "/_mock/events") as response:
                record = await response.json()
            if accepted <= {e["idempotency_key"] for e in record["events"]}:
                break
    final.send_signal(signal.SIGTERM)
    await asyncio.wait_for(final.wait(), 30)
    mock.send_signal(signal.SIGTERM)
    await asyncio.wait_for(mock.wait(), 30)
    keys = [e["idempotency_key"] for e in record["events"]]
    conn = open_readonly_or_fail(state)
    try:
        dead = len(list_dead_letters(conn))
    finally:
        conn.close()
    return {
        "seconds": seconds,
        "restarts": restarts,
        "accepted": len(accepted),
        "refused_or_down": refused,
        "unanswered": len(unanswered),
        "created": len(keys),
        "created_twice": len(keys) - len(set(keys)),
        "missing": len(accepted - set(keys)),
        "created_not_accepted": len(set(keys) - accepted - unanswered),
        "dead_letters": dead,
        "mock": record["stats"],
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fwsoak") as tmp:
        result = asyncio.run(soak(args.seconds, args.clients, Path(tmp)))
    print(json.dumps(result, indent=2))
    ok = result["missing"] == result["created_twice"] == result["created_not_accepted"] == 0
    print("exactly once: " + ("yes" if ok else "NO"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
