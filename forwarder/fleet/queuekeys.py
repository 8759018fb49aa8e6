"""The Redis keys of the shared queue (docs/how-to/fleet.md has the whole layout).

Every key of one account carries the hash tag `{PREFIX:ACCOUNT}`, so a Redis Cluster keeps
them in one slot and one Lua script may touch any of them.
"""

from __future__ import annotations

from dataclasses import dataclass

GROUP = "deliver"  # the consumer group of every partition's stream


@dataclass(frozen=True, slots=True)
class AccountKeys:
    """The queue's keys of one account under one prefix."""

    prefix: str
    account: str

    @property
    def tag(self) -> str:
        """The hash tag every key of the account starts with."""
        return f"{{{self.prefix}:{self.account}}}"

    def stream(self, partition: int) -> str:
        """The stream of partition `partition` (consumer group `GROUP`)."""
        return f"{self.tag}:p:{partition}"

    def lease(self, partition: int) -> str:
        """The partition's lease: "MEMBER GENERATION", with a PX expiry."""
        return f"{self.tag}:lease:{partition}"

    def generation(self, partition: int) -> str:
        """The partition's generation counter (one more at each acquisition)."""
        return f"{self.tag}:gen:{partition}"

    def handover(self, partition: int) -> str:
        """Set by a clean release, taken by the next acquisition: no wait before claiming."""
        return f"{self.tag}:handover:{partition}"

    @property
    def dead(self) -> str:
        """The account's dead letters (a stream)."""
        return f"{self.tag}:dead"


def accounts_key(prefix: str) -> str:
    """The set of account names that have keys (for `forwarder fleet status`)."""
    return f"{prefix}:accounts"
