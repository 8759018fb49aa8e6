"""The API key never appears in output, logs, stats, metrics or any file forwarder writes.

A recognisable key goes through every command (`run`, `check-config`, `send`, `demo`, `dlq
list/show/replay/purge`, `spool stats`, `reload`, `mock-remote`) and every failure path the test
can reach: the remote refusing the key (401 from the mock, 403 from a hostile remote that echoes
the key and the Authorization header back in its error text), dead letters (a 422, a 400 that
echoes the header, a remote that is down), apps that send the key themselves, a refused reload,
a stop with events still queued, bad configs and unusable key files. Then neither the key nor
the base64 of "key:" (what the Basic header carries) may appear in anything collected: stdout,
stderr, the JSON logs, every HTTP answer of forwarder, and the raw bytes of every file under the
state dir (the SQLite spool with its dead-letter rows, its WAL and shared memory, the PID file),
read while the daemon runs and after it stopped.
"""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import DaemonProc, MockProc, Proc, dead_letters, spawn, spooled
from tests.e2e.test_e2e import wait_until

KEY = "sk-SECRET-canary-1234567890"
FORMS = (KEY, base64.b64encode(f"{KEY}:".encode()).decode())
BASIC = {"Authorization": f"Basic {FORMS[1]}"}
StartMock = Callable[..., Awaitable[MockProc]]
StartDaemon = Callable[..., Awaitable[DaemonProc]]


@dataclass
class Seen:
    """Everything collected, by where it came from."""

    texts: dict[str, str] = field(default_factory=dict)

    def add(self, where: str, text: str) -> None:
        self.texts[f"{where} #{len(self.texts)}"] = text

    def add_proc(self, where: str, proc: Proc) -> None:
        self.add(f"{where} stdout", "\n".join(proc.stdout))
        self.add(f"{where} stderr", "\n".join(proc.stderr))

    def add_files(self, where: str, directory: Path) -> None:
        for path in sorted(directory.rglob("*")):
            if path.is_file():
                # Raw bytes: a key would sit in SQLite pages (or the WAL) as plain ASCII.
                self.add(f"{where} {path.name}", path.read_bytes().decode("latin-1"))

    def assert_clean(self) -> None:
        leaks = [
            f"{form[:12]}... in {where}"
            for where, text in self.texts.items()
            for form in FORMS
            if form in text
        ]
        assert not leaks, f"the API key leaked: {leaks}"


@dataclass
class Hostile:
    """A remote that echoes the key and the Authorization header in its error texts."""

    mode: str = "forbid"  # forbid (403), reject (400), ok (200)
    requests: int = 0


@pytest.fixture
async def hostile() -> AsyncIterator[tuple[Hostile, str]]:
    state = Hostile()

    async def create(request: web.Request) -> web.Response:
        state.requests += 1
        header = request.headers.get("Authorization", "")
        user = base64.b64decode(header.removeprefix("Basic ")).decode().rstrip(":")
        echo = f"key {user} refused; you sent Authorization: {header}"
        if state.mode == "forbid":
            return web.json_response({"success": False, "error": echo}, status=403)
        if state.mode == "reject":
            return web.json_response({"success": False, "error": echo}, status=400)
        return web.json_response({"success": True, "data": state.requests})

    app = web.Application()
    app.router.add_post("/v1/recipientEvents/create", create)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield state, f"http://127.0.0.1:{port}/v1"
    await runner.cleanup()


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def _collect_http(seen: Seen, http: aiohttp.ClientSession, label: str) -> None:
    for path in ("/readyz", "/v1/stats", "/metrics", "/healthz", "/nope"):
        async with http.get(path) as response:
            seen.add(f"{label} GET {path}", await response.text())


async def _run_all(*commands: Awaitable[Proc]) -> list[Proc]:
    """Start commands together (each is a Python start-up) and wait for all of them."""
    procs = list(await asyncio.gather(*commands))
    await asyncio.gather(*(proc.wait(60) for proc in procs))
    return procs


@pytest.mark.timeout(90)
async def test_key_appears_nowhere(
    mock_remote: StartMock,
    daemon: StartDaemon,
    hostile: tuple[Hostile, str],
    short_tmp: Path,
) -> None:
    seen = Seen()
    remote, hostile_url = hostile
    down_port = _closed_port()
    key_env = {"FORWARDER_API_KEY": KEY, "FW_HOSTILE_KEY": KEY, "FW_DOWN_KEY": KEY}

    # The mock refuses the key at first (401); "hostile" answers 403 echoing it; "down" is down.
    mock = await mock_remote(api_key="not-the-key-0000")
    accounts: dict[str, dict[str, object]] = {
        "accounts.hostile": {"base_url": hostile_url, "api_key_env": "FW_HOSTILE_KEY"},
        "accounts.down": {
            "base_url": f"http://127.0.0.1:{down_port}/v1",
            "api_key_env": "FW_DOWN_KEY",
        },
    }
    d = await daemon(
        mock.base_url,
        api_key=KEY,
        env=key_env,
        remote={"auth_retry_s": 0.2, "concurrency": 4, "breaker_probe_initial_s": 0.2},
        retry={"initial_backoff_s": 0.05, "max_backoff_s": 0.2, "max_elapsed_s": 1.0},
        shutdown={"timeout_s": 0.3},
        log={"level": "debug", "format": "json"},
        **accounts,
    )
    async with aiohttp.ClientSession(base_url=d.url) as http:
        batch = [{"recipient_id": str(n), "name": "SIGNUP"} for n in range(10)]
        async with http.post("/v1/events", json=batch) as response:
            assert response.status == 202
        # An app that used to call the remote itself sends the key every way it could.
        form = {"recipient_id": "7", "name": "PURCHASE", "api_key": KEY}
        async with http.post(
            "/v1/recipientEvents/create", data=form, params={"api_key": KEY}, headers=BASIC
        ) as response:
            assert response.status == 202, await response.text()
        async with http.post(
            "/v1/recipientEvents/create", data={"recipient_id": "7"}, headers=BASIC
        ) as response:
            assert response.status == 400
            seen.add("400 answer", await response.text())
        for account in ("hostile", "down"):
            items = [{"recipient_id": str(n), "name": "A", "account": account} for n in range(3)]
            async with http.post("/v1/events", json=items) as response:
                assert response.status == 202

        async def both_paused() -> bool:
            async with http.get("/readyz") as response:
                reason = (await response.json()).get("reason", "")
            return "account default: delivery paused" in reason and "hostile" in reason

        await wait_until(both_paused, 10)
        await _collect_http(seen, http, "paused")

        def letters(count: int) -> Callable[[], Awaitable[bool]]:
            async def enough() -> bool:
                return len(dead_letters(d.state_dir)) >= count

            return enough

        await wait_until(letters(3), 15)  # the down account's events gave up
        remote.mode = "reject"  # the next probe meets a 400 that echoes the header
        await mock.set_faults(api_key=KEY)
        await wait_until(letters(6), 15)
        # A permanent failure at the mock: an event_id reused with other fields (422).
        reused = {"event_id": "leak-check-0001", "recipient_id": "1", "name": "A"}
        async with http.post("/v1/events", json=[reused]) as response:
            assert response.status == 202
        await wait_until(lambda: _delivered(http, 12), 15)
        async with http.post("/v1/events", json=[{**reused, "name": "B"}]) as response:
            assert response.status == 202
        await wait_until(letters(7), 15)
        seen.add_files("running", d.state_dir)

        # Reload: accepted through the command, then refused (a bad value) through SIGHUP.
        (reload_ok,) = await _run_all(spawn("reload", "--config", str(d.config_path)))
        assert reload_ok.process.returncode == 0, reload_ok.stderr
        await d.proc.wait_for_line(lambda s: '"reloaded"' in s, 10)
        good = d.config_path.read_text()
        d.config_path.write_text(good.replace("[shutdown]", '[shutdown]\nbogus = "x"'))
        pid = int((d.state_dir / "forwarder.pid").read_text())
        os.kill(pid, signal.SIGHUP)
        await d.proc.wait_for_line(lambda s: '"reload_refused"' in s, 10)
        d.config_path.write_text(good)

        # The key is refused again with events queued: they are saved into the spool at stop.
        await mock.set_faults(api_key="not-the-key-0000")
        async with http.post("/v1/events", json=batch) as response:
            assert response.status == 202
        await wait_until(both_paused_default(http), 10)
        await _collect_http(seen, http, "before stop")
    assert await d.stop() == 0
    assert spooled(d.state_dir), "nothing was saved at stop"
    assert any('"pending_saved"' in line for line in d.proc.stdout)
    for reason in ("gave_up", "rejected"):
        assert any(letter["reason"] == reason for letter in dead_letters(d.state_dir))
    seen.add_files("stopped", d.state_dir)

    # The commands, with the key in the environment: dead letters, spool, send, demo, config.
    config = ["--config", str(d.config_path)]
    letters_now = dead_letters(d.state_dir)
    hostile_ids = [str(x["id"]) for x in letters_now if x["event"].get("account") == "hostile"]
    assert hostile_ids, letters_now
    commands = await _run_all(
        spawn("dlq", "list", *config, env=key_env),
        spawn("dlq", "list", "--json", *config, env=key_env),
        *(spawn("dlq", "show", str(x["id"]), *config, env=key_env) for x in letters_now),
        spawn("spool", "stats", *config, env=key_env),
        spawn("check-config", *config, env=key_env),
        spawn("send", "--url", f"http://127.0.0.1:{down_port}", "--recipient-id", "1",
              "--name", "X", env=key_env),
        spawn("demo", "--events", "6", env=key_env),
    )  # fmt: skip
    assert [p.process.returncode for p in commands[:-2]] == [0] * (len(commands) - 2)
    assert commands[-2].process.returncode == 1  # send: nothing listens there
    assert commands[-1].process.returncode == 0, commands[-1].stderr[-5:]  # demo
    assert any("\thostile\t" in line for line in commands[0].stdout), commands[0].stdout
    (replay,) = await _run_all(spawn("dlq", "replay", *hostile_ids, *config, env=key_env))
    assert replay.process.returncode == 0, replay.stderr
    commands.append(replay)

    # Restart with the key from a file; the saved and replayed events go out; `send` works.
    key_file = short_tmp / "api_key"
    key_file.write_text(KEY + "\n")
    key_file.chmod(0o600)
    remote.mode = "ok"
    # A mock that takes the key on its command line (the first one got it at run time).
    mock2 = await mock_remote(api_key=KEY)
    again = await daemon(
        mock2.base_url,
        state_dir=d.state_dir,
        api_key="",
        env={k: v for k, v in key_env.items() if k != "FORWARDER_API_KEY"},
        remote={"api_key_file": str(key_file)},
        log={"level": "debug", "format": "json"},
        **accounts,
    )
    (sent,) = await _run_all(
        spawn("send", "--url", again.url, "--recipient-id", "1", "--name", "X", env=key_env)
    )
    assert sent.process.returncode == 0, sent.stderr
    commands.append(sent)

    async def only_down_left() -> bool:
        return all(event.get("account") == "down" for event in spooled(d.state_dir))

    await wait_until(only_down_left, 20)
    async with aiohttp.ClientSession(base_url=again.url) as http:
        await _collect_http(seen, http, "again")
    seen.add_files("again running", d.state_dir)
    assert await again.stop(signal.SIGINT) == 0
    assert any('"spool_replay"' in line for line in again.proc.stdout)
    assert remote.requests > 3  # the replayed events reached the hostile remote again

    commands += await _run_all(
        spawn("dlq", "purge", "--before", "0s", *config, env=key_env),
        spawn("spool", "stats", "--json", *config, env=key_env),
    )
    assert [p.process.returncode for p in commands[-2:]] == [0, 0]
    seen.add_files("end", d.state_dir)

    assert (await mock2.record())["stats"]["created"] >= 10  # the events saved at stop
    for n, proc in enumerate([mock.proc, mock2.proc, d.proc, again.proc, *commands]):
        seen.add_proc(f"process {n}", proc)
    texts = "\n".join(seen.texts.values())
    # The paths were really taken (the lines are there, only without the key).
    for needle in ("delivery_paused", "dead_lettered", "reload_refused", "pending_saved",
                   "retrying", "HTTP 403", "refused; you sent Authorization"):  # fmt: skip
        assert needle in texts, f"{needle!r} never seen: a path was not exercised"
    seen.assert_clean()


async def _delivered(http: aiohttp.ClientSession, count: int) -> bool:
    async with http.get("/v1/stats") as response:
        delivered: int = (await response.json())["counters"]["delivered"]
    return delivered >= count


def both_paused_default(http: aiohttp.ClientSession) -> Callable[[], Awaitable[bool]]:
    async def paused() -> bool:
        async with http.get("/readyz") as response:
            return "account default: delivery paused" in (await response.json()).get("reason", "")

    return paused


@pytest.mark.timeout(120)  # 26 CLI processes at once: about 30 s on 2 busy cores
async def test_config_and_key_file_errors_never_show_the_key(short_tmp: Path) -> None:
    seen = Seen()
    config = short_tmp / "forwarder.toml"
    config.write_text(f'[state]\ndir = "{short_tmp / "state"}"\n[log]\nformat = "json"\n')

    def with_key_file(name: str, content: bytes) -> Path:
        path = short_tmp / name
        path.write_bytes(content)
        path.chmod(0o600)
        written = short_tmp / f"{name}.toml"
        written.write_text(config.read_text() + f'[remote]\napi_key_file = "{path}"\n')
        return written

    good = with_key_file("good", KEY.encode() + b"\n")
    unreadable = with_key_file("unreadable", KEY.encode())
    unreadable_key = short_tmp / "unreadable"
    unreadable_key.chmod(0)
    credentials = short_tmp / "credentials"
    credentials.mkdir()
    (credentials / "api_key").write_text(KEY)
    broken: dict[str, Path] = {
        "too large": with_key_file("large", KEY.encode() + b"x" * 5000),
        "not UTF-8": with_key_file("latin", KEY.encode() + b"\xff\n"),
        "whitespace": with_key_file("spaced", f"{KEY} {KEY}\n".encode()),
        "a directory": with_key_file("dir", b""),
    }
    (short_tmp / "dir").unlink()
    (short_tmp / "dir").mkdir()
    bad_toml = short_tmp / "bad.toml"
    bad_toml.write_text(config.read_text() + '[remote]\ntimeout_s = "soon"\nbogus = 1\n')
    pasted_file = short_tmp / "pasted.toml"  # the key where its file's path belongs
    pasted_file.write_text(config.read_text() + f'[remote]\napi_key_file = "{KEY}"\n')
    pasted_env = short_tmp / "pasted-env.toml"  # the key where a variable's name belongs
    pasted_env.write_text(config.read_text() + f'[accounts.us]\napi_key_env = "{KEY}"\n')
    env = {"FORWARDER_API_KEY": KEY}
    http_remote = {**env, "FORWARDER_REMOTE_BASE_URL": "http://example.com/v1"}

    cases: list[tuple[str, list[str], dict[str, str], int | None]] = [
        ("key file", ["check-config", "--config", str(good)], {}, 0),
        ("key in env", ["check-config", "--config", str(config)], env, 0),
        ("credential", ["check-config", "--config", str(config)],
         {"CREDENTIALS_DIRECTORY": str(credentials)}, 0),
        # As root the mode does not stop the read: then it is simply a good key file.
        ("mode 000", ["check-config", "--config", str(unreadable)], {},
         0 if os.geteuid() == 0 else 2),
        ("bad toml", ["check-config", "--config", str(bad_toml)], env, 2),
        ("no file", ["check-config", "--config", str(short_tmp / "missing.toml")], env, 2),
        ("pasted file", ["check-config", "--config", str(pasted_file)], env, 2),
        ("pasted env", ["check-config", "--config", str(pasted_env)], env, 2),
        ("http remote", ["run", "--config", str(config)], http_remote, 2),
        ("run bad toml", ["run", "--config", str(bad_toml)], env, 2),
        ("run pasted", ["run", "--config", str(pasted_file)], {}, 2),
        *((f"key file {why}", ["check-config", "--config", str(path)], {}, 2)
          for why, path in broken.items()),
        *((f"run, key file {why}", ["run", "--config", str(path)], {}, 2)
          for why, path in broken.items()),
        ("dlq, bad toml", ["dlq", "list", "--config", str(bad_toml)], env, 2),
        ("reload, bad toml", ["reload", "--config", str(bad_toml)], env, 2),
        ("reload, no daemon", ["reload", "--config", str(good)], env, 1),
        # Memory mode makes spool.db only when it must: no spool is a state, not an error.
        ("spool stats, no spool", ["spool", "stats", "--config", str(good)], env, 0),
    ]  # fmt: skip
    procs = await _run_all(*(spawn(*argv, env=case_env) for _, argv, case_env, _ in cases))
    for (label, _, _, code), proc in zip(cases, procs, strict=True):
        if code is not None:
            assert proc.process.returncode == code, (label, proc.stdout, proc.stderr)
        if code:
            assert proc.stderr, f"{label}: a failure without a word"
        seen.add_proc(label, proc)
    # The key source is named, the key masked.
    assert any("# api key: **** (from file" in line for line in procs[0].stdout)
    if (short_tmp / "state").exists():
        seen.add_files("state", short_tmp / "state")
    seen.assert_clean()
