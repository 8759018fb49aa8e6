"""The partition of a recipient: stable across hosts, processes and Python versions."""

from __future__ import annotations

import subprocess
import sys

from forwarder.fleet.partition import partition_of


def test_values_are_pinned() -> None:
    # CRC-32 of the UTF-8 bytes: these must never change, or a running fleet's recipients move
    # partitions (and lose their order) at an upgrade.
    assert partition_of("user-1", 16) == 4
    assert partition_of("user-2", 16) == 14
    assert partition_of("émile@example.com", 16) == 15
    assert partition_of("user-1", 1) == 0
    assert partition_of("user-1", 1024) == 532


def test_every_partition_is_within_bounds() -> None:
    seen = {partition_of(f"r{i}", 7) for i in range(500)}
    assert seen == set(range(7))


def test_another_process_agrees() -> None:
    # Python's hash() of a str is salted per process; the partition must not be.
    code = "from forwarder.fleet.partition import partition_of; print(partition_of('user-1', 16))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(partition_of("user-1", 16))
