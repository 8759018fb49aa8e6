"""Shared fixtures and helpers, and the layout of the tests.

The tests are laid out by kind, and each kind gets the pytest marker of its folder (the
`pytest_collection_modifyitems` hook below; the markers are registered in pyproject.toml):
`tests/unit/` (marker `unit`) is pure logic with injected clocks: no sockets, no subprocesses;
`tests/integration/` (`integration`) runs in-process aiohttp servers and daemons, SQLite spool
files, and a real `forwarder mock-remote` or one-shot CLI subprocess talking to in-process code;
`tests/e2e/` (`e2e`) starts `forwarder run` as a subprocess (the `daemon` fixture). A file that
mixes kinds sits where its slowest test belongs. `make test` runs all of them; `make test-fast`
runs `-m "not e2e"`. `tests/benchmarks/` holds the benchmarks and soaks, which pytest does not
collect.

The fixtures run the real programs: `forwarder mock-remote` and `forwarder run` as subprocesses.

Each factory cleans up what it made: processes are stopped (SIGTERM, then SIGKILL after a bounded
wait) and temporary directories removed. Ports are always 0; Unix socket paths are kept short.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from forwarder.cli.spooldb import list_dead_letters
from forwarder.intake.app import create_app
from forwarder.intake.state import IntakeState
from forwarder.ops.metrics import Metrics, Stats
from forwarder.storage.eventstatus import StatusBook
from forwarder.storage.numbering import BLOCK, EventNumbers
from forwarder.storage.queue import EventQueue
from forwarder.storage.sqlite.file import SPOOL_FILE
from forwarder.storage.sqlite.opening import open_readonly_or_fail
from tests.rediscluster import RedisClusterGroup, running_cluster
from tests.redisserver import RedisServer, running_redis


def promtool() -> str:
    """promtool's path (Debian's `prometheus` package). Under CI its absence fails the test;
    elsewhere the test is skipped saying how to get it (`make test` installs it as root)."""
    path = shutil.which("promtool")
    if path:
        return path
    how = "promtool is not installed: `apt-get install prometheus` (Debian ships it there)"
    if os.environ.get("CI"):
        pytest.fail(f"{how}; .ci/run and `make test` install it, so CI must have it")
    pytest.skip(f"{how}; `make test` installs it when run as root, and CI always runs this test")


API_KEY = "sk-e2e-SECRET-9f8e7d6c5b4a"
START_TIMEOUT_S = 15.0


@dataclass
class Proc:
    """A running forwarder subprocess and everything it printed so far."""

    process: asyncio.subprocess.Process
    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)
    readers: list[asyncio.Task[None]] = field(default_factory=list)

    def logs(self) -> list[dict[str, Any]]:
        """stdout lines that are JSON log records."""
        records = []
        for line in self.stdout:
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict):
                    records.append(record)
        return records

    def events(self, name: str) -> list[dict[str, Any]]:
        return [r for r in self.logs() if r.get("event") == name]

    async def wait_for_line(self, predicate: Callable[[str], bool], timeout: float) -> str:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        seen = 0
        while loop.time() < deadline:
            for line in self.stdout[seen:]:
                if predicate(line):
                    return line
            seen = len(self.stdout)
            if self.process.returncode is not None and all(t.done() for t in self.readers):
                break
            await asyncio.sleep(0.02)
        raise AssertionError(
            f"no expected line within {timeout}s; stdout={self.stdout[-20:]} "
            f"stderr={self.stderr[-20:]}"
        )

    async def wait(self, timeout: float = 20.0) -> int:
        """Wait for a one-shot command to finish by itself."""
        code = await asyncio.wait_for(self.process.wait(), timeout)
        await asyncio.wait_for(asyncio.gather(*self.readers), 5)
        return code

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.process.returncode is None:
            self.process.send_signal(sig)
        try:
            code = await asyncio.wait_for(self.process.wait(), timeout)
        except TimeoutError:
            self.process.kill()
            code = await self.process.wait()
        await asyncio.wait_for(asyncio.gather(*self.readers), 5)
        return code


async def _pump(stream: asyncio.StreamReader | None, sink: list[str]) -> None:
    if stream is None:
        return
    while line := await stream.readline():
        sink.append(line.decode("utf-8", "replace").rstrip("\n"))


async def spawn(*args: str, env: dict[str, str] | None = None) -> Proc:
    """Start `python -m forwarder ARGS` with its output captured."""
    return await spawn_argv([sys.executable, "-m", "forwarder", *args], env=env)


async def spawn_argv(argv: list[str], env: dict[str, str] | None = None) -> Proc:
    """Start any command (a wrapper around forwarder, say) with a clean forwarder environment."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("FORWARDER_")}
    for name in ("STATE_DIRECTORY", "CREDENTIALS_DIRECTORY", "NOTIFY_SOCKET"):
        full_env.pop(name, None)
    full_env["PYTHONUNBUFFERED"] = "1"
    full_env.update(env or {})
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=full_env,
    )
    proc = Proc(process)
    proc.readers = [
        asyncio.create_task(_pump(process.stdout, proc.stdout)),
        asyncio.create_task(_pump(process.stderr, proc.stderr)),
    ]
    return proc


@dataclass
class MockProc:
    """`forwarder mock-remote` on an ephemeral port, with its control endpoints."""

    proc: Proc
    base_url: str

    @property
    def root(self) -> str:
        return self.base_url.removesuffix("/v1")

    async def record(self) -> dict[str, Any]:
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{self.root}/_mock/events") as response,
        ):
            result: dict[str, Any] = await response.json()
            return result

    async def set_faults(self, **faults: object) -> None:
        async with (
            aiohttp.ClientSession() as http,
            http.post(f"{self.root}/_mock/faults", json=faults) as response,
        ):
            assert response.status == 200, await response.text()


@pytest.fixture
async def mock_remote() -> AsyncIterator[Callable[..., Awaitable[MockProc]]]:
    started: list[Proc] = []

    async def start(*flags: str, api_key: str = API_KEY) -> MockProc:
        proc = await spawn(
            "mock-remote", "--port", "0", "--api-key", api_key, "--rate-limit", "0", *flags
        )
        started.append(proc)
        line = await proc.wait_for_line(
            lambda s: s.startswith("mock-remote listening on"), START_TIMEOUT_S
        )
        return MockProc(proc, line.rsplit(" ", 1)[1])

    yield start
    for proc in started:
        await proc.stop()


@dataclass
class DaemonProc:
    """`forwarder run` with its config, state dir and the addresses it listens on."""

    proc: Proc
    config_path: Path
    state_dir: Path
    url: str
    socket_path: str

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        return await self.proc.stop(sig, timeout)


def spooled(state_dir: Path) -> list[dict[str, Any]]:
    """The events in a state dir's spool, oldest first (read as `forwarder` itself would)."""
    from forwarder.cli.spooldb import spooled_events

    if not (state_dir / SPOOL_FILE).exists():
        return []
    conn = open_readonly_or_fail(state_dir)
    try:
        events = spooled_events(conn)
    finally:
        conn.close()
    return [event.to_dict() for event in events]


def dead_letters(state_dir: Path) -> list[dict[str, Any]]:
    """The dead letters in a state dir's spool, oldest first."""
    if not (state_dir / SPOOL_FILE).exists():
        return []
    conn = open_readonly_or_fail(state_dir)
    try:
        return [letter.to_dict() for letter in list_dead_letters(conn)]
    finally:
        conn.close()


def unix_session(path: str) -> aiohttp.ClientSession:
    """A client session that talks HTTP over the daemon's Unix socket."""
    return aiohttp.ClientSession(
        base_url="http://forwarder", connector=aiohttp.UnixConnector(path=path)
    )


def write_config(path: Path, sections: dict[str, dict[str, object]]) -> None:
    """A TOML file from sections; a dotted name such as "accounts.us" is a nested table."""
    lines: list[str] = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {json.dumps(value)}")
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture
async def short_tmp() -> AsyncIterator[Path]:
    """A short directory path: Unix socket paths must stay under 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="fw", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def daemon(short_tmp: Path) -> AsyncIterator[Callable[..., Awaitable[DaemonProc]]]:
    started: list[DaemonProc] = []

    async def start(
        base_url: str,
        *,
        state_dir: Path | None = None,
        api_key: str = API_KEY,
        env: dict[str, str] | None = None,
        **sections: dict[str, object],
    ) -> DaemonProc:
        n = len(started)
        state = state_dir or short_tmp / f"state{n}"
        sock = str(short_tmp / f"d{n}.sock")
        # The drop-in endpoint answers "accepted" (202, data.id) unless a test asks for the
        # remote's answer (intake={"drop_in_answer": "remote"}, the default of the config).
        config: dict[str, dict[str, object]] = {
            "intake": {
                "http_listen": "127.0.0.1:0",
                "unix_socket": sock,
                "drop_in_answer": "accepted",
            },
            "remote": {"base_url": base_url, "timeout_s": 5.0, "connect_timeout_s": 2.0},
            "retry": {"initial_backoff_s": 0.05, "max_backoff_s": 0.5, "max_elapsed_s": 60.0},
            "state": {"dir": str(state)},
            "shutdown": {"timeout_s": 5.0},
            "log": {"level": "info", "format": "json"},
        }
        for section, values in sections.items():
            config.setdefault(section, {}).update(values)
        config_path = short_tmp / f"forwarder{n}.toml"
        write_config(config_path, config)
        proc = await spawn(
            "run", "--config", str(config_path), env={"FORWARDER_API_KEY": api_key, **(env or {})}
        )
        line = await proc.wait_for_line(lambda s: '"started"' in s, START_TIMEOUT_S)
        listening = json.loads(line)["listening"]
        url = next(a for a in listening if a.startswith("http://"))
        made = DaemonProc(proc, config_path, state, url, sock)
        started.append(made)
        return made

    yield start
    for made in started:
        await made.stop()


def intake_state(
    *,
    max_events: int = 100,
    max_bytes: int = 0,
    max_batch: int = 10,
    max_body_bytes: int = 1024 * 1024,
    not_ready_reason: Callable[[], str] = lambda: "",
    stats_extra: Callable[[], dict[str, Any]] = dict,
    drop_in_answer: str = "accepted",
) -> IntakeState:
    """The intake's state with a fresh queue and counters, as the daemon wires it (memory mode).

    The drop-in endpoint answers "accepted" (202 and the event_id) unless told otherwise: what
    most tests look at is which event was queued. Event numbers start at 1 (a block far from
    used up: nothing is written to disk).
    """
    queue = EventQueue(max_events, max_bytes=max_bytes)
    stats = Stats()
    status = StatusBook(retention_s=86400.0, max_count=1000)
    status.queue = queue

    def gauges() -> dict[str, tuple[str, float]]:
        return {"queue_depth": ("Events waiting in the queue.", float(len(queue)))}

    return IntakeState(
        queue=queue,
        stats=stats,
        metrics=Metrics(stats, gauges),
        max_batch=max_batch,
        max_body_bytes=max_body_bytes,
        not_ready_reason=not_ready_reason,
        stats_extra=stats_extra,
        drop_in_answer=drop_in_answer,
        numbers=EventNumbers(Path("/nonexistent"), 1, 1 + BLOCK),
        status=status,
    )


IntakeClient = TestClient[web.Request, web.Application]
ServeIntake = Callable[[IntakeState], Awaitable[IntakeClient]]


@pytest.fixture
async def serve_intake() -> AsyncIterator[ServeIntake]:
    """Serve intake apps in-process on ephemeral ports; closes every one it started."""
    clients: list[IntakeClient] = []

    async def serve(state: IntakeState) -> IntakeClient:
        client = TestClient(TestServer(create_app(state)))
        clients.append(client)
        await client.start_server()
        return client

    yield serve
    for client in clients:
        await client.close()


@dataclass(frozen=True)
class TlsFiles:
    """A throw-away CA and a server certificate it signed for 127.0.0.1 (PEM files)."""

    ca: Path
    cert: Path
    key: Path


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """Made with the openssl command line once per run (no Python crypto library needed)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("needs the openssl command to make test certificates")
    where = tmp_path_factory.mktemp("tls")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=where, check=True, capture_output=True, timeout=30)

    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=forwarder test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip
    run("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    # clientAuth too: the nodes of a TLS cluster (tls-cluster yes) present their certificate
    # to each other on the cluster bus, which always verifies it as a client's.
    (where / "server.ext").write_text(
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\n"
    )
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-days", "2",
        "-CAcreateserial", "-out", "server.pem", "-extfile", "server.ext")  # fmt: skip
    return TlsFiles(where / "ca.pem", where / "server.pem", where / "server.key")


@pytest.fixture
async def redis_server() -> AsyncIterator[RedisServer]:
    """A real `redis-server` of this test's own (tests/redisserver.py); fails if not installed."""
    async with running_redis() as server:
        yield server


@pytest.fixture
async def redis_cluster() -> AsyncIterator[RedisClusterGroup]:
    """A real Redis Cluster of this test's own: 3 primaries, 3 replicas (about 2 s to form;
    the failover tests kill and promote nodes, which a shared cluster could not survive)."""
    async with running_cluster() as cluster:
        yield cluster


@pytest.fixture
async def redis_client(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    """A client of the test's Redis (answers as bytes), closed after the test."""
    client = redis_server.client()
    try:
        yield client
    finally:
        await client.aclose()


# The kinds of test, by the folder a test lives in (see the module docstring).
KINDS = ("unit", "integration", "e2e")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test with the kind of its folder, so `-m "not e2e"` picks the fast ones.

    A test file outside the three folders would get no kind and slip into every selection, so it
    stops the run, naming the file.
    """
    tests_dir = Path(__file__).resolve().parent
    strays: set[str] = set()
    for item in items:
        path = item.path.resolve()
        if not path.is_relative_to(tests_dir):
            continue
        kind = path.relative_to(tests_dir).parts[0]
        if kind in KINDS:
            item.add_marker(kind)
        else:
            strays.add(str(path.relative_to(tests_dir.parent)))
    if strays:
        raise pytest.UsageError(
            f"tests outside tests/{{{','.join(KINDS)}}}/: {', '.join(sorted(strays))}; "
            "move each file to the folder of its kind (tests/conftest.py says which is which)"
        )
