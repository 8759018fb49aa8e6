"""Durability benchmark: what `[queue] mode = "durable"` costs at intake, and what a backlog costs.

1. Accepted events per second, durable vs memory mode, in the same run on the same machine:
   (a) single events (`POST /v1/recipientEvents/create`, a form, over many keep-alive
   connections) and (b) batches of 100 (`POST /v1/events`). Each measurement gets a fresh daemon
   and state dir (killed afterwards); rounds alternate the order of the modes; medians are
   compared. Goals: durable >= 0.5x memory for single events, >= 0.8x for batches of 100.
2. Memory with a spooled backlog (durable mode, default `queue.max_events` of 100 000): the
   daemon's RSS idle, after 1 000 000 events were put into the spool (batches of 1000), and after
   a restart on that backlog (the replay streams from disk). Goal: within 100 MB of idle.

Intake is measured alone: delivery is blocked. The remote is a loopback port that is bound but
never listens (every connection is refused at once), the circuit breaker opens on the first
failure and probes once an hour, one delivery slot, retries that never give up: the daemon spends
no CPU on delivery and dead-letters nothing. The daemon is pinned to one core and this process
(the load generator, a raw HTTP/1.1 client cheaper than the server it drives) to another, when
`os.sched_setaffinity` exists and there are two cores. Not part of pytest.

    .venv/bin/python tests/benchmarks/bench_spool.py [--quick] [--seconds S] [--rounds N]
        [--connections C] [--events N] [--max-events N] [--out FILE]

Defaults: 5 rounds of 3 s, 1 000 000 events. `--quick`: 2 rounds of 2 s, 100 000 events. The
verdict compares the medians of each mode; the per-round (back-to-back) ratios are printed too,
since a shared VM's CPU speed drifts. Exit status 0 when every goal passes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

API_KEY = "bench-spool-key-0123456789"
FORM_PATH = "/v1/recipientEvents/create"
BATCH_PATH = "/v1/events"
MB = 1024 * 1024
SINGLE_GOAL = 0.5
BATCH_GOAL = 0.8
RSS_GOAL_MB = 100.0
START_TIMEOUT_S = 30.0
FILL_BATCH = 1000
FILL_CONNECTIONS = 4
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# -- a minimal HTTP/1.1 keep-alive client: the load generator must cost less than the server ----


def _request(method: str, path: str, body: bytes = b"", content_type: str = "") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    if content_type:
        head += f"Content-Type: {content_type}\r\n"
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


async def get_json(port: int, path: str) -> dict[str, Any]:
    """GET `path` on a new connection; the JSON body."""
    conn = await Conn.open(port)
    try:
        status, body = await asyncio.wait_for(conn.call(_request("GET", path)), 10)
    finally:
        await conn.close()
    if status != 200:
        raise RuntimeError(f"GET {path}: HTTP {status}: {body[:200]!r}")
    result: dict[str, Any] = json.loads(body)
    return result


# -- the daemon under test ----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _toml(sections: dict[str, dict[str, object]]) -> str:
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
    """User + system CPU time of a process (all its threads) so far."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


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


@dataclass
class Setup:
    """What every daemon of this run shares: where delivery goes, cores, the work directory."""

    work: Path
    blackhole_url: str
    daemon_cpu: int | None
    started: list[Daemon] = field(default_factory=list)

    async def start(
        self, name: str, *, mode: str, max_events: int, state: Path | None = None
    ) -> Daemon:
        """Start `forwarder run` and wait until /healthz answers."""
        port = _free_port()
        state_dir = state or self.work / f"state-{name}"
        config_path = self.work / f"{name}.toml"
        config_path.write_text(
            _toml(
                {
                    "intake": {"http_listen": f"127.0.0.1:{port}"},
                    "queue": {
                        "mode": mode,
                        "max_events": max_events,
                        "max_disk_bytes": 16 * 1024 * MB,
                    },
                    "remote": {
                        "base_url": self.blackhole_url,
                        "concurrency": 1,
                        "breaker_failures": 1,
                        "breaker_probe_initial_s": 3600.0,
                        "breaker_probe_max_s": 3600.0,
                        "timeout_s": 5.0,
                        "connect_timeout_s": 1.0,
                    },
                    "retry": {
                        "initial_backoff_s": 1.0,
                        "max_backoff_s": 60.0,
                        "max_elapsed_s": 1e9,
                    },
                    "state": {"dir": str(state_dir)},
                    "shutdown": {"timeout_s": 1.0},
                    "log": {"level": "warning", "format": "json"},
                }
            )
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("FORWARDER_")}
        env["FORWARDER_API_KEY"] = API_KEY
        log_path = self.work / f"{name}.log"
        began = time.monotonic()
        with log_path.open("ab") as log:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "forwarder", "run", "--config", str(config_path),
                env=env, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
            )  # fmt: skip
        if self.daemon_cpu is not None:
            # Only the main thread exists yet; the threads it starts later inherit the mask.
            os.sched_setaffinity(process.pid, {self.daemon_cpu})
        daemon = Daemon(process, port, state_dir, log_path)
        self.started.append(daemon)
        deadline = began + START_TIMEOUT_S
        while True:
            if process.returncode is not None:
                raise RuntimeError(
                    f"the daemon exited ({process.returncode}):\n{daemon.log_tail()}"
                )
            try:
                await get_json(port, "/healthz")
                break
            except (OSError, RuntimeError, asyncio.IncompleteReadError, TimeoutError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no /healthz within {START_TIMEOUT_S}s") from None
                await asyncio.sleep(0.05)
        daemon.started_in_s = time.monotonic() - began
        return daemon

    async def cleanup(self) -> None:
        """Kill whatever is still running."""
        for daemon in self.started:
            with contextlib.suppress(ProcessLookupError, TimeoutError):
                await daemon.kill()


# -- 1. intake throughput -----------------------------------------------------------------------


def single_request() -> bytes:
    """A drop-in form post: one event (the daemon gives it an event_id)."""
    form = "recipient_id=12345&name=PURCHASE&value=24.99&conversion=1&ref=spring"
    return _request("POST", FORM_PATH, form.encode(), "application/x-www-form-urlencoded")


def batch_request(count: int, first_recipient: int = 0) -> bytes:
    """A JSON batch of `count` events for distinct recipients (event_ids given by the daemon)."""
    items = [
        {
            "recipient_id": str(first_recipient + n),
            "name": "PAGE_VIEW",
            "value": "24.99",
            "data": {"page": f"/products/{n % 50}"},
        }
        for n in range(count)
    ]
    return _request("POST", BATCH_PATH, json.dumps(items).encode(), "application/json")


@dataclass
class Sample:
    """One measurement: accepted events per second and what it cost."""

    events_per_s: float
    daemon_cpu: float  # fraction of one core
    generator_cpu: float
    requests: int

    @property
    def per_cpu_s(self) -> float:
        """Events accepted per second of daemon CPU time."""
        return self.events_per_s / self.daemon_cpu if self.daemon_cpu else 0.0


async def measure(
    daemon: Daemon, raw: bytes, per_request: int, connections: int, seconds: float, warmup: float
) -> Sample:
    """Drive `raw` over `connections` keep-alive connections; count 202s after `warmup`."""
    conns = [await Conn.open(daemon.port) for _ in range(connections)]
    done = 0
    refused: dict[int, int] = {}
    stop = False

    async def worker(conn: Conn) -> None:
        nonlocal done
        while not stop:
            status, body = await conn.call(raw)
            if status == 202:
                done += 1
            else:
                refused[status] = refused.get(status, 0) + 1
                if len(refused) == 1 and refused[status] == 1:
                    print(f"  ! HTTP {status}: {body[:200]!r}")

    tasks = [asyncio.create_task(worker(c)) for c in conns]
    try:
        await asyncio.sleep(warmup)
        c0, d0, g0, t0 = done, cpu_seconds(daemon.pid), time.process_time(), time.monotonic()
        await asyncio.sleep(seconds)
        c1, d1, g1, t1 = done, cpu_seconds(daemon.pid), time.process_time(), time.monotonic()
    finally:
        stop = True
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
        for conn in conns:
            await conn.close()
    if refused:
        raise RuntimeError(f"the daemon refused requests: {refused}\n{daemon.log_tail()}")
    elapsed = t1 - t0
    return Sample(
        events_per_s=(c1 - c0) * per_request / elapsed,
        daemon_cpu=(d1 - d0) / elapsed,
        generator_cpu=(g1 - g0) / elapsed,
        requests=c1 - c0,
    )


async def throughput(setup: Setup, args: argparse.Namespace) -> dict[str, Any]:
    """Every workload in both modes, `rounds` times, alternating which mode goes first."""
    workloads: dict[str, tuple[bytes, int]] = {
        "single": (single_request(), 1),
        "batch100": (batch_request(100), 100),
    }
    samples: dict[str, dict[str, list[Sample]]] = {
        w: {"memory": [], "durable": []} for w in workloads
    }
    blocked_attempts = 0
    for rnd in range(args.rounds):
        modes = ("memory", "durable") if rnd % 2 == 0 else ("durable", "memory")
        for workload, (raw, per_request) in workloads.items():
            for mode in modes:
                name = f"tp-{workload}-{mode}-{rnd}"
                # Room for everything one measurement accepts, in both modes alike.
                daemon = await setup.start(name, mode=mode, max_events=20_000_000)
                try:
                    sample = await measure(
                        daemon, raw, per_request, args.connections, args.seconds, args.warmup
                    )
                    stats = await daemon.stats()
                    blocked_attempts += int(stats["counters"]["attempts"])
                finally:
                    await daemon.kill()
                    shutil.rmtree(daemon.state_dir, ignore_errors=True)
                samples[workload][mode].append(sample)
                print(
                    f"  round {rnd + 1} {workload:<9} {mode:<8} {sample.events_per_s:>10.0f} ev/s"
                    f"  daemon cpu {sample.daemon_cpu:5.0%}  generator cpu"
                    f" {sample.generator_cpu:5.0%}"
                )
    result: dict[str, Any] = {"blocked_delivery_attempts": blocked_attempts, "workloads": {}}
    for workload, by_mode in samples.items():
        # Each round measured both modes back to back: its ratio is immune to slow drift.
        paired = [
            d.events_per_s / m.events_per_s
            for m, d in zip(by_mode["memory"], by_mode["durable"], strict=True)
        ]
        result.setdefault("paired_ratios", {})[workload] = [round(r, 3) for r in paired]
        result["workloads"][workload] = {
            mode: {
                "events_per_s": statistics.median(s.events_per_s for s in runs),
                "daemon_cpu": statistics.median(s.daemon_cpu for s in runs),
                "generator_cpu": statistics.median(s.generator_cpu for s in runs),
                "events_per_cpu_s": statistics.median(s.per_cpu_s for s in runs),
                "runs": [round(s.events_per_s) for s in runs],
            }
            for mode, runs in by_mode.items()
        }
    return result


# -- 2. memory with a spooled backlog -----------------------------------------------------------


async def fill(daemon: Daemon, total: int) -> float:
    """Put `total` events into the daemon in batches of FILL_BATCH; returns events/s."""
    # Ten different bodies: 10 000 recipients, as a busy sender would have.
    bodies = [batch_request(FILL_BATCH, first_recipient=n * FILL_BATCH) for n in range(10)]
    batches = total // FILL_BATCH
    sent = 0
    began = time.monotonic()

    async def worker() -> None:
        nonlocal sent
        conn = await Conn.open(daemon.port)
        try:
            while sent < batches:
                raw = bodies[sent % len(bodies)]
                sent += 1
                status, body = await conn.call(raw)
                if status != 202:
                    raise RuntimeError(f"fill: HTTP {status}: {body[:300]!r}")
        finally:
            await conn.close()

    await asyncio.gather(*(worker() for _ in range(FILL_CONNECTIONS)))
    return batches * FILL_BATCH / (time.monotonic() - began)


async def settled(daemon: Daemon, expect_events: int, timeout: float = 120.0) -> dict[str, Any]:
    """Wait until the spool holds `expect_events` and the in-memory window stopped changing."""
    deadline = time.monotonic() + timeout
    last: tuple[int, int] | None = None
    while time.monotonic() < deadline:
        spool: dict[str, Any] = (await daemon.stats())["spool"]
        now = (int(spool["spool_events"]), int(spool["spool_on_disk_only"]))
        if now[0] == expect_events and now == last:
            return spool
        last = now
        await asyncio.sleep(0.5)
    raise RuntimeError(f"not settled within {timeout}s: spool {last}")


def _file_mb(state_dir: Path) -> float:
    return sum(p.stat().st_size for p in state_dir.glob("spool.db*")) / MB


async def memory(setup: Setup, args: argparse.Namespace) -> dict[str, Any]:
    """RSS idle, after spooling `events`, and after a restart on that backlog."""
    total = args.events - args.events % FILL_BATCH
    daemon = await setup.start("mem", mode="durable", max_events=args.max_events)
    await asyncio.sleep(1.0)
    idle, _ = rss_mb(daemon.pid)
    print(f"  idle: RSS {idle:.1f} MiB (started in {daemon.started_in_s:.2f}s)")
    rate = await fill(daemon, total)
    spool = await settled(daemon, total)
    await asyncio.sleep(1.0)
    filled, filled_peak = rss_mb(daemon.pid)
    print(
        f"  after spooling {total} events ({rate:.0f} ev/s): RSS {filled:.1f} MiB"
        f" (peak {filled_peak:.1f}), {spool['spool_on_disk_only']} on disk only,"
        f" spool files {_file_mb(daemon.state_dir):.0f} MiB"
    )
    attempts = int((await daemon.stats())["counters"]["attempts"])
    began = time.monotonic()
    code = await daemon.terminate()
    stop_s = time.monotonic() - began
    if code != 0:
        raise RuntimeError(f"the daemon exited {code} at SIGTERM:\n{daemon.log_tail()}")
    again = await setup.start(
        "mem-restart", mode="durable", max_events=args.max_events, state=daemon.state_dir
    )
    try:
        spool_again = await settled(again, total)
        await asyncio.sleep(1.0)
        restarted, restarted_peak = rss_mb(again.pid)
        attempts += int((await again.stats())["counters"]["attempts"])
    finally:
        await again.kill()
    print(
        f"  after a restart on the backlog (stopped in {stop_s:.1f}s, up in"
        f" {again.started_in_s:.2f}s): RSS {restarted:.1f} MiB (peak {restarted_peak:.1f}),"
        f" {spool_again['spool_replayed_events']} replayed into memory,"
        f" {spool_again['spool_on_disk_only']} on disk only"
    )
    return {
        "events": total,
        "max_events": args.max_events,
        "fill_events_per_s": rate,
        "rss_idle_mb": idle,
        "rss_filled_mb": filled,
        "rss_filled_peak_mb": filled_peak,
        "rss_restarted_mb": restarted,
        "rss_restarted_peak_mb": restarted_peak,
        "stop_s": stop_s,
        "restart_up_s": again.started_in_s,
        "on_disk_only_filled": spool["spool_on_disk_only"],
        "on_disk_only_restarted": spool_again["spool_on_disk_only"],
        "replayed_after_restart": spool_again["spool_replayed_events"],
        "spool_file_mb": _file_mb(daemon.state_dir),
        "blocked_delivery_attempts": attempts,
    }


# -- the run ------------------------------------------------------------------------------------


def _pin() -> tuple[int | None, str]:
    """Pin this process to one core and return the other for the daemons (None: no pinning)."""
    if not hasattr(os, "sched_setaffinity"):
        return None, "no pinning (os.sched_setaffinity is not available)"
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, f"no pinning (only CPU {cpus} available)"
    os.sched_setaffinity(0, {cpus[1]})
    return cpus[0], f"daemon pinned to CPU {cpus[0]}, load generator to CPU {cpus[1]}"


async def _run(args: argparse.Namespace, report: Callable[[str], None]) -> dict[str, Any]:
    daemon_cpu, pinning = _pin()
    work = Path(tempfile.mkdtemp(prefix="fwbench-spool-", dir=args.dir))
    # Bound, never listening: every connection to it is refused at once, and no one else gets it.
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    blackhole = f"http://127.0.0.1:{hole.getsockname()[1]}/v1"
    setup = Setup(work, blackhole, daemon_cpu)
    report(f"pinning: {pinning}")
    report(f"state dirs under {work} (the spool's fsyncs go to that file system)")
    report(
        f"delivery blocked: remote.base_url {blackhole} is bound but never listens (connections"
        " refused at once); breaker opens after 1 failure and probes hourly; concurrency 1;"
        " retries never give up"
    )
    results: dict[str, Any] = {"pinning": pinning, "blackhole": blackhole}
    try:
        report(
            f"\n1. intake throughput: {args.rounds} rounds x {args.seconds:g}s (after"
            f" {args.warmup:g}s warm-up), {args.connections} keep-alive connections, a fresh daemon"
            " per measurement, queue.max_events 20 000 000 in both modes"
        )
        results["throughput"] = await throughput(setup, args)
        report(f"\n2. memory: durable, queue.max_events {args.max_events}, {args.events} events")
        results["memory"] = await memory(setup, args)
    finally:
        await setup.cleanup()
        hole.close()
        if args.keep:
            report(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return results


def _verdicts(results: dict[str, Any]) -> list[tuple[str, str, bool]]:
    checks: list[tuple[str, str, bool]] = []
    for workload, goal in (("single", SINGLE_GOAL), ("batch100", BATCH_GOAL)):
        by = results["throughput"]["workloads"][workload]
        ratio = by["durable"]["events_per_s"] / by["memory"]["events_per_s"]
        paired = results["throughput"]["paired_ratios"][workload]
        checks.append(
            (
                f"durable/memory events/s, {workload}",
                f"{ratio:.2f} (goal >= {goal}; per round {paired})",
                ratio >= goal,
            )
        )
    mem = results["memory"]
    for key, what in (("rss_filled_mb", "after spooling"), ("rss_restarted_mb", "after restart")):
        delta = mem[key] - mem["rss_idle_mb"]
        checks.append(
            (
                f"RSS {what} {mem['events']} events - idle",
                f"{delta:+.1f} MiB (goal <= {RSS_GOAL_MB:g})",
                delta <= RSS_GOAL_MB,
            )
        )
    attempts = results["throughput"]["blocked_delivery_attempts"] + mem["blocked_delivery_attempts"]
    # Sanity: delivery really was out of the way (a handful of attempts per daemon at most).
    checks.append(("delivery attempts while blocked", str(attempts), attempts < 100))
    return checks


def main() -> int:
    """Parse the options, run both parts, print the table and the verdicts."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="100 000 events, 2 rounds of 2 s")
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--events", type=int, default=None)
    parser.add_argument("--max-events", type=int, default=100_000)
    parser.add_argument("--dir", default=None, help="where the state dirs go (default: $TMPDIR)")
    parser.add_argument("--keep", action="store_true", help="keep the state dirs and logs")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    args.seconds = args.seconds or (2.0 if args.quick else 3.0)
    args.rounds = args.rounds or (2 if args.quick else 5)
    args.events = args.events or (100_000 if args.quick else 1_000_000)
    print("command: " + " ".join([sys.executable, *sys.argv]))
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    results = asyncio.run(_run(args, print))

    print(f"\n{'workload':<10}{'mode':<9}{'events/s':>10}{'daemon CPU':>12}{'ev/CPU-s':>10}"
          f"{'gen CPU':>9}  runs")  # fmt: skip
    for workload, by_mode in results["throughput"]["workloads"].items():
        for mode, m in by_mode.items():
            print(
                f"{workload:<10}{mode:<9}{m['events_per_s']:>10.0f}{m['daemon_cpu']:>12.0%}"
                f"{m['events_per_cpu_s']:>10.0f}{m['generator_cpu']:>9.0%}  {m['runs']}"
            )
    mem = results["memory"]
    print(f"\n{'RSS (MiB)':<34}{'VmRSS':>8}{'peak':>8}{'- idle':>8}")
    for key, what in (
        ("rss_idle_mb", "idle"),
        ("rss_filled_mb", f"{mem['events']} events spooled"),
        ("rss_restarted_mb", "restarted on that backlog"),
    ):
        peak = mem.get(key.replace("_mb", "_peak_mb"), mem[key])
        print(f"{what:<34}{mem[key]:>8.1f}{peak:>8.1f}{mem[key] - mem['rss_idle_mb']:>+8.1f}")
    print()
    checks = _verdicts(results)
    for what, value, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {what}: {value}")
    results["checks"] = [{"check": w, "value": v, "pass": ok} for w, v, ok in checks]
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0 if all(ok for _, _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
