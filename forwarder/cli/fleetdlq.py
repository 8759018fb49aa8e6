"""`forwarder dlq` in queue.mode "fleet": the dead letters in Redis (`{P:A}:dead` streams).

Every listing says its source (`source: redis` in text, `"source": "redis"` in JSON); `--spool`
reads this host's local spool instead (dead letters from before fleet mode, or written while
Redis was unreachable at a stop). Ids are "ACCOUNT/ENTRY-ID".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from forwarder.config.load import load_config
from forwarder.config.schema import Config
from forwarder.fleet import deadletters
from forwarder.fleet.connection import RedisUnavailable
from forwarder.fleet.host import open_client
from forwarder.fleet.queuestatus import known_accounts

T = TypeVar("T")


def fleet_config(args: argparse.Namespace) -> Config | None:
    """The config, if the dead letters are Redis's (queue.mode "fleet", no `--spool`)."""
    if getattr(args, "spool", False):
        return None
    config = load_config(Path(args.config) if args.config else None)
    return config if config.queue.mode == "fleet" else None


# A whole listing, replay or purge: long ones are fine, a frozen Redis is not (each socket
# operation has its own 1 s bound too, so an unreachable server fails within seconds).
WORK_TIMEOUT_S = 300.0
EX_UNAVAILABLE = 2


def _run(config: Config, work: Callable[[Any], Awaitable[T]]) -> T:
    """`work` on the fleet's Redis; Redis unreachable: one line on stderr and exit status 2."""

    async def main() -> T:
        fleet, _ = await open_client(config)
        try:
            return await fleet.call("dlq", lambda: work(fleet.client), WORK_TIMEOUT_S)
        finally:
            await fleet.aclose()

    try:
        return asyncio.run(main())
    except RedisUnavailable as exc:
        print(f"forwarder dlq: cannot reach Redis: {exc}", file=sys.stderr)
        raise SystemExit(EX_UNAVAILABLE) from None


def _iso(moment: float | None) -> str:
    if not moment:
        return "-"
    return datetime.fromtimestamp(moment, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _source(config: Config) -> str:
    prefix = config.fleet.key_prefix
    return f"source: redis (streams {{{prefix}:ACCOUNT}}:dead)"


async def _accounts(client: Any, config: Config) -> list[str]:
    return await known_accounts(client, config.fleet.key_prefix, list(config.account_names()))


def cmd_list(args: argparse.Namespace, config: Config) -> int:
    """List the fleet's dead letters, oldest first per account."""

    async def work(client: Any) -> list[deadletters.FleetDeadLetter]:
        accounts = await _accounts(client, config)
        return await deadletters.list_letters(
            client, config.fleet.key_prefix, accounts, limit=args.limit
        )

    letters = _run(config, work)
    if args.since is not None:
        letters = [x for x in letters if x.dead_lettered_at >= args.since]
    if args.reason:
        letters = [x for x in letters if x.fields.get("reason") == args.reason]
    if not args.json:
        print(_source(config))
        print("id\tdead_lettered_at\treason\tstatus\taccount\tevent_id\trecipient\tname\terror")
    for letter in letters:
        record = letter.to_dict()
        if args.json:
            print(json.dumps(record, ensure_ascii=False))
            continue
        event = record["event"] or {}
        print(
            f"{letter.id}\t{_iso(letter.dead_lettered_at)}\t{record['reason']}\t"
            f"{record['status'] if record['status'] is not None else '-'}\t"
            f"{event.get('account') or '-'}\t{event.get('event_id', '-')}\t"
            f"{event.get('recipient_id', '-')}\t{event.get('name', '-')}\t{record['error']}"
        )
    return 0


def cmd_show(args: argparse.Namespace, config: Config) -> int:
    """One fleet dead letter in full (JSON, with its source)."""
    letter = _run(config, lambda c: deadletters.get_letter(c, config.fleet.key_prefix, args.id))
    if letter is None:
        print(f"forwarder: no dead letter with id {args.id} ({_source(config)})")
        return 1
    print(json.dumps(letter.to_dict(), ensure_ascii=False, indent=2))
    return 0


def cmd_replay(args: argparse.Namespace, config: Config) -> int:
    """Put fleet dead letters back into their partitions' streams (same idempotency keys)."""
    prefix, partitions = config.fleet.key_prefix, config.fleet.partitions

    async def work(client: Any) -> tuple[int, int]:
        if args.all:
            letters = await deadletters.list_letters(
                client, prefix, await _accounts(client, config)
            )
        else:
            found = [await deadletters.get_letter(client, prefix, i) for i in args.ids]
            letters = [x for x in found if x is not None]
        moved = 0
        for letter in letters:
            moved += await deadletters.replay(client, prefix, partitions, letter)
        return moved, len(letters)

    moved, found = _run(config, work)
    print(f"replayed {moved} dead letter(s) into the fleet's streams ({_source(config)})")
    wanted = found if args.all else len(set(args.ids))
    if moved < wanted:
        print(f"forwarder: {wanted - moved} id(s) not found (or not a valid event)")
        return 1
    return 0


def cmd_purge(args: argparse.Namespace, config: Config) -> int:
    """Delete the fleet's dead letters from before a date."""

    async def work(client: Any) -> int:
        accounts = await _accounts(client, config)
        return await deadletters.purge(client, config.fleet.key_prefix, accounts, args.before)

    removed = _run(config, work)
    print(f"purged {removed} dead letter(s) from before {_iso(args.before)} ({_source(config)})")
    return 0
