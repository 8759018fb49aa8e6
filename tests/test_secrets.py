"""The API key never appears in output, logs, stats, metrics or files we write."""

from __future__ import annotations

import asyncio
import base64
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp

from tests.conftest import DaemonProc, MockProc, Proc, dead_letters, spawn, spooled
from tests.test_e2e import wait_until

KEY = "SECRETKEY-c0ffee-4242-recognisable"
StartMock = Callable[..., Awaitable[MockProc]]
StartDaemon = Callable[..., Awaitable[DaemonProc]]


def _forms(text: str) -> list[str]:
    return [text, base64.b64encode(f"{text}:".encode()).decode()]


def assert_clean(where: str, text: str) -> None:
    for form in _forms(KEY):
        assert form not in text, f"the API key leaked into {where}"


async def test_key_appears_nowhere(
    mock_remote: StartMock, daemon: StartDaemon, short_tmp: Path
) -> None:
    key_file = short_tmp / "api_key"
    key_file.write_text(KEY + "\n")
    key_file.chmod(0o600)
    seen: dict[str, str] = {}
    procs: list[Proc] = []

    # The remote first refuses the key (401 path), then a slow remote holds events at stop.
    mock = await mock_remote("--latency-ms", "300", api_key="not-the-key-0000")
    d = await daemon(
        mock.base_url,
        api_key=KEY,
        remote={"auth_retry_s": 0.2, "concurrency": 4},
        shutdown={"timeout_s": 0.3},
    )
    procs += [mock.proc, d.proc]
    async with aiohttp.ClientSession(base_url=d.url) as http:
        batch = [{"recipient_id": str(n), "name": "SIGNUP"} for n in range(20)]
        async with http.post("/v1/events", json=batch) as response:
            assert response.status == 202
        # A permanent failure too: reuse an id with other fields after the key works.
        bad = {"event_id": "leak-check-0001", "recipient_id": "1", "name": "A"}
        async with http.post("/v1/events", json=[bad]) as response:
            assert response.status == 202

        async def paused() -> bool:
            async with http.get("/readyz") as response:
                return response.status == 503

        await wait_until(paused, 10)
        for path in ("/readyz", "/v1/stats", "/metrics", "/healthz", "/nope"):
            async with http.get(path) as response:
                seen[f"GET {path}"] = await response.text()
        await mock.set_faults(api_key=KEY)
        async with http.post("/v1/events", json=[{**bad, "name": "B"}]) as response:
            assert response.status == 202

        async def dead_lettered() -> bool:
            return bool(dead_letters(d.state_dir))

        await wait_until(dead_lettered, 20)
        for path in ("/v1/stats", "/metrics"):
            async with http.get(path) as response:
                seen[f"GET {path} later"] = await response.text()
        # More than the slow remote can take before the stop: the pending file path too.
        async with http.post("/v1/events", json=batch) as response:
            assert response.status == 202
    assert await d.stop() == 0
    assert spooled(d.state_dir)

    # Every command and its failure paths, with the key from a file this time.
    config = d.config_path.read_text()
    config_path = short_tmp / "with-key-file.toml"
    config_path.write_text(config.replace("[remote]", f'[remote]\napi_key_file = "{key_file}"'))
    env_key = {"FORWARDER_API_KEY": KEY}
    runs = [
        await spawn("check-config", "--config", str(config_path)),
        await spawn("check-config", "--config", str(d.config_path), env=env_key),
        await spawn("check-config", "--config", str(short_tmp / "missing.toml"), env=env_key),
        await spawn(
            "run", "--config", str(d.config_path),
            env={**env_key, "FORWARDER_REMOTE_BASE_URL": "http://example.com/v1"},
        ),
        await spawn("send", "--url", "http://127.0.0.1:9", "--recipient-id", "1", "--name", "X",
                    env=env_key),
    ]  # fmt: skip
    for proc in runs:
        await proc.wait(20)
    procs += runs
    # A daemon that restarts from the pending file and stops again.
    again = await daemon(mock.base_url, state_dir=d.state_dir, api_key=KEY)
    await asyncio.sleep(0.5)
    assert await again.stop(signal.SIGINT) == 0
    procs.append(again.proc)

    for n, proc in enumerate(procs):
        seen[f"process {n} stdout"] = "\n".join(proc.stdout)
        seen[f"process {n} stderr"] = "\n".join(proc.stderr)
    for written in d.state_dir.rglob("*"):
        if written.is_file():
            # Raw bytes: the spool is a SQLite file, and a key would sit in it as plain ASCII.
            seen[str(written)] = written.read_bytes().decode("latin-1")
    assert any(name.endswith("spool.db") for name in seen)  # events and dead letters, raw bytes
    assert any("delivery_paused" in text for text in seen.values()), "401 path not exercised"
    for where, text in seen.items():
        assert_clean(where, text)
