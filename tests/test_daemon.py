"""The daemon's lifecycle in-process: startup failures are clean, sockets are handled safely."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import aiohttp

from forwarder.config import ApiKey, Config, IntakeConfig, Secret, StateConfig
from forwarder.daemon import Daemon

KEY = ApiKey(Secret("sk-daemon-test-0000"), "test")


def _config(state: Path, *, listen: str = "127.0.0.1:0", sock: str = "") -> Config:
    return Config(
        intake=IntakeConfig(http_listen=listen, unix_socket=sock),
        state=StateConfig(dir=str(state)),
    )


async def _run_until_ready(daemon: Daemon) -> asyncio.Task[int]:
    task = asyncio.create_task(daemon.run())
    ready = asyncio.create_task(daemon.ready.wait())
    await asyncio.wait({task, ready}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
    ready.cancel()
    return task


async def test_port_in_use_is_a_clean_startup_failure(short_tmp: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        daemon = Daemon(_config(short_tmp / "s", listen=f"127.0.0.1:{port}"), KEY)
        assert await asyncio.wait_for(daemon.run(), 10) == 1
    assert not daemon.ready.is_set()


async def test_unusable_state_dir_is_a_clean_startup_failure(short_tmp: Path) -> None:
    not_a_dir = short_tmp / "file"
    not_a_dir.write_text("")
    assert await asyncio.wait_for(Daemon(_config(not_a_dir), KEY).run(), 10) == 1


async def test_stale_socket_is_replaced_with_the_configured_mode(short_tmp: Path) -> None:
    path = str(short_tmp / "f.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # the file stays, nobody listens: what a killed daemon leaves behind
    daemon = Daemon(_config(short_tmp / "s", listen="", sock=path), KEY)
    task = await _run_until_ready(daemon)
    assert daemon.addresses == [f"unix:{path}"]
    assert os.stat(path).st_mode & 0o777 == 0o660
    connector = aiohttp.UnixConnector(path=path)
    async with (
        aiohttp.ClientSession(connector=connector) as http,
        http.get("http://forwarder/healthz") as response,
    ):
        assert response.status == 200
    daemon.request_stop()
    assert await asyncio.wait_for(task, 10) == 0
    assert not os.path.exists(path)  # removed at stop


async def test_socket_of_a_live_process_or_a_regular_file_is_refused(short_tmp: Path) -> None:
    path = str(short_tmp / "live.sock")
    with socket.socket(socket.AF_UNIX) as live:
        live.bind(path)
        live.listen()
        daemon = Daemon(_config(short_tmp / "s", listen="", sock=path), KEY)
        assert await asyncio.wait_for(daemon.run(), 10) == 1
        assert os.path.exists(path)  # another process's socket is left alone
    regular = short_tmp / "plain"
    regular.write_text("keep me")
    daemon = Daemon(_config(short_tmp / "s", listen="", sock=str(regular)), KEY)
    assert await asyncio.wait_for(daemon.run(), 10) == 1
    assert regular.read_text() == "keep me"
    link = short_tmp / "link.sock"
    link.symlink_to(regular)
    daemon = Daemon(_config(short_tmp / "s", listen="", sock=str(link)), KEY)
    assert await asyncio.wait_for(daemon.run(), 10) == 1
    assert regular.read_text() == "keep me"
