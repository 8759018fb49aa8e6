"""Durability benchmark: what `[queue] mode = "durable"` costs at intake, and what a backlog costs.

1. Accepted events per second, durable vs memory mode, in the same run on the same machine:
   (a) single events (`POST /v1/recipientEvents/create`, a form, over many keep-alive
   connections) and (b) batches of 100 (`POST /v1/events`). Each round starts a memory-mode and
   a durable-mode daemon side by side (fresh state dirs, killed afterwards) and measures them in
   alternating short slices, a memory slice and a durable slice making a pair (which goes first
   alternates). The verdict takes the median of the pairs' ratios: this shared VM's speed drifts
   by half within a minute, and the two slices of a pair are seconds apart. Runs of a few
   seconds, a daemon start apart, gave ratios from 0.45 to 0.9 for the same code; paired 1.5 s
   slices still range about 0.5-1.0, so it takes a dozen pairs for a median to mean something.
   Goals: durable >= 0.5x memory for single events, >= 0.8x for batches of 100.
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
        [--slices N] [--windows MS,MS...] [--connections C] [--events N] [--max-events N]
        [--out FILE]

Defaults: 3 rounds of 4 pairs of 1.5 s slices (after 0.3 s of warm-up each), 1 000 000 events.
`--quick`: 1 round of 2 pairs of 1 s, 100 000 events. The ratio of the modes' medians is
printed too. Exit status 0 when every goal passes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

# The script runs with its own directory on sys.path; mypy sees the file as tests.benchmarks.*.
if TYPE_CHECKING:
    from tests.benchmarks._common import (
        MB,
        Blackhole,
        Conn,
        Daemon,
        Sample,
        batch_request,
        blocked_delivery,
        form_request,
        measure,
        pin_load_generator,
        rss_mb,
        start_daemon,
    )
else:
    from _common import (
        MB,
        Blackhole,
        Conn,
        Daemon,
        Sample,
        batch_request,
        blocked_delivery,
        form_request,
        measure,
        pin_load_generator,
        rss_mb,
        start_daemon,
    )

SINGLE_GOAL = 0.5
BATCH_GOAL = 0.8
RSS_GOAL_MB = 100.0
FILL_BATCH = 1000
FILL_CONNECTIONS = 4


@dataclass
class Setup:
    """What every daemon of this run shares: where delivery goes, cores, the work directory."""

    work: Path
    blackhole_url: str
    daemon_cpu: int | None
    started: list[Daemon] = field(default_factory=list)

    async def start(
        self,
        name: str,
        *,
        mode: str,
        max_events: int,
        state: Path | None = None,
        group_commit_ms: float | None = None,
    ) -> Daemon:
        """Start `forwarder run` with delivery blocked and wait until /healthz answers."""
        window = {} if group_commit_ms is None else {"group_commit_ms": group_commit_ms}
        daemon = await start_daemon(
            self.work,
            name,
            {
                "queue": {
                    "mode": mode,
                    "max_events": max_events,
                    "max_disk_bytes": 16 * 1024 * MB,
                    # Room in memory for everything one measurement accepts (memory mode).
                    "max_bytes": 64 * 1024 * MB,
                    **window,
                },
                **blocked_delivery(self.blackhole_url),
                "shutdown": {"timeout_s": 1.0},
                "log": {"level": "warning", "format": "json"},
            },
            cpu=self.daemon_cpu,
            state_dir=state,
        )
        self.started.append(daemon)
        return daemon

    async def cleanup(self) -> None:
        """Kill whatever is still running."""
        for daemon in self.started:
            with contextlib.suppress(ProcessLookupError, TimeoutError):
                await daemon.kill()


# -- 1. intake throughput -----------------------------------------------------------------------


async def throughput(setup: Setup, args: argparse.Namespace) -> dict[str, Any]:
    """Every workload in both modes: per round a memory and a durable daemon side by side,
    measured in alternating short slices, so that each durable slice has a memory slice of the
    same minute of the machine next to it (a shared VM's speed drifts by a factor of 1.5 within
    a minute: the paired ratio is what the verdict takes).

    With `--windows A,B,...` a durable daemon runs for each `queue.group_commit_ms`, each paired
    with the same memory slices; the first window's is the one the verdict takes ("durable").
    """
    workloads: dict[str, tuple[bytes, int]] = {
        "single": (form_request(), 1),
        "batch100": (batch_request(100), 100),
    }
    windows: dict[str, float | None] = {"durable": args.windows[0] if args.windows else None}
    windows.update({f"durable {ms:g} ms": ms for ms in args.windows[1:]})
    variants = ["memory", *windows]
    samples: dict[str, dict[str, list[Sample]]] = {w: {v: [] for v in variants} for w in workloads}
    paired: dict[str, dict[str, list[float]]] = {w: {v: [] for v in windows} for w in workloads}
    blocked_attempts = 0
    for workload, (raw, per_request) in workloads.items():
        for rnd in range(args.rounds):
            # Room for everything one round accepts, in all daemons alike.
            daemons = {
                "memory": await setup.start(
                    f"tp-{workload}-memory-{rnd}", mode="memory", max_events=20_000_000
                )
            }
            for n, (name, ms) in enumerate(windows.items()):
                daemons[name] = await setup.start(
                    f"tp-{workload}-durable{n}-{rnd}",
                    mode="durable",
                    max_events=20_000_000,
                    group_commit_ms=ms,
                )
            try:
                for pair in range(args.slices):
                    # Rotate which goes first, against a drift within the slice.
                    turn = (rnd * args.slices + pair) % len(variants)
                    got: dict[str, Sample] = {}
                    for name in variants[turn:] + variants[:turn]:
                        daemon = daemons[name]
                        got[name] = await measure(
                            daemon.port,
                            daemon.pid,
                            raw,
                            per_request,
                            args.connections,
                            args.seconds,
                            args.warmup,
                        )
                        samples[workload][name].append(got[name])
                    line = f"  round {rnd + 1}.{pair + 1} {workload:<9}"
                    line += f"  memory {got['memory'].events_per_s:>8.0f} ev/s"
                    for name in windows:
                        ratio = got[name].events_per_s / got["memory"].events_per_s
                        paired[workload][name].append(ratio)
                        line += f"  {name} {got[name].events_per_s:>8.0f} ({ratio:.3f})"
                    print(line)
                for daemon in daemons.values():
                    blocked_attempts += int((await daemon.stats())["counters"]["attempts"])
            finally:
                for daemon in daemons.values():
                    await daemon.kill()
                    shutil.rmtree(daemon.state_dir, ignore_errors=True)
    result: dict[str, Any] = {"blocked_delivery_attempts": blocked_attempts, "workloads": {}}
    result["windows_ms"] = {name: ms for name, ms in windows.items()}
    result["paired_ratios"] = {w: [round(r, 3) for r in by["durable"]] for w, by in paired.items()}
    result["paired_median"] = {w: statistics.median(by["durable"]) for w, by in paired.items()}
    result["paired_median_by_window"] = {
        w: {name: statistics.median(rs) for name, rs in by.items()} for w, by in paired.items()
    }
    for workload, by_mode in samples.items():
        result["workloads"][workload] = {
            mode: {
                "events_per_s": statistics.median(s.events_per_s for s in runs),
                "daemon_cpu": statistics.median(s.server_cpu for s in runs),
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


async def _run(args: argparse.Namespace, report: Callable[[str], None]) -> dict[str, Any]:
    daemon_cpu, pinning = pin_load_generator()
    work = Path(tempfile.mkdtemp(prefix="fwbench-spool-", dir=args.dir))
    # Bound, never listening: every connection to it is refused at once, and no one else gets it.
    hole = Blackhole()
    blackhole = hole.url
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
            f"\n1. intake throughput: {args.rounds} rounds x {args.slices} pairs of"
            f" {args.seconds:g}s slices (after {args.warmup:g}s warm-up each),"
            f" {args.connections} keep-alive connections, a memory and a durable daemon side by"
            " side per round, queue.max_events 20 000 000 in both modes"
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
        tp = results["throughput"]
        by = tp["workloads"][workload]
        of_medians = by["durable"]["events_per_s"] / by["memory"]["events_per_s"]
        ratio = tp["paired_median"][workload]
        pairs = tp["paired_ratios"][workload]
        checks.append(
            (
                f"durable/memory events/s, {workload}",
                f"{ratio:.2f}, the median of {len(pairs)} paired slices (goal >= {goal});"
                f" slices {min(pairs):.2f}-{max(pairs):.2f}; ratio of the modes' medians"
                f" {of_medians:.2f}",
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
    parser.add_argument("--quick", action="store_true", help="100 000 events, 1 round, 2 pairs")
    parser.add_argument("--seconds", type=float, default=None, help="per slice (1.5; quick 1)")
    parser.add_argument("--warmup", type=float, default=0.3, help="before each slice")
    parser.add_argument("--rounds", type=int, default=None, help="daemon pairs (3; quick 1)")
    parser.add_argument("--slices", type=int, default=None, help="pairs per round (4; quick 2)")
    parser.add_argument(
        "--windows",
        type=lambda text: [float(ms) for ms in text.split(",")],
        default=[],
        help="queue.group_commit_ms of the durable daemon (default: the config's); several,"
        " comma-separated, run side by side against the same memory slices (the first decides)",
    )
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--events", type=int, default=None)
    parser.add_argument("--max-events", type=int, default=100_000)
    parser.add_argument("--dir", default=None, help="where the state dirs go (default: $TMPDIR)")
    parser.add_argument("--keep", action="store_true", help="keep the state dirs and logs")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    args.seconds = args.seconds or (1.0 if args.quick else 1.5)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.slices = args.slices or (2 if args.quick else 4)
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
    by_window = results["throughput"]["paired_median_by_window"]
    if len(results["throughput"]["windows_ms"]) > 1:
        print("\npaired median of durable/memory by queue.group_commit_ms:")
        for workload, medians in by_window.items():
            print(f"  {workload:<10}" + "  ".join(f"{n}: {r:.3f}" for n, r in medians.items()))
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
