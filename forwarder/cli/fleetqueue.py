"""`forwarder fleet` for the shared queue (queue.mode "fleet"): what `fleet status` adds (each
account's streams: length, pending, dead letters; the partitions each member holds) and
`forwarder fleet drain MEMBER` / `undrain MEMBER`.

`drain` names a member in `{P}:drain`: at its next ownership round (within fleet.lease_s / 3)
it stops loading, waits for what it has in delivery, and releases its partitions, handing its
unsettled entries to the members that take them; it takes none until it is undrained or starts
again. Exit status: 0 done, 2 no fleet configured or Redis unreachable.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from forwarder.config.load import load_config
from forwarder.config.schema import Config, ConfigError
from forwarder.fleet import queuestatus
from forwarder.fleet.connection import RedisUnavailable
from forwarder.fleet.host import open_client

EX_UNAVAILABLE = 2
T = TypeVar("T")


def add_queue_commands(commands: Any, config_help: str, docs: str) -> None:
    """Register `drain` and `undrain` on `forwarder fleet`'s subcommands."""
    for name, helptext in (
        ("drain", "hand a member's partitions of the shared queue to the others before a stop"),
        ("undrain", "let a drained member take partitions again"),
    ):
        command = commands.add_parser(name, help=helptext, epilog=f"Docs: {docs}")
        command.add_argument("member", help="the member's name (fleet.member, else its host name)")
        command.add_argument("--config", help=config_help)
        command.set_defaults(func=cmd_drain if name == "drain" else cmd_undrain)


async def read_queues(client: Any, config: Config) -> dict[str, Any]:
    """The shared queue's part of `fleet status`: per account, its streams; per member, the
    partitions it holds; the consumers and the drained members."""
    prefix, partitions = config.fleet.key_prefix, config.fleet.partitions
    accounts = await queuestatus.known_accounts(client, prefix, list(config.account_names()))
    queues = [await queuestatus.account_queue(client, prefix, a, partitions) for a in accounts]
    held: dict[str, int] = {}
    for queue in queues:
        for p in queue.partitions:
            if p.holder:
                name = p.holder.rsplit(" ", 1)[0]
                held[name] = held.get(name, 0) + 1
    consumers, drained = await queuestatus.consumers(client, prefix)
    return {
        "accounts": [q.to_dict() for q in queues],
        "partitions_held": held,
        "consumers": consumers,
        "drained": drained,
    }


def render_queues(state: dict[str, Any]) -> list[str]:
    """The shared queue's lines of `fleet status`."""
    lines = ["shared queue:"]
    if not state["accounts"]:
        lines.append("  (none)")
    for account in state["accounts"]:
        lines.append(
            f"  {account['account']:<24} stream {account['length']}  pending "
            f"{account['pending']}  dead letters {account['dead_letters']}"
        )
    held = state["partitions_held"]
    consumers = ", ".join(f"{m} ({held.get(m, 0)} partitions)" for m in state["consumers"])
    lines.append(f"  consumers: {consumers or '(none)'}")
    if state["drained"]:
        lines.append(f"  drained: {', '.join(state['drained'])}")
    return lines


def on_fleet(
    args: argparse.Namespace, what: str, work: Callable[[Config], Coroutine[Any, Any, T]]
) -> tuple[Config, T] | int:
    """The config, and what `work` read or did on the fleet's Redis; or, when there is no
    fleet or no Redis, the exit code after one line on stderr saying why."""
    try:
        config = load_config(Path(args.config) if args.config else None)
        if not config.fleet.enabled:
            raise ConfigError("fleet.redis_url is not set: this host is in no fleet")
        return config, asyncio.run(work(config))
    except ConfigError as exc:
        print(f"forwarder fleet {what}: {exc}", file=sys.stderr)
    except RedisUnavailable as exc:
        print(f"forwarder fleet {what}: cannot reach Redis: {exc}", file=sys.stderr)
    return EX_UNAVAILABLE


def _run(args: argparse.Namespace, what: str, drain: bool) -> int:
    done = on_fleet(args, what, lambda config: _drain(config, args.member, drain))
    if isinstance(done, int):
        return done
    config, changed = done
    if drain:
        print(
            f"{args.member} is drained: it hands its partitions to the others within "
            f"{config.fleet.lease_s / 3:g} s and takes none until undrained or started again"
        )
    else:
        print(
            f"{args.member} takes partitions again" if changed else f"{args.member} was not drained"
        )
    return 0


async def _drain(config: Config, member: str, drain: bool) -> bool:
    fleet, _ = await open_client(config)
    prefix = config.fleet.key_prefix
    try:
        if drain:
            await fleet.call("drain", lambda: queuestatus.drain(fleet.client, prefix, member))
            return True
        return await fleet.call(
            "undrain", lambda: queuestatus.undrain(fleet.client, prefix, member)
        )
    finally:
        await fleet.aclose()


def cmd_drain(args: argparse.Namespace) -> int:
    """`forwarder fleet drain MEMBER`."""
    return _run(args, "drain", drain=True)


def cmd_undrain(args: argparse.Namespace) -> int:
    """`forwarder fleet undrain MEMBER`."""
    return _run(args, "undrain", drain=False)
