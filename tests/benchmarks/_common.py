"""What the benchmark scripts share (not a benchmark itself; pytest does not collect it).

- a minimal HTTP/1.1 keep-alive client, much cheaper than the aiohttp servers it drives, and a
  closed-loop load generator built on it;
- CPU pinning: the load generator on one core, the server under test on the other;
- /proc readings: RSS and the CPU time of a process;
- starting `forwarder run` with a config written from a dict, pinned, and waiting for /healthz;
- a remote that refuses every connection at once, to keep delivery out of an intake measurement;
- the request bodies: one event as a form, batches as JSON or NDJSON.

The scripts run with their own directory on sys.path and import this as `_common`; mypy sees it
as `tests.benchmarks._common`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import forwarder

API_KEY = "bench-key-0123456789abcdef"
FORM_PATH = "/v1/recipientEvents/create"
BATCH_PATH = "/v1/events"
MB = 1024 * 1024
START_TIMEOUT_S = 30.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
FORM_TYPE = "application/x-www-form-urlencoded"
NDJSON_TYPE = "application/x-ndjson"


# -- a minimal HTTP/1.1 keep-alive client: the load generator must cost less than the server ----


def http_request(
    method: str,
    path: str,
    body: bytes = b"",
    content_type: str = "",
    headers: dict[str, str] | None = None,
) -> bytes:
    """The bytes of one request, prepared once and sent many times."""
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    if content_type:
        head += f"Content-Type: {content_type}\r\n"
    for name, value in (headers or {}).items():
        head += f"{name}: {value}\r\n"
    head += f"Content-Length: {len(body)}\r\n\r\n"
    return head.encode("ascii") + body


class Conn:
    """One keep-alive connection; `call` sends prepared request bytes and reads the answer."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> Conn:
        """Connect to 127.0.0.1:`port`."""
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def call(self, raw: bytes) -> tuple[int, bytes]:
        """(status, body) of one exchange."""
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        body = await self.reader.readexactly(length) if length else b""
        return status, body

    async def close(self) -> None:
        """Close the connection (errors on an already dead one are ignored)."""
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


async def call_json(
    port: int, method: str, path: str, payload: object = None, timeout: float = 30.0
) -> dict[str, Any]:
    """One request on a new connection (a JSON body if `payload` is given); the JSON answer."""
    body = b"" if payload is None else json.dumps(payload).encode()
    raw = http_request(method, path, body, "application/json" if body else "")
    conn = await Conn.open(port)
    try:
        status, answer = await asyncio.wait_for(conn.call(raw), timeout)
    finally:
        await conn.close()
    if status != 200:
        raise RuntimeError(f"{method} {path}: HTTP {status}: {answer[:200]!r}")
    result: dict[str, Any] = json.loads(answer)
    return result


async def get_json(port: int, path: str) -> dict[str, Any]:
    """GET `path` on a new connection; the JSON body."""
    return await call_json(port, "GET", path, timeout=10.0)


# -- processes and cores ------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def toml(sections: dict[str, dict[str, object]]) -> str:
    """A TOML document of flat sections (values as JSON literals, which TOML reads alike)."""
    lines: list[str] = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {json.dumps(value)}" for key, value in values.items())
    return "\n".join(lines) + "\n"


def rss_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process in MiB, from /proc/PID/status."""
    found: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            found[name] = int(value.split()[0]) / 1024
    return found["VmRSS"], found["VmHWM"]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) so far, from /proc/PID/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def pin_load_generator() -> tuple[int | None, str]:
    """Pin this process to one core and return another for the servers (None: no pinning).

    What this process starts afterwards (wrk, the mock remote) inherits its core; the servers
    under test are moved to the returned one with `pin`.
    """
    if not hasattr(os, "sched_setaffinity"):
        return None, "no pinning (os.sched_setaffinity is not available)"
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, f"no pinning (only CPU {cpus} available)"
    os.sched_setaffinity(0, {cpus[1]})
    return cpus[0], f"servers pinned to CPU {cpus[0]}, load generator and mock to CPU {cpus[1]}"


def pin(pid: int, cpu: int | None) -> None:
    """Move a just-started process to `cpu`; threads it starts later inherit the mask."""
    if cpu is not None:
        os.sched_setaffinity(pid, {cpu})


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without FORWARDER_* (the config file decides), plus `extra`.

    FORWARDER_NO_UVLOOP stays: it is no config key, and it lets a caller choose the loop.
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("FORWARDER_") or k == "FORWARDER_NO_UVLOOP"
    }
    env.update(extra)
    return env


async def wait_healthy(
    port: int, path: str, process: asyncio.subprocess.Process, describe: str
) -> None:
    """Wait until GET `path` answers on `port`; fail early if the process exits."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if process.returncode is not None:
            raise RuntimeError(f"{describe} exited ({process.returncode})")
        try:
            conn = await Conn.open(port)
            try:
                await asyncio.wait_for(conn.call(http_request("GET", path)), 5)
            finally:
                await conn.close()
            return
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{describe}: no answer within {START_TIMEOUT_S}s") from None
            await asyncio.sleep(0.05)


async def stop_process(process: asyncio.subprocess.Process, timeout: float = 15.0) -> None:
    """SIGTERM, then SIGKILL after `timeout`; always reaped."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(process.wait(), timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await asyncio.wait_for(process.wait(), timeout)


# -- the daemon under test ----------------------------------------------------------------------


@dataclass
class Daemon:
    """A running `forwarder run` on a known port, its state dir and its log file."""

    process: asyncio.subprocess.Process
    port: int
    state_dir: Path
    log_path: Path
    started_in_s: float = 0.0

    @property
    def pid(self) -> int:
        """The daemon's process id."""
        return self.process.pid

    def log_tail(self, lines: int = 20) -> str:
        """The last lines the daemon printed."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    async def stats(self) -> dict[str, Any]:
        """GET /v1/stats."""
        return await get_json(self.port, "/v1/stats")

    async def kill(self) -> None:
        """SIGKILL and reap."""
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
        await asyncio.wait_for(self.process.wait(), 30)

    async def terminate(self, timeout: float = 120.0) -> int:
        """SIGTERM (graceful stop) and wait; SIGKILL if it does not stop within `timeout`."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.process.wait(), timeout)
        except TimeoutError:
            await self.kill()
            raise RuntimeError(f"the daemon did not stop within {timeout}s") from None


async def start_daemon(
    work: Path,
    name: str,
    sections: dict[str, dict[str, object]],
    *,
    cpu: int | None,
    env: dict[str, str] | None = None,
    state_dir: Path | None = None,
) -> Daemon:
    """Write `sections` (plus intake.http_listen and state.dir) as a config, start `forwarder
    run` on it pinned to `cpu`, and wait until /healthz answers."""
    port = free_port()
    state = state_dir or work / f"state-{name}"
    config = {section: dict(values) for section, values in sections.items()}
    config.setdefault("intake", {})["http_listen"] = f"127.0.0.1:{port}"
    # The benchmarks read the event_id from the answer's data (the 202 answer's shape).
    config["intake"].setdefault("drop_in_answer", "accepted")
    config.setdefault("state", {})["dir"] = str(state)
    config_path = work / f"{name}.toml"
    config_path.write_text(toml(config))
    log_path = work / f"{name}.log"
    began = time.monotonic()
    with log_path.open("ab") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "forwarder", "run", "--config", str(config_path),
            env=clean_env(FORWARDER_API_KEY=API_KEY, **(env or {})),
            stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
        )  # fmt: skip
    # Only the main thread exists yet; the threads it starts later inherit the mask.
    pin(process.pid, cpu)
    daemon = Daemon(process, port, state, log_path)
    try:
        await wait_healthy(port, "/healthz", process, f"the daemon {name}")
    except RuntimeError as exc:
        await daemon.kill()
        raise RuntimeError(f"{exc}\n{daemon.log_tail()}") from None
    daemon.started_in_s = time.monotonic() - began
    return daemon


class Blackhole:
    """A loopback port that is bound but never listens: every connection is refused at once."""

    def __init__(self) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}/v1"

    def close(self) -> None:
        """Release the port."""
        self._sock.close()


def blocked_delivery(url: str) -> dict[str, dict[str, object]]:
    """Config sections that keep delivery out of the way: the remote refuses every connection,
    the breaker opens on the first failure and probes hourly, one delivery slot, retries that
    never give up (nothing is dead-lettered). The daemon spends no CPU on delivery."""
    return {
        "remote": {
            "base_url": url,
            "concurrency": 1,
            "breaker_failures": 1,
            "breaker_probe_initial_s": 3600.0,
            "breaker_probe_max_s": 3600.0,
            "timeout_s": 5.0,
            "connect_timeout_s": 1.0,
        },
        "retry": {"initial_backoff_s": 1.0, "max_backoff_s": 60.0, "max_elapsed_s": 1e9},
    }


# -- request bodies -----------------------------------------------------------------------------

FORM_BODY = b"recipient_id=12345&name=PURCHASE&value=24.99&conversion=1&ref=spring"


def form_request() -> bytes:
    """A drop-in form post: one event (the daemon gives it an event_id)."""
    return http_request("POST", FORM_PATH, FORM_BODY, FORM_TYPE)


def batch_items(count: int, first_recipient: int = 0) -> list[dict[str, object]]:
    """`count` events for distinct recipients (event_ids given by the daemon)."""
    return [
        {
            "recipient_id": str(first_recipient + n),
            "name": "PAGE_VIEW",
            "value": "24.99",
            "data": {"page": f"/products/{n % 50}"},
        }
        for n in range(count)
    ]


def batch_request(count: int, first_recipient: int = 0, *, ndjson: bool = False) -> bytes:
    """A batch for POST /v1/events: a JSON array, or NDJSON (one object a line)."""
    items = batch_items(count, first_recipient)
    if ndjson:
        body = "".join(json.dumps(item) + "\n" for item in items).encode()
        return http_request("POST", BATCH_PATH, body, NDJSON_TYPE)
    return http_request("POST", BATCH_PATH, json.dumps(items).encode(), "application/json")


# -- closed-loop load ---------------------------------------------------------------------------


@dataclass
class Sample:
    """One measurement: accepted events per second and what it cost."""

    events_per_s: float
    server_cpu: float  # fraction of one core
    generator_cpu: float
    requests: int

    @property
    def per_cpu_s(self) -> float:
        """Events accepted per second of the server's CPU time."""
        return self.events_per_s / self.server_cpu if self.server_cpu else 0.0


async def measure(
    port: int,
    server_pid: int,
    raw: bytes,
    per_request: int,
    connections: int,
    seconds: float,
    warmup: float,
    expect: int = 202,
) -> Sample:
    """Drive `raw` over `connections` keep-alive connections; count `expect` answers after
    `warmup`. Any other answer fails the measurement."""
    conns = [await Conn.open(port) for _ in range(connections)]
    done = 0
    refused: dict[int, int] = {}
    stop = False

    async def worker(conn: Conn) -> None:
        nonlocal done
        while not stop:
            status, body = await conn.call(raw)
            if status == expect:
                done += 1
            else:
                refused[status] = refused.get(status, 0) + 1
                if len(refused) == 1 and refused[status] == 1:
                    print(f"  ! HTTP {status}: {body[:200]!r}", file=sys.stderr)

    tasks = [asyncio.create_task(worker(c)) for c in conns]
    try:
        await asyncio.sleep(warmup)
        c0, d0, g0, t0 = done, cpu_seconds(server_pid), time.process_time(), time.monotonic()
        await asyncio.sleep(seconds)
        c1, d1, g1, t1 = done, cpu_seconds(server_pid), time.process_time(), time.monotonic()
    finally:
        stop = True
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
        for conn in conns:
            await conn.close()
    if refused:
        raise RuntimeError(f"the server refused requests: {refused}")
    elapsed = t1 - t0
    return Sample(
        events_per_s=(c1 - c0) * per_request / elapsed,
        server_cpu=(d1 - d0) / elapsed,
        generator_cpu=(g1 - g0) / elapsed,
        requests=c1 - c0,
    )


# -- what was measured --------------------------------------------------------------------------


def code_version() -> str:
    """The checkout's `git describe --always --dirty` and a hash of the daemon's sources.

    Printed at the start and the end: if the hash differs, the code changed during the run.
    """
    package = Path(forwarder.__file__).resolve().parent
    digest = hashlib.sha256()
    for source in sorted(package.glob("*.py")):
        digest.update(source.name.encode() + b"\0" + source.read_bytes())
    try:
        done = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=package,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        described = done.stdout.strip() or "no git"
    except (OSError, subprocess.SubprocessError):
        described = "no git"
    return f"{described}, forwarder/*.py sha256 {digest.hexdigest()[:12]}"
