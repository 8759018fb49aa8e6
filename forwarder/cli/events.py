"""`forwarder events show ID`: what became of one event, asked of the running daemon.

Asked over the daemon's HTTP address or Unix socket (GET /v1/events/{id}), not read from the
spool: only the daemon knows the events in memory and in delivery, and memory mode keeps
outcomes nowhere else.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any
from urllib.parse import quote

from forwarder.cli.daemonclient import Target, Unreachable, request_once


def fail(message: str, code: int) -> int:
    """Print an error for the command line; returns the exit code."""
    print(f"forwarder: {message}", file=sys.stderr)
    return code


def cmd_events_show(args: argparse.Namespace) -> int:
    """Print what became of one event, as the running daemon's GET /v1/events/{id} says."""
    token = os.environ.get("FORWARDER_INTAKE_AUTH_TOKEN", "")
    return asyncio.run(_events_show(args.url, args.socket, args.id, args.timeout, token))


async def _events_show(
    url: str, socket_path: str | None, key: str, timeout: float, token: str = ""
) -> int:
    # Asked of the daemon, not read from the spool: only the daemon knows the events in memory
    # and in delivery, and memory mode keeps outcomes nowhere else.
    target = Target(url, socket_path, token)
    try:
        status, raw = await request_once(
            target, "GET", f"/v1/events/{quote(key, safe='')}", timeout_s=timeout
        )
    except Unreachable as exc:
        return fail(f"cannot reach forwarder at {target.describe()}: {exc}", 1)
    body = raw.decode(errors="replace")
    try:
        answer = json.loads(body)
    except ValueError:
        answer = None
    if status != 200 or not isinstance(answer, dict) or not isinstance(answer.get("data"), dict):
        message = answer.get("error") if isinstance(answer, dict) else body[:200]
        return fail(f"{key}: {message} (HTTP {status})", 1)
    width = max(len(name) for name in answer["data"])
    for name, value in answer["data"].items():
        shown = "" if value is None else value
        print(f"{name:<{width}}  {shown}")
    return 0


def add_events_commands(sub: Any) -> None:
    """Register `events show` on the `forwarder` parser's subcommands."""
    docs = "Docs: docs/reference/http-api.md"
    events = sub.add_parser("events", help="ask the running daemon about events", epilog=docs)
    events_sub = events.add_subparsers(dest="events_command", required=True)
    show = events_sub.add_parser(
        "show",
        help="what became of one event: queued, in_delivery, delivered (the remote's id) or"
        " dead_lettered (token: $FORWARDER_INTAKE_AUTH_TOKEN, if set)",
        epilog=docs,
    )
    show.add_argument("id", help="the event's number (the drop-in answer's data) or event_id")
    where = show.add_mutually_exclusive_group()
    where.add_argument("--url", default="http://127.0.0.1:8787", help="daemon's HTTP address")
    where.add_argument("--socket", help="daemon's Unix socket path")
    show.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    show.set_defaults(func=cmd_events_show)
