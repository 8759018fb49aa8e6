"""What a running daemon exports on /metrics is what docs/reference/metrics.md lists.

Every exported family is documented with its type and labels, every documented family is
exported, no `*_created` family sneaks in, and `promtool check metrics` (Debian's `prometheus`
package; CI installs it) finds nothing to say about the output.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import DaemonProc, MockProc, promtool
from tests.e2e.test_e2e import wait_until
from tests.redisserver import RedisServer

PAGE = Path(__file__).resolve().parents[2] / "docs" / "reference" / "metrics.md"
# | `forwarder_name` | type | `label`, `label` | what it is |
ROW = re.compile(r"^\| `(forwarder_\w+)` \| (\w+) \|([^|]*)\|")


def documented() -> dict[str, tuple[str, frozenset[str]]]:
    """The metrics page's Families table: family -> (type, labels)."""
    text = PAGE.read_text()
    section = text.split("\n## Families\n", 1)[1]
    section = re.split(r"\n#{1,2} ", section, maxsplit=1)[0]
    families: dict[str, tuple[str, frozenset[str]]] = {}
    for line in section.splitlines():
        match = ROW.match(line)
        if match:
            name, kind, labels = match.groups()
            assert name not in families, f"{name} is listed twice"
            families[name] = (kind, frozenset(re.findall(r"`(\w+)`", labels)))
    assert len(families) > 20, "the Families table of docs/reference/metrics.md was not found"
    return families


def exported(text: str) -> dict[str, tuple[str, frozenset[str]]]:
    """The exposition's families as a client queries them: family -> (type, labels)."""
    families: dict[str, tuple[str, frozenset[str]]] = {}
    for family in text_string_to_metric_families(text):
        # The parser names a counter's family without the `_total` its samples carry.
        name = family.name + ("_total" if family.type == "counter" else "")
        labels = frozenset(k for sample in family.samples for k in sample.labels if k != "le")
        families[name] = (family.type, labels)
    return families


async def scrape(
    mock_remote: Callable[..., Awaitable[MockProc]],
    daemon: Callable[..., Awaitable[DaemonProc]],
    redis: RedisServer,
) -> str:
    """/metrics of a daemon in a fleet (so the fleet's families are there) that has delivered
    two events, one with an unknown field (so every labelled family has a series)."""
    mock = await mock_remote()
    d = await daemon(mock.base_url, fleet={"redis_url": redis.url, "member": "scraped"})
    async with aiohttp.ClientSession(base_url=d.url) as http:
        async with http.post("/v1/events", json=[{"recipient_id": "1", "name": "A"}]) as answer:
            assert answer.status == 202, await answer.text()
        # A field the remote does not know, so forwarder_unknown_fields_total has its label.
        form = {"recipient_id": "2", "name": "A", "campaign_id": "77"}
        async with http.post("/v1/recipientEvents/create", data=form) as answer:
            assert answer.status < 300, await answer.text()

        async def delivered() -> bool:
            async with http.get("/v1/stats") as answer:
                return bool((await answer.json())["counters"]["delivered"] == 2)

        await wait_until(delivered, 15)
        async with http.get("/metrics") as answer:
            assert answer.status == 200
            return await answer.text()


async def test_every_exported_family_is_documented_and_every_documented_one_exported(
    mock_remote: Callable[..., Awaitable[MockProc]],
    daemon: Callable[..., Awaitable[DaemonProc]],
    redis_server: RedisServer,
) -> None:
    text = await scrape(mock_remote, daemon, redis_server)
    assert "_created" not in text
    have, docs = exported(text), documented()
    assert sorted(set(have) - set(docs)) == [], "exported but not in docs/reference/metrics.md"
    assert sorted(set(docs) - set(have)) == [], "in docs/reference/metrics.md but not exported"
    wrong = {name: (have[name], docs[name]) for name in have if have[name] != docs[name]}
    assert wrong == {}, "(exported type and labels, documented type and labels) differ"


async def test_promtool_check_metrics_passes_without_a_warning(
    mock_remote: Callable[..., Awaitable[MockProc]],
    daemon: Callable[..., Awaitable[DaemonProc]],
    redis_server: RedisServer,
) -> None:
    text = await scrape(mock_remote, daemon, redis_server)
    checked = await asyncio.to_thread(
        subprocess.run,
        [promtool(), "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert (checked.returncode, checked.stdout, checked.stderr) == (0, "", "")
