"""Intake benchmark: forwarder's drop-in endpoint vs a bare aiohttp handler, in the same run.

The bare handler parses the same form and answers the same JSON, so the ratio shows what
validation, queueing and the daemon's bookkeeping cost. forwarder is measured twice: delivering
each event to `forwarder mock-remote` at once (a second HTTP exchange per event on the same core,
far above any real account's rate limit), and with delivery paused (the mock refuses its key), which
isolates intake. Servers run pinned to core 0 and the load
generator to core 1 when `taskset` exists. Several rounds; medians. Prints a table and writes JSON.

    .venv/bin/python tests/benchmarks/bench_intake.py [--seconds 3] [--rounds 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp
from aiohttp import web

FORM = {"recipient_id": "12345", "name": "PURCHASE", "value": "24.99", "conversion": "1"}
PATH = "/v1/recipientEvents/create"


async def bare_handler(request: web.Request) -> web.Response:
    form = await request.post()
    if not form.get("recipient_id") or not form.get("name"):
        return web.json_response({"success": False, "error": "missing"}, status=400)
    body = {"success": True, "data": {"id": str(uuid.uuid4()), "status": "queued"}}
    return web.json_response(body, status=202)


def serve_bare(port: int) -> None:
    app = web.Application()
    app.router.add_post(PATH, bare_handler)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


def _pinned(core: int, argv: list[str]) -> list[str]:
    return ["taskset", "-c", str(core), *argv] if shutil.which("taskset") else argv


async def _spawn(argv: list[str], env: dict[str, str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *argv,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )


async def _wait_port(url: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            try:
                async with http.get(url) as response:
                    await response.read()
                    return
            except aiohttp.ClientError:
                await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


async def _throughput(url: str, connections: int, seconds: float) -> float:
    done = 0
    stop_at = time.monotonic() + seconds
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def worker() -> None:
            nonlocal done
            while time.monotonic() < stop_at:
                async with http.post(url + PATH, data=FORM) as response:
                    await response.read()
                    assert response.status == 202, response.status
                done += 1

        await asyncio.gather(*(worker() for _ in range(connections)))
    return done / seconds


async def _latency(url: str, count: int) -> tuple[float, float]:
    samples: list[float] = []
    async with aiohttp.ClientSession() as http:
        for _ in range(count):
            started = time.perf_counter()
            async with http.post(url + PATH, data=FORM) as response:
                await response.read()
            samples.append((time.perf_counter() - started) * 1000)
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.99) - 1]


async def main() -> tuple[str, dict[str, object]]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--out", default="bench-intake.json")
    args = parser.parse_args()
    py = sys.executable
    tmp = Path(tempfile.mkdtemp(prefix="fwbench"))
    procs: list[asyncio.subprocess.Process] = []
    try:
        mock = await _spawn(
            _pinned(1, [py, "-m", "forwarder", "mock-remote", "--port", "0", "--rate-limit", "0"]),
            {},
        )
        procs.append(mock)
        assert mock.stdout is not None
        mock_url = (await mock.stdout.readline()).decode().split()[-1]
        for port, key in ((18787, "test-key"), (18789, "key-the-mock-refuses")):
            env = {
                "FORWARDER_API_KEY": key,
                "FORWARDER_REMOTE_BASE_URL": mock_url,
                "FORWARDER_INTAKE_HTTP_LISTEN": f"127.0.0.1:{port}",
                "FORWARDER_STATE_DIR": str(tmp / str(port)),
                "FORWARDER_LOG_LEVEL": "warning",
                "FORWARDER_QUEUE_MAX_EVENTS": "10000000",
            }
            procs.append(await _spawn(_pinned(0, [py, "-m", "forwarder", "run"]), env))
        procs.append(await _spawn(_pinned(0, [py, __file__, "--serve-bare", "18788"]), {}))
        targets = {
            "bare aiohttp": "http://127.0.0.1:18788",
            "fw paused": "http://127.0.0.1:18789",
            "fw delivering": "http://127.0.0.1:18787",
        }
        await _wait_port(targets["fw delivering"] + "/healthz")
        await _wait_port(targets["fw paused"] + "/healthz")
        await _wait_port(targets["bare aiohttp"] + PATH)
        results: dict[str, dict[str, list[float]]] = {
            name: {"rps": [], "p50_ms": [], "p99_ms": []} for name in targets
        }
        for _ in range(args.rounds):
            for name, url in targets.items():  # alternate, so drift hits both alike
                results[name]["rps"].append(await _throughput(url, args.connections, args.seconds))
                p50, p99 = await _latency(url, 2000)
                results[name]["p50_ms"].append(p50)
                results[name]["p99_ms"].append(p99)
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.terminate()
        for proc in procs:
            await asyncio.wait_for(proc.wait(), 30)
        shutil.rmtree(tmp, ignore_errors=True)
    medians = {n: {k: statistics.median(v) for k, v in r.items()} for n, r in results.items()}
    base = medians["bare aiohttp"]["rps"]
    ratios = {name: m["rps"] / base for name, m in medians.items()}
    print(f"{'target':<16}{'req/s':>10}{'ratio':>8}{'p50 ms':>10}{'p99 ms':>10}")
    for name, m in medians.items():
        print(
            f"{name:<16}{m['rps']:>10.0f}{ratios[name]:>8.2f}{m['p50_ms']:>10.3f}{m['p99_ms']:>10.3f}"
        )
    print(f"(req/s with {args.connections} keep-alive connections; latency: one connection)")
    return args.out, {"medians": medians, "ratios": ratios, "runs": results}


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--serve-bare":
        serve_bare(int(sys.argv[2]))
    else:
        out_path, report = asyncio.run(main())
        Path(out_path).write_text(json.dumps(report, indent=2))
