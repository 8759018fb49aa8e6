"""`forwarder run` under systemd's protocols, without systemd: a test-owned notify socket, and
`systemd-socket-activate` passing listening sockets."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import API_KEY, DaemonProc, MockProc, Proc, spawn_argv, write_config

StartMock = Callable[..., Awaitable[MockProc]]
StartDaemon = Callable[..., Awaitable[DaemonProc]]


class NotifySocket:
    """The datagram socket systemd would own; collects what the daemon says."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.messages: list[dict[str, str]] = []

    def drain(self) -> list[dict[str, str]]:
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                return self.messages
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
            self.messages.append(fields)

    def kinds(self) -> list[str]:
        names = ("READY", "RELOADING", "STOPPING", "WATCHDOG")
        return [next((n for n in names if n in m), "STATUS") for m in self.drain()]

    async def wait_for(self, kind: str, timeout: float = 15.0) -> None:
        async def seen() -> None:
            while kind not in self.kinds():
                await asyncio.sleep(0.02)

        await asyncio.wait_for(seen(), timeout)


async def test_notify_ready_status_reload_watchdog_and_stopping_in_order(
    mock_remote: StartMock, daemon: StartDaemon, short_tmp: Path
) -> None:
    notify = NotifySocket(short_tmp / "notify")
    mock = await mock_remote()
    d = await daemon(
        mock.base_url,
        env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "400000"},
    )
    await notify.wait_for("READY")
    ready = next(m for m in notify.drain() if "READY" in m)
    assert ready["READY"] == "1"
    assert "queue 0" in ready["STATUS"]
    await notify.wait_for("WATCHDOG")  # pinged every 0.2 s while the loop turns

    d.proc.process.send_signal(signal.SIGHUP)
    await d.proc.wait_for_line(lambda s: '"reloaded"' in s, 10)
    await asyncio.sleep(0.1)
    reloading = [m for m in notify.drain() if "RELOADING" in m]
    assert reloading
    assert int(reloading[0]["MONOTONIC_USEC"]) > 0
    assert await d.stop() == 0
    kinds = [k for k in notify.kinds() if k != "WATCHDOG"]
    # READY, RELOADING, READY again (systemd waits for it after a reload), then STOPPING.
    assert [k for k in kinds if k != "STATUS"] == ["READY", "RELOADING", "READY", "STOPPING"]
    stopping = next(m for m in notify.drain() if "STOPPING" in m)
    assert "draining" in stopping["STATUS"]
    notify.sock.close()


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None, reason="no systemd tools")
async def test_socket_activation_serves_on_passed_sockets_and_keeps_early_events(
    mock_remote: StartMock, short_tmp: Path
) -> None:
    mock = await mock_remote()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sock_path = short_tmp / "act.sock"
    config = short_tmp / "activated.toml"
    write_config(
        config,
        {
            # Ignored under socket activation: the passed sockets are served instead.
            "intake": {"http_listen": "127.0.0.1:1", "unix_socket": ""},
            "remote": {"base_url": mock.base_url},
            "state": {"dir": str(short_tmp / "state")},
            "log": {"format": "json"},
        },
    )
    activate = shutil.which("systemd-socket-activate")
    assert activate is not None
    proc = await _spawn_activated(
        activate,
        ["-l", f"127.0.0.1:{port}", "-l", str(sock_path), "--fdname=tcp:unix"],
        ["run", "--config", str(config)],
    )
    try:
        await _wait_for_path(sock_path)
        # Sent right away: the daemon may not be serving yet; the kernel holds the connection.
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                f"http://127.0.0.1:{port}/v1/events",
                json=[{"recipient_id": "1", "name": "EARLY"}],
            ) as response,
        ):
            assert response.status == 202
        connector = aiohttp.UnixConnector(path=str(sock_path))
        async with (
            aiohttp.ClientSession(connector=connector) as http,
            http.post(
                "http://forwarder/v1/events", json=[{"recipient_id": "2", "name": "UNIX"}]
            ) as response,
        ):
            assert response.status == 202
        line = await proc.wait_for_line(lambda s: '"started"' in s, 15)
        started = json.loads(line)
        assert started["socket_activated"] is True
        assert sorted(started["listening"]) == sorted(
            [f"http://127.0.0.1:{port}", f"unix:{sock_path}"]
        )

        async def arrived() -> bool:
            return len((await mock.record())["events"]) == 2

        await asyncio.wait_for(_until(arrived), 15)
    finally:
        assert await proc.stop() == 0
    assert sock_path.exists()  # systemd's socket: not ours to remove


async def _spawn_activated(activate: str, flags: list[str], args: list[str]) -> Proc:
    # systemd-socket-activate binds, then execs the command with the sockets at fd 3, 4 and
    # a clean environment: only what --setenv names passes.
    argv = [
        activate,
        *flags,
        "--setenv=PYTHONUNBUFFERED=1",
        "--setenv=FORWARDER_API_KEY",
        sys.executable,
        "-m",
        "forwarder",
    ]
    return await spawn_argv([*argv, *args], env={"FORWARDER_API_KEY": API_KEY})


async def _wait_for_path(path: Path) -> None:
    async def exists() -> bool:
        return path.exists()

    await asyncio.wait_for(_until(exists), 10)


async def _until(check: Callable[[], Awaitable[bool]]) -> None:
    while not await check():
        await asyncio.sleep(0.05)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd tools")
async def test_the_unit_files_pass_systemd_analyze_verify(short_tmp: Path) -> None:
    units = Path(__file__).resolve().parents[2] / "systemd"
    for unit in units.iterdir():
        text = unit.read_text()
        # verify checks that ExecStart's binary exists; it is installed to /opt only on a host.
        (short_tmp / unit.name).write_text(
            text.replace("/opt/forwarder/bin/forwarder", shutil.which("true") or "/bin/true")
        )
    names = sorted(str(short_tmp / unit.name) for unit in units.iterdir())
    assert len(names) == 2
    process = await asyncio.create_subprocess_exec(
        "systemd-analyze",
        "verify",
        *names,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, out.decode()
    assert out.decode().strip() == "", out.decode()
