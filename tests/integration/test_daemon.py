"""The daemon's lifecycle in-process: startup failures are clean, sockets are handled safely."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import ssl
import stat
from pathlib import Path

import aiohttp
import pytest
import structlog
from aiohttp import web

from forwarder.config.schema import (
    AccountConfig,
    Config,
    ConfigError,
    IntakeConfig,
    QueueConfig,
    RemoteConfig,
    ShutdownConfig,
    StateConfig,
)
from forwarder.daemon.lifecycle import Daemon
from forwarder.events import Event
from forwarder.intake.accounts import Account, configured_accounts
from forwarder.ops.credentials import ApiKey, Secret
from forwarder.storage.backlog import Backlog
from forwarder.storage.memory import MemoryLog
from tests.conftest import TlsFiles, dead_letters, spooled

KEY = configured_accounts(Config(), ApiKey(Secret("sk-daemon-test-0000"), "test"), {})


def _accounts(config: Config) -> dict[str, Account]:
    """The default account as `config` describes it (its base URL), with the test key."""
    return configured_accounts(config, ApiKey(Secret("sk-daemon-test-0000"), "test"), {})


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


async def _refused_because(config: Config) -> str:
    """Run a daemon that must fail to start; the error of its startup_failed line."""
    with structlog.testing.capture_logs() as logs:
        assert await asyncio.wait_for(Daemon(config, KEY).run(), 10) == 1
    (failed,) = [line for line in logs if line["event"] == "startup_failed"]
    error: str = failed["error"]
    return error


async def test_socket_of_a_live_process_or_a_regular_file_is_refused(short_tmp: Path) -> None:
    path = str(short_tmp / "live.sock")
    with socket.socket(socket.AF_UNIX) as live:
        live.bind(path)
        live.listen()
        error = await _refused_because(_config(short_tmp / "s", listen="", sock=path))
        assert error == f"cannot listen on {path}: already in use by another process"
        assert os.path.exists(path)  # another process's socket is left alone
        live.accept()[0].close()  # the probe connected; nothing else did
    regular = short_tmp / "plain"
    regular.write_text("keep me")
    error = await _refused_because(_config(short_tmp / "s", listen="", sock=str(regular)))
    assert error == f"cannot listen on {regular}: it exists and is not a socket (not removed)"
    assert regular.read_text() == "keep me"
    link = short_tmp / "link.sock"
    link.symlink_to(regular)
    error = await _refused_because(_config(short_tmp / "s", listen="", sock=str(link)))
    assert error.startswith(f"cannot listen on {link}: it is a symbolic link")
    assert regular.read_text() == "keep me"


async def test_a_symlink_to_a_stale_socket_is_neither_followed_nor_removed(short_tmp: Path) -> None:
    target = str(short_tmp / "stale.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(target)
    stale.close()  # a dead socket file: would be removed if it were at the path itself
    link = short_tmp / "l.sock"
    link.symlink_to(target)
    error = await _refused_because(_config(short_tmp / "s", listen="", sock=str(link)))
    assert "symbolic link" in error
    assert link.is_symlink()
    assert stat.S_ISSOCK(os.lstat(target).st_mode)


async def test_socket_gets_the_configured_group_and_mode_before_anyone_can_connect(
    short_tmp: Path,
) -> None:
    others = sorted(set(os.getgroups()) - {os.getegid()})
    if os.geteuid() == 0:
        gid = 4242  # root may give it to any group, named or not
    elif others:
        gid = others[0]
    else:
        pytest.skip("needs root or a supplementary group to give the socket to")
    path = str(short_tmp / "g.sock")
    config = _config(short_tmp / "s", listen="", sock=path)
    config = dataclasses.replace(
        config,
        intake=dataclasses.replace(
            config.intake, unix_socket_mode=0o640, unix_socket_group=str(gid)
        ),
    )
    daemon = Daemon(config, KEY)
    task = await _run_until_ready(daemon)
    try:
        info = os.lstat(path)
        assert (info.st_gid, stat.S_IMODE(info.st_mode)) == (gid, 0o640)
        async with (
            aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=path)) as http,
            http.get("http://forwarder/healthz") as response,
        ):
            assert response.status == 200
    finally:
        daemon.request_stop()
        assert await asyncio.wait_for(task, 10) == 0
    assert not os.path.exists(path)


async def test_an_unknown_socket_group_is_a_startup_error_naming_the_key(short_tmp: Path) -> None:
    config = _config(short_tmp / "s", listen="", sock=str(short_tmp / "u.sock"))
    config = dataclasses.replace(
        config, intake=dataclasses.replace(config.intake, unix_socket_group="no-such-group-x")
    )
    error = await _refused_because(config)
    assert error.startswith("intake.unix_socket_group: no such group 'no-such-group-x'")
    assert not os.path.exists(short_tmp / "u.sock")


async def test_events_that_cannot_be_saved_go_to_the_journal(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def disk_full(self: Backlog, leftovers: list[tuple[Event, int]]) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Backlog, "save", disk_full)
    config = dataclasses.replace(
        _config(short_tmp / "s"),
        remote=RemoteConfig(base_url="http://127.0.0.1:9/v1"),  # nothing listens: retries
        shutdown=ShutdownConfig(timeout_s=0.1),
    )
    daemon = Daemon(config, KEY)
    with structlog.testing.capture_logs() as logs:
        task = await _run_until_ready(daemon)
        event = Event(event_id="evt-unsaved-01", recipient_id="1", name="SIGNUP", account="default")
        assert daemon.queue.offer([event])
        await asyncio.sleep(0.1)
        daemon.request_stop()
        assert await asyncio.wait_for(task, 10) == 0
    (unsaved,) = [line for line in logs if line["event"] == "pending_unsaved"]
    assert unsaved["count"] == 1
    assert unsaved["events"][0]["event_id"] == "evt-unsaved-01"
    assert "No space left" in unsaved["error"]


async def test_reload_applies_what_it_can_and_refuses_a_bad_config(short_tmp: Path) -> None:
    base = dataclasses.replace(
        _config(short_tmp / "s"), remote=RemoteConfig(base_url="http://127.0.0.1:9/v1")
    )
    us = AccountConfig(
        name="us", base_url="http://127.0.0.1:9/v1", api_key_env="X", rate_limit_per_minute=600
    )
    us_account = Account("us", us.base_url, Secret("us-key-0123456789"), 600, "env X")
    assert us_account.per_minute == us.rate_limit_per_minute
    answers: list[tuple[Config, dict[str, Account]] | ConfigError] = []

    def loader() -> tuple[Config, dict[str, Account]]:
        answer = answers.pop(0)
        if isinstance(answer, ConfigError):
            raise answer
        return answer

    daemon = Daemon(base, KEY, loader=loader)
    task = await _run_until_ready(daemon)
    try:
        assert isinstance(daemon.log, MemoryLog)
        assert daemon.log.group_window_s == 0.008
        newer = dataclasses.replace(
            base,
            intake=dataclasses.replace(
                base.intake,
                http_listen="127.0.0.1:1",
                max_batch=7,
                max_connections=9,
                header_timeout_s=3.0,
                body_timeout_s=4.0,
                keepalive_timeout_s=5.0,
                write_timeout_s=6.0,
            ),
            remote=dataclasses.replace(
                base.remote, rate_limit_per_minute=120, max_concurrency=3, per_recipient_order=False
            ),
            queue=QueueConfig(
                max_events=50,
                max_bytes=2 << 20,
                group_commit_ms=20,
                # Read at start only: a reload names them and keeps the running values.
                mode="durable",
                max_disk_bytes=1 << 21,
            ),
            accounts={"us": us},
        )
        default_key = ApiKey(Secret("sk-daemon-test-0000"), "test")
        us_key = ApiKey(us_account.key, us_account.key_source)
        answers.append((newer, configured_accounts(newer, default_key, {"us": us_key})))
        with structlog.testing.capture_logs() as logs:
            assert await daemon.request_reload()
        (line,) = [entry for entry in logs if entry["event"] == "reloaded"]
        assert line["accounts_added"] == ["us"]
        assert line["restart_needed"] == [
            "intake.http_listen",
            "queue.mode",
            "queue.max_disk_bytes",
        ]
        assert daemon.config.queue.mode == base.queue.mode
        assert daemon.config.queue.max_disk_bytes == base.queue.max_disk_bytes
        assert "remote.rate_limit_per_minute" in line["changed"]
        lanes = daemon._dispatcher.lanes if daemon._dispatcher else {}
        assert sorted(lanes) == ["default", "us"]
        assert (
            lanes["default"].budget.view()["limit_per_window"] == 120
        )  # 120/minute over a 60 s window
        assert lanes["default"].concurrency.maximum == 3
        assert lanes["us"].budget.view()["limit_per_window"] == 600
        assert daemon.queue.max_events == 50
        assert daemon.queue.max_bytes == 2 << 20
        assert isinstance(daemon.log, MemoryLog)
        assert daemon.log.group_window_s == 0.02
        assert not daemon.queue.ordered
        assert daemon.config.intake.max_batch == 7
        guard = daemon.connections
        assert (guard.max_connections, guard.header_timeout_s, guard.keepalive_timeout_s) == (
            9,
            3.0,
            5.0,
        )
        assert guard.write_timeout_s == 6.0
        assert daemon._state is not None
        assert daemon._state.body_timeout_s == 4.0
        assert daemon.config.intake.http_listen == "127.0.0.1:0"  # kept: needs a restart

        answers.append(ConfigError("remote.bogus: unknown key"))
        with structlog.testing.capture_logs() as logs:
            assert not await daemon.request_reload()
        (refused,) = [entry for entry in logs if entry["event"] == "reload_refused"]
        assert refused["error"] == "remote.bogus: unknown key"
        assert daemon.config.remote.max_concurrency == 3  # the running config stays
        assert daemon.reloads == 1

        answers.append((base, KEY))  # "us" removed: its idle lane stops
        assert await daemon.request_reload()
        await asyncio.sleep(0)
        assert sorted(lanes) == ["default"]
    finally:
        daemon.request_stop()
        assert await asyncio.wait_for(task, 10) == 0


async def test_a_damaged_spool_is_moved_aside_and_a_fresh_one_used(short_tmp: Path) -> None:
    state = short_tmp / "s"
    state.mkdir()
    (state / "spool.db").write_bytes(b"this is not a database" * 100)
    daemon = Daemon(_config(state), KEY)
    with structlog.testing.capture_logs() as logs:
        task = await _run_until_ready(daemon)
        daemon.request_stop()
        assert await asyncio.wait_for(task, 10) == 0
    (moved,) = [line for line in logs if line["event"] == "spool_moved_aside"]
    assert "not an SQLite database" in moved["reason"]
    aside = Path(moved["path"])
    assert aside.parent == state
    assert aside.read_bytes() == b"this is not a database" * 100  # kept, never dropped
    assert (state / "spool.db").read_bytes().startswith(b"SQLite format 3")


async def test_durable_mode_refuses_with_503_past_max_disk_bytes(short_tmp: Path) -> None:
    config = dataclasses.replace(
        _config(short_tmp / "s"),
        # Nothing listens: events stay. The breaker stays closed: an open one pauses the account
        # and its events go back to disk, which would race the memory counts read below.
        remote=RemoteConfig(base_url="http://127.0.0.1:9/v1", breaker_failures=10_000),
        queue=QueueConfig(mode="durable", max_events=5, max_disk_bytes=1_048_576),
        shutdown=ShutdownConfig(timeout_s=0.1),
    )
    daemon = Daemon(config, KEY)
    task = await _run_until_ready(daemon)
    try:
        big = "x" * 60_000
        batch = [{"recipient_id": str(n), "name": "PAGE_VIEW", "data": big} for n in range(10)]
        async with aiohttp.ClientSession(base_url=daemon.addresses[0]) as http:
            statuses = []
            for _ in range(3):
                async with http.post("/v1/events", json=batch) as response:
                    statuses.append((response.status, await response.json()))
        assert [status for status, _ in statuses] == [202, 503, 503]
        assert statuses[1][1]["reason"] == "spool_full"
        assert statuses[1][1]["error"].startswith("the spool is full")
        # Ten accepted, only five in memory: the rest wait on disk, in order.
        assert daemon.log is not None
        assert daemon.log.on_disk_only + len(daemon.queue) + daemon.queue.in_delivery == 10
        assert len(daemon.queue) + daemon.queue.in_delivery <= 5
        async with aiohttp.ClientSession(base_url=daemon.addresses[0]) as http:
            async with http.get("/v1/stats") as response:
                queue = (await response.json())["queue"]
            async with http.get("/metrics") as response:
                metrics = await response.text()
        assert queue["max_bytes"] == 256 << 20
        assert 5 * 60_000 <= queue["bytes"] <= 5 * 62_000
        assert "forwarder_queue_bytes_capacity 2.68435456e+08" in metrics
        assert f"forwarder_queue_bytes {float(queue['bytes'])}" in metrics
    finally:
        daemon.request_stop()
        assert await asyncio.wait_for(task, 10) == 0


async def test_a_stop_saves_everything_even_past_max_disk_bytes(short_tmp: Path) -> None:
    # The bound is for admission in durable mode; a stop in memory mode must never lose events.
    config = dataclasses.replace(
        _config(short_tmp / "s"),
        remote=RemoteConfig(base_url="http://127.0.0.1:9/v1"),
        queue=QueueConfig(mode="memory", max_disk_bytes=1_048_576),
        shutdown=ShutdownConfig(timeout_s=0.1),
    )
    daemon = Daemon(config, KEY)
    task = await _run_until_ready(daemon)
    big = "y" * 60_000
    events = [
        Event(event_id=f"evt-big-{n:06d}", recipient_id=str(n), name="V", data=big, account="x")
        for n in range(40)  # 2.4 MB, held for an account without a lane: nothing delivers them
    ]
    assert daemon.queue.offer(events)
    with structlog.testing.capture_logs() as logs:
        daemon.request_stop()
        assert await asyncio.wait_for(task, 10) == 0
    (saved,) = [line for line in logs if line["event"] == "pending_saved"]
    assert saved["count"] == 40
    assert len(spooled(short_tmp / "s")) == 40


async def _serve(
    app: web.Application, tls: ssl.SSLContext | None = None
) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls).start()
    port = next(a[1] for a in runner.addresses if isinstance(a, tuple))
    return runner, f"{'https' if tls else 'http'}://127.0.0.1:{port}"


async def _until(condition: object, timeout: float = 10.0) -> None:
    assert callable(condition)
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.02)


async def test_delivers_over_tls_verified_against_remote_ca_bundle(
    short_tmp: Path, tls_files: TlsFiles
) -> None:
    created: list[str] = []

    async def create(request: web.Request) -> web.Response:
        created.append((await request.post())["recipient_id"])  # type: ignore[arg-type]
        return web.json_response({"success": True, "data": len(created)})

    app = web.Application()
    app.router.add_post("/v1/recipientEvents/create", create)
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(tls_files.cert, tls_files.key)
    runner, root = await _serve(app, server_tls)
    config = dataclasses.replace(
        _config(short_tmp / "s"),
        remote=RemoteConfig(base_url=f"{root}/v1", ca_bundle=str(tls_files.ca)),
    )
    daemon = Daemon(config, _accounts(config))
    task = await _run_until_ready(daemon)
    try:
        evt = Event(event_id="evt-tls-0001", recipient_id="7", name="A", account="default")
        assert daemon.queue.offer([evt])
        await _until(lambda: daemon.stats.delivered == 1)
        assert created == ["7"]
    finally:
        daemon.request_stop()
        assert await asyncio.wait_for(task, 10) == 0
        await runner.cleanup()


async def test_a_redirecting_remote_dead_letters_as_redirected_and_logs_only_the_host(
    short_tmp: Path,
) -> None:
    async def moved(request: web.Request) -> web.Response:
        raise web.HTTPFound("https://moved.example.test/v2/recipientEvents/create?x=1")

    app = web.Application()
    app.router.add_post("/v1/recipientEvents/create", moved)
    runner, root = await _serve(app)
    config = dataclasses.replace(
        _config(short_tmp / "s"), remote=RemoteConfig(base_url=f"{root}/v1")
    )
    daemon = Daemon(config, _accounts(config))
    try:
        with structlog.testing.capture_logs() as logs:
            task = await _run_until_ready(daemon)
            evt = Event(event_id="evt-moved-001", recipient_id="7", name="A", account="default")
            assert daemon.queue.offer([evt])
            await _until(lambda: daemon.stats.dead_lettered["redirected"] == 1)
            daemon.request_stop()
            assert await asyncio.wait_for(task, 10) == 0
    finally:
        await runner.cleanup()
    (line,) = [entry for entry in logs if entry["event"] == "dead_lettered"]
    assert line["reason"] == "redirected"
    assert line["status"] == 302
    assert "redirect to moved.example.test" in line["error"]
    assert "/v2" not in line["error"]
    assert "sk-daemon-test-0000" not in repr(logs)
    (letter,) = dead_letters(short_tmp / "s")
    assert (letter["reason"], letter["attempts"]) == ("redirected", 1)
