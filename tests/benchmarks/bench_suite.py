"""Benchmark suite: forwarder against bare baselines measured in the same run, on both loops.

Every figure is a median over rounds, and every ratio is against a baseline measured in the same
run on the same machine (alternating which goes first), because a shared VM's speed drifts. The
servers under test (the daemon, the bare aiohttp server, the bare delivery client) are pinned to
one core; the load generator (wrk when installed, else a raw HTTP/1.1 keep-alive client in this
process, both cheaper than the servers they drive) and the mock remote to the other.

Scenarios (`--only NAME`, repeatable):

- ingest: one event per request, form posts to POST /v1/recipientEvents/create over 32
  keep-alive connections; forwarder against a bare aiohttp handler that parses the same form and
  answers the same JSON. Delivery is blocked (the remote refuses connections at once, the breaker
  opens on the first failure and probes hourly): intake alone. Goal >= 0.8x.
- batch: NDJSON, 100 events per request, to POST /v1/events; forwarder against a bare handler
  doing one json.loads a line. Goal >= 100 000 events/s accepted (ratio reported).
- delivery: N events (50 000; `--quick` 10 000) queued in memory while the mock remote refuses
  the key (delivery paused, probing every 0.2 s), then the mock accepts it: the time from the
  second to the last event created at `forwarder mock-remote --rate-limit 0` (no latency; the
  first is the paused lane's one probe, whose answer the others wait for, by design: with a
  100 ms remote it alone would take 1% off a 10 s drain; skipped for the bare client too); against
  a bare aiohttp client loop posting the same forms to the same mock at the same concurrency (32).
  Goal >= 0.85x. Also reported: the daemon's CPU per delivered event (utime+stime from
  /proc/PID/stat over the drain) against the bare client's.
- latency_bound: as delivery with the mock answering after 100 ms and concurrency 64: goal >= 95%
  of the 640 events/s that allows.
- memory: RSS with 100 000 events queued (memory mode, delivery blocked) minus idle RSS. Goal
  <= 100 MB; bytes per queued event reported.
- fleet: 3 hosts (`forwarder run`, memory mode, each with more events than the account's
  limit lets through) against one account of `forwarder mock-remote --rate-limit 1200` with
  5-second windows (quick: 2), for 6 windows: once sharing the budget through one
  `redis-server` (AOF on, appendfsync always), once each on its own, in the same run. The
  delivered rate after the first window as % of the limit (goal >= 98% in the fleet) and the
  429s after the first window (goal 0 in the fleet); the budget's Redis calls per delivered
  event and their mean time (from the hosts' /v1/stats), and one budget call's time from an
  idle process.
- intake_latency: 1 000 requests/s offered open-loop (paced; each request on a free keep-alive
  connection, timed from its write to the end of its answer) while the remote is down
  (connections refused, default breaker). p50/p99/max; goal p99 <= 2 ms. The bare server's
  figures show the floor of this client and machine.

    .venv/bin/python tests/benchmarks/bench_suite.py [--quick] [--only SCENARIO]... [--rounds N]
        [--seconds S] [--loops asyncio,uvloop] [--load auto|wrk|python] [--profile]
        [--out bench-results.json]

Prints one table and writes the results (every round's numbers) as JSON. `--profile` also
records py-spy profiles of the daemon under ingest and delivery (extra runs, not counted) into
a directory next to the JSON file. Exit status 0 when every goal passes.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

# The script runs with its own directory on sys.path; mypy sees the file as tests.benchmarks.*.
if TYPE_CHECKING:
    from tests.benchmarks._common import (
        API_KEY,
        BATCH_PATH,
        FORM_BODY,
        FORM_PATH,
        FORM_TYPE,
        NDJSON_TYPE,
        Blackhole,
        Conn,
        Daemon,
        Sample,
        batch_items,
        blocked_delivery,
        call_json,
        clean_env,
        code_version,
        cpu_seconds,
        free_port,
        http_request,
        measure,
        pin,
        pin_load_generator,
        rss_mb,
        start_daemon,
        stop_process,
        wait_healthy,
    )
else:
    from _common import (
        API_KEY,
        BATCH_PATH,
        FORM_BODY,
        FORM_PATH,
        FORM_TYPE,
        NDJSON_TYPE,
        Blackhole,
        Conn,
        Daemon,
        Sample,
        batch_items,
        blocked_delivery,
        call_json,
        clean_env,
        code_version,
        cpu_seconds,
        free_port,
        http_request,
        measure,
        pin,
        pin_load_generator,
        rss_mb,
        start_daemon,
        stop_process,
        wait_healthy,
    )

HERE = Path(__file__).resolve().parent
SCENARIOS = ("ingest", "batch", "delivery", "latency_bound", "memory", "intake_latency", "fleet")
PROFILED = ("ingest", "delivery")
INGEST_GOAL = 0.8
BATCH_GOAL_EPS = 100_000.0
BATCH_SIZE = 100
DELIVERY_GOAL = 0.85
DELIVERY_CONCURRENCY = 32
LATENCY_MS = 100.0
LATENCY_CONCURRENCY = 64
LATENCY_GOAL = 0.95
MEMORY_GOAL_BYTES = 100e6
MEMORY_EVENTS = 100_000
PACE_PER_S = 1000.0
PACE_P99_GOAL_MS = 2.0
PACE_POOL = 256
FILL_BATCH = 1000
FILL_CONNECTIONS = 4
REFUSED_KEY = "a-key-the-mock-does-not-know-yet"
FLEET_HOSTS = 3
FLEET_RATE_PER_MIN = 1200  # 20 requests a second for the whole account
FLEET_GOAL = 0.98
AUTH_PROBE_S = 0.2


def _progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- results ------------------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the table: forwarder's figure, the baseline's, the ratio and the goal."""

    scenario: str
    loop: str
    forwarder: str
    baseline: str
    ratio: str
    goal: str
    ok: bool | None  # None: reported, no goal

    @property
    def verdict(self) -> str:
        """PASS, FAIL, or "-" for a figure without a goal."""
        return "-" if self.ok is None else ("PASS" if self.ok else "FAIL")


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _fmt(value: float, digits: int = 0) -> str:
    return f"{value:,.{digits}f}".replace(",", " ")


def render(rows: list[Row]) -> str:
    """The table, one line per row, columns padded to fit."""
    header = ("scenario", "loop", "forwarder", "baseline", "ratio", "goal", "result")
    cells = [header] + [
        (r.scenario, r.loop, r.forwarder, r.baseline, r.ratio, r.goal, r.verdict) for r in rows
    ]
    widths = [max(len(line[i]) for line in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


# --- load generation ----------------------------------------------------------------------------


@dataclass
class Load:
    """Closed-loop load: wrk when there (C, one thread), else the raw keep-alive client."""

    wrk: str | None
    connections: int
    work: Path

    @property
    def name(self) -> str:
        """What generates the load, for the report."""
        if self.wrk:
            return f"wrk (1 thread, {self.connections} connections)"
        return f"raw HTTP/1.1 keep-alive client in Python ({self.connections} connections)"

    async def run(
        self,
        port: int,
        pid: int,
        path: str,
        body: bytes,
        content_type: str,
        per_request: int,
        seconds: float,
    ) -> Sample:
        """Drive POST `path` for `seconds` after a warm-up; the server's rate and CPU share."""
        if self.wrk is None:
            raw = http_request("POST", path, body, content_type)
            return await measure(port, pid, raw, per_request, self.connections, seconds, 1.0)
        script = self.work / f"wrk-{abs(hash((path, body)))}.lua"
        script.write_text(
            'wrk.method = "POST"\n'
            f'wrk.headers["Content-Type"] = "{content_type}"\n'
            f"wrk.body = [==[{body.decode()}]==]\n"
        )
        url = f"http://127.0.0.1:{port}{path}"
        await self._wrk(url, script, 1)  # warm-up: wrk takes whole seconds
        whole = max(1, round(seconds))
        d0, r0 = cpu_seconds(pid), resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.monotonic()
        out = await self._wrk(url, script, whole)
        elapsed = time.monotonic() - t0
        d1, r1 = cpu_seconds(pid), resource.getrusage(resource.RUSAGE_CHILDREN)
        parsed = _parse_wrk(out)
        generator = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
        return Sample(
            events_per_s=parsed["requests"] * per_request / parsed["seconds"],
            server_cpu=(d1 - d0) / elapsed,
            generator_cpu=generator / elapsed,
            requests=int(parsed["requests"]),
        )

    async def _wrk(self, url: str, script: Path, seconds: int) -> str:
        assert self.wrk is not None
        proc = await asyncio.create_subprocess_exec(
            self.wrk, "-t1", f"-c{self.connections}", f"-d{seconds}s", "-s", str(script), url,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(proc.communicate(), seconds + 60)
        text = out.decode(errors="replace")
        if proc.returncode != 0:
            raise RuntimeError(f"wrk failed ({proc.returncode}):\n{text}")
        parsed = _parse_wrk(text)
        if parsed["non_2xx"] or parsed["socket_errors"]:
            raise RuntimeError(f"wrk saw failed requests:\n{text}")
        return text


def _parse_wrk(text: str) -> dict[str, float]:
    """Requests, duration, non-2xx answers and socket errors from wrk's summary."""
    found = {"requests": 0.0, "seconds": 0.0, "non_2xx": 0.0, "socket_errors": 0.0}
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 4 and words[1] == "requests" and words[2] == "in":
            found["requests"] = float(words[0])
            found["seconds"] = float(words[3].rstrip(",").removesuffix("s"))
        elif line.strip().startswith("Non-2xx or 3xx responses:"):
            found["non_2xx"] = float(words[-1])
        elif line.strip().startswith("Socket errors:"):
            found["socket_errors"] = sum(float(w.rstrip(",")) for w in words[3::2])
    if not found["seconds"]:
        raise RuntimeError(f"cannot read wrk's output:\n{text}")
    return found


async def paced(
    port: int, raw: bytes, rate: float, seconds: float, warmup: float
) -> dict[str, float]:
    """Open-loop load: a request every 1/`rate` s on a free keep-alive connection (of
    PACE_POOL opened beforehand), whatever the answers do. Each is timed from its write to the end
    of its answer (after `warmup`): a server that falls behind queues the requests of the other
    connections, and that shows. Only with every connection busy does the pacing wait (counted
    as `behind`, and the lateness of the sends as `send_lag`)."""
    loop = asyncio.get_running_loop()
    free: asyncio.Queue[Conn] = asyncio.Queue()
    for _ in range(PACE_POOL):
        free.put_nowait(await Conn.open(port))
    behind = 0
    took: list[float] = []
    lags: list[float] = []
    failed: dict[int, int] = {}
    running: set[asyncio.Task[None]] = set()
    total = int(rate * (warmup + seconds))
    skip = int(rate * warmup)

    async def one(index: int, conn: Conn) -> None:
        began = time.perf_counter()
        status, _ = await conn.call(raw)
        elapsed = time.perf_counter() - began
        free.put_nowait(conn)
        if status != 202:
            failed[status] = failed.get(status, 0) + 1
        if index >= skip:
            took.append(elapsed * 1000)

    start = loop.time() + 0.05
    for index in range(total):
        due = start + index / rate
        if (wait := due - loop.time()) > 0:
            await asyncio.sleep(wait)
        if free.empty():
            behind += 1
        conn = await free.get()
        if index >= skip:
            lags.append((loop.time() - due) * 1000)
        task = asyncio.create_task(one(index, conn))
        running.add(task)
        task.add_done_callback(running.discard)
    await asyncio.wait_for(asyncio.gather(*running), 60)
    while not free.empty():
        await free.get_nowait().close()
    if failed:
        raise RuntimeError(f"paced load: answers other than 202: {failed}")
    took.sort()
    lags.sort()
    return {
        "requests": len(took),
        "p50_ms": took[len(took) // 2],
        "p99_ms": took[min(len(took) - 1, int(len(took) * 0.99))],
        "max_ms": took[-1],
        "send_lag_p99_ms": lags[min(len(lags) - 1, int(len(lags) * 0.99))],
        "behind": behind,
    }


# --- processes ----------------------------------------------------------------------------------


@dataclass
class Mock:
    """A `forwarder mock-remote` subprocess (on the load generator's core)."""

    process: asyncio.subprocess.Process
    port: int
    base_url: str
    loop: str

    async def reset(self, api_key: str) -> None:
        """Forget everything it recorded; accept `api_key` from now on."""
        await call_json(self.port, "POST", "/_mock/reset", {})
        await call_json(self.port, "POST", "/_mock/faults", {"api_key": api_key})

    async def record(self) -> dict[str, Any]:
        """What it created, and its counters."""
        return await call_json(self.port, "GET", "/_mock/events", timeout=120)


def created_times(record: dict[str, Any]) -> list[float]:
    """UNIX times at which the mock created each event, sorted."""
    return sorted(datetime.fromisoformat(e["received_at"]).timestamp() for e in record["events"])


def _daemon_loop(daemon: Daemon) -> str:
    """The loop the daemon reported in its `event_loop` log line."""
    for line in daemon.log_path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict) and record.get("event") == "event_loop":
                return str(record.get("loop"))
    return "?"


@dataclass
class Suite:
    """One run: where things go, which cores, which loops, and everything measured."""

    args: argparse.Namespace
    work: Path
    server_cpu: int | None
    load: Load
    blackhole: Blackhole
    rows: list[Row] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    profiles: dict[str, Any] = field(default_factory=dict)
    _procs: list[asyncio.subprocess.Process] = field(default_factory=list)
    _daemons: int = 0

    # -- starting things --

    def track(self, process: asyncio.subprocess.Process) -> None:
        """Stop `process` with the rest at the end of the scenario."""
        self._procs.append(process)

    def loop_env(self, loop: str) -> dict[str, str]:
        """Environment for `forwarder run`/`mock-remote` to run on `loop`."""
        return {"FORWARDER_NO_UVLOOP": "1"} if loop == "asyncio" else {}

    async def daemon(
        self, loop: str, sections: dict[str, dict[str, object]], name: str = "fw"
    ) -> Daemon:
        """A fresh `forwarder run` on `loop` with `sections` (production log settings)."""
        self._daemons += 1
        config: dict[str, dict[str, object]] = {
            "log": {"level": "info", "format": "json"},
            **sections,
        }
        started = await start_daemon(
            self.work,
            f"{name}-{loop}-{self._daemons}",
            config,
            cpu=self.server_cpu,
            env=self.loop_env(loop),
        )
        self._procs.append(started.process)
        actual = _daemon_loop(started)
        if actual != loop:
            await started.kill()
            raise RuntimeError(f"the daemon runs on {actual}, not {loop}")
        return started

    async def bare_server(self, loop: str) -> tuple[asyncio.subprocess.Process, int]:
        """The bare aiohttp server (`_bare.py serve`) on `loop`, pinned like the daemon."""
        port = free_port()
        process = await asyncio.create_subprocess_exec(
            sys.executable, str(HERE / "_bare.py"), "--loop", loop, "serve", str(port),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        pin(process.pid, self.server_cpu)
        self._procs.append(process)
        await wait_healthy(port, "/healthz", process, "the bare server")
        return process, port

    async def mock(self, *flags: str) -> Mock:
        """`forwarder mock-remote` with `flags` on this process's core (its default loop)."""
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "forwarder", "mock-remote", "--port", "0",
            "--api-key", API_KEY, *flags,
            env=clean_env(), stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        self._procs.append(process)
        assert process.stdout is not None
        first = (await asyncio.wait_for(process.stdout.readline(), 30)).decode()
        second = (await asyncio.wait_for(process.stdout.readline(), 30)).decode()
        if "listening on" not in first:
            raise RuntimeError(f"the mock did not start: {first!r}")
        base_url = first.split()[-1]
        port = int(base_url.rsplit(":", 1)[1].split("/")[0])
        return Mock(process, port, base_url, second.partition(":")[2].strip())

    async def close(self) -> None:
        """Stop everything this run started."""
        for process in self._procs:
            await stop_process(process, 10.0)
        self._procs.clear()

    async def alternate(
        self, rounds: int, runs: dict[str, Callable[[str], Awaitable[Any]]]
    ) -> dict[str, dict[str, list[Any]]]:
        """Each round, each loop: every run in `runs`, the order reversed on odd rounds."""
        out: dict[str, dict[str, list[Any]]] = {
            loop: {name: [] for name in runs} for loop in self.args.loops
        }
        for rnd in range(rounds):
            names = list(runs) if rnd % 2 == 0 else list(reversed(runs))
            for loop in self.args.loops:
                for name in names:
                    result = await runs[name](loop)
                    out[loop][name].append(result)
                    _progress(f"  round {rnd + 1} {loop:<7} {name:<9} {_short(result)}")
        return out

    # -- profiling --

    async def profile(self, name: str, pid: int, work: Awaitable[Any]) -> None:
        """Record a py-spy profile of `pid` while `work` runs (nothing if py-spy is missing)."""
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not Path(spy).exists():
            self.profiles[name] = {"error": "py-spy not installed (pip install -e '.[bench]')"}
            await work
            return
        directory = Path(self.args.profile_dir)
        directory.mkdir(parents=True, exist_ok=True)
        out = directory / f"{name}.collapsed.txt"
        spy_proc = await asyncio.create_subprocess_exec(
            spy, "record", "--pid", str(pid), "--rate", "200", "--nonblocking",
            "--format", "raw", "--output", str(out),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        await asyncio.sleep(0.5)
        try:
            await work
        finally:
            if spy_proc.returncode is None:
                spy_proc.send_signal(signal.SIGINT)
            output, _ = await asyncio.wait_for(spy_proc.communicate(), 60)
        if not out.exists():
            self.profiles[name] = {"error": output.decode(errors="replace")[-500:]}
            return
        self.profiles[name] = {"file": str(out), **summarize_profile(out)}


def _short(result: Any) -> str:
    if isinstance(result, Sample):
        return f"{result.events_per_s:,.0f}/s, server CPU {result.server_cpu:.0%}"
    if isinstance(result, dict):
        keys = [
            k
            for k in (
                "events_per_s",
                "p99_ms",
                "delta_mb",
                "cpu_us_per_event",
                "delivered_share",
                "rate_limited",
            )
            if k in result
        ]
        return ", ".join(f"{k} {result[k]:,.2f}" for k in keys)
    return str(result)


def summarize_profile(path: Path, top: int = 12) -> dict[str, Any]:
    """From py-spy's collapsed stacks ("frame;frame;... count" a line): the functions with the
    most samples on top of the stack (self), the same by package, and the share of samples
    inside each forwarder module (inclusive; the entry point, which holds everything, left out)."""
    own: collections.Counter[str] = collections.Counter()
    packages: collections.Counter[str] = collections.Counter()
    modules: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = stack.split(";")
        name, _, where = frames[-1].partition(" (")
        file = where.rsplit(":", 1)[0]
        own[f"{name} ({file})"] += count
        packages[file.split("/")[0] if "/" in file else file or "?"] += count
        inside = {
            "forwarder/" + frame.split("forwarder/")[-1].split(":")[0]
            for frame in frames
            if "forwarder/" in frame
        }
        for module in inside - {"forwarder/__main__.py", "forwarder/cli/main.py"}:
            modules[module] += count
    if not total:
        return {"samples": 0}
    return {
        "samples": total,
        "top_self": [(name, round(n / total, 3)) for name, n in own.most_common(top)],
        "self_by_package": {name: round(n / total, 3) for name, n in packages.most_common(top)},
        "forwarder_modules_inclusive": {m: round(n / total, 3) for m, n in modules.most_common()},
    }


# --- scenarios ----------------------------------------------------------------------------------


def _blocked_memory(max_events: int, url: str) -> dict[str, dict[str, object]]:
    # queue.max_bytes out of the way too: these measure intake, not the bound.
    queue = {"mode": "memory", "max_events": max_events, "max_bytes": 64 * 1024**3}
    return {"queue": queue, **blocked_delivery(url)}


async def _throughput(
    suite: Suite, scenario: str, path: str, body: bytes, ctype: str, per: int
) -> dict[str, dict[str, list[Sample]]]:
    args = suite.args
    sections = _blocked_memory(20_000_000, suite.blackhole.url)

    async def forwarder(loop: str) -> Sample:
        daemon = await suite.daemon(loop, sections, name=scenario)
        try:
            return await suite.load.run(
                daemon.port, daemon.pid, path, body, ctype, per, args.seconds
            )
        finally:
            await daemon.kill()
            shutil.rmtree(daemon.state_dir, ignore_errors=True)

    async def bare(loop: str) -> Sample:
        process, port = await suite.bare_server(loop)
        try:
            return await suite.load.run(port, process.pid, path, body, ctype, per, args.seconds)
        finally:
            await stop_process(process)

    runs = await suite.alternate(args.rounds, {"bare": bare, "forwarder": forwarder})
    if args.profile and scenario in PROFILED:
        for loop in args.loops:
            daemon = await suite.daemon(loop, sections, name=f"{scenario}-profile")
            try:
                driving = suite.load.run(
                    daemon.port, daemon.pid, path, body, ctype, per, args.seconds
                )
                await suite.profile(f"{scenario}-{loop}", daemon.pid, driving)
            finally:
                await daemon.kill()
    return runs


def _per_cpu_ratio(by: dict[str, list[Sample]]) -> float:
    """forwarder's events per second of its own CPU time over the bare server's: what the
    ratio would be if both had a whole core (a shared machine hands out less, unevenly)."""
    fw = _median([s.per_cpu_s for s in by["forwarder"]])
    bare = _median([s.per_cpu_s for s in by["bare"]])
    return fw / bare if bare else float("nan")


def _sample_data(runs: dict[str, dict[str, list[Sample]]]) -> dict[str, Any]:
    return {
        loop: {name: [asdict(s) for s in samples] for name, samples in by.items()}
        for loop, by in runs.items()
    }


async def scenario_ingest(suite: Suite) -> None:
    """Single-event form posts: forwarder vs the bare handler."""
    runs = await _throughput(suite, "ingest", FORM_PATH, FORM_BODY, FORM_TYPE, 1)
    suite.data["ingest"] = _sample_data(runs)
    for loop, by in runs.items():
        fw = _median([s.events_per_s for s in by["forwarder"]])
        bare = _median([s.events_per_s for s in by["bare"]])
        cpu = _median([s.server_cpu for s in by["forwarder"]])
        paired = [
            round(f.events_per_s / b.events_per_s, 2)
            for f, b in zip(by["forwarder"], by["bare"], strict=True)
        ]
        suite.data["ingest"][loop]["paired_ratios"] = paired
        per_cpu = _per_cpu_ratio(by)
        suite.rows.append(
            Row(
                "ingest, form, 1 event/request",
                loop,
                f"{_fmt(fw)} req/s (CPU {cpu:.0%})",
                f"{_fmt(bare)} req/s bare aiohttp",
                f"{fw / bare:.2f}x ({per_cpu:.2f}x per CPU-s)",
                f">= {INGEST_GOAL}x bare",
                fw / bare >= INGEST_GOAL,
            )
        )


def ndjson_body(count: int) -> bytes:
    """NDJSON of `count` events for distinct recipients."""
    return "".join(json.dumps(item) + "\n" for item in batch_items(count)).encode()


async def scenario_batch(suite: Suite) -> None:
    """NDJSON batches of 100: forwarder's accepted events/s, absolute and against bare."""
    body = ndjson_body(BATCH_SIZE)
    runs = await _throughput(suite, "batch", BATCH_PATH, body, NDJSON_TYPE, BATCH_SIZE)
    suite.data["batch"] = _sample_data(runs)
    for loop, by in runs.items():
        fw = _median([s.events_per_s for s in by["forwarder"]])
        bare = _median([s.events_per_s for s in by["bare"]])
        per_cpu = _median([s.per_cpu_s for s in by["forwarder"]])
        suite.rows.append(
            Row(
                "batch, NDJSON x100",
                loop,
                f"{_fmt(fw)} ev/s ({_fmt(per_cpu)}/CPU-s)",
                f"{_fmt(bare)} ev/s bare aiohttp",
                f"{fw / bare:.2f}x ({_per_cpu_ratio(by):.2f}x per CPU-s)",
                f">= {_fmt(BATCH_GOAL_EPS)} ev/s",
                fw >= BATCH_GOAL_EPS,
            )
        )


async def _fill(port: int, total: int, recipients: int = 0) -> None:
    """Queue `total` events through POST /v1/events, 1000 a request: each for a recipient of its
    own, or spread over `recipients` (a multiple of 1000) when given."""
    bodies: dict[int, bytes] = {}
    for n in range(total // FILL_BATCH):
        first = n * FILL_BATCH % recipients if recipients else n * FILL_BATCH
        if first not in bodies:
            items = batch_items(FILL_BATCH, first_recipient=first)
            bodies[first] = http_request(
                "POST", BATCH_PATH, json.dumps(items).encode(), "application/json"
            )
    batches = [
        bodies[n * FILL_BATCH % recipients if recipients else n * FILL_BATCH]
        for n in range(total // FILL_BATCH)
    ]
    remainder = total % FILL_BATCH
    if remainder:
        items = batch_items(remainder, first_recipient=total - remainder)
        batches.append(
            http_request("POST", BATCH_PATH, json.dumps(items).encode(), "application/json")
        )
    pending = collections.deque(batches)

    async def worker() -> None:
        conn = await Conn.open(port)
        try:
            while pending:
                status, body = await conn.call(pending.popleft())
                if status != 202:
                    raise RuntimeError(f"fill: HTTP {status}: {body[:300]!r}")
        finally:
            await conn.close()

    await asyncio.gather(*(worker() for _ in range(FILL_CONNECTIONS)))


async def _wait_for(
    what: str, check: Callable[[], Awaitable[bool]], timeout: float, every: float = 0.25
) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {timeout:.0f}s")
        await asyncio.sleep(every)


async def drain_forwarder(
    suite: Suite, mock: Mock, loop: str, events: int, concurrency: int, profile: str = ""
) -> dict[str, float]:
    """Queue `events` while the mock refuses the key, then let them go; time the drain."""
    await mock.reset(REFUSED_KEY)
    daemon = await suite.daemon(
        loop,
        {
            "queue": {
                "mode": "memory",
                "max_events": max(events, 100_000),
                "max_bytes": 64 * 1024**3,
            },
            "intake": {"max_batch": FILL_BATCH},
            "remote": {
                "base_url": mock.base_url,
                "concurrency": concurrency,
                "rate_limit_per_minute": 1_000_000,
                "auth_retry_s": AUTH_PROBE_S,
                "timeout_s": 30.0,
            },
        },
        name="delivery",
    )
    try:
        await _fill(daemon.port, events)

        async def paused() -> bool:
            stats = await daemon.stats()
            held = int(stats["queue"]["depth"]) + int(stats["in_flight"])
            return held == events and bool(stats["accounts"]["default"]["paused"])

        await _wait_for("queue filled and delivery paused", paused, 60)
        cpu0, mock0 = cpu_seconds(daemon.pid), cpu_seconds(mock.process.pid)
        began = time.monotonic()
        await mock.reset(API_KEY)

        async def delivered() -> bool:
            counters = (await daemon.stats())["counters"]
            return int(counters["delivered"]) >= events

        drain = _wait_for("drained", delivered, 120 + events / 50)
        if profile:
            await suite.profile(profile, daemon.pid, drain)
        else:
            await drain
        wall = time.monotonic() - began
        cpu1, mock1 = cpu_seconds(daemon.pid), cpu_seconds(mock.process.pid)
        counters = (await daemon.stats())["counters"]
    finally:
        await daemon.kill()
        shutil.rmtree(daemon.state_dir, ignore_errors=True)
    result = _drain_result(await mock.record(), events, wall, mock1 - mock0)
    result["cpu_us_per_event"] = (cpu1 - cpu0) / events * 1e6
    result["attempts"] = float(counters["attempts"])
    return result


async def drain_bare(
    suite: Suite, mock: Mock, loop: str, events: int, concurrency: int
) -> dict[str, float]:
    """The bare client (`_bare.py deliver`) posts the same forms to the same mock."""
    await mock.reset(API_KEY)
    mock0 = cpu_seconds(mock.process.pid)
    began = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(HERE / "_bare.py"), "--loop", loop, "deliver", mock.base_url,
        "--key", API_KEY, "--events", str(events), "--concurrency", str(concurrency),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    pin(process.pid, suite.server_cpu)
    suite.track(process)
    out, _ = await asyncio.wait_for(process.communicate(), 120 + events / 50)
    wall = time.monotonic() - began
    mock1 = cpu_seconds(mock.process.pid)
    if process.returncode != 0:
        raise RuntimeError(f"the bare client failed:\n{out.decode(errors='replace')[-2000:]}")
    answer = json.loads(out.decode().strip().splitlines()[-1])
    result = _drain_result(await mock.record(), events, wall, mock1 - mock0)
    result["cpu_us_per_event"] = answer["cpu_s"] / events * 1e6
    return result


def _drain_result(
    record: dict[str, Any], events: int, wall: float, mock_cpu: float
) -> dict[str, float]:
    times = created_times(record)
    keys = {e["idempotency_key"] for e in record["events"]}
    if len(times) != events or len(keys) != events:
        raise RuntimeError(f"the mock created {len(times)} ({len(keys)} distinct) of {events}")
    # From the second event: the first is the paused lane's probe (see the module docstring).
    span = times[-1] - times[1]
    return {
        "events_per_s": (events - 1) / span if span > 0 else float("nan"),
        "span_s": span,
        "first_gap_s": times[1] - times[0],
        "wall_s": wall,
        "mock_cpu": mock_cpu / span if span > 0 else float("nan"),
    }


async def _delivery_runs(
    suite: Suite, mock: Mock, events: int, concurrency: int, profile_as: str
) -> dict[str, dict[str, list[dict[str, float]]]]:
    async def forwarder(loop: str) -> dict[str, float]:
        return await drain_forwarder(suite, mock, loop, events, concurrency)

    async def bare(loop: str) -> dict[str, float]:
        return await drain_bare(suite, mock, loop, events, concurrency)

    runs = await suite.alternate(suite.args.rounds, {"bare": bare, "forwarder": forwarder})
    if profile_as and suite.args.profile:
        for loop in suite.args.loops:
            await drain_forwarder(
                suite, mock, loop, events, concurrency, profile=f"{profile_as}-{loop}"
            )
    return runs


async def scenario_delivery(suite: Suite) -> None:
    """Drain a preloaded queue into an unlimited mock: forwarder vs the bare client loop."""
    events = suite.args.delivery_events
    mock = await suite.mock("--rate-limit", "0")
    suite.data["delivery_mock_loop"] = mock.loop
    runs = await _delivery_runs(suite, mock, events, DELIVERY_CONCURRENCY, "delivery")
    suite.data["delivery"] = runs
    for loop, by in runs.items():
        fw = _median([r["events_per_s"] for r in by["forwarder"]])
        bare = _median([r["events_per_s"] for r in by["bare"]])
        mock_cpu = _median([r["mock_cpu"] for r in by["forwarder"]])
        suite.rows.append(
            Row(
                f"delivery, {_fmt(events)} queued, c={DELIVERY_CONCURRENCY}",
                loop,
                f"{_fmt(fw)} ev/s (mock CPU {mock_cpu:.0%})",
                f"{_fmt(bare)} ev/s bare client",
                f"{fw / bare:.2f}x",
                f">= {DELIVERY_GOAL}x bare",
                fw / bare >= DELIVERY_GOAL,
            )
        )
        fw_cpu = _median([r["cpu_us_per_event"] for r in by["forwarder"]])
        bare_cpu = _median([r["cpu_us_per_event"] for r in by["bare"]])
        suite.rows.append(
            Row(
                "CPU per delivered event",
                loop,
                f"{fw_cpu:.0f} us",
                f"{bare_cpu:.0f} us bare client",
                f"{fw_cpu / bare_cpu:.2f}x",
                "reported",
                None,
            )
        )


async def scenario_latency_bound(suite: Suite) -> None:
    """A mock answering after 100 ms, concurrency 64: the rate against the 640/s it allows."""
    events = suite.args.latency_events
    mock = await suite.mock("--rate-limit", "0", "--latency-ms", str(LATENCY_MS))
    runs = await _delivery_runs(suite, mock, events, LATENCY_CONCURRENCY, "")
    suite.data["latency_bound"] = runs
    ideal = LATENCY_CONCURRENCY * 1000 / LATENCY_MS
    for loop, by in runs.items():
        fw = _median([r["events_per_s"] for r in by["forwarder"]])
        bare = _median([r["events_per_s"] for r in by["bare"]])
        suite.rows.append(
            Row(
                f"latency-bound, mock 100 ms, c={LATENCY_CONCURRENCY}",
                loop,
                f"{_fmt(fw)} ev/s",
                f"{_fmt(ideal)} ev/s ideal (bare {_fmt(bare)})",
                f"{fw / ideal:.1%}",
                f">= {LATENCY_GOAL:.0%} of {_fmt(ideal)}/s",
                fw >= LATENCY_GOAL * ideal,
            )
        )


async def scenario_memory(suite: Suite) -> None:
    """RSS with 100 000 events queued (memory mode, delivery blocked) minus idle: every event
    for a recipient of its own (per-recipient ordering's worst case), and 10 per recipient."""
    sections = _blocked_memory(2 * MEMORY_EVENTS, suite.blackhole.url)

    async def queued_rss(loop: str, recipients: int) -> dict[str, float]:
        daemon = await suite.daemon(loop, sections, name="memory")
        try:
            await asyncio.sleep(1.0)
            idle, _ = rss_mb(daemon.pid)
            await _fill(daemon.port, MEMORY_EVENTS, recipients)

            async def queued() -> bool:
                stats = await daemon.stats()
                return int(stats["queue"]["depth"]) + int(stats["in_flight"]) >= MEMORY_EVENTS

            await _wait_for("queued", queued, 60)
            await asyncio.sleep(1.0)
            full, peak = rss_mb(daemon.pid)
        finally:
            await daemon.kill()
        delta_bytes = (full - idle) * 1024 * 1024
        return {
            "idle_mib": idle,
            "full_mib": full,
            "peak_mib": peak,
            "delta_mb": delta_bytes / 1e6,
            "bytes_per_event": delta_bytes / MEMORY_EVENTS,
        }

    variants = {"distinct": 0, "10_each": MEMORY_EVENTS // 10}

    async def distinct(loop: str) -> dict[str, float]:
        return await queued_rss(loop, variants["distinct"])

    async def ten_each(loop: str) -> dict[str, float]:
        return await queued_rss(loop, variants["10_each"])

    runs = await suite.alternate(suite.args.rounds, {"distinct": distinct, "10_each": ten_each})
    suite.data["memory"] = runs
    for loop, by in runs.items():
        for variant, label in (
            ("distinct", "a recipient each"),
            ("10_each", f"{_fmt(variants['10_each'])} recipients"),
        ):
            delta = _median([r["delta_mb"] for r in by[variant]])
            per = _median([r["bytes_per_event"] for r in by[variant]])
            idle = _median([r["idle_mib"] for r in by[variant]])
            suite.rows.append(
                Row(
                    f"memory, {_fmt(MEMORY_EVENTS)} queued, {label}",
                    loop,
                    f"+{delta:.1f} MB ({per:.0f} B/event)",
                    f"idle RSS {idle:.1f} MiB",
                    "",
                    f"<= {MEMORY_GOAL_BYTES / 1e6:.0f} MB over idle",
                    delta * 1e6 <= MEMORY_GOAL_BYTES,
                )
            )


async def scenario_intake_latency(suite: Suite) -> None:
    """1 000 requests/s offered open-loop while the remote is down: answer times."""
    args = suite.args
    raw = http_request("POST", FORM_PATH, FORM_BODY, FORM_TYPE)
    # The remote is down as in production: connections refused, default breaker and retries.
    sections: dict[str, dict[str, object]] = {
        "queue": {"mode": "memory", "max_events": 1_000_000, "max_bytes": 64 * 1024**3},
        "remote": {"base_url": suite.blackhole.url, "connect_timeout_s": 1.0},
    }

    async def forwarder(loop: str) -> dict[str, float]:
        daemon = await suite.daemon(loop, sections, name="latency")
        try:
            return await paced(daemon.port, raw, PACE_PER_S, args.latency_seconds, 1.0)
        finally:
            await daemon.kill()

    async def bare(loop: str) -> dict[str, float]:
        process, port = await suite.bare_server(loop)
        try:
            return await paced(port, raw, PACE_PER_S, args.latency_seconds, 1.0)
        finally:
            await stop_process(process)

    runs = await suite.alternate(args.rounds, {"bare": bare, "forwarder": forwarder})
    suite.data["intake_latency"] = runs
    for loop, by in runs.items():
        fw = {k: _median([r[k] for r in by["forwarder"]]) for k in ("p50_ms", "p99_ms", "max_ms")}
        bare_p = {k: _median([r[k] for r in by["bare"]]) for k in ("p50_ms", "p99_ms", "max_ms")}
        suite.rows.append(
            Row(
                "intake latency, 1000 req/s, remote down",
                loop,
                f"p50 {fw['p50_ms']:.2f} / p99 {fw['p99_ms']:.2f} / max {fw['max_ms']:.1f} ms",
                f"bare p50 {bare_p['p50_ms']:.2f} / p99 {bare_p['p99_ms']:.2f} ms",
                f"{fw['p99_ms'] / bare_p['p99_ms']:.2f}x p99",
                f"p99 <= {PACE_P99_GOAL_MS:g} ms",
                fw["p99_ms"] <= PACE_P99_GOAL_MS,
            )
        )


class RedisProc:
    """A `redis-server` for the fleet scenario, on a free port in the work directory."""

    def __init__(self, work: Path) -> None:
        self.port = free_port()
        self.directory = work / f"redis-{self.port}"
        self.process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        server = shutil.which("redis-server")
        if server is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = await asyncio.create_subprocess_exec(
            server, "--port", str(self.port), "--bind", "127.0.0.1",
            "--dir", str(self.directory), "--appendonly", "yes", "--appendfsync", "always",
            "--save", "", "--maxmemory-policy", "noeviction", "--loglevel", "warning",
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.close()
                return
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            await asyncio.sleep(0.05)


async def _fleet_run(suite: Suite, loop: str, redis_url: str, window_s: float) -> dict[str, Any]:
    """3 hosts against one limited account for 6 windows; what the mock saw, and the hosts."""
    windows = 6
    mock = await suite.mock(
        "--rate-limit", str(FLEET_RATE_PER_MIN), "--window-s", f"{window_s:g}"
    )  # fmt: skip
    rate = FLEET_RATE_PER_MIN / 60.0
    per_host = int(rate * window_s * (windows + 2))  # more than the account lets through
    hosts = []
    for n in range(FLEET_HOSTS):
        sections: dict[str, dict[str, object]] = {
            "remote": {"base_url": mock.base_url, "rate_limit_per_minute": FLEET_RATE_PER_MIN},
        }
        if redis_url:
            sections["fleet"] = {"redis_url": redis_url, "member": f"bench-{n}"}
        hosts.append(await suite.daemon(loop, sections, name=f"fleet{n}"))
    for n, host in enumerate(hosts):
        items = batch_items(per_host, first_recipient=n * 1_000_000)
        body = http_request("POST", BATCH_PATH, json.dumps(items).encode(), "application/json")
        conn = await Conn.open(host.port)
        try:
            status, answer = await conn.call(body)
        finally:
            await conn.close()
        if status != 202:
            raise RuntimeError(f"fleet fill: HTTP {status}: {answer[:200]!r}")
    began = time.time()
    await asyncio.sleep(window_s * windows + 0.5)
    record = await mock.record()
    stats = [await call_json(host.port, "GET", "/v1/stats") for host in hosts]
    await suite.close()
    times = created_times(record)
    if not times:
        raise RuntimeError("fleet: nothing was delivered")
    first = times[0]
    # The windows after the first, as the mock counted them from the first request.
    start, end = first + window_s, first + window_s * windows
    delivered = sum(1 for t in times if start <= t < end)
    mock_stats = record["stats"]
    limited_late = mock_stats["rate_limited"] and (mock_stats["last_rate_limited_at"] or 0) >= start
    budget_calls = sum(
        account["rate_limit"].get("redis_calls", 0)
        for host in stats
        for account in host["accounts"].values()
    )
    redis_calls = sum(host.get("fleet", {}).get("redis_calls", 0) for host in stats)
    redis_seconds = sum(host.get("fleet", {}).get("redis_seconds", 0.0) for host in stats)
    created = len(times)
    return {
        "began": began,
        "delivered_share": delivered / ((end - start) * rate),
        "delivered_after_first": delivered,
        "created": created,
        "rate_limited": mock_stats["rate_limited"],
        "rate_limited_after_first_window": bool(limited_late),
        "window_counts": mock_stats["window_counts"],
        "budget_calls_per_event": budget_calls / created,
        "redis_calls_per_event": redis_calls / created,
        "redis_us_per_call": 1e6 * redis_seconds / redis_calls if redis_calls else 0.0,
        "per_host_delivered": [host["counters"]["delivered"] for host in stats],
    }


async def _budget_call_us(redis_url: str, calls: int = 2000) -> float:
    """Mean wall time of one budget script call from this process (idle host, loopback Redis):
    what a batch costs without the load of a delivering daemon around it."""
    from forwarder.config.schema import FleetConfig
    from forwarder.fleet.budget import RedisRateBudget
    from forwarder.fleet.connection import connect
    from forwarder.fleet.mode import FleetMode

    fleet = connect(
        FleetConfig(redis_url=redis_url, key_prefix="benchcost"), member="bench", password=None
    )
    try:
        budget = RedisRateBudget("cost", 60_000_000, fleet=fleet, mode=FleetMode())
        await budget._call(1)  # connects and loads the script
        began = time.perf_counter()
        for _ in range(calls):
            await budget._call(1)
        return 1e6 * (time.perf_counter() - began) / calls
    finally:
        await fleet.aclose()


async def scenario_fleet(suite: Suite) -> None:
    """3 hosts, one limited account: sharing the budget through Redis, and each on its own."""
    window_s = 2.0 if suite.args.quick else 5.0
    loop = suite.args.loops[-1]
    redis = RedisProc(suite.work)
    await redis.start()
    assert redis.process is not None
    try:
        fleet = await _fleet_run(suite, loop, redis.url, window_s)
        _progress(f"  fleet:    {_short(fleet)} {fleet['window_counts']}")
        alone = await _fleet_run(suite, loop, "", window_s)
        _progress(f"  no fleet: {_short(alone)} {alone['window_counts']}")
        idle_us = await _budget_call_us(redis.url)
    finally:
        await stop_process(redis.process, 10.0)
    suite.data["fleet"] = {
        "window_s": window_s,
        "fleet": fleet,
        "no_fleet": alone,
        "idle_budget_call_us": idle_us,
    }
    quota = FLEET_RATE_PER_MIN * window_s / 60
    label = f"fleet, 3 hosts, {FLEET_RATE_PER_MIN}/min in {window_s:g} s windows"
    late_429 = "429s after the 1st window"
    suite.rows.append(
        Row(
            label,
            loop,
            f"{fleet['delivered_share']:.1%} of the limit, {fleet['rate_limited']} x 429"
            f" ({'some' if fleet['rate_limited_after_first_window'] else 'none'} late)",
            f"no fleet: {alone['delivered_share']:.1%}, {alone['rate_limited']} x 429"
            f" ({'some' if alone['rate_limited_after_first_window'] else 'none'} late)",
            f"max window {max(fleet['window_counts'])}/{quota:g}",
            f">= {FLEET_GOAL:.0%}, no {late_429}",
            fleet["delivered_share"] >= FLEET_GOAL and not fleet["rate_limited_after_first_window"],
        )
    )
    suite.rows.append(
        Row(
            "fleet: the shared budget's cost",
            loop,
            f"{fleet['budget_calls_per_event']:.2f} budget calls/event",
            f"{fleet['redis_calls_per_event']:.2f} Redis calls/event with heartbeats",
            f"{fleet['redis_us_per_call']:.0f} us/call in the run, {idle_us:.0f} idle",
            "reported",
            None,
        )
    )


RUNNERS: dict[str, Callable[[Suite], Awaitable[None]]] = {
    "ingest": scenario_ingest,
    "batch": scenario_batch,
    "delivery": scenario_delivery,
    "latency_bound": scenario_latency_bound,
    "memory": scenario_memory,
    "intake_latency": scenario_intake_latency,
    "fleet": scenario_fleet,
}


# --- the run ------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """What this ran on."""
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    try:
        import uvloop

        uv = str(vars(uvloop).get("__version__", "?"))
    except ImportError:
        uv = "not installed"
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "uvloop": uv,
        "kernel": platform.release(),
        "loadavg_start": Path("/proc/loadavg").read_text().split()[:3],
    }


async def run(args: argparse.Namespace) -> Suite:
    """Every chosen scenario in turn; the suite with its rows and data."""
    server_cpu, pinning = pin_load_generator()
    work = Path(tempfile.mkdtemp(prefix="fwbench-suite-"))
    wrk = shutil.which("wrk") if args.load in ("auto", "wrk") else None
    if args.load == "wrk" and wrk is None:
        raise SystemExit("--load wrk: wrk is not installed (apt-get install wrk)")
    suite = Suite(args, work, server_cpu, Load(wrk, args.connections, work), Blackhole())
    suite.data["pinning"] = pinning
    suite.data["load_generator"] = suite.load.name
    _progress(pinning)
    _progress(f"load: {suite.load.name}; work dir {work}")
    try:
        for name in args.only:
            _progress(f"scenario {name}")
            try:
                await RUNNERS[name](suite)
            except (RuntimeError, OSError, TimeoutError) as exc:
                _progress(f"scenario {name} failed: {exc}")
                suite.rows.append(
                    Row(name, "-", f"did not complete: {exc}"[:80], "", "", "", False)
                )
                suite.data.setdefault("errors", {})[name] = str(exc)
            finally:
                await suite.close()
    finally:
        await suite.close()
        suite.blackhole.close()
        if args.keep:
            _progress(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return suite


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options, with --quick's smaller defaults filled in."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="2 rounds, 2 s, 10 000 to drain")
    parser.add_argument(
        "--only", action="append", default=[], help=f"a scenario ({', '.join(SCENARIOS)})"
    )
    parser.add_argument("--rounds", type=int, default=0, help="rounds (3; quick 2)")
    parser.add_argument("--seconds", type=float, default=0, help="per throughput run (5; quick 2)")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--delivery-events", type=int, default=0, help="50 000; quick 10 000")
    parser.add_argument("--latency-events", type=int, default=0, help="6 400; quick 1 920")
    parser.add_argument("--latency-seconds", type=float, default=0, help="paced run (15; quick 5)")
    parser.add_argument("--loops", default="", help="comma-separated (default: both if uvloop)")
    parser.add_argument("--load", choices=["auto", "wrk", "python"], default="auto")
    parser.add_argument("--profile", action="store_true", help="py-spy profiles (extra runs)")
    parser.add_argument("--out", default="bench-results.json")
    parser.add_argument("--keep", action="store_true", help="keep the work dir and daemon logs")
    args = parser.parse_args(argv)
    chosen = [name for item in args.only for name in item.split(",") if name]
    unknown = sorted(set(chosen) - set(SCENARIOS))
    if unknown:
        parser.error(
            f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}"
        )
    args.only = [s for s in SCENARIOS if s in chosen] if chosen else list(SCENARIOS)
    args.rounds = args.rounds or (2 if args.quick else 3)
    args.seconds = args.seconds or (2.0 if args.quick else 5.0)
    args.delivery_events = args.delivery_events or (10_000 if args.quick else 50_000)
    args.latency_events = args.latency_events or (1_920 if args.quick else 6_400)
    args.latency_seconds = args.latency_seconds or (5.0 if args.quick else 15.0)
    if args.loops:
        args.loops = [loop for loop in args.loops.split(",") if loop]
    else:
        try:
            import uvloop  # noqa: F401
        except ImportError:
            args.loops = ["asyncio"]
        else:
            args.loops = ["asyncio", "uvloop"]
    bad = sorted(set(args.loops) - {"asyncio", "uvloop"})
    if bad:
        parser.error(f"unknown loop(s) {', '.join(bad)}")
    args.profile_dir = str(Path(args.out).with_suffix("")) + "-profiles"
    return args


def main() -> int:
    """Run the suite, print the table, write the JSON."""
    args = parse_args()
    for var in [v for v in os.environ if v.startswith("FORWARDER_")]:
        del os.environ[var]
    command = shlex.join([sys.executable, *sys.argv])
    version = code_version()
    began = time.monotonic()
    info = machine()
    suite = asyncio.run(run(args))
    info["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    elapsed = time.monotonic() - began
    print()
    print(f"command: {command}")
    print(f"code: {version} at start, {code_version()} at end")
    print(
        f"machine: {info['nproc']} CPUs ({info['cpu_model']}), Python {info['python']}, "
        f"uvloop {info['uvloop']}; load average {' '.join(info['loadavg_start'])} at start, "
        f"{' '.join(info['loadavg_end'])} at end"
    )
    print(f"{suite.data['pinning']}; load: {suite.data['load_generator']}")
    print(
        f"rounds: {args.rounds} (medians), {args.seconds:g} s per throughput run; "
        f"{'quick' if args.quick else 'full'} run in {elapsed:.0f} s"
    )
    print()
    print(render(suite.rows))
    for name, prof in suite.profiles.items():
        print(f"\nprofile {name}: {prof.get('file', prof.get('error'))}")
        if prof.get("samples"):
            packages = prof["self_by_package"].items()
            print("  self by package: " + ", ".join(f"{p} {n:.0%}" for p, n in packages))
            modules = prof["forwarder_modules_inclusive"].items()
            print(
                "  inside forwarder modules: " + ", ".join(f"{m[10:]} {n:.0%}" for m, n in modules)
            )
            for func, share in prof["top_self"][:8]:
                print(f"  {share:6.1%}  {func}")
    verdict = all(row.ok is not False for row in suite.rows)
    print(f"\noverall: {'PASS' if verdict else 'FAIL'}; results in {args.out}")
    Path(args.out).write_text(
        json.dumps(
            {
                "command": command,
                "code": version,
                "machine": info,
                "quick": args.quick,
                "rounds": args.rounds,
                "loops": args.loops,
                "elapsed_s": elapsed,
                "rows": [{**asdict(row), "verdict": row.verdict} for row in suite.rows],
                "data": suite.data,
                "profiles": suite.profiles,
            },
            indent=2,
            default=str,
        )
    )
    return 0 if verdict else 1


if __name__ == "__main__":
    sys.exit(main())
