"""`forwarder status`: is the running daemon healthy? One read of /v1/stats, judged and drawn.

The verdict is also the exit status, so the command works as a monitoring check:
0 healthy, 1 degraded (not ready, a breaker open, a key refused, an old event), 2 unreachable.
`--json` prints the verdict with the daemon's own figures; `--watch` redraws a live view on a
terminal (rich), with per-account rates taken from successive reads.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import enum
import os
import sys
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from forwarder.cli.daemonclient import Target, Unreachable, request
from forwarder.config.load import load_config
from forwarder.config.schema import ConfigError
from forwarder.ops.credentials import resolve_intake_token

# An event this old is worth a look, even while it is flowing: at the default 300 requests a
# minute, an hour is a backlog of 18 000 events. The remote forgets idempotency keys after 24 h.
DEFAULT_MAX_AGE_S = 3600.0
EX_USAGE = 64  # sysexits.h: the command was used wrongly (--watch off a terminal)
DOCS = "docs/monitoring.md"


class Verdict(enum.IntEnum):
    """Health as an exit status."""

    HEALTHY = 0
    DEGRADED = 1
    UNREACHABLE = 2


@dataclass(frozen=True)
class Reading:
    """One answer of /v1/stats and when it came (monotonic seconds)."""

    stats: dict[str, Any]
    at: float


@dataclass
class Report:
    """A reading judged: the verdict, what is wrong, and the figures a person reads."""

    verdict: Verdict
    problems: list[str]
    target: str
    stats: dict[str, Any] = field(default_factory=dict)
    # account -> delivered per minute (from two reads in --watch, else the daemon's own figure)
    rates: dict[str, float] = field(default_factory=dict)
    error: str = ""

    def as_json(self) -> dict[str, Any]:
        """For `--json`: the verdict first, then the daemon's figures as it gave them."""
        return {
            "verdict": self.verdict.name.lower(),
            "exit_code": int(self.verdict),
            "problems": self.problems,
            "target": self.target,
            "error": self.error,
            "delivered_per_min": self.rates,
            "stats": self.stats,
        }


def locate(
    config_path: str | None,
    url: str | None,
    socket_path: str | None,
    environ: Mapping[str, str] | None = None,
) -> Target:
    """Find the daemon: `--socket`/`--url` if given, else the config's Unix socket or TCP address.

    The intake token comes from the config's sources (or FORWARDER_INTAKE_AUTH_TOKEN); a config
    that cannot be read is an error only when it is needed to find the daemon.
    """
    env: Mapping[str, str] = os.environ if environ is None else environ
    try:
        config = load_config(Path(config_path) if config_path else None, env)
        key = resolve_intake_token(config, env)
        token = key.secret.reveal() if key is not None else ""
    except ConfigError:
        if not (url or socket_path):
            raise
        config, token = None, env.get("FORWARDER_INTAKE_AUTH_TOKEN", "")
    if socket_path:
        return Target("http://localhost", socket_path, token)
    if url:
        return Target(url.rstrip("/"), None, token)
    assert config is not None
    if config.intake.unix_socket:
        return Target("http://localhost", config.intake.unix_socket, token)
    tcp = config.intake.tcp_address
    if tcp is None:
        raise ConfigError("intake: no listener configured; give --url or --socket")
    host, port = tcp
    host = "127.0.0.1" if host in ("", "0.0.0.0") else host
    host = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return Target(f"http://{host}:{port}", None, token)


async def read(session: aiohttp.ClientSession, target: Target, timeout_s: float) -> Reading:
    """GET /v1/stats once; Unreachable when there is no such daemon or it answers no JSON."""
    status, body = await request(session, target, "GET", "/v1/stats", timeout_s=timeout_s)
    if status != 200:
        raise Unreachable(f"/v1/stats answered HTTP {status}")
    try:
        stats = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise Unreachable("/v1/stats did not answer JSON") from exc
    if not isinstance(stats, dict):
        raise Unreachable("/v1/stats did not answer a JSON object")
    return Reading(stats, time.monotonic())


def _rates(now: Reading, before: Reading | None) -> dict[str, float]:
    accounts: dict[str, Any] = now.stats.get("accounts", {})
    if before is None or now.at <= before.at:
        return {name: float(view.get("delivered_per_min", 0.0)) for name, view in accounts.items()}
    previous: dict[str, Any] = before.stats.get("accounts", {})
    minutes = (now.at - before.at) / 60.0
    rates = {}
    for name, view in accounts.items():
        delta = view.get("delivered", 0) - previous.get(name, {}).get("delivered", 0)
        rates[name] = max(0.0, delta / minutes)
    return rates


def assess(
    now: Reading, before: Reading | None, target: str, max_age_s: float = DEFAULT_MAX_AGE_S
) -> Report:
    """Judge one reading: degraded when not ready, a breaker is open, a key refused, or old."""
    stats = now.stats
    problems: list[str] = []
    delivery = stats.get("delivery", {})
    if not delivery.get("ready", False):
        problems.append(f"not ready: {delivery.get('reason') or 'no reason given'}")
    for name, view in sorted(stats.get("accounts", {}).items()):
        if view.get("retired"):
            continue
        if view.get("breaker", {}).get("state") == "open" and "circuit breaker" not in str(
            delivery.get("reason")
        ):
            problems.append(f"account {name}: circuit breaker open")
        if view.get("paused") and "paused" not in str(delivery.get("reason")):
            problems.append(f"account {name}: key refused: {view.get('pause_reason', '')}")
    age = float(stats.get("oldest_event_age_s", 0.0))
    if age > max_age_s:
        problems.append(
            f"oldest undelivered event is {_duration(age)} old (threshold {_duration(max_age_s)})"
        )
    verdict = Verdict.DEGRADED if problems else Verdict.HEALTHY
    return Report(verdict, problems, target, stats, _rates(now, before))


def unreachable(target: Target, error: str) -> Report:
    """The report when no daemon answered."""
    return Report(
        Verdict.UNREACHABLE, [f"no answer from {target.describe()}"], target.describe(), error=error
    )


# --- drawing --------------------------------------------------------------------------------


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h {minutes:02d}m"
    return f"{hours // 24}d {hours % 24}h"


def _size(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GiB"


_STYLE = {Verdict.HEALTHY: "bold green", Verdict.DEGRADED: "bold yellow"}
_STYLE[Verdict.UNREACHABLE] = "bold red"


def render(report: Report) -> Group:
    """The few lines a person reads at a glance (the same for a one-shot and for --watch)."""
    head = Text()
    head.append(report.verdict.name, style=_STYLE[report.verdict])
    stats = report.stats
    if report.verdict is Verdict.UNREACHABLE:
        head.append(f"  forwarder at {report.target}: {report.error or 'no answer'}")
        return Group(head)
    head.append(f"  forwarder {stats.get('version', '?')} at {report.target}")
    head.append(f", up {_duration(float(stats.get('uptime_s', 0)))}")
    lines: list[Text | Table] = [head]
    lines.extend(Text(f"  ! {problem}", style="yellow") for problem in report.problems)
    queue, spool = stats.get("queue", {}), stats.get("spool", {})
    counters = stats.get("counters", {})
    lines.append(
        Text(
            f"queue {spool.get('mode', '?')}: backlog {stats.get('backlog_events', 0)}, "
            f"oldest {_duration(float(stats.get('oldest_event_age_s', 0.0)))}, "
            f"in memory {queue.get('depth', 0)} of {queue.get('max_events', '?')} "
            f"({_size(float(queue.get('bytes', 0)))}), "
            f"spool {spool.get('spool_events', 0)} events, "
            f"{_size(float(spool.get('spool_bytes', 0)))}"
        )
    )
    dead: Counter[str] = Counter(counters.get("dead_lettered", {}))
    top = ", ".join(f"{reason} {n}" for reason, n in dead.most_common(3)) or "none"
    lines.append(
        Text(f"dead letters: {spool.get('spool_dead_letters', 0)} kept; since start: {top}")
    )
    table = Table(box=box.SIMPLE, pad_edge=False, show_edge=False)
    table.add_column("account", no_wrap=True)
    for column in ("delivered/min", "limit/min", "queued", "in delivery", "sending/limit"):
        table.add_column(column, justify="right", no_wrap=True)
    for column in ("breaker", "429s", "paused"):
        table.add_column(column, justify="right", no_wrap=True)
    for name, view in sorted(stats.get("accounts", {}).items()):
        rate = view.get("rate_limit", {})
        window = float(rate.get("window_s", 60.0)) or 60.0
        limit = float(rate.get("limit_per_window", 0)) * 60.0 / window
        conc = view.get("concurrency", {})
        paused = "key refused" if view.get("paused") else ""
        if not paused and float(rate.get("paused_for_s", 0.0)) > 0:
            paused = f"429: {_duration(float(rate['paused_for_s']))}"
        table.add_row(
            name,
            f"{report.rates.get(name, 0.0):.1f}",
            f"{limit:.0f}",
            str(view.get("queued", 0)),
            str(view.get("in_delivery", 0)),
            f"{conc.get('sending', 0)}/{conc.get('limit', 0)}",
            str(view.get("breaker", {}).get("state", "?")),
            str(rate.get("rate_limited", 0)),
            paused or "-",
        )
    lines.append(table)
    last = stats.get("last_error")
    if isinstance(last, dict):
        ago = _duration(time.time() - float(last.get("at", time.time())))
        lines.append(Text(f"last error {ago} ago ({last.get('account')}): {last.get('error')}"))
    else:
        lines.append(Text("last error: none since start"))
    return Group(*lines)


# --- the command ----------------------------------------------------------------------------


async def _once(target: Target, timeout_s: float, max_age_s: float) -> Report:
    async with target.session() as session:
        try:
            reading = await read(session, target, timeout_s)
        except Unreachable as exc:
            return unreachable(target, str(exc))
    return assess(reading, None, target.describe(), max_age_s)


async def _watch(target: Target, args: argparse.Namespace, last: list[Report]) -> None:
    """Redraw until Ctrl-C; `last` keeps the latest report, so the exit status is its verdict."""
    before: Reading | None = None
    async with target.session() as session:
        with Live(render(last[-1]), auto_refresh=False) as live:
            while True:
                try:
                    now = await read(session, target, args.timeout)
                    last.append(assess(now, before, target.describe(), args.max_age))
                    before = now
                except Unreachable as exc:
                    last.append(unreachable(target, str(exc)))
                    before = None
                del last[:-1]
                live.update(render(last[-1]), refresh=True)
                await asyncio.sleep(args.interval)


def cmd_status(args: argparse.Namespace) -> int:
    """Print the daemon's health; the exit status is the verdict (0, 1 or 2)."""
    if args.watch and not sys.stdout.isatty():
        print(
            "forwarder status: --watch redraws a terminal, and standard output is not one; "
            "use --json (or no option) in scripts",
            file=sys.stderr,
        )
        return EX_USAGE
    try:
        target = locate(args.config, args.url, args.socket)
    except ConfigError as exc:
        print(f"forwarder status: config error: {exc}", file=sys.stderr)
        return int(Verdict.UNREACHABLE)
    if args.watch:
        last = [unreachable(target, "not read yet")]
        # Ctrl-C ends a watch (asyncio.run cancels it and re-raises KeyboardInterrupt here);
        # the last picture stays on the screen and its verdict is the exit status.
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_watch(target, args, last))
        return int(last[-1].verdict)
    report = asyncio.run(_once(target, args.timeout, args.max_age))
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(report.as_json(), option=orjson.OPT_INDENT_2) + b"\n")
    else:
        # Off a terminal (a log, a monitoring check) lines are not wrapped at all.
        console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)
        console.print(render(report))
    return int(report.verdict)


def add_command(sub: Any, config_help: str) -> None:
    """Register `forwarder status` on the CLI's subparsers."""
    status = sub.add_parser(
        "status",
        help="is the running daemon healthy? exit 0 healthy, 1 degraded, 2 unreachable",
        description=(
            "Read the running daemon's /v1/stats and print its health at a glance. "
            f"Exit status: 0 healthy, 1 degraded, 2 unreachable. See {DOCS}."
        ),
        epilog=f"Docs: {DOCS}",
    )
    status.add_argument("--config", help=config_help)
    where = status.add_mutually_exclusive_group()
    where.add_argument("--url", help="daemon's HTTP address (default: from the config)")
    where.add_argument("--socket", help="daemon's Unix socket path (default: from the config)")
    out = status.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print the verdict and figures as JSON")
    out.add_argument("--watch", action="store_true", help="redraw live on a terminal, like top")
    status.add_argument(
        "--interval", type=float, default=2.0, help="seconds between reads in --watch (default 2)"
    )
    status.add_argument(
        "--max-age",
        type=float,
        default=DEFAULT_MAX_AGE_S,
        help="degraded when the oldest undelivered event is older, seconds (default 3600)",
    )
    status.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    status.set_defaults(func=cmd_status)
