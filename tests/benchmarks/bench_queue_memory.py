"""In-process measure of what a queued event costs in memory (the memory scenario's quick check).

Builds events as the intake does for the benchmark suite's memory scenario (JSON batches of 1000
from `batch_items`, parsed with `loads_json`, validated by `events_from_items`), admits them to
an `EventQueue` in memory mode and reports the bytes each one added:

- traced: Python allocations (tracemalloc), split into the events themselves and the queue's
  bookkeeping around them;
- rss: the process's resident set (/proc/self/statm) before and after, run without tracemalloc
  (which has a cost of its own); closer to what the suite's daemon-level figure sees.

    .venv/bin/python tests/benchmarks/bench_queue_memory.py [--events N] [--per-recipient K]

Each (mode, per-recipient) pair runs in a fresh subprocess, so one run's freed memory does not
flatter the next. Not part of `make test`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import TYPE_CHECKING

from forwarder.events import Event
from forwarder.events.parse import loads_json
from forwarder.events.validate import events_from_items
from forwarder.storage.queue import EventQueue

# The script runs with its own directory on sys.path; mypy sees the file as tests.benchmarks.*.
if TYPE_CHECKING:
    from tests.benchmarks._common import batch_items
else:
    from _common import batch_items

BATCH = 1000
PAGE = os.sysconf("SC_PAGE_SIZE")


def bodies(total: int, recipients: int) -> list[bytes]:
    """The request bodies of the suite's `_fill`: 1000 events each, `recipients` 0 for distinct."""
    out: list[bytes] = []
    for n in range(total // BATCH):
        first = n * BATCH % recipients if recipients else n * BATCH
        out.append(json.dumps(batch_items(BATCH, first_recipient=first)).encode())
    return out


def rss() -> int:
    """Resident bytes of this process."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * PAGE


def run(total: int, per_recipient: int, mode: str) -> dict[str, float]:
    """Queue `total` events and measure; `per_recipient` events share each recipient."""
    recipients = 0 if per_recipient <= 1 else total // per_recipient
    raw = bodies(total, recipients)
    queue = EventQueue(2 * total)
    held: list[list[Event]] = []
    gc.collect()
    if mode == "traced":
        tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0] if mode == "traced" else rss()
    for body in raw:
        items = loads_json(body)
        assert isinstance(items, list)
        events = events_from_items(items, max_items=BATCH)
        held.append(events)  # the events alone, to tell them apart from the queue's share
    gc.collect()
    middle = tracemalloc.get_traced_memory()[0] if mode == "traced" else rss()
    for events in held:
        assert queue.offer(events)
    gc.collect()
    after = tracemalloc.get_traced_memory()[0] if mode == "traced" else rss()
    assert len(queue) == total
    return {
        "events_b": (middle - before) / total,
        "queue_b": (after - middle) / total,
        "total_b": (after - before) / total,
    }


def main() -> None:
    """Run each measure in a subprocess and print one line each."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--per-recipient", type=int, action="append", default=[])
    parser.add_argument(
        "--child", nargs=3, metavar=("MODE", "EVENTS", "PER"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        mode, total, per = args.child
        print(json.dumps(run(int(total), int(per), mode)))
        return
    for per in args.per_recipient or [1, 10]:
        for mode in ("traced", "rss"):
            child = [sys.executable, __file__, "--child", mode, str(args.events), str(per)]
            out = subprocess.run(child, check=True, capture_output=True, text=True).stdout
            got = json.loads(out)
            print(
                f"{args.events} events, {per} per recipient, {mode:6}: "
                f"{got['total_b']:6.0f} B/event (events {got['events_b']:4.0f}, "
                f"queue {got['queue_b']:4.0f})"
            )


if __name__ == "__main__":
    main()
