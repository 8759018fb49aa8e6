"""Fault soak: many clients send to a real `forwarder run` while the remote misbehaves.

`forwarder mock-remote` answers 20% of requests with a transient fault: 5xx (10%), a dropped
connection (5%), an event created but never answered, held past forwarder's `remote.timeout_s`
(4%), and a 429 with `Retry-After` as if another client had spent the quota (1%). Clients send
single form posts and JSON batches of 1-20 events, each with an `event_id` of their own, faster
than the faulty remote takes them, so intake also refuses (503 `queue_full` in memory mode,
`spool_full` in durable mode, where the events carry a few KiB of `data` to fill the spool).
A client never resends: a refused event stays refused. When the clients stop, the daemon drains.
Then, from the mock's record, forwarder's `/v1/stats`, `/metrics` and its log:

- every event that got a 202 was created exactly once (a repeat with its idempotency key met a
  409 and created nothing), with the fields that were sent; nothing else was created, so no
  refused event reached the remote;
- every refusal was a 503 with `Retry-After`, reported to its client, and forwarder counted
  exactly those events as refused, by reason;
- forwarder's counters agree with the clients, the mock and themselves: accepted = what got a
  202, delivered = accepted = created at the mock, nothing dead-lettered, attempts = delivered +
  retries, one `retrying` line per retry and one `delivered` line per event, and `/metrics`
  says what `/v1/stats` says;
- every 409 forwarder counted as a duplicate was a 409 the mock answered for a created key, and
  there are at least as many as events whose creating answer the mock withheld; forwarder saw a
  timeout for every hang and for every answer that came too late for it (the differences
  between what the mock answered and what forwarder counted).

The CI test (`tests/e2e/test_soak_faults.py`) runs a few seconds of it per queue mode through the
conftest fixtures; this script runs it at length (not collected by pytest: not `test_*.py`):

    .venv/bin/python tests/benchmarks/soak_faults.py [--seconds 60] [--clients 16] [--mode both]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

KEY = "soak-faults-key-0123456789"
# The mock's faults: 20% of requests, from every transient kind forwarder retries.
FAULTS: dict[str, float] = {
    "fail_rate": 0.10,  # 500/502/503, nothing created
    "reset_rate": 0.05,  # connection dropped, nothing created
    "timeout_rate": 0.04,  # created, then held past forwarder's timeout: the retry meets 409
    "throttle_rate": 0.01,  # 429 + Retry-After, nothing created; closes the lane ~1 s
}
LATENCY_MS = 5
# One-second rate windows: an injected 429's Retry-After (the rest of the window) is 1 s.
WINDOW_S = 1
REMOTE_TIMEOUT_S = 0.5  # the hung answers are given up on after this
CLIENT_TIMEOUT_S = 30.0  # intake answers in milliseconds; this only catches a hang
REFUSE_REASONS = ("queue_full", "spool_full")
# A durable event's padding: ~250 of them fill the smallest allowed spool (1 MiB).
DURABLE_PAD_CHARS = 4000


@dataclass(frozen=True)
class Plan:
    """One soak run's shape."""

    mode: str  # "memory" or "durable"
    clients: int
    seconds: float
    events_per_s_per_client: float = 40.0
    # Requests in flight: fixed, for the interleavings; 0 is forwarder's default, adaptive,
    # which a 20% failure rate keeps near its minimum (each failure halves it).
    concurrency: int = 16
    seed: int = 20261126

    @property
    def pad_chars(self) -> int:
        """Characters of `data` padding per event (durable mode fills the spool with them)."""
        return DURABLE_PAD_CHARS if self.mode == "durable" else 0


def mock_flags(seed: int) -> list[str]:
    """`forwarder mock-remote` flags for the faults above (port and key are the caller's)."""
    flags = ["--rate-limit", "0", "--window-s", str(WINDOW_S), "--latency-ms", str(LATENCY_MS)]
    for name, rate in FAULTS.items():
        flags += [f"--{name.replace('_', '-')}", str(rate)]
    return [*flags, "--seed", str(seed)]


def daemon_sections(mode: str, concurrency: int) -> dict[str, dict[str, object]]:
    """forwarder's settings for a soak (on top of listen address, base URL and state dir)."""
    # Small bounds so intake refuses under the load: in memory mode the queue, in durable mode
    # the spool (1 MiB, the least allowed), with a window of 100 events over it.
    queue: dict[str, object] = (
        {"mode": "durable", "max_events": 100, "max_disk_bytes": 1_048_576}
        if mode == "durable"
        else {"mode": "memory", "max_events": 300}
    )
    return {
        "queue": queue,
        "remote": {
            "timeout_s": REMOTE_TIMEOUT_S,
            "connect_timeout_s": REMOTE_TIMEOUT_S,
            "rate_limit_per_minute": 1_000_000,
            "concurrency": concurrency,
            "breaker_probe_initial_s": 0.25,
            "breaker_probe_max_s": 1.0,
        },
        "retry": {"initial_backoff_s": 0.05, "max_backoff_s": 0.5, "max_elapsed_s": 120.0},
        "log": {"level": "info", "format": "json"},
    }


@dataclass
class Ledger:
    """What the clients know about every event they sent."""

    sent: dict[str, dict[str, str]] = field(default_factory=dict)  # by event_id
    accepted: set[str] = field(default_factory=set)  # got a 202
    refused: set[str] = field(default_factory=set)  # got a 503
    refused_by_reason: Counter[str] = field(default_factory=Counter)  # events, by the 503's reason
    unknown: set[str] = field(default_factory=set)  # no answer (must stay empty)
    other_statuses: Counter[int] = field(default_factory=Counter)  # must stay empty
    errors: Counter[str] = field(default_factory=Counter)
    requests: int = 0
    refusals: int = 0  # 503 answers
    refusals_without_retry_after: int = 0


async def _post(
    http: aiohttp.ClientSession,
    rng: random.Random,
    client: int,
    plan: Plan,
    ledger: Ledger,
    url: str,
) -> tuple[list[str], float]:
    """One request of 1-20 events, recorded in the ledger; returns its ids and a pause."""
    single = rng.random() < 0.3
    count = 1 if single else rng.randint(1, 20)
    items: list[dict[str, str]] = []
    for _ in range(count):
        event_id = f"soak-{plan.mode}-c{client}-{len(ledger.sent) + 1:08d}"
        item = {
            "event_id": event_id,
            "recipient_id": f"r{client}-{rng.randrange(50)}",
            "name": rng.choice(("PAGE_VIEW", "PRODUCT_VIEW", "SIGNUP", "PURCHASE")),
            "value": f"{rng.uniform(1, 500):.2f}",
        }
        if plan.pad_chars:
            item["data"] = json.dumps({"pad": "x" * plan.pad_chars, "n": len(ledger.sent)})
        ledger.sent[event_id] = item
        items.append(item)
    ids = [item["event_id"] for item in items]
    ledger.requests += 1
    timeout = aiohttp.ClientTimeout(total=CLIENT_TIMEOUT_S)
    try:
        if single:
            context = http.post(f"{url}/v1/recipientEvents/create", data=items[0], timeout=timeout)
        else:
            context = http.post(f"{url}/v1/events", json=items, timeout=timeout)
        async with context as response:
            body: dict[str, Any] = await response.json()
            if response.status == 202:
                got = [body["data"]["id"]] if single else body["data"]["ids"]
                if got != ids:
                    ledger.errors["202 for other ids"] += 1
                ledger.accepted.update(ids)
                return ids, 0.0
            if response.status == 503:
                ledger.refusals += 1
                ledger.refused.update(ids)
                ledger.refused_by_reason[str(body.get("reason"))] += len(ids)
                if "Retry-After" not in response.headers:
                    ledger.refusals_without_retry_after += 1
                # An app would come back after Retry-After; this one comes back sooner, with
                # new events, to keep the pressure on.
                return ids, rng.uniform(0.05, 0.25)
            ledger.other_statuses[response.status] += 1
            ledger.refused.update(ids)
            return ids, 0.1
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        ledger.errors[type(exc).__name__] += 1
        ledger.unknown.update(ids)
        return ids, 0.1


async def _client(
    client: int, url: str, plan: Plan, ledger: Ledger, stop_at: float, seed: int
) -> None:
    """Send at the plan's pace until `stop_at` (loop time); never resend an event."""
    rng = random.Random(seed)
    loop = asyncio.get_running_loop()
    next_at = loop.time()
    async with aiohttp.ClientSession() as http:
        while loop.time() < stop_at:
            ids, pause = await _post(http, rng, client, plan, ledger, url)
            next_at = max(next_at + len(ids) / plan.events_per_s_per_client, loop.time() + pause)
            await asyncio.sleep(max(0.0, next_at - loop.time()))


async def drive(url: str, plan: Plan) -> Ledger:
    """Run the plan's clients against the daemon at `url` (http://host:port)."""
    ledger = Ledger()
    stop_at = asyncio.get_running_loop().time() + plan.seconds
    await asyncio.gather(
        *(_client(n, url, plan, ledger, stop_at, plan.seed + n) for n in range(plan.clients))
    )
    return ledger


async def _get_json(http: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with http.get(url) as response:
        body: dict[str, Any] = await response.json()
        return body


async def settle(url: str, timeout: float) -> dict[str, Any]:
    """Wait until every accepted event is delivered or dead-lettered and the spool is empty."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    stats: dict[str, Any] = {}
    async with aiohttp.ClientSession() as http:
        while loop.time() < deadline:
            stats = await _get_json(http, f"{url}/v1/stats")
            c = stats["counters"]
            settled = c["accepted"] == c["delivered"] + sum(c["dead_lettered"].values())
            if settled and not stats["in_flight"] and not stats["spool"].get("spool_events"):
                return stats
            await asyncio.sleep(0.2)
    raise AssertionError(f"not settled after {timeout}s: {stats}")


@dataclass
class Observed:
    """forwarder's and the mock's view at the end."""

    stats: dict[str, Any]
    metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float]
    record: dict[str, Any]

    def metric(self, name: str, **labels: str) -> float:
        """One sample's value (0 if absent)."""
        return self.metrics.get((name, tuple(sorted(labels.items()))), 0.0)

    def metric_sum(self, name: str) -> float:
        """The sum of a metric over all its label values."""
        return sum(v for (n, _), v in self.metrics.items() if n == name)


async def observe(url: str, mock_root: str) -> Observed:
    """Read /v1/stats, /metrics and the mock's record."""
    async with aiohttp.ClientSession() as http:
        stats = await _get_json(http, f"{url}/v1/stats")
        async with http.get(f"{url}/metrics") as response:
            text = await response.text()
        record = await _get_json(http, f"{mock_root}/_mock/events")
    metrics = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    return Observed(stats, metrics, record)


def fault_kind(line: dict[str, Any]) -> str:
    """The kind of transient failure a `retrying` log line reports."""
    status = line.get("status")
    if status == 429:
        return "429"
    if isinstance(status, int) and status >= 500:
        return "5xx"
    if str(line.get("error", "")).startswith("timeout"):
        return "timeout"
    if status is None:
        return "dropped"
    return f"other {status}"


def verify(
    plan: Plan, ledger: Ledger, seen: Observed, logs: Iterable[dict[str, Any]]
) -> tuple[dict[str, Any], list[str]]:
    """The soak's checks: (figures, problems); no problems means every invariant held."""
    problems: list[str] = []

    def expect(ok: bool, what: str) -> None:
        if not ok:
            problems.append(what)

    lines = list(logs)
    retried = Counter(fault_kind(r) for r in lines if r.get("event") == "retrying")
    delivered_lines = [r for r in lines if r.get("event") == "delivered"]
    duplicate_ids = {r["event_id"] for r in delivered_lines if r.get("duplicate")}
    dead_lines = [r for r in lines if r.get("event") == "dead_lettered"]

    c = seen.stats["counters"]
    mock = seen.record["stats"]
    created = Counter(e["idempotency_key"] for e in seen.record["events"])
    conflicted = {d["idempotency_key"] for d in seen.record["duplicates"]}
    accepted, refused = ledger.accepted, ledger.refused

    # The clients' side: every request got a 202 or a 503 with Retry-After.
    expect(not ledger.unknown, f"{len(ledger.unknown)} events got no answer: {ledger.errors}")
    expect(not ledger.other_statuses, f"answers other than 202/503: {ledger.other_statuses}")
    expect(not ledger.errors, f"client errors: {ledger.errors}")
    expect(not ledger.refusals_without_retry_after, "a 503 without Retry-After")
    expect(set(ledger.refused_by_reason) <= set(REFUSE_REASONS), f"{ledger.refused_by_reason}")
    expect(not accepted & refused, "an event both accepted and refused")
    expect(bool(accepted), "nothing accepted")

    # The remote's side: each accepted event created once, as sent; nothing else created.
    twice = {k: n for k, n in created.items() if n > 1}
    expect(not twice, f"created more than once: {list(twice.items())[:5]}")
    missing = accepted - set(created)
    expect(not missing, f"{len(missing)} accepted events never created: {sorted(missing)[:5]}")
    refused_created = refused & set(created)
    expect(not refused_created, f"refused events created: {sorted(refused_created)[:5]}")
    stray = set(created) - accepted
    expect(not stray, f"created but never accepted: {sorted(stray)[:5]}")
    for event in seen.record["events"]:
        sent = ledger.sent.get(event["idempotency_key"], {})
        fields = {k: v for k, v in sent.items() if k != "event_id"}
        if {k: event[k] for k in fields} != fields:
            problems.append(f"created with other fields: {event['idempotency_key']}")
            break
    expect(conflicted <= set(created), "a 409 for a key that created nothing")

    # forwarder's counters: against the clients, the mock, its log and each other.
    refused_by_reason = {r: int(n) for r, n in c["refused"].items() if n}
    expect(c["accepted"] == len(accepted), f"accepted {c['accepted']} != {len(accepted)}")
    expect(
        refused_by_reason == dict(ledger.refused_by_reason),
        f"refused {refused_by_reason} != clients' {dict(ledger.refused_by_reason)}",
    )
    expect(c["delivered"] == len(accepted) == mock["created"], "delivered != accepted != created")
    expect(not any(c["dead_lettered"].values()) and not dead_lines, "dead letters")
    expect(
        c["attempts"] == c["delivered"] + c["retries"],
        f"attempts {c['attempts']} != delivered {c['delivered']} + retries {c['retries']}",
    )
    expect(sum(retried.values()) == c["retries"], f"retrying lines {retried} != {c['retries']}")
    expect(len(delivered_lines) == c["delivered"], "a delivered line per delivered event")
    expect(len(duplicate_ids) == c["duplicates"], "a duplicate=true line per 409 counted")
    # A 409 forwarder counts is one the mock answered, for a key it created; every event whose
    # creating answer the mock withheld (a hang) ends delivered by such a 409.
    expect(duplicate_ids <= conflicted, "forwarder counted a 409 the mock never answered")
    expect(
        mock["timeouts"] <= c["duplicates"] <= mock["duplicates"],
        f"hangs {mock['timeouts']} <= duplicates {c['duplicates']} <= 409s {mock['duplicates']}",
    )
    expect(mock["requests"] <= c["attempts"], "the mock saw more requests than were attempted")
    expect(retried["5xx"] <= mock["failed"], "more 5xx seen than the mock answered")
    rate_limited = seen.metric_sum("forwarder_account_rate_limited_total")
    expect(rate_limited == retried["429"], f"429s: metric {rate_limited} != log {retried['429']}")
    expect(retried["429"] <= mock["throttled"] + mock["rate_limited"], "more 429s than answered")
    # An answer the mock gave but forwarder never read (it came after forwarder's timeout, on a
    # loaded machine) shows up as one of these differences; each was a timeout for forwarder,
    # on top of one per hang.
    late = {
        "created": c["duplicates"] - mock["timeouts"],
        "409": mock["duplicates"] - c["duplicates"],
        "5xx": mock["failed"] - retried["5xx"],
        "429": mock["throttled"] + mock["rate_limited"] - retried["429"],
    }
    expect(
        retried["timeout"] >= mock["timeouts"] + sum(late.values()),
        f"timeouts {retried['timeout']} < hangs {mock['timeouts']} + late answers {late}",
    )
    # /metrics and /v1/stats are read from the same counters.
    for metric, value in (
        ("forwarder_events_accepted_total", c["accepted"]),
        ("forwarder_events_delivered_total", c["delivered"]),
        ("forwarder_events_duplicate_total", c["duplicates"]),
        ("forwarder_delivery_attempts_total", c["attempts"]),
        ("forwarder_delivery_retries_total", c["retries"]),
        ("forwarder_events_refused_total", sum(refused_by_reason.values())),
        ("forwarder_events_dead_lettered_total", 0),
        ("forwarder_account_delivered_total", c["delivered"]),
    ):
        expect(seen.metric_sum(metric) == value, f"{metric} {seen.metric_sum(metric)} != {value}")
    for reason, count in refused_by_reason.items():
        got = seen.metric("forwarder_events_refused_total", reason=reason)
        expect(got == count, f"refused{{reason={reason}}} {got} != {count}")

    report = {
        "mode": plan.mode,
        "clients": plan.clients,
        "concurrency": plan.concurrency or "adaptive",
        "requests": ledger.requests,
        "events_sent": len(ledger.sent),
        "accepted": len(accepted),
        "refused": dict(ledger.refused_by_reason),
        "refusals_503": ledger.refusals,
        "created": mock["created"],
        "remote_requests": mock["requests"],
        "faults_at_mock": {
            "5xx": mock["failed"],
            "dropped": mock["resets"],
            "hung": mock["timeouts"],
            "429": mock["throttled"] + mock["rate_limited"],
        },
        "retries_by_kind": dict(sorted(retried.items())),
        "attempts": c["attempts"],
        "retries": c["retries"],
        "duplicates_409": {"absorbed_at_mock": mock["duplicates"], "counted": c["duplicates"]},
        "answers_after_forwarder_timeout": {k: v for k, v in late.items() if v},
        "breaker_opened": seen.metric_sum("forwarder_account_breaker_opened_total"),
    }
    return report, problems


def summary_line(report: dict[str, Any], seconds: float, ok: bool) -> str:
    """One line with the figures that matter."""
    faults = report["faults_at_mock"]
    return (
        f"soak_faults {report['mode']}: {report['accepted']} events accepted by "
        f"{report['clients']} clients in {seconds:.0f}s, {sum(report['refused'].values())} "
        f"refused (503), {report['created']} created once each; faults "
        f"5xx {faults['5xx']} / dropped {faults['dropped']} / hung {faults['hung']} / "
        f"429 {faults['429']} of {report['remote_requests']} requests; retries "
        f"{report['retries']}, 409s absorbed {report['duplicates_409']['absorbed_at_mock']}; "
        f"invariants {'held' if ok else 'BROKEN'}"
    )


# --- the script: its own mock and daemon ------------------------------------------------------


async def _spawn(args: list[str], env: dict[str, str], out: Path) -> asyncio.subprocess.Process:
    with out.open("ab") as sink:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "forwarder", *args,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
            stdout=sink, stderr=asyncio.subprocess.STDOUT, stdin=asyncio.subprocess.DEVNULL,
        )  # fmt: skip


async def _line(path: Path, marker: str, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in path.read_text().splitlines():
            if marker in line:
                return line
        await asyncio.sleep(0.05)
    raise AssertionError(f"no {marker!r} in {path} after {timeout}s")


def _toml(sections: dict[str, dict[str, object]]) -> str:
    lines: list[str] = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


def _logs(path: Path) -> list[dict[str, Any]]:
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


async def _stop(process: asyncio.subprocess.Process) -> int:
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
    return await asyncio.wait_for(process.wait(), 30)


async def soak(plan: Plan, tmp: Path) -> tuple[dict[str, Any], list[str]]:
    """One run: a mock, a daemon, the clients, the drain and the checks."""
    mock_log, daemon_log = tmp / f"mock-{plan.mode}.log", tmp / f"daemon-{plan.mode}.log"
    mock = await _spawn(
        ["mock-remote", "--port", "0", "--api-key", KEY, *mock_flags(plan.seed)], {}, mock_log
    )
    daemon: asyncio.subprocess.Process | None = None
    try:
        base_url = (await _line(mock_log, "listening on")).split()[-1]
        sections = daemon_sections(plan.mode, plan.concurrency)
        sections["intake"] = {"http_listen": "127.0.0.1:0", "drop_in_answer": "accepted"}
        sections["remote"]["base_url"] = base_url
        sections["state"] = {"dir": str(tmp / f"state-{plan.mode}")}
        config = tmp / f"forwarder-{plan.mode}.toml"
        config.write_text(_toml(sections))
        daemon = await _spawn(
            ["run", "--config", str(config)], {"FORWARDER_API_KEY": KEY}, daemon_log
        )
        started = json.loads(await _line(daemon_log, '"started"'))
        url = next(a for a in started["listening"] if a.startswith("http://"))
        began = time.monotonic()
        ledger = await drive(url, plan)
        await settle(url, timeout=120 + plan.seconds)
        drained_s = time.monotonic() - began
        seen = await observe(url, base_url.removesuffix("/v1"))
        assert await _stop(daemon) == 0, "the daemon did not stop cleanly"
        report, problems = verify(plan, ledger, seen, _logs(daemon_log))
        report["seconds_sending"] = plan.seconds
        report["seconds_until_drained"] = round(drained_s, 1)
        return report, problems
    finally:
        if daemon is not None and daemon.returncode is None:
            daemon.kill()
        await _stop(mock)


def main() -> int:
    """Run the soak in one or both queue modes; exit 1 if an invariant broke."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="sending time per mode")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--mode", choices=("memory", "durable", "both"), default="both")
    parser.add_argument("--rate", type=float, default=40.0, help="events/s offered per client")
    parser.add_argument("--concurrency", type=int, default=16, help="forwarder's; 0 = adaptive")
    parser.add_argument("--seed", type=int, default=Plan.seed, help="clients' and faults' seed")
    args = parser.parse_args()
    modes = ("memory", "durable") if args.mode == "both" else (args.mode,)
    failed = False
    for mode in modes:
        plan = Plan(mode, args.clients, args.seconds, args.rate, args.concurrency, args.seed)
        with tempfile.TemporaryDirectory(prefix="fwfaults") as tmp:
            report, problems = asyncio.run(soak(plan, Path(tmp)))
        print(json.dumps(report, indent=2))
        for problem in problems:
            print(f"PROBLEM: {problem}")
        print(summary_line(report, args.seconds, not problems), flush=True)
        failed = failed or bool(problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
