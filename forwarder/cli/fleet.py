"""`forwarder fleet …`: the fleet as Redis holds it, read straight from Redis (no daemon asked).

`forwarder fleet status` lists the members (last heartbeat, mode, in delivery) and each
account's shared budget (limit, remaining, paused until); `--json` prints the same as JSON.
Exit status: 0 when read, 2 when there is no fleet configured or Redis cannot be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

import orjson

from forwarder.config.load import load_config
from forwarder.config.schema import Config, ConfigError
from forwarder.fleet.budget import read_budgets
from forwarder.fleet.connection import RedisUnavailable, connect
from forwarder.fleet.host import member_name
from forwarder.fleet.members import read_members
from forwarder.ops.credentials import resolve_redis_password

DOCS = "docs/how-to/fleet.md"
EX_UNAVAILABLE = 2


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


def cmd_fleet_status(args: argparse.Namespace) -> int:
    """`forwarder fleet status`."""
    try:
        config = load_config(Path(args.config) if args.config else None)
        if not config.fleet.enabled:
            raise ConfigError("fleet.redis_url is not set: this host is in no fleet")
        state = asyncio.run(read_fleet(config))
    except ConfigError as exc:
        print(f"forwarder fleet status: {exc}", file=sys.stderr)
        return EX_UNAVAILABLE
    except RedisUnavailable as exc:
        print(f"forwarder fleet status: cannot reach Redis: {exc}", file=sys.stderr)
        return EX_UNAVAILABLE
    if args.json:
        sys.stdout.write(orjson.dumps(state, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        sys.stdout.write(render(state))
    return 0


async def read_fleet(config: Config) -> dict[str, Any]:
    """Members and budgets of the fleet `config` names."""
    password = await asyncio.to_thread(resolve_redis_password, config)
    fleet = connect(config.fleet, member=member_name(config), password=password)
    try:
        return {
            "key_prefix": config.fleet.key_prefix,
            "members": await read_members(fleet),
            "budgets": await read_budgets(fleet),
        }
    finally:
        await fleet.aclose()


def render(state: dict[str, Any]) -> str:
    """The state as two plain tables."""
    lines = [f"fleet {state['key_prefix']}", "", "members:"]
    members = state["members"]
    if not members:
        lines.append("  (none)")
    for m in members:
        live = "live" if m["live"] else "gone"
        lines.append(
            f"  {m['member']:<24} {live:<4}  heartbeat {m['last_heartbeat_s']:>8.1f}s ago  "
            f"mode {m['mode'] or '?':<8}  in delivery {m['in_delivery']}  {m['version']}"
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
    return "\n".join(lines) + "\n"
