"""The bare baselines of the benchmark suite, each run as a subprocess pinned like the daemon.

    python _bare.py serve PORT [--loop asyncio|uvloop]
        A bare aiohttp server: POST /v1/recipientEvents/create parses the same form as
        forwarder's drop-in endpoint and answers the same JSON (202, a fresh id); POST /v1/events
        parses the same NDJSON (one json.loads a line, recipient_id and name present) and answers
        the ids like forwarder does. No validation beyond that, no queue, no metrics.

    python _bare.py deliver BASE_URL --key KEY --events N --concurrency C [--loop ...]
        A bare aiohttp client loop: C workers post N prepared forms (the fields forwarder sends)
        to BASE_URL/recipientEvents/create with Basic auth and an X-Idempotency-Key, read each
        answer and check it is JSON with success true. Prints one JSON line: seconds, CPU
        seconds, delivered, failed.

Both use uvloop's loop with `--loop uvloop`, asyncio's own otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sys
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

import aiohttp
from aiohttp import web

FORM_PATH = "/v1/recipientEvents/create"
BATCH_PATH = "/v1/events"


async def bare_form(request: web.Request) -> web.Response:
    """Parse the form, check the two required fields, answer 202 with a fresh id."""
    form = await request.post()
    if not form.get("recipient_id") or not form.get("name"):
        return web.json_response({"success": False, "error": "missing"}, status=400)
    body = {"success": True, "data": {"id": str(uuid.uuid4()), "status": "queued"}}
    return web.json_response(body, status=202)


async def bare_ndjson(request: web.Request) -> web.Response:
    """Parse NDJSON, check the two required fields of each event, answer 202 with the ids."""
    text = (await request.read()).decode("utf-8")
    ids: list[str] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        item = json.loads(line)
        if not isinstance(item, dict) or not item.get("recipient_id") or not item.get("name"):
            return web.json_response({"success": False, "error": "invalid"}, status=400)
        ids.append(str(item.get("event_id") or uuid.uuid4()))
    body = {"success": True, "data": {"ids": ids, "count": len(ids), "status": "queued"}}
    return web.json_response(body, status=202)


async def serve(port: int) -> None:
    """Serve both endpoints on 127.0.0.1:`port` until killed."""
    app = web.Application()
    app.router.add_post(FORM_PATH, bare_form)
    app.router.add_post(BATCH_PATH, bare_ndjson)
    app.router.add_get("/healthz", lambda _: _ok())
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


async def _ok() -> web.Response:
    return web.json_response({"status": "ok"})


def forms(count: int) -> list[dict[str, str]]:
    """The forms forwarder sends for the suite's delivery events (see bench_suite.batch)."""
    return [
        {
            "recipient_id": str(n),
            "name": "PAGE_VIEW",
            "conversion": "0",
            "value": "24.99",
            "data": json.dumps({"page": f"/products/{n % 50}"}, separators=(",", ":")),
        }
        for n in range(count)
    ]


async def deliver(base_url: str, key: str, events: int, concurrency: int) -> dict[str, Any]:
    """Post `events` forms with `concurrency` workers; how long it took and what it cost."""
    url = f"{base_url.rstrip('/')}/recipientEvents/create"
    token = base64.b64encode(f"{key}:".encode()).decode("ascii")
    headers = {"Authorization": f"Basic {token}", "User-Agent": "bare-client"}
    todo = forms(events)
    ids = [str(uuid.uuid4()) for _ in todo]
    delivered = failed = 0
    next_index = 0
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=30)
    ) as http:

        async def worker() -> None:
            nonlocal delivered, failed, next_index
            while next_index < len(todo):
                index = next_index
                next_index += 1
                async with http.post(
                    url,
                    data=todo[index],
                    headers={**headers, "X-Idempotency-Key": ids[index]},
                    allow_redirects=False,
                ) as response:
                    body = await response.read()
                answer = json.loads(body)
                if response.status < 300 and answer.get("success") is True:
                    delivered += 1
                else:
                    failed += 1

        cpu0, began = time.process_time(), time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds, cpu = time.monotonic() - began, time.process_time() - cpu0
    return {"seconds": seconds, "cpu_s": cpu, "delivered": delivered, "failed": failed}


def _loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return None


def _run(main: Coroutine[Any, Any, Any], loop: str) -> Any:
    with asyncio.Runner(loop_factory=_loop_factory(loop)) as runner:
        return runner.run(main)


def main() -> int:
    """Parse the command line and run the server or the client."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    sub = parser.add_subparsers(dest="command", required=True)
    serve_cmd = sub.add_parser("serve")
    serve_cmd.add_argument("port", type=int)
    deliver_cmd = sub.add_parser("deliver")
    deliver_cmd.add_argument("base_url")
    deliver_cmd.add_argument("--key", required=True)
    deliver_cmd.add_argument("--events", type=int, required=True)
    deliver_cmd.add_argument("--concurrency", type=int, required=True)
    args = parser.parse_args()
    if args.command == "serve":
        _run(serve(args.port), args.loop)
        return 0
    result = _run(deliver(args.base_url, args.key, args.events, args.concurrency), args.loop)
    print(json.dumps(result), flush=True)
    return 0 if not result["failed"] else 1


if __name__ == "__main__":
    sys.exit(main())
