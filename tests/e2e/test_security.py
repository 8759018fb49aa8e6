"""Who may talk to intake: a token whenever a listener is reachable from other machines."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
import structlog

from forwarder.config.schema import Config, IntakeConfig, StateConfig
from forwarder.daemon import lifecycle as daemon_module
from forwarder.daemon.lifecycle import Daemon
from forwarder.intake.accounts import Account, configured_accounts
from forwarder.ops.credentials import ApiKey, Secret
from forwarder.ops.systemd import ListenSocket
from tests.conftest import API_KEY, DaemonProc, MockProc, spawn, unix_session, write_config
from tests.e2e.test_e2e import wait_until

StartMock = Callable[..., Awaitable[MockProc]]
StartDaemon = Callable[..., Awaitable[DaemonProc]]
TOKEN = "intake-tok-5f4e3d2c1b0a-RECOGNISABLE"
CLIENT_KEY = "client-own-key-0123456789"


def _basic(user: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:".encode()).decode()


async def test_check_config_and_run_refuse_a_public_listener_without_a_token(
    short_tmp: Path,
) -> None:
    config = short_tmp / "public.toml"
    write_config(
        config,
        {
            "intake": {"http_listen": "0.0.0.0:0"},
            "state": {"dir": str(short_tmp / "state")},
            "log": {"format": "json"},
        },
    )
    env = {"FORWARDER_API_KEY": API_KEY}
    for command in ("check-config", "run"):
        proc = await spawn(command, "--config", str(config), env=env)
        assert await proc.wait(20) == 2, proc.stderr
        (line,) = proc.stderr
        assert line.startswith("forwarder: config error: intake.http_listen: 0.0.0.0 is not a")
        assert "intake.auth_token_file" in line
    with_token = {**env, "FORWARDER_INTAKE_AUTH_TOKEN": TOKEN}
    proc = await spawn("check-config", "--config", str(config), env=with_token)
    assert await proc.wait(20) == 0, proc.stderr
    output = "\n".join(proc.stdout)
    assert 'auth_token = "****"' in output
    assert "# intake auth token: **** (from intake.auth_token)" in output
    assert TOKEN not in output


async def test_a_public_listener_with_a_token_and_client_keys_side_by_side(
    mock_remote: StartMock, daemon: StartDaemon, short_tmp: Path
) -> None:
    token_file = short_tmp / "intake_token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    # The mock knows only the app's own key: events under forwarder's key (API_KEY) wait paused.
    mock = await mock_remote(api_key=CLIENT_KEY)
    d = await daemon(
        mock.base_url,
        intake={
            "http_listen": "0.0.0.0:0",
            "auth_token_file": str(token_file),
            "accept_client_keys": True,
        },
    )
    url = d.url.replace("0.0.0.0", "127.0.0.1")
    form = {"recipient_id": "42", "name": "SIGNUP"}
    async with aiohttp.ClientSession(base_url=url) as http:
        async with http.post("/v1/recipientEvents/create", data=form) as response:
            assert response.status == 401
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
        async with http.get("/healthz") as response:
            assert response.status == 200
        # The drop-in's app keeps its own key in Authorization; the token goes beside it.
        headers = {"Authorization": _basic(CLIENT_KEY), "X-Forwarder-Token": TOKEN}
        async with http.post("/v1/recipientEvents/create", data=form, headers=headers) as response:
            assert response.status == 202, await response.text()
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        async with http.post("/v1/events", json=[form], headers=bearer) as response:
            assert response.status == 202, await response.text()

        async def created_under_the_client_key() -> bool:
            return len((await mock.record())["events"]) == 1

        await wait_until(created_under_the_client_key, 10)
        async with http.get("/v1/stats", headers=bearer) as response:
            stats = await response.json()
    assert stats["counters"]["unauthorized"] == 1
    assert stats["counters"]["accepted"] == 2
    # The Unix socket asks for the token too: one rule for every listener.
    async with unix_session(d.socket_path) as http, http.get("/v1/stats") as response:
        assert response.status == 401
    sent = await spawn(
        "send", "--url", url, "--recipient-id", "7", "--name", "X",
        env={"FORWARDER_INTAKE_AUTH_TOKEN": TOKEN},
    )  # fmt: skip
    assert await sent.wait(20) == 0, sent.stdout
    assert await d.stop() == 0
    for text in (*d.proc.stdout, *d.proc.stderr, *sent.stdout, *sent.stderr):
        assert TOKEN not in text
    (started,) = d.proc.events("started")
    assert started["intake_token"] == f"file {token_file}"


# --- in-process: systemd's sockets and reloads ---------------------------------------------------


def _accounts(config: Config) -> dict[str, Account]:
    return configured_accounts(config, ApiKey(Secret("sk-security-test-0000"), "test"), {})


def _config(state: Path, *, listen: str, token: str = "") -> Config:
    return Config(
        intake=IntakeConfig(http_listen=listen, auth_token=token),
        state=StateConfig(dir=str(state)),
    )


async def _run_until_ready(daemon: Daemon) -> asyncio.Task[int]:
    task = asyncio.create_task(daemon.run())
    ready = asyncio.create_task(daemon.ready.wait())
    await asyncio.wait({task, ready}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
    ready.cancel()
    return task


def _public_activated_socket(monkeypatch: pytest.MonkeyPatch) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("0.0.0.0", 0))
    sock.listen()
    sock.setblocking(False)
    passed = ListenSocket(fd=sock.fileno(), name="http", family=socket.AF_INET, sock=sock)
    monkeypatch.setattr(daemon_module, "listen_sockets", lambda: [passed])
    return sock


async def test_a_public_socket_from_systemd_needs_a_token_too(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sock = _public_activated_socket(monkeypatch)
    port, fd = sock.getsockname()[1], sock.fileno()
    config = _config(short_tmp / "s", listen="127.0.0.1:0")  # not used: systemd's socket is
    with structlog.testing.capture_logs() as logs:
        assert await asyncio.wait_for(Daemon(config, _accounts(config)).run(), 10) == 1
    assert sock.fileno() == -1  # closed: nothing serves on it
    (failed,) = [line for line in logs if line["event"] == "startup_failed"]
    assert failed["error"].startswith(
        f"socket activation: http://0.0.0.0:{port} (fd {fd}): 0.0.0.0 is not a"
    )

    sock = _public_activated_socket(monkeypatch)
    config = _config(short_tmp / "s", listen="127.0.0.1:0", token=TOKEN)
    daemon = Daemon(config, _accounts(config))
    task = await _run_until_ready(daemon)
    try:
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        async with aiohttp.ClientSession(base_url=url) as http:
            async with http.get("/v1/stats") as response:
                assert response.status == 401
            headers = {"Authorization": f"Bearer {TOKEN}"}
            async with http.get("/v1/stats", headers=headers) as response:
                assert response.status == 200
    finally:
        daemon.request_stop()
        assert await asyncio.wait_for(task, 10) == 0


async def test_a_reload_changes_the_token_but_cannot_drop_it_from_a_public_listener(
    short_tmp: Path,
) -> None:
    config = _config(short_tmp / "s", listen="0.0.0.0:0", token=TOKEN)
    new_token = "intake-tok-rotated-0123456789"
    answers: list[Config] = []

    def loader() -> tuple[Config, dict[str, Account]]:
        loaded = answers.pop(0)
        return loaded, _accounts(loaded)

    daemon = Daemon(config, _accounts(config), loader=loader)
    task = await _run_until_ready(daemon)
    try:
        url = daemon.addresses[0].replace("0.0.0.0", "127.0.0.1")

        async def status(token: str) -> int:
            headers = {"Authorization": f"Bearer {token}"}
            async with (
                aiohttp.ClientSession(base_url=url) as http,
                http.get("/v1/stats", headers=headers) as response,
            ):
                return response.status

        answers.append(dataclasses.replace(config, intake=IntakeConfig(http_listen="0.0.0.0:0")))
        with structlog.testing.capture_logs() as logs:
            assert not await daemon.request_reload()
        (refused,) = [line for line in logs if line["event"] == "reload_refused"]
        assert refused["error"].startswith("intake.http_listen: 0.0.0.0 is not a loopback")
        assert await status(TOKEN) == 200

        rotated = IntakeConfig(http_listen="0.0.0.0:0", auth_token=new_token)
        answers.append(dataclasses.replace(config, intake=rotated))
        assert await daemon.request_reload()
        assert await status(new_token) == 200
        assert await status(TOKEN) == 401

        answers.append(
            dataclasses.replace(
                config, intake=IntakeConfig(http_listen="0.0.0.0:0", auth_token="x")
            )
        )
        with structlog.testing.capture_logs() as logs:
            assert not await daemon.request_reload()
        (refused,) = [line for line in logs if line["event"] == "reload_refused"]
        assert "shorter than 16 characters" in refused["error"]
        assert await status(new_token) == 200
    finally:
        daemon.request_stop()
        assert await asyncio.wait_for(task, 10) == 0
