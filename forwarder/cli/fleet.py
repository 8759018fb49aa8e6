"""`forwarder fleet …`: the fleet as Redis holds it, read straight from Redis (no daemon asked).

`forwarder fleet status` lists the members (last heartbeat, mode, in delivery, partitions
held), each account's shared budget (limit, remaining, paused until) and shared queue (stream
length, pending, dead letters; cli/fleetqueue.py); `--json` prints the same as JSON.
`forwarder fleet drain` / `undrain` are cli/fleetqueue.py's.
Exit status: 0 when read, 2 when there is no fleet configured or Redis cannot be reached.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import orjson

from forwarder.cli.fleetqueue import (
    add_queue_commands,
    on_fleet,
    read_queues,
    render_queues,
)
from forwarder.config.schema import Config
from forwarder.fleet.budget import read_budgets
from forwarder.fleet.host import open_client
from forwarder.fleet.members import read_members

DOCS = "docs/how-to/fleet.md"


def add_command(sub: Any, config_help: str) -> None:
    """Register `forwarder fleet` and its subcommands on the CLI's subparsers."""
    fleet = sub.add_parser(
        "fleet",
        help="the fleet on Redis: members and the accounts' shared rate budgets",
        epilog=f"Docs: {DOCS}",
    )
    commands = fleet.add_subparsers(dest="fleet_command", required=True)
    status = commands.add_parser(
        "status",
        help="members (last heartbeat, mode, in delivery) and shared budgets",
        description="Read the fleet's state from Redis (fleet.redis_url of the config). "
        "Exit status: 0 read, 2 no fleet configured or Redis unreachable.",
        epilog=f"Docs: {DOCS}",
    )
    status.add_argument("--config", help=config_help)
    status.add_argument("--json", action="store_true", help="print the state as JSON")
    status.set_defaults(func=cmd_fleet_status)
    add_queue_commands(commands, config_help, DOCS)


def cmd_fleet_status(args: argparse.Namespace) -> int:
    """`forwarder fleet status`."""
    done = on_fleet(args, "status", read_fleet)
    if isinstance(done, int):
        return done
    _config, state = done
    if args.json:
        sys.stdout.write(orjson.dumps(state, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        sys.stdout.write(render(state))
    return 0


async def read_fleet(config: Config) -> dict[str, Any]:
    """Members and budgets of the fleet `config` names."""
    fleet, _ = await open_client(config)
    try:
        return {
            "key_prefix": config.fleet.key_prefix,
            "members": await read_members(fleet),
            "budgets": await read_budgets(fleet),
            "queue": await fleet.call("queue_status", lambda: read_queues(fleet.client, config)),
        }
    finally:
        await fleet.aclose()


def render(state: dict[str, Any]) -> str:
    """The state as plain tables: members, shared budgets, the shared queue."""
    lines = [f"fleet {state['key_prefix']}", "", "members:"]
    members = state["members"]
    if not members:
        lines.append("  (none)")
    held = state["queue"]["partitions_held"]
    for m in members:
        live = "live" if m["live"] else "gone"
        lines.append(
            f"  {m['member']:<24} {live:<4}  heartbeat {m['last_heartbeat_s']:>8.1f}s ago  "
            f"mode {m['mode'] or '?':<8}  in delivery {m['in_delivery']}  "
            f"partitions {held.get(m['member'], 0)}  {m['version']}"
        )
    lines += ["", "shared budgets:"]
    budgets = state["budgets"]
    if not budgets:
        lines.append("  (none)")
    for name, b in budgets.items():
        paused = f"paused {b['paused_for_s']:.1f}s" if b["paused_for_s"] else "not paused"
        lines.append(
            f"  {name:<24} limit {b['limit_per_window']}/{b['window_s']:g}s  "
            f"remaining {b['remaining']}  {paused}  429s {b['rate_limited']}"
        )
    lines += ["", *render_queues(state["queue"])]
    return "\n".join(lines) + "\n"
