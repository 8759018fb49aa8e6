"""The memory bound against the shipped systemd unit: queue.max_bytes at its default, filled with
the costliest text the validator accepts, must keep the daemon well under the unit's MemoryMax.

A real `forwarder run` (memory mode, the default bounds) whose remote refuses its key, so nothing
drains; requests of events at every field's cap, in astral-plane characters (4 bytes each in
CPython, in memory as in UTF-8) and in ASCII text holding one such character (4 bytes each in
memory, 1 in UTF-8), are sent until intake answers 503. The process's peak resident memory
(VmHWM) is then compared with `MemoryMax=` of systemd/forwarder.service, through the stop's
save as well: an OOM kill there would lose every queued event too.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import signal
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import aiohttp
import orjson
import pytest

from forwarder.events.model import (
    MAX_DATA_BYTES,
    MAX_ID_CHARS,
    MAX_NAME_CHARS,
    MAX_REF_CHARS,
    MAX_VALUE_CHARS,
)
from tests.conftest import DaemonProc, MockProc

StartMock = Callable[..., Awaitable[MockProc]]
StartDaemon = Callable[..., Awaitable[DaemonProc]]
MIB = 1024 * 1024
UNIT = Path(__file__).resolve().parents[2] / "systemd" / "forwarder.service"
# The peak may use this share of MemoryMax at most: the rest is for what RSS does not show
# (the cgroup also counts page cache and kernel memory) and for concurrent requests.
SHARE = 0.7


def memory_max() -> int:
    """MemoryMax= of the shipped unit, in bytes."""
    match = re.search(r"^MemoryMax=(\d+)([KMG]?)$", UNIT.read_text(), re.MULTILINE)
    assert match, "systemd/forwarder.service sets no MemoryMax"
    unit = {"": 1, "K": 1024, "M": MIB, "G": 1024 * MIB}[match[2]]
    return int(match[1]) * unit


def status_kib(pid: int, field: str) -> int:
    """A field of /proc/PID/status in KiB (VmRSS, VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} line")


# The costliest characters, by how CPython stores the text around them: 4 bytes a character
# (astral), 2 (BMP) and 1 (Latin-1) in memory, 4, 3 and 2 in UTF-8, whose copy each str keeps
# once it has been encoded (the save at a stop) - and ASCII text made 4 bytes a character by one
# astral character in it (`None`: 4 bytes in memory, 1 in UTF-8).
SHAPES = ("\U0001f600", "\u20ac", "\u00e9", None)


def capped(tag: str, cap: int, wide: str | None, *, utf8: bool = False) -> str:
    """`tag`, then text of the given shape up to `cap` characters (`utf8`: bytes of UTF-8)."""
    if wide is None:
        return tag + "\U0001f600" + "x" * (cap - len(tag) - (4 if utf8 else 1))
    room = cap - len(tag.encode()) if utf8 else cap - len(tag)
    return tag + wide * (room // len(wide.encode()) if utf8 else room)


def worst_event(n: int, wide: str | None) -> dict[str, object]:
    """An event with every text field at its cap, all of its text its own (no shared name)."""
    tag = f"{n:07d}"
    return {
        "recipient_id": capped(tag, MAX_ID_CHARS, wide),
        "name": capped(tag, MAX_NAME_CHARS, wide),
        "value": capped(tag, MAX_VALUE_CHARS, wide),
        "ref": capped(tag, MAX_REF_CHARS, wide),
        "data": capped(tag, MAX_DATA_BYTES, wide, utf8=True),
    }


def tiny_event(n: int) -> dict[str, object]:
    """An event of little text, all of it its own: the fixed overhead is most of its cost."""
    return {"recipient_id": str(n), "name": f"N{n}"}


async def fill_then_stop(d: DaemonProc, bodies: Iterator[tuple[int, bytes]]) -> None:
    """Send `bodies` (event count, JSON) until intake answers 503, then stop the daemon; the
    peak resident memory, through the stop's save, must stay under SHARE of MemoryMax."""
    limit = memory_max()
    pid = d.proc.process.pid
    start_kib = status_kib(pid, "VmRSS")
    accepted = 0
    refused = ""
    async with aiohttp.ClientSession(base_url=d.url) as http:
        for count, body in bodies:
            async with http.post(
                "/v1/events", data=body, headers={"Content-Type": "application/json"}
            ) as answer:
                payload = await answer.json()
            if answer.status != 202:
                assert answer.status == 503, payload
                refused = payload["reason"]
                break
            accepted += count
            # The old accounting let this grow past 1 GiB: stop at the limit, not at the bound.
            if status_kib(pid, "VmRSS") * 1024 > limit:
                break
        async with http.get("/v1/stats") as answer:
            stats = await answer.json()
    filled_kib = status_kib(pid, "VmHWM")
    assert refused in ("queue_bytes_full", "queue_full"), (
        f"{accepted} events took RSS from {start_kib // 1024} to {filled_kib // 1024} MiB "
        f"against MemoryMax {limit // MIB} MiB before intake refused any"
    )
    assert stats["queue"]["depth"] + stats["in_flight"] == accepted

    # The stop saves them all into the spool: that must fit as well.
    d.proc.process.send_signal(signal.SIGTERM)
    peak_kib = filled_kib
    while d.proc.process.returncode is None:
        try:
            peak_kib = max(peak_kib, status_kib(pid, "VmHWM"))
        except (OSError, AssertionError):  # gone (or a zombie without the lines)
            break
        await asyncio.sleep(0.01)
    assert await d.stop() == 0
    assert d.proc.events("stopped")[0]["saved_pending"] == accepted
    print(
        f"{accepted} events until {refused}; VmRSS at start {start_kib // 1024} MiB, filled"
        f" {filled_kib // 1024} MiB, peak through the stop {peak_kib // 1024} MiB;"
        f" MemoryMax {limit // MIB} MiB"
    )
    assert peak_kib * 1024 < SHARE * limit, (accepted, start_kib, filled_kib, peak_kib)


async def paused_daemon(mock_remote: StartMock, daemon: StartDaemon) -> DaemonProc:
    """A daemon at the default bounds whose remote refuses its key: nothing drains."""
    mock = await mock_remote(api_key="not-the-daemons-key-123")  # 401: delivery pauses
    return await daemon(mock.base_url, shutdown={"timeout_s": 0.5})


@pytest.mark.timeout(240)
async def test_worst_text_at_the_default_byte_bound_fits_the_units_memory_max(
    mock_remote: StartMock, daemon: StartDaemon
) -> None:
    d = await paused_daemon(mock_remote, daemon)
    per_request = 12  # at most about 800 KB of JSON: under intake.max_body_bytes (1 MiB)

    def bodies() -> Iterator[tuple[int, bytes]]:
        for n in itertools.count(0, per_request):
            wide = SHAPES[(n // per_request) % len(SHAPES)]
            yield per_request, orjson.dumps([worst_event(n + i, wide) for i in range(per_request)])

    await fill_then_stop(d, bodies())


@pytest.mark.timeout(240)
async def test_tiny_events_at_the_default_event_bound_fit_the_units_memory_max(
    mock_remote: StartMock, daemon: StartDaemon
) -> None:
    d = await paused_daemon(mock_remote, daemon)
    per_request = 1000  # intake.max_batch

    def bodies() -> Iterator[tuple[int, bytes]]:
        for n in itertools.count(0, per_request):
            yield per_request, orjson.dumps([tiny_event(n + i) for i in range(per_request)])

    await fill_then_stop(d, bodies())
