"""Flow-control benchmark: rate pacing, adaptive concurrency and outage recovery, end to end.

Each scenario starts its own `forwarder mock-remote` and `forwarder run` subprocesses (config file
in a temporary directory, port 0, the daemon's "started" log line and the mock's "listening on"
line say where they listen), queues events through `POST /v1/events` and judges the daemon from
the mock's record (`GET /_mock/events`: creation times and 429 counters) and from `/v1/stats`.

- rate: mock limited to 6000/min in 6 s windows, daemon configured for 6000/min, adaptive
  concurrency; a backlog queued at once. Goal: delivered rate >= 99% of the allowed 100/s and
  no 429 after the first window.
- adaptive: unlimited mock with 100 ms latency; fixed concurrency 8..128 against adaptive
  (1..256). Goal: adaptive's steady state (second half of its run) >= 90% of the best fixed.
- outage: as rate, with a steady feed; the mock drops every connection for a while. Goals: the
  breaker opens and /readyz says so, the backlog drains at >= 99% of the allowed rate after
  recovery without a 429 burst, and every accepted event is created exactly once.

    .venv/bin/python tests/benchmarks/bench_flow.py [--scenario all|rate|adaptive|outage]
        [--events N] [--quick] [--keep-logs]

Not part of `make test`: the full rate scenario alone takes five minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp

# Shared with the restart soak: `python -m forwarder ARGS` with its output in a log file. The
# script runs with its own directory on sys.path; mypy sees the file as tests.benchmarks.*.
if TYPE_CHECKING:
    from tests.benchmarks._common import code_version
    from tests.benchmarks.soak_restarts import _spawn
else:
    from _common import code_version
    from soak_restarts import _spawn

KEY = "flow-bench-key-0123456789"
BATCH = 1000
# The rate scenarios' quota, as the issue states it: 6000 requests/minute in 6-second windows.
RATE_PER_MINUTE = 6000
WINDOW_S = 6.0
ALLOWED_PER_S = RATE_PER_MINUTE / 60.0
QUOTA = round(RATE_PER_MINUTE * WINDOW_S / 60.0)  # the mock's per-window quota
FIXED_LEVELS = (8, 16, 32, 64, 128)
STARTUP_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 15.0
HTTP_TIMEOUT_S = 60.0


# --- results --------------------------------------------------------------------------------


@dataclass
class Check:
    """One goal of a scenario and whether the run met it."""

    goal: str
    ok: bool


@dataclass
class Report:
    """A scenario's numbers (label, value) and goals, printed as one table."""

    name: str
    setup: str
    rows: list[tuple[str, str]] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)

    def add(self, label: str, value: str) -> None:
        """Record one number."""
        self.rows.append((label, value))

    def check(self, goal: str, ok: bool) -> None:
        """Record one goal."""
        self.checks.append(Check(goal, ok))

    @property
    def passed(self) -> bool:
        """Every goal met (and at least one was judged)."""
        return bool(self.checks) and all(c.ok for c in self.checks)

    def render(self) -> str:
        """The table: setup line, numbers, then PASS/FAIL per goal."""
        width = max([len(label) for label, _ in self.rows] + [len(c.goal) for c in self.checks])
        lines = [f"== {self.name} ==", f"   {self.setup}"]
        lines += [f"   {label:<{width}}  {value}" for label, value in self.rows]
        lines += [f"   {c.goal:<{width}}  {'PASS' if c.ok else 'FAIL'}" for c in self.checks]
        return "\n".join(lines)


def _progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- processes ------------------------------------------------------------------------------


class Fleet:
    """The subprocesses and temporary directory of one run; `close` always cleans up."""

    def __init__(self, keep_logs: bool) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="fwflow"))
        self._keep = keep_logs
        self._procs: list[asyncio.subprocess.Process] = []

    async def _start(
        self, kind: str, args: list[str], env: dict[str, str]
    ) -> tuple[Path, asyncio.subprocess.Process]:
        log = self.tmp / f"{kind}-{len(self._procs)}.log"
        proc = await _spawn(args, env, log)
        self._procs.append(proc)
        return log, proc

    async def mock(self, *flags: str) -> str:
        """Start `forwarder mock-remote` with `flags`; return its base URL (…/v1)."""
        args = ["mock-remote", "--port", "0", "--api-key", KEY, *flags]
        log, proc = await self._start("mock", args, {})
        line = await _wait_line(log, proc, lambda text: "listening on" in text)
        return line.split()[-1]

    async def daemon(self, config: str) -> str:
        """Start `forwarder run` with this TOML `config`; return its intake URL."""
        path = self.tmp / f"forwarder-{len(self._procs)}.toml"
        path.write_text(config)
        log, proc = await self._start(
            "daemon", ["run", "--config", str(path)], {"FORWARDER_API_KEY": KEY}
        )
        line = await _wait_line(log, proc, _is_started)
        listening: list[str] = json.loads(line)["listening"]
        return listening[0]

    async def close(self) -> None:
        """Stop every process (SIGTERM, then SIGKILL), then remove the directory."""
        for proc in self._procs:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
        for proc in self._procs:
            try:
                await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
        self._procs.clear()
        if self._keep:
            _progress(f"logs kept in {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


@contextlib.asynccontextmanager
async def fleet(keep_logs: bool) -> AsyncIterator[Fleet]:
    """A `Fleet` closed on the way out, whatever happened."""
    running = Fleet(keep_logs)
    try:
        yield running
    finally:
        await running.close()


def _is_started(line: str) -> bool:
    """The daemon's JSON "started" log line, which lists the addresses it listens on."""
    try:
        record = json.loads(line)
    except ValueError:
        return False
    return isinstance(record, dict) and record.get("event") == "started"


async def _wait_line(
    log: Path, proc: asyncio.subprocess.Process, wanted: Callable[[str], bool]
) -> str:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if log.exists():
            for line in log.read_text(errors="replace").splitlines():
                if wanted(line):
                    return line
        if proc.returncode is not None:
            break
        await asyncio.sleep(0.05)
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
    raise RuntimeError(f"{log.name}: did not start (exit {proc.returncode}):\n{tail}")


def daemon_config(
    tmp: Path,
    base_url: str,
    *,
    per_minute: int,
    concurrency: int = 0,
    max_concurrency: int = 64,
    max_events: int = 100_000,
) -> str:
    """The TOML for one daemon: short backoffs and probe intervals, queue large enough."""
    return f"""
[intake]
http_listen = "127.0.0.1:0"
max_batch = {BATCH}
drop_in_answer = "accepted"

[queue]
max_events = {max(max_events, 100_000)}

[remote]
base_url = "{base_url}"
rate_limit_per_minute = {per_minute}
concurrency = {concurrency}
min_concurrency = 1
max_concurrency = {max_concurrency}
breaker_failures = 5
breaker_probe_initial_s = 0.5
breaker_probe_max_s = 2.0
timeout_s = 10.0
connect_timeout_s = 5.0

[retry]
initial_backoff_s = 0.05
max_backoff_s = 1.0

[state]
dir = "{tmp / "state"}"

[shutdown]
timeout_s = 2.0

[log]
level = "info"
format = "json"
"""


# --- HTTP -----------------------------------------------------------------------------------


class Client:
    """Talks to one daemon and one mock: queue events, read stats and the mock's record."""

    def __init__(self, http: aiohttp.ClientSession, daemon: str, mock_base: str) -> None:
        self.http = http
        self.daemon = daemon
        self.mock = mock_base.removesuffix("/v1")
        self._seq = 0

    async def queue(self, count: int) -> list[str]:
        """Queue `count` events in batches; return the ids the daemon accepted them under."""
        ids: list[str] = []
        while count > 0:
            size = min(BATCH, count)
            body = [{"recipient_id": f"r{self._seq + i}", "name": "PAGE_VIEW"} for i in range(size)]
            self._seq += size
            count -= size
            async with self.http.post(f"{self.daemon}/v1/events", json=body) as response:
                answer = await response.json()
                if response.status != 202:
                    raise RuntimeError(f"intake refused a batch: {response.status} {answer}")
                ids.extend(answer["data"]["ids"])
        return ids

    async def stats(self) -> dict[str, Any]:
        """The daemon's /v1/stats."""
        async with self.http.get(f"{self.daemon}/v1/stats") as response:
            body: dict[str, Any] = await response.json()
            return body

    async def readyz(self) -> tuple[int, str]:
        """The daemon's /readyz: status and reason."""
        async with self.http.get(f"{self.daemon}/readyz") as response:
            body = await response.json()
            return response.status, str(body.get("reason", ""))

    async def record(self) -> dict[str, Any]:
        """The mock's created events and counters."""
        async with self.http.get(f"{self.mock}/_mock/events") as response:
            body: dict[str, Any] = await response.json()
            return body

    async def faults(self, **options: float) -> None:
        """Change the mock's fault options."""
        async with self.http.post(f"{self.mock}/_mock/faults", json=options) as response:
            if response.status != 200:
                raise RuntimeError(f"mock refused {options}: {await response.text()}")

    async def wait_settled(self, target: int, timeout: float, label: str) -> dict[str, Any]:
        """Wait until `target` events have an outcome (delivered or dead-lettered)."""
        deadline = time.monotonic() + timeout
        next_note = time.monotonic() + 15.0
        while True:
            stats = await self.stats()
            counters = stats["counters"]
            settled = int(counters["delivered"]) + sum(counters["dead_lettered"].values())
            if settled >= target:
                return stats
            now = time.monotonic()
            if now >= deadline:
                raise TimeoutError(f"{label}: {settled} of {target} settled after {timeout:.0f}s")
            if now >= next_note:
                _progress(f"{label}: {settled}/{target} settled")
                next_note = now + 15.0
            await asyncio.sleep(0.25)


def _session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S))


def created_times(record: dict[str, Any]) -> list[float]:
    """UNIX times at which the mock created each event, sorted."""
    return sorted(datetime.fromisoformat(e["received_at"]).timestamp() for e in record["events"])


def span_rate(times: list[float]) -> float:
    """Events / (last - first), the issue's definition of the delivered rate."""
    if len(times) < 2 or times[-1] <= times[0]:
        return 0.0
    return len(times) / (times[-1] - times[0])


def busiest(times: list[float], width: float) -> int:
    """Most events created within any `width` seconds (a sliding window over sorted times)."""
    most = start = 0
    for end, at in enumerate(times):
        while at - times[start] >= width:
            start += 1
        most = max(most, end - start + 1)
    return most


def _busiest_text(times: list[float]) -> str:
    return f"{busiest(times, 1.0)} / {busiest(times, WINDOW_S)} (quota {QUOTA} per {WINDOW_S:g} s)"


def _attempts_text(stats: dict[str, Any]) -> str:
    return f"{stats['counters']['attempts']} / {stats['counters']['retries']}"


def _fmt_time(at: float | None, origin: float) -> str:
    return "-" if at is None else f"{at - origin:+.2f}s"


# --- scenario 1: rate -----------------------------------------------------------------------


async def scenario_rate(events: int, keep_logs: bool) -> Report:
    """Queue a backlog at once against a 6000/min mock; measure the pace and the 429s."""
    flags = ["--rate-limit", str(RATE_PER_MINUTE), "--window-s", str(WINDOW_S)]
    flags += ["--latency-ms", "5"]
    report = Report(
        "rate",
        f"mock {' '.join(flags)}; daemon rate_limit_per_minute={RATE_PER_MINUTE}, "
        f"adaptive concurrency 1..64; {events} events queued at once",
    )
    async with fleet(keep_logs) as procs, _session() as http:
        mock = await procs.mock(*flags)
        daemon = await procs.daemon(
            daemon_config(procs.tmp, mock, per_minute=RATE_PER_MINUTE, max_events=events)
        )
        client = Client(http, daemon, mock)
        started = time.time()
        accepted = await client.queue(events)
        _progress(f"rate: {len(accepted)} queued; expect ~{events / ALLOWED_PER_S:.0f}s")
        # The 429 count just after the first window (which starts with the first request).
        await asyncio.sleep(max(0.0, started + WINDOW_S + 1.0 - time.time()))
        first_window_429 = int((await client.record())["stats"]["rate_limited"])
        stats = await client.wait_settled(len(accepted), events / ALLOWED_PER_S * 1.5 + 60, "rate")
        record = await client.record()
    times = created_times(record)
    mock_stats = record["stats"]
    rate = span_rate(times)
    first = times[0] if times else started
    window_end = first + WINDOW_S
    last_429 = mock_stats["last_rate_limited_at"]
    late_429 = last_429 is not None and last_429 > window_end
    total_429 = int(mock_stats["rate_limited"])
    keys = [e["idempotency_key"] for e in record["events"]]
    lane = stats["accounts"]["default"]
    report.add("events accepted / created at mock", f"{len(accepted)} / {len(times)}")
    report.add("span first..last created", f"{times[-1] - first:.2f}s" if times else "-")
    report.add("delivered rate", f"{rate:.2f}/s (allowed {ALLOWED_PER_S:.0f}/s)")
    report.add("delivered / allowed", f"{rate / ALLOWED_PER_S:.2%}")
    report.add("busiest 1 s / busiest 6 s (any start)", _busiest_text(times))
    report.add("429s total", str(total_429))
    report.add("429s in the first window (snapshot)", str(first_window_429))
    report.add("429s after the first window (approx.)", str(total_429 - first_window_429))
    report.add(
        "first / last 429 (from first event)",
        f"{_fmt_time(mock_stats['first_rate_limited_at'], first)} / {_fmt_time(last_429, first)}",
    )
    report.add("mock requests", str(mock_stats["requests"]))
    report.add("daemon attempts / retries", _attempts_text(stats))
    report.add(
        "limiter learnt (limit/window)",
        f"{lane['rate_limit']['limit_per_window']}/{lane['rate_limit']['window_s']}s",
    )
    report.add("concurrency limit at end", str(lane["concurrency"]["limit"]))
    report.check("delivered rate >= 99% of allowed", rate >= 0.99 * ALLOWED_PER_S)
    report.check("no 429 after the first window", not late_429)
    report.check("every accepted event created once", sorted(keys) == sorted(accepted))
    return report


# --- scenario 2: adaptive -------------------------------------------------------------------


@dataclass
class Run:
    """One adaptive-scenario run: throughput, and (seconds, limit, rtt ms) samples of /v1/stats."""

    label: str
    whole: float
    second_half: float
    samples: list[tuple[float, int, float]]
    seconds: float


async def _throughput_run(concurrency: int, events: int, keep_logs: bool) -> Run:
    label = f"fixed {concurrency}" if concurrency else "adaptive 1..256"
    async with fleet(keep_logs) as procs, _session() as http:
        mock = await procs.mock("--rate-limit", "0", "--latency-ms", "100")
        config = daemon_config(
            procs.tmp,
            mock,
            per_minute=1_000_000,
            concurrency=concurrency,
            max_concurrency=256,
            max_events=events,
        )
        client = Client(http, await procs.daemon(config), mock)
        samples: list[tuple[float, int, float]] = []
        begun = time.monotonic()

        async def sample() -> None:
            while True:
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    view = (await client.stats())["accounts"]["default"]
                    flow = view["concurrency"]
                    at = time.monotonic() - begun
                    samples.append((at, int(flow["limit"]), float(flow["rtt_ms"])))
                await asyncio.sleep(0.25)

        sampler = asyncio.create_task(sample())
        try:
            accepted = await client.queue(events)
            # Slowest expected: 8 in flight at 100 ms is 80/s.
            await client.wait_settled(len(accepted), 60 + events / 20, label)
        finally:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
        record = await client.record()
    times = created_times(record)
    mid = len(times) // 2
    half = (len(times) - mid) / (times[-1] - times[mid]) if times[-1] > times[mid] else 0.0
    run = Run(label, span_rate(times), half, samples, times[-1] - times[0])
    _progress(f"adaptive: {label}: {run.whole:.0f}/s, second half {run.second_half:.0f}/s")
    return run


async def scenario_adaptive(events: int, keep_logs: bool) -> Report:
    """Fixed concurrency levels against adaptive, each delivering `events` events."""
    report = Report(
        "adaptive",
        "mock --rate-limit 0 --latency-ms 100; daemon rate_limit_per_minute=1000000; "
        f"{events} events per run",
    )
    fixed = [await _throughput_run(level, events, keep_logs) for level in FIXED_LEVELS]
    adaptive = await _throughput_run(0, events, keep_logs)
    for run in [*fixed, adaptive]:
        report.add(
            f"{run.label}: events/s (whole / 2nd half)",
            f"{run.whole:7.1f} / {run.second_half:7.1f}   ({run.seconds:.1f}s)",
        )
    best = max(fixed, key=lambda r: r.whole)
    samples = adaptive.samples or [(0.0, 0, 0.0)]
    limits = [limit for _, limit, _ in samples]
    best_level = FIXED_LEVELS[fixed.index(best)]
    reached = [at for at, limit, _ in samples if limit >= best_level]
    cuts = sum(1 for before, after in itertools.pairwise(limits) if after < before)
    report.add("best fixed", f"{best.label} ({best.whole:.1f}/s)")
    report.add("adaptive steady state / best fixed", f"{adaptive.second_half / best.whole:.2%}")
    report.add("adaptive whole run / best fixed", f"{adaptive.whole / best.whole:.2%}")
    report.add("adaptive limit reached (max / at end)", f"{max(limits)} / {limits[-1]}")
    points = [samples[len(samples) * q // 4] for q in range(4)] + [samples[-1]]
    report.add(
        "adaptive limit at 0, 1/4, 1/2, 3/4, end",
        " ".join(f"{limit}@{at:.1f}s" for at, limit, _ in points),
    )
    report.add("adaptive rtt ms at the same points", " ".join(f"{rtt:.0f}" for _, _, rtt in points))
    report.add("adaptive limit cuts seen (0.25 s samples)", str(cuts))
    report.add(
        f"adaptive time to limit >= {best_level}",
        f"{reached[0]:.1f}s (run took {samples[-1][0]:.1f}s)" if reached else "never",
    )
    report.check(
        "adaptive steady state >= 90% of best fixed", adaptive.second_half >= 0.9 * best.whole
    )
    return report


# --- scenario 3: outage ---------------------------------------------------------------------


async def scenario_outage(backlog: int, outage_s: float, keep_logs: bool) -> Report:
    """A steady feed plus backlog; the mock drops every connection for `outage_s`."""
    flags = ["--rate-limit", str(RATE_PER_MINUTE), "--window-s", str(WINDOW_S)]
    feed_per_s = 50
    report = Report(
        "outage",
        f"mock {' '.join(flags)}; daemon as in rate; backlog {backlog} + {feed_per_s}/s feed "
        f"until recovery; mock drops every connection for {outage_s:g}s",
    )
    async with fleet(keep_logs) as procs, _session() as http:
        mock = await procs.mock(*flags)
        daemon = await procs.daemon(
            daemon_config(procs.tmp, mock, per_minute=RATE_PER_MINUTE, max_events=backlog * 4)
        )
        client = Client(http, daemon, mock)
        accepted: list[str] = await client.queue(backlog)
        feeding = True

        async def feed() -> None:
            while feeding:
                accepted.extend(await client.queue(feed_per_s // 2))
                await asyncio.sleep(0.5)

        feeder = asyncio.create_task(feed())
        states: set[str] = set()
        opened_max = 0
        readyz: list[tuple[int, str]] = []
        try:
            # Flowing: a few seconds' worth delivered before the outage starts.
            flowing = min(300, backlog // 3)
            await client.wait_settled(flowing, 60, "outage: warm-up")
            await client.faults(reset_rate=1.0)
            outage_at = time.time()
            _progress(f"outage: connections dropped for {outage_s:g}s")
            while time.time() < outage_at + outage_s:
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    breaker = (await client.stats())["accounts"]["default"]["breaker"]
                    states.add(breaker["state"])
                    opened_max = max(opened_max, int(breaker["opened"]))
                    readyz.append(await client.readyz())
                await asyncio.sleep(0.25)
            await client.faults(reset_rate=0.0)
            recovered_at = time.time()
            feeding = False
            await feeder
        finally:
            feeding = False
            feeder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await feeder
        at_recovery = await client.record()
        left = len(accepted) - len(at_recovery["events"])
        _progress(f"outage: recovered; {left} events to drain, expect ~{left / ALLOWED_PER_S:.0f}s")
        stats = await client.wait_settled(len(accepted), left / ALLOWED_PER_S * 1.5 + 60, "drain")
        record = await client.record()
    times = created_times(record)
    after = [t for t in times if t >= recovered_at]
    drain = span_rate(after)
    lag = after[0] - recovered_at if after else float("nan")
    incl_lag = len(after) / (after[-1] - recovered_at) if after else 0.0
    mock_stats = record["stats"]
    total_429 = int(mock_stats["rate_limited"])
    after_429 = total_429 - int(at_recovery["stats"]["rate_limited"])
    last_429 = mock_stats["last_rate_limited_at"]
    burst = bool(after) and last_429 is not None and last_429 > after[0] + WINDOW_S
    keys = [e["idempotency_key"] for e in record["events"]]
    unique = set(keys)
    wanted = set(accepted)
    down = [reason for status, reason in readyz if status == 503]
    breaker_reason = any("breaker" in reason for reason in down)
    dead = stats["counters"]["dead_lettered"]
    report.add("events accepted (backlog + feed)", str(len(accepted)))
    report.add("created at mock / unique ids", f"{len(keys)} / {len(unique)}")
    twice = len(keys) - len(unique)
    report.add(
        "missing / created twice / unknown",
        f"{len(wanted - unique)} / {twice} / {len(unique - wanted)}",
    )
    report.add("dead-lettered", json.dumps(dead))
    report.add("breaker states seen during outage", ", ".join(sorted(states)) or "-")
    report.add("breaker opened (times)", str(opened_max))
    report.add("/readyz 503 samples / all", f"{len(down)} / {len(readyz)}")
    report.add("/readyz reason (first 503)", (down[0][:90] if down else "-"))
    report.add("backlog at recovery", str(left))
    report.add("first delivery after recovery", f"{lag:.2f}s")
    report.add("drain rate after recovery", f"{drain:.2f}/s ({drain / ALLOWED_PER_S:.2%})")
    report.add("drain rate incl. probe lag", f"{incl_lag:.2f}/s ({incl_lag / ALLOWED_PER_S:.2%})")
    first_second = sum(1 for t in after if t < after[0] + 1.0) if after else 0
    report.add("created in the first 1 s after recovery", str(first_second))
    report.add("busiest 1 s / busiest 6 s after recovery", _busiest_text(after))
    report.add("429s total / after recovery", f"{total_429} / {after_429}")
    origin = after[0] if after else recovered_at
    report.add(
        "first / last 429 (from 1st post-recovery)",
        f"{_fmt_time(mock_stats['first_rate_limited_at'], origin)} / {_fmt_time(last_429, origin)}",
    )
    report.add("daemon attempts / retries", _attempts_text(stats))
    report.check("breaker opened during the outage", any(s != "closed" for s in states))
    report.check("/readyz 503 naming the breaker", breaker_reason)
    report.check("drain rate >= 99% of allowed", drain >= 0.99 * ALLOWED_PER_S)
    report.check("no 429 beyond the first window after recovery", not burst)
    report.check(
        "every accepted event created exactly once",
        len(keys) == len(unique) and unique == wanted and not dead,
    )
    return report


# --- main -----------------------------------------------------------------------------------


async def main(args: argparse.Namespace) -> list[Report]:
    """Run the chosen scenarios in turn; a scenario that breaks is reported as failed."""
    chosen = ["rate", "adaptive", "outage"] if args.scenario == "all" else [args.scenario]
    reports: list[Report] = []
    for name in chosen:
        _progress(f"scenario {name}")
        try:
            if name == "rate":
                events = args.events or (6000 if args.quick else 30_000)
                reports.append(await scenario_rate(events, args.keep_logs))
            elif name == "adaptive":
                events = args.events or (2000 if args.quick else 5000)
                reports.append(await scenario_adaptive(events, args.keep_logs))
            else:
                backlog = args.events or (1000 if args.quick else 3000)
                outage_s = 10.0 if args.quick else 30.0
                reports.append(await scenario_outage(backlog, outage_s, args.keep_logs))
        except (RuntimeError, TimeoutError, aiohttp.ClientError) as exc:
            broken = Report(name, f"did not complete: {type(exc).__name__}: {exc}")
            broken.check("scenario completed", False)
            reports.append(broken)
    return reports


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--scenario", choices=["all", "rate", "adaptive", "outage"], default="all")
    parser.add_argument(
        "--events",
        type=int,
        default=0,
        help="rate: events queued (30000; quick 6000); adaptive: per run (5000; quick 2000); "
        "outage: initial backlog (3000; quick 1000)",
    )
    parser.add_argument("--quick", action="store_true", help="fewer events, 10 s outage")
    parser.add_argument("--keep-logs", action="store_true", help="keep the temp dirs and logs")
    return parser.parse_args()


if __name__ == "__main__":
    options = parse_args()
    # The daemons must run with the config file's settings, not the caller's overrides.
    for var in [v for v in os.environ if v.startswith("FORWARDER_")]:
        del os.environ[var]
    begun = time.monotonic()
    version = code_version()
    results = asyncio.run(main(options))
    print()
    print("command: " + shlex.join([sys.executable, *sys.argv]))
    print(f"code: {version} at start, {code_version()} at end")
    for result in results:
        print(result.render())
    verdict = all(r.passed for r in results)
    print(f"overall: {'PASS' if verdict else 'FAIL'} in {time.monotonic() - begun:.0f}s")
    sys.exit(0 if verdict else 1)
