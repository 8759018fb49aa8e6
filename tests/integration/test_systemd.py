"""systemd integration without systemd: a test-owned notify socket, fds arranged in a child."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, MutableMapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import structlog

from forwarder.config.load import load_config
from forwarder.ops.systemd import (
    STOP_TIMEOUT_VAR,
    Notifier,
    PerMinute,
    Watchdog,
    drain_timeout_s,
    format_status,
    listen_sockets,
    stop_timeout_s,
    watchdog_interval,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short directory path: Unix socket paths must stay under 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="fwsd", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(params=["path", "abstract"])
def receiver(
    request: pytest.FixtureRequest, short_dir: Path
) -> Iterator[tuple[socket.socket, str]]:
    """What systemd would own: a datagram socket, and the $NOTIFY_SOCKET value naming it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "path":
        address = str(short_dir / "notify.sock")
        sock.bind(address)
    else:
        address = f"@forwarder-test-{uuid.uuid4().hex[:12]}"
        sock.bind("\0" + address[1:])
    sock.setblocking(False)
    yield sock, address
    sock.close()


def received(sock: socket.socket) -> list[bytes]:
    """Every datagram waiting (local datagram sends are queued when `send` returns)."""
    datagrams: list[bytes] = []
    while True:
        try:
            datagrams.append(sock.recv(4096))
        except BlockingIOError:
            return datagrams


def events(logs: Sequence[MutableMapping[str, Any]], name: str) -> list[MutableMapping[str, Any]]:
    return [line for line in logs if line["event"] == name]


# --- Notifier ------------------------------------------------------------------------------------


def test_notifier_sends_exactly_the_expected_datagrams(
    receiver: tuple[socket.socket, str],
) -> None:
    sock, address = receiver
    notifier = Notifier.from_env({"NOTIFY_SOCKET": address})
    try:
        assert notifier.enabled
        assert notifier.send(READY="1", STATUS="starting") is True
        notifier.ready()
        notifier.ready(status="queue 0")
        notifier.status("queue 12, in delivery 3")
        notifier.stopping()
        notifier.stopping("draining")
        notifier.watchdog()
        before = time.monotonic_ns() // 1000
        notifier.reloading()
        after = time.monotonic_ns() // 1000
        notifier.ready()
    finally:
        notifier.close()
    *first, reloading, ready_again = received(sock)
    assert first == [
        b"READY=1\nSTATUS=starting\n",
        b"READY=1\n",
        b"READY=1\nSTATUS=queue 0\n",
        b"STATUS=queue 12, in delivery 3\n",
        b"STOPPING=1\n",
        b"STOPPING=1\nSTATUS=draining\n",
        b"WATCHDOG=1\n",
    ]
    match = re.fullmatch(rb"RELOADING=1\nMONOTONIC_USEC=(\d+)\n", reloading)
    assert match is not None, reloading
    assert before <= int(match[1]) <= after
    assert ready_again == b"READY=1\n"


def test_fields_stay_one_line_and_bad_names_are_not_sent(
    receiver: tuple[socket.socket, str],
) -> None:
    sock, address = receiver
    notifier = Notifier(address)
    try:
        notifier.status("line one\nline two")
        notifier.reloading("reloading configuration")
        notifier.extend_timeout(1.5)
        with structlog.testing.capture_logs() as logs:
            assert notifier.send(ready="1") is False
        assert notifier.send() is False
    finally:
        notifier.close()
    status, reloading, extend = received(sock)
    assert status == b"STATUS=line one line two\n"
    assert reloading.startswith(b"RELOADING=1\nMONOTONIC_USEC=")
    assert reloading.endswith(b"\nSTATUS=reloading configuration\n")
    assert extend == b"EXTEND_TIMEOUT_USEC=1500000\n"
    assert events(logs, "notify_bad_field")[0]["field"] == "ready"


def test_without_notify_socket_everything_is_a_noop() -> None:
    notifier = Notifier.from_env({})
    assert not notifier.enabled
    assert notifier.send(READY="1") is False
    notifier.ready("up")
    notifier.status("fine")
    notifier.reloading()
    notifier.watchdog()
    notifier.stopping()
    notifier.close()
    notifier.close()


def test_an_unsupported_notify_socket_is_logged_and_ignored() -> None:
    with structlog.testing.capture_logs() as logs:
        notifier = Notifier.from_env({"NOTIFY_SOCKET": "vsock:2:4242"})
    assert not notifier.enabled
    assert notifier.send(READY="1") is False
    assert events(logs, "notify_socket_unsupported")[0]["notify_socket"] == "vsock:2:4242"


@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_a_notify_socket_pointing_nowhere_fails_quietly_and_recovers(
    kind: str, short_dir: Path
) -> None:
    path = str(short_dir / "nobody.sock")
    address = path if kind == "path" else f"@forwarder-test-{uuid.uuid4().hex[:12]}"
    notifier = Notifier(address)
    late = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        with structlog.testing.capture_logs() as logs:
            assert notifier.send(READY="1") is False
            notifier.status("still nobody")
            assert notifier.send(WATCHDOG="1") is False
            # The manager's socket appears (daemon-reexec): the next send reconnects.
            late.bind(path if kind == "path" else "\0" + address[1:])
            assert notifier.send(STATUS="back") is True
        assert notifier.enabled
        (failed,) = events(logs, "notify_failed")  # logged once, not once per send
        assert failed["log_level"] == "warning"
        assert failed["notify_socket"] == address
        assert len(events(logs, "notify_recovered")) == 1
        assert late.recv(4096) == b"STATUS=back\n"
    finally:
        notifier.close()
        late.close()
    assert notifier.send(READY="1") is False  # closed


# --- watchdog_interval ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 30.0),
        ({"WATCHDOG_USEC": "500000"}, 0.5),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "<own>"}, 30.0),
        ({}, None),
        ({"WATCHDOG_USEC": ""}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "3e7"}, None),
        ({"WATCHDOG_USEC": " 30000000"}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "<other>"}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "me"}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": ""}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    pids = {"<own>": str(os.getpid()), "<other>": str(os.getpid() + 1)}
    env = {name: pids.get(value, value) for name, value in env.items()}
    assert watchdog_interval(env) == expected


# --- Watchdog ------------------------------------------------------------------------------------


class RecordingNotifier(Notifier):
    """Records when each watchdog ping went out."""

    def __init__(self) -> None:
        super().__init__(None)
        self.times: list[float] = []

    def watchdog(self) -> None:
        self.times.append(time.monotonic())


def block_loop(seconds: float) -> None:
    """Deliberately blocks the event loop (a wedged daemon), from a coroutine on that loop."""
    time.sleep(seconds)


async def test_watchdog_pings_about_twice_per_interval() -> None:
    notifier = RecordingNotifier()
    watchdog = Watchdog(notifier, 0.1, lambda: True)
    watchdog.start()
    watchdog.start()  # no second task
    try:
        await asyncio.sleep(0.5)
    finally:
        await watchdog.stop()
    # A ping at once, then every 0.05 s: about 11 (a loaded machine may lose one or two).
    assert 7 <= watchdog.pings <= 12, notifier.times
    assert len(notifier.times) == watchdog.pings
    await asyncio.sleep(0.15)
    assert len(notifier.times) == watchdog.pings  # stopped means stopped
    await watchdog.stop()  # twice is fine


async def test_watchdog_pings_reach_the_notify_socket(
    receiver: tuple[socket.socket, str],
) -> None:
    sock, address = receiver
    notifier = Notifier(address)
    watchdog = Watchdog(notifier, 0.1, lambda: True)
    watchdog.start()
    try:
        await asyncio.sleep(0.12)
    finally:
        await watchdog.stop()
        notifier.close()
    datagrams = received(sock)
    assert len(datagrams) == watchdog.pings >= 2
    assert set(datagrams) == {b"WATCHDOG=1\n"}


async def test_an_unhealthy_daemon_stops_pinging_and_warns_once() -> None:
    healthy = True
    notifier = RecordingNotifier()
    watchdog = Watchdog(notifier, 0.1, lambda: healthy)
    with structlog.testing.capture_logs() as logs:
        watchdog.start()
        try:
            await asyncio.sleep(0.15)
            assert watchdog.pings >= 2
            healthy = False
            pings = watchdog.pings
            await asyncio.sleep(0.3)  # about six ticks
            assert watchdog.pings == pings
            healthy = True
            await asyncio.sleep(0.15)
            assert watchdog.pings > pings
        finally:
            await watchdog.stop()
    (unhealthy,) = events(logs, "watchdog_unhealthy")
    assert unhealthy["log_level"] == "warning"
    assert len(events(logs, "watchdog_healthy_again")) == 1


async def test_a_failing_health_check_counts_as_unhealthy() -> None:
    def broken() -> bool:
        raise RuntimeError("lane table gone")

    watchdog = Watchdog(RecordingNotifier(), 0.1, broken)
    with structlog.testing.capture_logs() as logs:
        watchdog.start()
        try:
            await asyncio.sleep(0.2)
        finally:
            await watchdog.stop()
    assert watchdog.pings == 0
    (unhealthy,) = events(logs, "watchdog_unhealthy")
    assert "lane table gone" in unhealthy["reason"]


async def test_a_blocked_loop_sends_no_ping_and_a_late_tick_is_logged() -> None:
    notifier = RecordingNotifier()
    watchdog = Watchdog(notifier, 0.1, lambda: True)
    with structlog.testing.capture_logs() as logs:
        watchdog.start()
        try:
            await asyncio.sleep(0.15)
            blocked_from = time.monotonic()
            block_loop(0.3)
            blocked_until = time.monotonic()
            await asyncio.sleep(0.15)
        finally:
            await watchdog.stop()
    assert not [t for t in notifier.times if blocked_from < t < blocked_until]
    assert [t for t in notifier.times if t >= blocked_until], "pings resume after the block"
    late = events(logs, "watchdog_late_tick")
    assert late, logs
    assert late[0]["log_level"] == "warning"
    # The tick was due at most 0.05 s into the 0.3 s block.
    assert late[0]["late_s"] >= 0.2


def test_a_watchdog_needs_a_positive_interval() -> None:
    with pytest.raises(ValueError, match="positive"):
        Watchdog(Notifier(None), 0.0, lambda: True)


# --- listen_sockets ------------------------------------------------------------------------------

# Runs in a child: arranges the inherited fds at 3, 4... as systemd would, claims LISTEN_PID,
# and prints what listen_sockets() made of them.
CHILD = r"""
import fcntl, json, os, sys
from forwarder.ops.systemd import listen_sockets

inherited = [int(fd) for fd in sys.argv[1].split(",")]
# Out of the way first: an inherited fd may already sit at 3 or 4.
high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 100) for fd in inherited]
for fd in inherited:
    os.close(fd)
for offset, fd in enumerate(high):
    os.dup2(fd, 3 + offset)
    os.close(fd)
os.environ["LISTEN_FDS"] = sys.argv[2] if len(sys.argv) > 2 else str(len(high))
os.environ["LISTEN_PID"] = str(os.getpid())
result = {}
try:
    found = listen_sockets()
except ValueError as exc:
    result["error"] = str(exc)
else:
    result["sockets"] = []
    for s in found:
        try:
            s.sock.accept()[0].close()
            accepted = True
        except BlockingIOError:
            accepted = False
        result["sockets"].append({
            "fd": s.fd,
            "name": s.name,
            "family": int(s.family),
            "address": s.address,
            "blocking": s.sock.getblocking(),
            "inheritable": os.get_inheritable(s.fd),
            "accepted": accepted,
        })
result["left"] = sorted(name for name in os.environ if name.startswith("LISTEN_"))
print(json.dumps(result))
"""


def clean_env(**extra: str) -> dict[str, str]:
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("LISTEN_", "WATCHDOG_", "FORWARDER_")) and name != "NOTIFY_SOCKET"
    }
    return {**env, **extra}


def run_child(fds: list[int], names: str | None = None, count: str | None = None) -> Any:
    extra = {} if names is None else {"LISTEN_FDNAMES": names}
    args = [sys.executable, "-c", CHILD, ",".join(map(str, fds)), *([count] if count else [])]
    done = subprocess.run(
        args,
        pass_fds=fds,
        env=clean_env(**extra),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def unix_listener(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(address)
    sock.listen()
    return sock


def test_listen_sockets_adopts_tcp_and_unix_listeners(short_dir: Path) -> None:
    path = str(short_dir / "intake.sock")
    abstract = f"forwarder-test-{uuid.uuid4().hex[:12]}"
    listeners = [
        socket.create_server(("127.0.0.1", 0)),
        unix_listener(path),
        unix_listener("\0" + abstract),
    ]
    port = listeners[0].getsockname()[1]
    # Waiting in the backlogs: the child proves each socket serves by accepting one.
    clients = [socket.socket(s.family, socket.SOCK_STREAM) for s in listeners]
    try:
        for client, listener in zip(clients, listeners, strict=True):
            client.connect(listener.getsockname())
        result = run_child([s.fileno() for s in listeners], names="http:local:hidden")
    finally:
        for sock in [*clients, *listeners]:
            sock.close()
    assert "error" not in result, result
    assert result["left"] == []  # unset: children of the daemon do not see them
    expected = [
        (3, "http", socket.AF_INET, f"http://127.0.0.1:{port}"),
        (4, "local", socket.AF_UNIX, f"unix:{path}"),
        (5, "hidden", socket.AF_UNIX, f"unix:@{abstract}"),
    ]
    assert [(s["fd"], s["name"], s["family"], s["address"]) for s in result["sockets"]] == expected
    for found in result["sockets"]:
        assert found["blocking"] is False
        assert found["inheritable"] is False
        assert found["accepted"] is True


def test_listen_sockets_ipv6_and_no_names() -> None:
    try:
        listener = socket.create_server(("::1", 0), family=socket.AF_INET6)
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    try:
        result = run_child([listener.fileno()])
        port = listener.getsockname()[1]
    finally:
        listener.close()
    (found,) = result["sockets"]
    assert (found["name"], found["family"]) == ("", socket.AF_INET6)
    assert found["address"] == f"http://[::1]:{port}"


def _datagram() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    return sock


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (_datagram, "is a datagram socket"),
        (lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM), "not a listening socket"),
        (lambda: socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET), "seqpacket"),
    ],
)
def test_listen_sockets_refuses_what_cannot_serve_http(
    make: Callable[[], socket.socket], message: str
) -> None:
    sock = make()
    try:
        result = run_child([sock.fileno()], names="intake")
    finally:
        sock.close()
    assert "sockets" not in result
    assert "fd 3 ('intake')" in result["error"]
    assert message in result["error"]
    assert result["left"] == []


def test_listen_sockets_refuses_a_file_that_is_no_socket() -> None:
    read_end, write_end = os.pipe()
    try:
        result = run_child([read_end])
    finally:
        os.close(read_end)
        os.close(write_end)
    assert result["error"] == "socket activation: fd 3 is not a socket"


def test_listen_sockets_names_the_bad_fd_among_good_ones() -> None:
    good, bad = socket.create_server(("127.0.0.1", 0)), _datagram()
    try:
        result = run_child([good.fileno(), bad.fileno()], names="http:metrics")
    finally:
        good.close()
        bad.close()
    assert "fd 4 ('metrics') is a datagram socket" in result["error"]


def test_listen_sockets_reports_a_missing_fd() -> None:
    good = socket.create_server(("127.0.0.1", 0))
    try:
        result = run_child([good.fileno()], count="2")
    finally:
        good.close()
    assert result["error"].startswith("socket activation: fd 4 is not open")


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"LISTEN_FDS": "2"},  # no LISTEN_PID
        {"LISTEN_PID": "<other>", "LISTEN_FDS": "2"},
        {"LISTEN_PID": "not-a-pid", "LISTEN_FDS": "2"},
        {"LISTEN_PID": "<own>"},  # no LISTEN_FDS
        {"LISTEN_PID": "<own>", "LISTEN_FDS": "0"},
    ],
)
def test_listen_sockets_finds_nothing_meant_for_us(env: dict[str, str]) -> None:
    pids = {"<own>": str(os.getpid()), "<other>": str(os.getpid() + 1)}
    env = {name: pids.get(value, value) for name, value in env.items()}
    env["LISTEN_FDNAMES"] = "http:local"
    assert listen_sockets(env, unset=False) == []
    assert listen_sockets(env) == []
    # Unset from the mapping that was read, not from this process's environment.
    assert env == {}


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LISTEN_FDS": "two"}, "LISTEN_FDS='two' is not a number"),
        ({"LISTEN_FDS": "-1"}, "LISTEN_FDS='-1' is not a number"),
        ({"LISTEN_FDS": "2", "LISTEN_FDNAMES": "http"}, "has 1 names for 2 fds"),
    ],
)
def test_listen_sockets_refuses_malformed_variables(env: dict[str, str], message: str) -> None:
    # Both are refused before any fd is looked at: safe in the test process.
    env = {**env, "LISTEN_PID": str(os.getpid())}
    with pytest.raises(ValueError, match=re.escape(message)):
        listen_sockets(env)
    assert env == {}


@pytest.mark.skipif(
    shutil.which("systemd-socket-activate") is None, reason="systemd-socket-activate not installed"
)
def test_systemd_socket_activate_passes_a_socket_we_adopt(short_dir: Path) -> None:
    path = str(short_dir / "act.sock")
    child = r"""
import json, os
from forwarder.ops.systemd import listen_sockets
(found,) = listen_sockets()
found.sock.setblocking(True)
conn, _ = found.sock.accept()
left = sorted(name for name in os.environ if name.startswith("LISTEN_"))
conn.sendall(json.dumps({"name": found.name, "address": found.address, "left": left}).encode())
conn.close()
"""
    # It listens, and on the first connection execs the program with the socket as fd 3.
    proc = subprocess.Popen(
        ["systemd-socket-activate", "-l", path, "--fdname=intake", sys.executable, "-c", child],
        env=clean_env(),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                client.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                assert time.monotonic() < deadline, "systemd-socket-activate did not listen"
                assert proc.poll() is None, proc.communicate()
                time.sleep(0.02)
        client.settimeout(20)
        reply = b""
        while chunk := client.recv(4096):
            reply += chunk
        _, stderr = proc.communicate(timeout=20)
        assert proc.returncode == 0, stderr
    finally:
        client.close()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert json.loads(reply) == {"name": "intake", "address": f"unix:{path}", "left": []}


# --- stop timeout, status ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [("30", 30.0), ("2.5", 2.5), (" 45 ", 45.0), ("", None), ("infinity", None), ("0", None)],
)
def test_stop_timeout(value: str, expected: float | None) -> None:
    assert stop_timeout_s({STOP_TIMEOUT_VAR: value}) == expected


@pytest.mark.parametrize("value", ["30s", "-1", "nan", "inf", "soon"])
def test_a_bad_stop_timeout_is_logged_and_ignored(value: str) -> None:
    with structlog.testing.capture_logs() as logs:
        assert stop_timeout_s({STOP_TIMEOUT_VAR: value}) is None
    (ignored,) = events(logs, "stop_timeout_ignored")
    assert ignored["value"] == value


def test_the_stop_timeout_variable_is_no_config_setting() -> None:
    assert stop_timeout_s({}) is None
    # FORWARDER_<SECTION>_<KEY> are config overrides; "systemd" is no section, so no error.
    config = load_config(None, {STOP_TIMEOUT_VAR: "30"})
    assert config.shutdown.timeout_s == 20.0


@pytest.mark.parametrize(
    ("stop_timeout", "expected"), [(None, 20.0), (30.0, 20.0), (15.0, 10.0), (3.0, 0.0)]
)
def test_drain_timeout_fits_inside_the_stop_timeout(
    stop_timeout: float | None, expected: float
) -> None:
    assert drain_timeout_s(20.0, stop_timeout, reserve_s=5.0) == expected


def test_format_status() -> None:
    line = format_status(queued=12, in_delivery=3, delivered_per_min=139.6, spool=0)
    assert line == "queue 12, in delivery 3, delivered 140/min, spool 0"


def test_per_minute_rate_over_a_sliding_window() -> None:
    now = 0.0
    rate = PerMinute(window_s=60.0, clock=lambda: now)
    assert rate.observe(0) == 0.0
    now = 5.0
    assert rate.observe(10) == pytest.approx(120.0)
    for _ in range(30):  # 150 s at a steady 2 per 5 s: 24/min
        now += 5.0
        total = 10 + 2 * round(now / 5 - 1)
        last = rate.observe(total)
    assert last == pytest.approx(24.0)
    now += 5.0
    assert rate.observe(3) == 0.0  # the counter was reset: start over
