"""`forwarder dlq` and `forwarder spool` against a running daemon's spool."""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import aiohttp
import pytest

from forwarder.cli.dlq import parse_when
from tests.conftest import DaemonProc, MockProc, dead_letters, spawn

StartMock = Callable[..., Awaitable[MockProc]]
StartDaemon = Callable[..., Awaitable[DaemonProc]]


def test_parse_when_takes_iso_dates_and_ages() -> None:
    assert parse_when("2026-11-20") == datetime(2026, 11, 20, tzinfo=UTC).timestamp()
    assert (
        parse_when("2026-11-20T08:00:00+01:00") == datetime(2026, 11, 20, 7, tzinfo=UTC).timestamp()
    )
    assert parse_when("7d", now=1_000_000.0) == 1_000_000.0 - 7 * 86400
    assert parse_when("30m", now=1000.0) == 1000.0 - 1800
    with pytest.raises(argparse.ArgumentTypeError, match="neither an ISO 8601"):
        parse_when("last tuesday")


async def run(*args: str) -> tuple[int, list[str], list[str]]:
    proc = await spawn(*args)
    code = await proc.wait(20)
    return code, proc.stdout, proc.stderr


async def test_dead_letters_can_be_listed_shown_replayed_and_purged(
    mock_remote: StartMock, daemon: StartDaemon
) -> None:
    mock = await mock_remote("--reset-rate", "1.0")  # the remote is down
    d = await daemon(
        mock.base_url,
        retry={"initial_backoff_s": 0.05, "max_backoff_s": 0.1, "max_elapsed_s": 0.3},
        remote={"breaker_failures": 1000},
    )
    config = str(d.config_path)
    async with aiohttp.ClientSession(base_url=d.url) as http:
        batch = [{"recipient_id": str(n), "name": "SIGNUP"} for n in range(3)]
        async with http.post("/v1/events", json=batch) as response:
            assert response.status == 202

        async def all_dead() -> bool:
            return len(dead_letters(d.state_dir)) == 3

        await asyncio.wait_for(_until(all_dead), 20)

        code, out, _ = await run("dlq", "list", "--config", config, "--json")
        assert code == 0
        listed = [json.loads(line) for line in out]
        assert [entry["reason"] for entry in listed] == ["gave_up"] * 3
        assert {entry["event"]["recipient_id"] for entry in listed} == {"0", "1", "2"}
        code, out, _ = await run("dlq", "list", "--config", config, "--reason", "rejected")
        assert code == 0
        assert len(out) == 1  # the header only

        first = listed[0]["id"]
        code, out, _ = await run("dlq", "show", str(first), "--config", config)
        assert code == 0
        assert json.loads("\n".join(out))["event"]["event_id"] == listed[0]["event"]["event_id"]
        code, _, err = await run("dlq", "show", "999", "--config", config)
        assert code == 1
        assert "no dead letter with id 999" in err[0]

        # The remote is back: replay one by id, then the rest; the daemon sends them.
        await mock.set_faults(reset_rate=0.0)
        code, out, _ = await run("dlq", "replay", str(first), "--config", config)
        assert code == 0
        assert "replayed 1" in out[0]
        # Beside the daemon, whose lock it reads (never takes): it names who sends them.
        assert f"the running forwarder (PID {d.proc.process.pid}) sends them" in out[0]
        code, out, _ = await run("dlq", "replay", "--all", "--config", config)
        assert code == 0
        assert "replayed 2" in out[0]

        async def delivered() -> bool:
            return len((await mock.record())["events"]) == 3

        await asyncio.wait_for(_until(delivered), 20)
    created = (await mock.record())["events"]
    # Sent again under their original event_id: the idempotency key is kept.
    assert {e["idempotency_key"] for e in created} == {e["event"]["event_id"] for e in listed}
    assert dead_letters(d.state_dir) == []

    code, out, _ = await run("spool", "stats", "--config", config, "--json")
    assert code == 0
    stats = json.loads(out[0])
    assert stats["events"] == stats["rows"] == 0
    assert stats["dead_letters_total"] == 0
    code, out, _ = await run("spool", "stats", "--config", config)
    assert code == 0
    assert any(line.split() == ["events:", "0", "in", "0", "rows", "(0", "bytes)"] for line in out)


async def test_purge_and_usage_errors(mock_remote: StartMock, daemon: StartDaemon) -> None:
    mock = await mock_remote()
    d = await daemon(mock.base_url)
    config = str(d.config_path)
    async with aiohttp.ClientSession(base_url=d.url) as http:
        first = {"event_id": "order-0000000042", "recipient_id": "7", "name": "SIGNUP"}
        async with http.post("/v1/events", json=[first]) as response:
            assert response.status == 202

        async def one() -> bool:
            return len((await mock.record())["events"]) == 1

        await asyncio.wait_for(_until(one), 10)
        # The same idempotency key with other fields: 422, dead-lettered as rejected.
        async with http.post("/v1/events", json=[{**first, "name": "OTHER"}]) as response:
            assert response.status == 202

        async def dead() -> bool:
            return len(dead_letters(d.state_dir)) == 1

        await asyncio.wait_for(_until(dead), 10)
    code, out, _ = await run("dlq", "purge", "--before", "2000-01-01", "--config", config)
    assert code == 0
    assert "purged 0" in out[0]
    code, out, _ = await run("dlq", "purge", "--before", "0m", "--config", config)
    assert code == 0
    assert "purged 1" in out[0]
    assert dead_letters(d.state_dir) == []

    code, _, err = await run("dlq", "replay", "--config", config)
    assert code == 2
    assert "name dead-letter ids, or --all" in err[0]
    code, _, err = await run("dlq", "purge", "--before", "soon", "--config", config)
    assert code == 2
    code, _, err = await run("spool", "stats", "--config", "/nonexistent/forwarder.toml")
    assert code == 2
    assert "config error" in err[0]


async def _until(check: Callable[[], Awaitable[bool]]) -> None:
    while not await check():
        await asyncio.sleep(0.05)


async def test_memory_mode_without_a_spool_has_no_dead_letters(
    mock_remote: StartMock, daemon: StartDaemon
) -> None:
    # Memory mode writes spool.db only when it must: the commands say there is none, exit 0.
    mock = await mock_remote()
    d = await daemon(mock.base_url)
    config = str(d.config_path)
    assert not (d.state_dir / "spool.db").exists()
    for command in (("dlq", "list"), ("dlq", "replay", "--all"), ("spool", "stats")):
        code, out, err = await run(*command, "--config", config)
        assert (code, out) == (0, []), command
        assert err == [f"forwarder: no spool at {d.state_dir / 'spool.db'}: no dead letters and"
                       " no saved events"], command  # fmt: skip
    code, _, err = await run("dlq", "show", "1", "--config", config)
    assert code == 1
    assert "no spool at" in err[0]
