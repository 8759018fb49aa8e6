"""Real clients nobody here wrote, against `forwarder run` and `forwarder mock-remote` (issue 15).

Each client posts to the drop-in endpoint exactly as it would post to the remote, and must get
the remote's answer (200 `{"success": true, "data": <integer>}`), and its event must arrive at
the mock with exactly its fields. The integer is then looked up (GET /v1/events/<n>) until it
says `delivered`, with the id the mock gave the event. curl, requests, httpx, urllib and
aiohttp are required; Node's fetch and PHP's curl run where their binary is installed.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import httpx
import pytest
import requests

from tests.conftest import DaemonProc, MockProc, unix_session
from tests.e2e.test_e2e import wait_until

StartMock = Callable[..., Awaitable[MockProc]]
StartDaemon = Callable[..., Awaitable[DaemonProc]]
CREATE = "/v1/recipientEvents/create"
APP_KEY = "app-own-key-123"
# What arrives when a field is not sent: the remote's defaults.
ABSENT = {"value": "", "conversion": "0", "data": "", "ref": ""}
REMOTE = {"drop_in_answer": "remote"}  # the default; the fixture's is "accepted"

# (status, body, X-Forwarder-Event-Id) of one answer.
Answer = tuple[int, Any, str | None]


async def start(
    mock_remote: StartMock, daemon: StartDaemon, **sections: Any
) -> tuple[DaemonProc, MockProc]:
    mock = await mock_remote()
    return await daemon(mock.base_url, intake=REMOTE, **sections), mock


def check_answer(answer: Answer) -> int:
    """The remote's answer shape; returns the event number."""
    status, body, event_id = answer
    assert status == 200, answer
    assert set(body) == {"success", "data"}, body
    assert body["success"] is True
    number = body["data"]
    assert type(number) is int, body
    assert 0 < number < 2**53, body
    assert event_id, "X-Forwarder-Event-Id missing"
    return number


async def arrived(
    d: DaemonProc, mock: MockProc, answers: dict[str, Answer], sent: dict[str, dict[str, str]]
) -> None:
    """Every answer's event arrived at the mock with exactly the fields sent, and its number
    looks up as delivered with the mock's id."""
    numbers = {label: check_answer(answer) for label, answer in answers.items()}
    assert len(set(numbers.values())) == len(numbers), numbers  # unique

    async def all_there() -> bool:
        return len((await mock.record())["events"]) >= len(sent)

    await wait_until(all_there, 20)
    record = await mock.record()
    by_key = {event["idempotency_key"]: event for event in record["events"]}
    assert len(record["events"]) == len(sent)
    async with aiohttp.ClientSession(base_url=d.url) as http:
        for label, answer in answers.items():
            event_id = answer[2]
            got = by_key[event_id]
            want = {**ABSENT, **sent[label]}
            assert {f: got[f] for f in (*ABSENT, "recipient_id", "name")} == want, label

            async def delivered(n: int = numbers[label]) -> bool:
                async with http.get(f"/v1/events/{n}") as response:
                    return bool((await response.json())["data"]["status"] == "delivered")

            await wait_until(delivered, 10)
            async with http.get(f"/v1/events/{numbers[label]}") as response:
                data = (await response.json())["data"]
            assert data["event_id"] == event_id, label
            assert data["remote_id"] == got["id"], label


# --- curl ----------------------------------------------------------------------------------------


async def curl(*args: str) -> list[Answer]:
    """Run curl; one answer per request (several with --next)."""
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--max-time", "10", "-D", "/dev/stderr",
        "-w", "\n%{http_code}\n", *args,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode == 0, err
    lines = out.decode().split("\n")
    ids = [
        line.split(":", 1)[1].strip()
        for line in err.decode().splitlines()
        if line.lower().startswith("x-forwarder-event-id:")
    ]
    answers: list[Answer] = []
    for body, code in zip(lines[0::2], lines[1::2], strict=False):
        answers.append((int(code), json.loads(body), ids[len(answers)]))
    return answers


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_curl(mock_remote: StartMock, daemon: StartDaemon) -> None:
    d, mock = await start(mock_remote, daemon)
    url = d.url + CREATE
    sent: dict[str, dict[str, str]] = {}
    answers: dict[str, Answer] = {}
    sent["form"] = {"recipient_id": "c1", "name": "PURCHASE", "value": "24.99", "conversion": "1"}
    [answers["form"]] = await curl(
        "-u", f"{APP_KEY}:", "-d", "name=PURCHASE", "-d", "value=24.99", "-d", "conversion=1",
        "-d", "recipient_id=c1", url,
    )  # fmt: skip
    sent["urlencode"] = {"recipient_id": "c 2+", "name": "PAGE VIEW", "data": '{"a": "b&c=d"}'}
    [answers["urlencode"]] = await curl(
        "--data-urlencode", "recipient_id=c 2+", "--data-urlencode", "name=PAGE VIEW",
        "--data-urlencode", 'data={"a": "b&c=d"}', url,
    )  # fmt: skip
    sent["multipart"] = {"recipient_id": "c3", "name": "SIGNUP", "value": "Café ☕", "ref": "m-1"}
    [answers["multipart"]] = await curl(
        "-F", "recipient_id=c3", "-F", "name=SIGNUP", "-F", "value=Café ☕", "-F", "ref=m-1", url
    )
    sent["chunked"] = {"recipient_id": "c4", "name": "PRODUCT_VIEW", "value": "sku-9"}
    [answers["chunked"]] = await curl(
        "-H", "Transfer-Encoding: chunked", "-d", "recipient_id=c4&name=PRODUCT_VIEW&value=sku-9",
        url,
    )  # fmt: skip
    sent["http1.0"] = {"recipient_id": "c5", "name": "SIGNUP"}
    [answers["http1.0"]] = await curl("--http1.0", "-d", "recipient_id=c5&name=SIGNUP", url)
    sent["keepalive1"] = {"recipient_id": "c6", "name": "A"}
    sent["keepalive2"] = {"recipient_id": "c7", "name": "B"}
    answers["keepalive1"], answers["keepalive2"] = await curl(
        "-d", "recipient_id=c6&name=A", url, "--next", "-sS", "-D", "/dev/stderr",
        "-w", "\n%{http_code}\n", "-d", "recipient_id=c7&name=B", url,
    )  # fmt: skip
    sent["unix"] = {"recipient_id": "c8", "name": "SIGNUP"}
    [answers["unix"]] = await curl(
        "--unix-socket", d.socket_path, "-d", "recipient_id=c8&name=SIGNUP",
        "http://localhost" + CREATE,
    )  # fmt: skip
    sent["api_key"] = {"recipient_id": "c9", "name": "SIGNUP"}
    [answers["api_key"]] = await curl(
        "-d", "recipient_id=c9&name=SIGNUP", f"{url}?api_key={APP_KEY}"
    )
    await arrived(d, mock, answers, sent)


# --- Python clients ------------------------------------------------------------------------------


def _requests_calls(url: str) -> list[Answer]:
    out: list[Answer] = []
    r = requests.post(
        url,
        data={"recipient_id": "p1", "name": "PURCHASE", "value": "24.99", "conversion": 1},
        auth=(APP_KEY, ""),
        timeout=10,
    )
    out.append((r.status_code, r.json(), r.headers.get("X-Forwarder-Event-Id")))
    r = requests.post(
        url, files={"recipient_id": (None, "p2"), "name": (None, "SIGNUP")}, timeout=10
    )
    out.append((r.status_code, r.json(), r.headers.get("X-Forwarder-Event-Id")))
    with requests.Session() as session:
        for n in (3, 4):
            r = session.post(url, data={"recipient_id": f"p{n}", "name": "VISIT"}, timeout=10)
            out.append((r.status_code, r.json(), r.headers.get("X-Forwarder-Event-Id")))
    return out


def _httpx_sync(url: str) -> Answer:
    r = httpx.post(url, data={"recipient_id": "h1", "name": "SIGNUP", "ref": "x y"}, timeout=10)
    return r.status_code, r.json(), r.headers.get("X-Forwarder-Event-Id")


async def _httpx_async(url: str) -> Answer:
    async with httpx.AsyncClient(timeout=10) as client:
        r = await client.post(url, data={"recipient_id": "h2", "name": "SIGNUP", "value": "1,5"})
    return r.status_code, r.json(), r.headers.get("X-Forwarder-Event-Id")


def _urllib(url: str) -> Answer:
    body = urllib.parse.urlencode({"recipient_id": "u1", "name": "ÄPFEL", "data": "[1, 2]"})
    request = urllib.request.Request(url, data=body.encode())
    with urllib.request.urlopen(request, timeout=10) as r:
        return r.status, json.loads(r.read()), r.headers.get("X-Forwarder-Event-Id")


async def _aiohttp(url: str, socket_path: str) -> list[Answer]:
    out: list[Answer] = []
    async with aiohttp.ClientSession() as http:
        async with http.post(url, data={"recipient_id": "a1", "name": "SIGNUP"}) as r:
            out.append((r.status, await r.json(), r.headers.get("X-Forwarder-Event-Id")))
        form = aiohttp.FormData()
        form.add_field("recipient_id", "a2")
        form.add_field("name", "SIGNUP")
        async with http.post(url, data=form) as r:
            out.append((r.status, await r.json(), r.headers.get("X-Forwarder-Event-Id")))
    async with (
        unix_session(socket_path) as unix,
        unix.post(CREATE, data={"recipient_id": "a3", "name": "SIGNUP"}) as r,
    ):
        out.append((r.status, await r.json(), r.headers.get("X-Forwarder-Event-Id")))
    return out


async def test_python_clients(mock_remote: StartMock, daemon: StartDaemon) -> None:
    d, mock = await start(mock_remote, daemon)
    url = d.url + CREATE
    sent = {
        "requests data": {
            "recipient_id": "p1", "name": "PURCHASE", "value": "24.99", "conversion": "1"
        },
        "requests files": {"recipient_id": "p2", "name": "SIGNUP"},
        "requests session 1": {"recipient_id": "p3", "name": "VISIT"},
        "requests session 2": {"recipient_id": "p4", "name": "VISIT"},
        "httpx sync": {"recipient_id": "h1", "name": "SIGNUP", "ref": "x y"},
        "httpx async": {"recipient_id": "h2", "name": "SIGNUP", "value": "1,5"},
        "urllib": {"recipient_id": "u1", "name": "ÄPFEL", "data": "[1, 2]"},
        "aiohttp data": {"recipient_id": "a1", "name": "SIGNUP"},
        "aiohttp FormData": {"recipient_id": "a2", "name": "SIGNUP"},
        "aiohttp unix": {"recipient_id": "a3", "name": "SIGNUP"},
    }  # fmt: skip
    got = [
        *await asyncio.to_thread(_requests_calls, url),
        await asyncio.to_thread(_httpx_sync, url),
        await _httpx_async(url),
        await asyncio.to_thread(_urllib, url),
        *await _aiohttp(url, d.socket_path),
    ]
    await arrived(d, mock, dict(zip(sent, got, strict=True)), sent)


# --- Node and PHP --------------------------------------------------------------------------------

NODE_SCRIPT = """
const url = process.argv[1];
const out = [];
async function post(body) {
  const r = await fetch(url, {method: "POST", body});
  out.push([r.status, await r.json(), r.headers.get("x-forwarder-event-id")]);
}
(async () => {
  await post(new URLSearchParams({recipient_id: "n1", name: "PURCHASE", value: "9.50",
                                  conversion: "1"}));
  const form = new FormData();
  form.append("recipient_id", "n2");
  form.append("name", "SIGNUP");
  form.append("data", JSON.stringify({plan: "pro"}));
  await post(form);
  console.log(JSON.stringify(out));
})().catch((e) => { console.error(e); process.exit(1); });
"""

PHP_SCRIPT = """
$url = $argv[1];
$out = [];
$bodies = [
  http_build_query(['recipient_id' => 'php1', 'name' => 'PURCHASE', 'value' => '5',
                    'conversion' => 1]),
  ['recipient_id' => 'php2', 'name' => 'SIGNUP'],
];
foreach ($bodies as $body) {
  $ch = curl_init($url);
  $id = null;
  curl_setopt($ch, CURLOPT_POST, true);
  curl_setopt($ch, CURLOPT_POSTFIELDS, $body);
  curl_setopt($ch, CURLOPT_RETURNTRANSFER, true);
  curl_setopt($ch, CURLOPT_HEADERFUNCTION, function ($ch, $h) use (&$id) {
    if (stripos($h, 'x-forwarder-event-id:') === 0) { $id = trim(substr($h, 21)); }
    return strlen($h);
  });
  $body = curl_exec($ch);
  $out[] = [curl_getinfo($ch, CURLINFO_HTTP_CODE), json_decode($body), $id];
}
echo json_encode($out);
"""


async def _run_script(*argv: str) -> list[Answer]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 20)
    except TimeoutError:
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        raise
    assert proc.returncode == 0, err
    return [(status, body, event_id) for status, body, event_id in json.loads(out)]


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed on this machine")
async def test_node_fetch(mock_remote: StartMock, daemon: StartDaemon) -> None:
    d, mock = await start(mock_remote, daemon)
    got = await _run_script("node", "-e", NODE_SCRIPT, d.url + CREATE)
    sent = {
        "URLSearchParams": {
            "recipient_id": "n1", "name": "PURCHASE", "value": "9.50", "conversion": "1"
        },
        "FormData": {"recipient_id": "n2", "name": "SIGNUP", "data": '{"plan":"pro"}'},
    }  # fmt: skip
    await arrived(d, mock, dict(zip(sent, got, strict=True)), sent)


@pytest.mark.skipif(shutil.which("php") is None, reason="php is not installed on this machine")
async def test_php_curl(mock_remote: StartMock, daemon: StartDaemon) -> None:
    d, mock = await start(mock_remote, daemon)
    got = await _run_script("php", "-r", PHP_SCRIPT, d.url + CREATE)
    sent = {
        "http_build_query": {
            "recipient_id": "php1", "name": "PURCHASE", "value": "5", "conversion": "1"
        },
        "array (multipart)": {"recipient_id": "php2", "name": "SIGNUP"},
    }  # fmt: skip
    await arrived(d, mock, dict(zip(sent, got, strict=True)), sent)


# --- the app that keeps the number ---------------------------------------------------------------


@pytest.mark.parametrize("mode", ["memory", "durable"])
async def test_an_app_reads_the_number_and_learns_the_remote_id(
    mock_remote: StartMock, daemon: StartDaemon, mode: str
) -> None:
    d, mock = await start(mock_remote, daemon, queue={"mode": mode})
    url = d.url + CREATE

    def app() -> tuple[int, dict[str, Any], dict[str, Any]]:
        r = requests.post(url, data={"recipient_id": "42", "name": "PURCHASE"}, timeout=10)
        number = int(r.json()["data"])  # what apps written for the remote do
        location = r.headers["Location"]
        for _ in range(100):
            status = requests.get(f"{d.url}/v1/events/{number}", timeout=10).json()
            if status["data"]["status"] == "delivered":
                break
            time.sleep(0.1)  # in a thread, as the app would
        by_id = requests.get(d.url + location, timeout=10).json()
        return number, status, by_id

    number, status, by_id = await asyncio.to_thread(app)
    record = (await mock.record())["events"]
    assert len(record) == 1
    assert status["success"] is True
    data = status["data"]
    assert data["status"] == "delivered"
    assert data["remote_id"] == record[0]["id"]  # what the remote would have answered
    assert data["event_id"] == record[0]["idempotency_key"]
    assert (data["number"], data["attempts"]) == (number, 1)
    assert by_id["data"] == data  # the same event by its event_id (Location)
    async with (
        aiohttp.ClientSession(base_url=d.url) as http,
        http.get(f"/v1/events/{number + 1}") as response,
    ):
        assert response.status == 404
        assert (await response.json())["success"] is False


# --- numbers across a crash, and the command line ------------------------------------------------


@pytest.mark.parametrize("mode", ["memory", "durable"])
async def test_numbers_are_never_reused_after_kill_9_and_events_show_prints_them(
    mock_remote: StartMock, daemon: StartDaemon, mode: str
) -> None:
    from tests.conftest import spawn

    mock = await mock_remote()
    first = await daemon(mock.base_url, intake=REMOTE, queue={"mode": mode})
    async with aiohttp.ClientSession(base_url=first.url) as http:
        async with http.post(CREATE, data={"recipient_id": "1", "name": "SIGNUP"}) as r:
            assert r.status == 200
            before = (await r.json())["data"]

        async def delivered() -> bool:
            async with http.get(f"/v1/events/{before}") as r:
                return bool((await r.json())["data"]["status"] == "delivered")

        await wait_until(delivered, 10)
    [created] = (await mock.record())["events"]
    show = await spawn("events", "show", str(before), "--socket", first.socket_path)
    assert await show.wait(15) == 0
    printed = dict(line.split(None, 1) for line in show.stdout if line.strip())
    assert (printed["status"], printed["remote_id"]) == ("delivered", str(created["id"]))
    assert printed["event_id"] == created["idempotency_key"]
    # `forwarder send` takes the remote's answer as success too.
    send = await spawn("send", "--socket", first.socket_path, "--recipient-id", "2", "--name", "X")
    assert await send.wait(15) == 0
    sent = json.loads(send.stdout[0])["data"]
    assert sent > before

    assert await first.stop(signal.SIGKILL) == -signal.SIGKILL
    second = await daemon(
        mock.base_url, state_dir=first.state_dir, intake=REMOTE, queue={"mode": mode}
    )
    async with aiohttp.ClientSession(base_url=second.url) as http:
        async with http.post(CREATE, data={"recipient_id": "3", "name": "SIGNUP"}) as r:
            after = (await r.json())["data"]
        # The outcome outlives the crash in durable mode (the spool); memory mode forgets it.
        async with http.get(f"/v1/events/{before}") as r:
            if mode == "durable":
                assert r.status == 200
                assert (await r.json())["data"]["remote_id"] == created["id"]
            else:
                assert r.status == 404
    assert after > sent  # never given out again, though the first daemon never saved a thing
    assert after < 2**53
    unknown = await spawn("events", "show", str(after + 1), "--socket", second.socket_path)
    assert await unknown.wait(15) == 1
    assert "no event" in "\n".join(unknown.stderr)
