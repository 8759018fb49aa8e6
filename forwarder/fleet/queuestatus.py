"""The shared queue as `forwarder fleet status`, `forwarder fleet drain` and the metrics see it.

Read-only except `drain` / `undrain`, which add or remove a member in `{P}:drain`: a drained
member gives its partitions up at its next ownership round (within fleet.lease_s / 3), after
the events it has in delivery are settled, and takes no new ones; the others take them over
at once (the hand-over marks the unsettled entries claimable, leases.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from forwarder.fleet.ownership import consumers_key, drain_key
from forwarder.fleet.queuekeys import GROUP, AccountKeys, accounts_key


@dataclass(slots=True)
class PartitionStatus:
    """One partition's stream."""

    partition: int
    length: int  # entries in the stream (waiting or handed out, not settled)
    pending: int  # handed to a member, not settled
    holder: str  # "MEMBER GENERATION" of its lease, "" if none

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "partition": self.partition,
            "length": self.length,
            "pending": self.pending,
            "lease": self.holder or None,
        }


@dataclass(slots=True)
class AccountQueue:
    """One account's shared queue."""

    account: str
    partitions: list[PartitionStatus] = field(default_factory=list)
    dead_letters: int = 0

    @property
    def length(self) -> int:
        """Entries in all its streams."""
        return sum(p.length for p in self.partitions)

    @property
    def pending(self) -> int:
        """Entries handed out and not settled."""
        return sum(p.pending for p in self.partitions)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "account": self.account,
            "length": self.length,
            "pending": self.pending,
            "dead_letters": self.dead_letters,
            "partitions": [p.to_dict() for p in self.partitions],
        }


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value or "")


async def known_accounts(redis: Any, prefix: str, configured: list[str]) -> list[str]:
    """The accounts with keys in Redis, and the configured ones."""
    names = {_text(v) for v in await redis.smembers(accounts_key(prefix))}
    return sorted(names | set(configured))


async def account_queue(redis: Any, prefix: str, account: str, partitions: int) -> AccountQueue:
    """Lengths, pending counts and lease holders of one account's partitions (one pipeline)."""
    keys = AccountKeys(prefix, account)
    pipe = redis.pipeline(transaction=False)
    for p in range(partitions):
        pipe.xlen(keys.stream(p))
        pipe.xpending(keys.stream(p), GROUP)
        pipe.get(keys.lease(p))
    pipe.xlen(keys.dead)
    answers = await pipe.execute(raise_on_error=False)
    status = AccountQueue(account)
    for p in range(partitions):
        length, pending, holder = answers[3 * p : 3 * p + 3]
        status.partitions.append(
            PartitionStatus(
                p,
                length if isinstance(length, int) else 0,
                int(pending["pending"]) if isinstance(pending, dict) else 0,
                _text(holder) if holder is not None and not isinstance(holder, Exception) else "",
            )
        )
    dead = answers[-1]
    status.dead_letters = dead if isinstance(dead, int) else 0
    return status


async def consumers(redis: Any, prefix: str) -> tuple[list[str], list[str]]:
    """The members beating as consumers of the shared queue, and the drained members."""
    live = [_text(v) for v in await redis.zrange(consumers_key(prefix), 0, -1)]
    drained = sorted(_text(v) for v in await redis.smembers(drain_key(prefix)))
    return live, drained


async def drain(redis: Any, prefix: str, member: str) -> None:
    """Mark `member` drained: it hands its partitions to the others and takes none."""
    await redis.sadd(drain_key(prefix), member)


async def undrain(redis: Any, prefix: str, member: str) -> bool:
    """Let `member` take partitions again; False if it was not drained."""
    return bool(await redis.srem(drain_key(prefix), member))
