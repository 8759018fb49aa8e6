"""No input ever makes intake answer 500: fuzzed bodies and a corpus of nasty requests.

Whatever the request, the answer is a 4xx JSON error (or a 2xx when it happens to be valid), the
counters agree with the answers, and whatever was queued can still be delivered and saved (valid
Unicode, so it encodes for the remote's form body and the pending file).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import gzip
import http.client
import json
import threading
import warnings
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar
from urllib.parse import urlencode

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from forwarder.events import Event
from forwarder.events.validate import FIELDS
from forwarder.intake.app import create_app
from forwarder.intake.state import IntakeState
from tests.conftest import ServeIntake, intake_state

CREATE = "/v1/recipientEvents/create"
BATCH = "/v1/events"
FORM = "application/x-www-form-urlencoded"
JSON = "application/json"
NDJSON = "application/x-ndjson"
BOUNDARY = "fuzz-boundary"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"
MAX_BODY = 1024 * 1024
# aiohttp warns (rather than raises) on a malformed multipart Content-Disposition and then treats
# the part as nameless; pytest's "warnings are errors" would turn that warning into a 500 that the
# daemon, which runs without -W error, never gives.
IGNORE_MULTIPART_WARNINGS = "ignore::aiohttp.BadContentDispositionHeader"
IGNORE_MULTIPART_PARAM_WARNINGS = "ignore::aiohttp.BadContentDispositionParam"

T = TypeVar("T")


def new_state(
    max_events: int = 1_000_000, max_batch: int = 100, max_body_bytes: int = MAX_BODY
) -> IntakeState:
    return intake_state(max_events=max_events, max_batch=max_batch, max_body_bytes=max_body_bytes)


def unencodable(events: list[Event]) -> list[str]:
    """Events that could not be sent to the remote nor written to the pending file."""
    bad: list[str] = []
    for event in events:
        try:
            urlencode(event.form()).encode("ascii")
            json.dumps(event.to_dict(), ensure_ascii=False).encode("utf-8")
        except UnicodeError as exc:
            bad.append(f"{event.to_dict()!r}: {exc}")
    return bad


def check_answer(
    status: int, ctype: str, raw: bytes, what: str, *, head: bool = False
) -> dict[str, Any]:
    """An intake answer: never 5xx, always a JSON object, the error shape on every 4xx."""
    assert status < 500, f"{what} -> {status}: {raw[:300]!r}"
    if head:
        return {}
    assert ctype == "application/json", f"{what} -> {status} {ctype}: {raw[:300]!r}"
    body = json.loads(raw)
    assert isinstance(body, dict), f"{what} -> {body!r}"
    if status >= 400:
        assert body["success"] is False, f"{what} -> {body!r}"
        assert isinstance(body["error"], str)
        assert body["error"]
        for error in body.get("errors", []):
            assert isinstance(error["index"], int)
            assert isinstance(error["field"], str)
            assert isinstance(error["message"], str)
    else:
        assert body["success"] is True, f"{what} -> {body!r}"
    return body


# --- fuzzing: an intake served from a thread, hit with plain http.client --------------------------


class ThreadedIntake:
    """The intake app on its own event loop in a thread: hypothesis examples stay plain sync code
    and cheap (no server start per example), and shrinking a failure stays fast."""

    def __init__(self) -> None:
        self.state = new_state()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="intake", daemon=True)
        self.runner: web.AppRunner | None = None
        self.port = 0
        self.conn: http.client.HTTPConnection | None = None

    def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the server's loop (the queue is not thread-safe)."""

        async def run() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(10)

    def start(self) -> None:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)

    async def _start(self) -> None:
        self.runner = web.AppRunner(create_app(self.state))
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        address = self.runner.addresses[0]
        self.port = int(address[1])

    def stop(self) -> None:
        self.close_connection()
        if self.runner is not None:
            asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def post(self, path: str, body: bytes, content_type: str | None) -> tuple[int, str, bytes]:
        """One request over a kept-alive connection (half the cost of a new one each time)."""
        headers = {} if content_type is None else {"Content-Type": content_type}
        reused = self.conn is not None
        if self.conn is None:
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            self.conn.request("POST", path, body=body, headers=headers)
            response = self.conn.getresponse()
            raw = response.read()
        except (http.client.RemoteDisconnected, ConnectionError):
            self.close_connection()
            if not reused:
                raise
            return self.post(path, body, content_type)  # the server had closed the idle one
        if response.will_close:
            self.close_connection()
        ctype = (response.getheader("Content-Type") or "").split(";")[0].strip()
        return response.status, ctype, raw

    def close_connection(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


@pytest.fixture(scope="module")
def threaded_intake() -> Iterator[ThreadedIntake]:
    server = ThreadedIntake()
    server.start()
    yield server
    server.stop()


# Text that JSON can carry but that often breaks code: lone surrogates, NUL, line separators, BOM.
NASTY_CHARS = ["\ud800", "\udfff", "\x00", "\u2028", "\u2029", "\x85", "\ufeff", "é", "\U0001f600"]
ANY_CHAR = st.one_of(st.characters(exclude_categories=()), st.sampled_from(NASTY_CHARS))
# Hypothesis favours short, simple text, so a nasty character is also planted on purpose.
NASTY_TEXT = st.builds(
    lambda text, char, at: text[:at] + char + text[at:],
    st.text(max_size=8),
    st.sampled_from(NASTY_CHARS),
    st.integers(0, 8),
)
ANY_TEXT = st.one_of(st.text(ANY_CHAR, max_size=12), NASTY_TEXT)
KEYS = st.one_of(st.sampled_from([*FIELDS, "api_key"]), ANY_TEXT)
JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**20), max_value=10**20),
    st.floats(),  # NaN and infinities are dumped as NaN / Infinity, which must be refused
    ANY_TEXT,
    st.sampled_from(["1", "0", "yes", "no", "24.99", "r-1", "PURCHASE", "order-000000001"]),
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(KEYS, children, max_size=4)
    ),
    max_leaves=12,
)
# Event-shaped objects get past the first checks, so validation itself is exercised.
# Event-shaped objects, often valid: they get past the first checks, so validation itself and the
# queue are exercised (a lone surrogate that passes validation is only caught by the queue check).
FIELD_TEXT = st.one_of(st.text(st.characters(exclude_categories=["Cc"]), min_size=1), NASTY_TEXT)
VALID_CONVERSION = st.sampled_from([True, False, 0, 1, "yes", "no", "1", "0", "true", ""])
EVENT_FIELDS = {
    "value": st.one_of(FIELD_TEXT, st.integers(), st.floats(), JSON_SCALARS),
    "conversion": st.one_of(VALID_CONVERSION, VALID_CONVERSION, JSON_SCALARS),
    "data": st.one_of(FIELD_TEXT, JSON_VALUES),
    "ref": st.one_of(FIELD_TEXT, FIELD_TEXT, JSON_SCALARS),
    "event_id": st.one_of(st.from_regex(r"[A-Za-z0-9._:-]{10,20}", fullmatch=True), FIELD_TEXT),
}
EVENTS = st.builds(
    lambda extra, event: {**extra, **event},
    st.one_of(st.just({}), st.just({}), st.dictionaries(KEYS, JSON_SCALARS, max_size=2)),
    st.fixed_dictionaries(
        {
            "recipient_id": st.one_of(FIELD_TEXT, FIELD_TEXT, FIELD_TEXT, JSON_SCALARS),
            "name": st.one_of(FIELD_TEXT, FIELD_TEXT, FIELD_TEXT, JSON_SCALARS),
        },
        optional=EVENT_FIELDS,
    ),
)


def dumps(value: object) -> bytes:
    return json.dumps(value).encode()


FORM_TEXT = st.one_of(
    st.sampled_from([*FIELDS, "api_key", "", "%", "%FF", "%00", "+", "==", "&&"]),
    st.text(st.sampled_from(list("ab1=&+%;é\x00 ")), max_size=8),
    ANY_TEXT.filter(lambda s: not any("\ud800" <= c <= "\udfff" for c in s)),
)
FORMS = st.lists(st.tuples(FORM_TEXT, FORM_TEXT), max_size=6).map(
    lambda pairs: "&".join(f"{k}={v}" for k, v in pairs).encode()
)
ENCODED_FORMS = st.lists(
    st.tuples(st.sampled_from([*FIELDS, "api_key", "x"]), FORM_TEXT), max_size=6
).map(lambda pairs: urlencode(pairs).encode())
NDJSONS = st.lists(
    st.one_of(EVENTS.map(dumps), JSON_VALUES.map(dumps), st.binary()), max_size=4
).map(b"\n".join)
PART_HEADERS = st.one_of(
    st.sampled_from([*FIELDS, "api_key", "x", ""]).map(
        lambda n: f'Content-Disposition: form-data; name="{n}"'.encode()
    ),
    # No file parts (filename=...): see test_refused_multipart_file_part_leaves_no_open_file.
    st.sampled_from(
        [
            b"Content-Disposition: form-data",
            b"Content-Disposition: attachment; name=name",
            b"Content-Type: text/plain; charset=utf-8",
            b"Content-Type: text/plain; charset=latin-1",
            b"Content-Type: application/octet-stream",
            b"Content-Transfer-Encoding: base64",
            b"Content-Transfer-Encoding: quoted-printable",
            b"Content-Transfer-Encoding: 8bit",
            b"Content-Encoding: gzip",
        ]
    ),
    st.binary(max_size=30).filter(lambda b: b"\r" not in b and b"\n" not in b),
)
PARTS = st.tuples(st.lists(PART_HEADERS, max_size=3), st.binary(max_size=30))


def multipart_body(parts: list[tuple[list[bytes], bytes]], boundary: str = BOUNDARY) -> bytes:
    out = b""
    for headers, body in parts:
        out += f"--{boundary}\r\n".encode() + b"".join(h + b"\r\n" for h in headers)
        out += b"\r\n" + body + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


MULTIPARTS = st.lists(PARTS, max_size=4).map(multipart_body)
# Weighted: half the bodies are event-shaped JSON, the rest anything at all. (st.one_of would
# give each kind the same share, whatever is repeated in it.)
BODY_KINDS: list[st.SearchStrategy[bytes]] = [
    EVENTS.map(dumps),
    EVENTS.map(dumps),
    st.lists(EVENTS, min_size=1, max_size=4).map(dumps),
    st.lists(EVENTS, min_size=1, max_size=4).map(lambda items: b"\n".join(map(dumps, items))),
    st.binary(max_size=200),
    st.text(ANY_CHAR, max_size=100).map(lambda s: s.encode("utf-8", "surrogatepass")),
    JSON_VALUES.map(dumps),
    NDJSONS,
    FORMS,
    ENCODED_FORMS,
    MULTIPARTS,
]
BODIES = st.sampled_from(BODY_KINDS).flatmap(lambda kind: kind)


CONTENT_TYPES: list[str | None] = [
    FORM,
    JSON,
    NDJSON,
    MULTIPART,
    None,
    "application/octet-stream",
    "text/plain; charset=utf-8",
    "garbage",
]


@pytest.mark.filterwarnings(IGNORE_MULTIPART_WARNINGS)
@pytest.mark.filterwarnings(IGNORE_MULTIPART_PARAM_WARNINGS)
@settings(
    max_examples=150,
    deadline=None,
    database=None,  # leave no .hypothesis/ directory behind
    derandomize=True,  # the same examples on every run: a red build is reproducible
    # No shrinking: each example costs 16 requests, and shrinking a failure took ~25 s. The bodies
    # are small (<= 200 bytes), so the first failing one is readable as it is.
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(body=BODIES)
def test_fuzzed_bodies_never_get_a_server_error(
    threaded_intake: ThreadedIntake, body: bytes
) -> None:
    server = threaded_intake
    stats = server.state.stats
    for path in (CREATE, BATCH):
        for ctype in CONTENT_TYPES:
            what = f"POST {path} Content-Type={ctype!r} body={body[:200]!r}"
            invalid, accepted = stats.invalid_requests, stats.accepted
            status, got_ctype, raw = server.post(path, body, ctype)
            answer = check_answer(status, got_ctype, raw, what)
            if status == 202:
                queued = server.call(server.state.queue.take_all)
                assert not unencodable(queued), f"{what} queued {unencodable(queued)}"
                count = answer["data"].get("count", 1)
                assert stats.accepted - accepted == count == len(queued), what
            else:
                assert stats.accepted == accepted, what
                assert len(server.state.queue) == 0, what
            assert stats.invalid_requests - invalid == (1 if 400 <= status < 500 else 0), (
                f"{what} -> {status}: invalid_requests counted {stats.invalid_requests - invalid}"
            )


# --- a corpus of nasty requests, through a real client --------------------------------------------


@dataclass(slots=True)
class Served:
    client: TestClient[web.Request, web.Application]
    state: IntakeState

    async def send(
        self,
        method: str,
        path: str,
        body: bytes | AsyncIterator[bytes] = b"",
        content_type: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, dict[str, Any]]:
        all_headers = dict(headers or {})
        if content_type is not None:
            all_headers["Content-Type"] = content_type
        skip = [] if content_type is not None else ["Content-Type"]
        async with self.client.request(
            method, path, data=body, headers=all_headers, skip_auto_headers=skip
        ) as response:
            raw = await response.read()
            what = f"{method} {path} Content-Type={content_type!r}"
            answer = check_answer(
                response.status, response.content_type, raw, what, head=method == "HEAD"
            )
            queued = self.state.queue.take_all()
            assert not unencodable(queued), f"{what} queued {unencodable(queued)}"
            return response.status, answer


class ServeFactory(Protocol):
    def __call__(self, *, max_body_bytes: int = ..., max_batch: int = ...) -> Awaitable[Served]: ...


@pytest.fixture
def serve(serve_intake: ServeIntake) -> ServeFactory:
    async def factory(*, max_body_bytes: int = MAX_BODY, max_batch: int = 100) -> Served:
        state = new_state(max_batch=max_batch, max_body_bytes=max_body_bytes)
        return Served(await serve_intake(state), state)

    return factory


@pytest.fixture
async def served(serve: ServeFactory) -> Served:
    return await serve()


@dataclass(frozen=True, slots=True)
class Nasty:
    path: str
    content_type: str | None
    body: bytes


def mp(*parts: tuple[str, bytes], boundary: str = BOUNDARY, end: bool = True) -> bytes:
    """A multipart body from raw (headers, payload) parts."""
    out = b""
    for headers, payload in parts:
        out += f"--{boundary}\r\n{headers}\r\n\r\n".encode() + payload + b"\r\n"
    return out + (f"--{boundary}--\r\n".encode() if end else b"")


def part(name: str, extra: str = "") -> str:
    return f'Content-Disposition: form-data; name="{name}"' + (f"\r\n{extra}" if extra else "")


OK_PARTS = ((part("recipient_id"), b"1"), (part("name"), b"x"))
DEEP = 100_000
CORPUS: dict[str, Nasty] = {
    # invalid UTF-8, wrong encodings, BOMs
    "form-invalid-utf8-value": Nasty(CREATE, FORM, b"recipient_id=1&name=\xff\xfe"),
    "form-invalid-utf8-key": Nasty(CREATE, FORM, b"\xc3(=1&recipient_id=1&name=x"),
    "form-percent-invalid-utf8": Nasty(CREATE, FORM, b"recipient_id=1&name=%FF%FE%ED%A0%80"),
    "form-utf16-charset": Nasty(CREATE, f"{FORM}; charset=utf-16", b"recipient_id=1&name=x"),
    "form-unknown-charset": Nasty(CREATE, f"{FORM}; charset=x-no-such", b"recipient_id=1&name=x"),
    "form-empty-charset": Nasty(CREATE, f'{FORM}; charset=""', b"recipient_id=1&name=x"),
    "json-invalid-utf8-create": Nasty(CREATE, JSON, b'{"recipient_id": "1", "name": "\xff"}'),
    "json-invalid-utf8-batch": Nasty(BATCH, JSON, b'[{"recipient_id": "1", "name": "\xc3"}]'),
    "ndjson-invalid-utf8": Nasty(BATCH, NDJSON, b'{"recipient_id": "1", "name": "\xed\xa0\x80"}'),
    "json-utf16": Nasty(BATCH, JSON, '[{"recipient_id": "1", "name": "x"}]'.encode("utf-16")),
    "json-utf8-bom": Nasty(BATCH, JSON, b'\xef\xbb\xbf[{"recipient_id": "1", "name": "x"}]'),
    "json-charset-param-ignored": Nasty(BATCH, f"{JSON}; charset=latin-1", b"[{}]"),
    # NUL bytes
    "form-nul-raw": Nasty(CREATE, FORM, b"recipient_id=1&name=a\x00b"),
    "form-nul-escaped": Nasty(CREATE, FORM, b"recipient_id=1&name=a%00b"),
    "form-nul-key": Nasty(CREATE, FORM, b"recipient_id=1&name=x&%00=1"),
    "json-nul-value": Nasty(BATCH, JSON, b'[{"recipient_id": "\\u0000", "name": "x"}]'),
    "json-nul-key": Nasty(CREATE, JSON, b'{"\\u0000": 1, "recipient_id": "1", "name": "x"}'),
    "json-nul-raw-byte": Nasty(CREATE, JSON, b'{"recipient_id": "1", "name": "a\x00"}'),
    "multipart-nul": Nasty(CREATE, MULTIPART, mp(OK_PARTS[0], (part("name"), b"a\x00b"))),
    # lone surrogates, which JSON escapes can carry but UTF-8 cannot encode
    "json-surrogate-key-create": Nasty(
        CREATE, JSON, b'{"\\ud800": 1, "recipient_id": "1", "name": "x"}'
    ),
    "json-surrogate-key-batch": Nasty(
        BATCH, JSON, b'[{"\\udc00x": 1, "recipient_id": "1", "name": "x"}]'
    ),
    "json-surrogate-name": Nasty(CREATE, JSON, b'{"recipient_id": "1", "name": "\\ud800"}'),
    "json-surrogate-recipient": Nasty(BATCH, JSON, b'[{"recipient_id": "\\udfff", "name": "x"}]'),
    "json-surrogate-value": Nasty(
        BATCH, JSON, b'[{"recipient_id": "1", "name": "x", "value": "\\ud83d"}]'
    ),
    "json-surrogate-ref": Nasty(
        BATCH, JSON, b'[{"recipient_id": "1", "name": "x", "ref": "\\ud800"}]'
    ),
    "json-surrogate-data": Nasty(
        BATCH, JSON, b'[{"recipient_id": "1", "name": "x", "data": {"k": "\\ud800"}}]'
    ),
    "json-surrogate-event-id": Nasty(
        BATCH, JSON, b'[{"recipient_id": "1", "name": "x", "event_id": "abcdefghij\\ud800"}]'
    ),
    "ndjson-surrogate-key": Nasty(BATCH, NDJSON, b'{"\\ud800": 1}\n'),
    "json-surrogate-pair-ok": Nasty(
        CREATE, JSON, b'{"recipient_id": "1", "name": "\\ud83d\\ude00"}'
    ),
    # deep nesting
    "deep-array-create": Nasty(CREATE, JSON, b"[" * DEEP),
    "deep-array-batch": Nasty(BATCH, JSON, b"[" * DEEP),
    "deep-array-ndjson": Nasty(BATCH, NDJSON, b"[" * DEEP),
    "deep-balanced-batch": Nasty(BATCH, JSON, b"[" * DEEP + b"]" * DEEP),
    "deep-object-create": Nasty(CREATE, JSON, b'{"a":' * DEEP + b"1" + b"}" * DEEP),
    "deep-data": Nasty(
        BATCH,
        JSON,
        b'[{"recipient_id": "1", "name": "x", "data": ' + b"[" * 20_000 + b"]" * 20_000 + b"}]",
    ),
    # huge values and many fields
    "huge-name-form": Nasty(CREATE, FORM, b"recipient_id=1&name=" + b"n" * 900_000),
    "huge-name-json": Nasty(CREATE, JSON, dumps({"recipient_id": "1", "name": "n" * 900_000})),
    "huge-data-json": Nasty(
        BATCH, JSON, dumps([{"recipient_id": "1", "name": "x", "data": "d" * 900_000}])
    ),
    "huge-key-json": Nasty(
        CREATE, JSON, dumps({"k" * 500_000: 1, "recipient_id": "1", "name": "x"})
    ),
    "huge-integer": Nasty(BATCH, JSON, b'[{"recipient_id": 1' + b"0" * 10_000 + b', "name": "x"}]'),
    "huge-exponent": Nasty(BATCH, JSON, b'[{"recipient_id": 1e999999, "name": "x"}]'),
    "many-unknown-keys": Nasty(CREATE, JSON, dumps({f"k{i}": i for i in range(20_000)})),
    "many-batch-items": Nasty(BATCH, JSON, dumps([{}] * 50_000)),
    "many-ndjson-lines": Nasty(BATCH, NDJSON, b"{}\n" * 50_000),
    "many-form-fields": Nasty(CREATE, FORM, "&".join(f"f{i}=1" for i in range(500)).encode()),
    "duplicate-form-keys": Nasty(CREATE, FORM, b"recipient_id=1&" + b"name=x&" * 500),
    "duplicate-json-keys": Nasty(CREATE, JSON, b'{"recipient_id": "1", "name": "x", "name": "y"}'),
    # wrong and odd content types
    "multipart-no-boundary": Nasty(CREATE, "multipart/form-data", mp(*OK_PARTS)),
    "multipart-wrong-boundary": Nasty(CREATE, "multipart/form-data; boundary=other", mp(*OK_PARTS)),
    "multipart-boundary-too-long": Nasty(
        CREATE, "multipart/form-data; boundary=" + "b" * 200, b"x"
    ),
    "multipart-mixed": Nasty(CREATE, f"multipart/mixed; boundary={BOUNDARY}", mp(*OK_PARTS)),
    "multipart-to-batch": Nasty(BATCH, MULTIPART, mp(*OK_PARTS)),
    "json-to-form-type": Nasty(CREATE, FORM, dumps({"recipient_id": "1", "name": "x"})),
    "form-to-json-type": Nasty(CREATE, JSON, b"recipient_id=1&name=x"),
    "ndjson-to-create": Nasty(CREATE, NDJSON, b'{"recipient_id": "1", "name": "x"}\n'),
    "text-html": Nasty(BATCH, "text/html", b"<html></html>"),
    "star-star": Nasty(BATCH, "*/*", b"[]"),
    "semicolons": Nasty(BATCH, ";;;", b"[]"),
    "two-types": Nasty(BATCH, "application/json, text/plain", b"[]"),
    "empty-type": Nasty(BATCH, "", b"[]"),
    "empty-body-json": Nasty(CREATE, JSON, b""),
    "empty-body-form": Nasty(CREATE, FORM, b""),
    "empty-body-multipart": Nasty(CREATE, MULTIPART, b""),
    # multipart, part by part
    "multipart-file-part": Nasty(
        CREATE, MULTIPART, mp(OK_PARTS[0], (part("name") + '; filename="n.txt"', b"x"))
    ),
    "multipart-nameless-part": Nasty(
        CREATE, MULTIPART, mp(("Content-Disposition: form-data", b"x"))
    ),
    "multipart-bad-disposition": Nasty(CREATE, MULTIPART, mp(('Content-Disposition: ;;;"', b"x"))),
    "multipart-not-terminated": Nasty(CREATE, MULTIPART, mp(*OK_PARTS, end=False)),
    "multipart-preamble": Nasty(CREATE, MULTIPART, b"junk\r\n" + mp(*OK_PARTS)),
    "multipart-nested": Nasty(
        CREATE,
        MULTIPART,
        mp(
            (part("name", "Content-Type: multipart/mixed; boundary=in"), b"--in\r\n\r\nx\r\n--in--")
        ),
    ),
    "multipart-bad-base64": Nasty(
        CREATE, MULTIPART, mp((part("name", "Content-Transfer-Encoding: base64"), b"!!!"))
    ),
    "multipart-bad-gzip-part": Nasty(
        CREATE, MULTIPART, mp((part("name", "Content-Encoding: gzip"), b"not gzip"))
    ),
    "multipart-invalid-utf8": Nasty(CREATE, MULTIPART, mp(OK_PARTS[0], (part("name"), b"\xff"))),
    "multipart-unknown-transfer-encoding": Nasty(
        CREATE, MULTIPART, mp((part("name", "Content-Transfer-Encoding: x-rot13"), b"x"))
    ),
    "multipart-unknown-charset": Nasty(
        CREATE, MULTIPART, mp((part("name", "Content-Type: text/plain; charset=x-no-such"), b"x"))
    ),
    "multipart-header-without-colon": Nasty(
        CREATE, MULTIPART, mp((part("name", "this is not a header"), b"x"))
    ),
    "multipart-too-many-part-headers": Nasty(
        CREATE,
        MULTIPART,
        mp((part("name", "\r\n".join(f"X-H{i}: v" for i in range(200))), b"x")),
    ),
    "multipart-huge-part-header": Nasty(
        CREATE, MULTIPART, mp((part("name", "X-Long: " + "v" * 20_000), b"x"))
    ),
}


@pytest.mark.parametrize("nasty", list(CORPUS.values()), ids=list(CORPUS))
@pytest.mark.filterwarnings(IGNORE_MULTIPART_WARNINGS)
@pytest.mark.filterwarnings(IGNORE_MULTIPART_PARAM_WARNINGS)
async def test_nasty_bodies(served: Served, nasty: Nasty) -> None:
    await served.send("POST", nasty.path, nasty.body, nasty.content_type)


@pytest.mark.parametrize("path", [CREATE, BATCH])
@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"])
async def test_wrong_methods_on_post_routes(served: Served, method: str, path: str) -> None:
    status, _ = await served.send(method, path, b'{"recipient_id": "1", "name": "x"}', JSON)
    assert status == 405
    assert len(served.state.queue) == 0


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics", "/v1/stats"])
@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
async def test_wrong_methods_on_get_routes(served: Served, method: str, path: str) -> None:
    status, _ = await served.send(method, path, b"[]", JSON)
    assert status == 405


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("Authorization", "Basic " + "A" * 8000),
        ("X-Api-Key", "k" * 8000),
        ("Content-Type", FORM + "; x=" + "y" * 8000),
        ("Cookie", "; ".join(f"c{i}=v" for i in range(800))),
    ],
)
async def test_long_header_values_under_the_limit(served: Served, name: str, value: str) -> None:
    ctype = None if name == "Content-Type" else FORM  # then the header itself is the type
    status, _ = await served.send("POST", CREATE, b"recipient_id=1&name=x", ctype, {name: value})
    assert status == 202


async def test_chunked_body_is_read_like_any_other(served: Served) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for piece in (b'[{"recipient_id"', b': "1", "na', b'me": "x"}', b"]"):
            yield piece

    status, answer = await served.send("POST", BATCH, chunks(), JSON)
    assert status == 202
    assert answer["data"]["count"] == 1


async def test_chunked_garbage_is_400(served: Served) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b"\xff\xfe"
        yield b"[" * 1000

    status, _ = await served.send("POST", BATCH, chunks(), JSON)
    assert status == 400


@pytest.mark.parametrize(("encoding", "path"), [("gzip", BATCH), ("deflate", CREATE)])
async def test_corrupt_compressed_body_is_a_client_error(
    served: Served, encoding: str, path: str
) -> None:
    ctype = JSON if path == BATCH else FORM
    status, _ = await served.send(
        "POST", path, b"this is not compressed", ctype, {"Content-Encoding": encoding}
    )
    assert status == 400
    assert served.state.stats.invalid_requests == 1


async def test_compressed_body_is_accepted_and_bomb_is_413(serve: ServeFactory) -> None:
    served = await serve(max_body_bytes=64 * 1024)
    body = dumps([{"recipient_id": "1", "name": "x"}])
    gz = {"Content-Encoding": "gzip"}
    status, _ = await served.send("POST", BATCH, gzip.compress(body), JSON, gz)
    assert status == 202
    bomb = gzip.compress(dumps([{"recipient_id": "1", "name": "x", "data": "a" * 5_000_000}]))
    assert len(bomb) < 64 * 1024
    status, _ = await served.send("POST", BATCH, bomb, JSON, gz)
    assert status == 413
    deflated = zlib.compress(b"recipient_id=1&name=x")
    status, _ = await served.send("POST", CREATE, deflated, FORM, {"Content-Encoding": "deflate"})
    assert status == 202


async def test_refused_multipart_file_part_leaves_no_open_file(served: Served) -> None:
    # A file part that is cut short (no closing boundary): aiohttp's request.post() spools it into
    # a SpooledTemporaryFile, raises ValueError, and never closes the file; intake answers 400.
    body = mp(OK_PARTS[0], (part("name") + '; filename="n.txt"', b"x" * 100), end=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        status, _ = await served.send("POST", CREATE, body, MULTIPART)
        gc.collect()
    assert status == 400
    leaked = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert not leaked


async def test_too_many_form_fields_is_refused_with_a_true_message(serve: ServeFactory) -> None:
    served = await serve(max_body_bytes=1024 * 1024)
    body = "&".join(f"f{i}=1" for i in range(5000)).encode()  # ~40 KB, far under the limit
    status, answer = await served.send("POST", CREATE, body, FORM)
    assert 400 <= status < 500
    if status == 413:
        assert "max_body_bytes" not in answer["error"], answer  # the body was not too large


# --- raw HTTP, below any client's politeness ------------------------------------------------------


async def raw_exchange(served: Served, request: bytes) -> tuple[int, bytes, bytes]:
    """Send bytes as they are; return the status, the response head and the body."""
    server = served.client.server
    assert server.host is not None
    assert server.port is not None
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        writer.write(request)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0]
    assert status_line.startswith(b"HTTP/"), data[:300]
    return int(status_line.split()[1]), head, body


def http_request(
    method: str, target: str, *, headers: Mapping[str, str] | None = None, body: bytes = b""
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: intake.test", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body and not any(k.lower() == "transfer-encoding" for k in headers or {}):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


CHUNKED = {"Content-Type": JSON, "Transfer-Encoding": "chunked"}
RAW: dict[str, tuple[bytes, set[int]]] = {
    "dotdot-literal": (http_request("GET", "/v1/../healthz"), {200, 404}),
    "dotdot-encoded": (http_request("GET", "/%2e%2e/etc/passwd"), {404}),
    "dotdot-encoded-under-v1": (http_request("GET", "/v1/%2e%2e/%2e%2e/etc/passwd"), {404}),
    "dotdot-many": (http_request("GET", "/../../../../etc/passwd"), {404}),
    "dotdot-post": (
        http_request("POST", "/v1/events/../events", headers={"Content-Type": JSON}, body=b"[]"),
        {400, 404},
    ),
    "backslashes": (http_request("GET", "/..\\..\\etc\\passwd"), {404}),
    "double-slash": (http_request("GET", "//etc/passwd"), {404}),
    "nul-in-path": (http_request("GET", "/healthz%00.json"), {404}),
    "bad-percent": (http_request("GET", "/%zz%"), {400, 404}),
    "utf8-path": (http_request("GET", "/%C3%A9v%C3%A9nements"), {404}),
    "invalid-utf8-path": (http_request("GET", "/%FF%FE"), {400, 404}),
    "very-long-path": (http_request("GET", "/" + "a" * 7000), {404, 414, 400}),
    "absolute-form": (http_request("GET", "http://elsewhere.example/healthz"), {200, 400}),
    "asterisk-form": (http_request("OPTIONS", "*"), {400, 404, 405}),
    "unknown-method": (http_request("FROB", BATCH), {400, 405, 501}),
    "trace": (http_request("TRACE", CREATE), {405}),
    "header-too-long": (http_request("GET", "/healthz", headers={"X-Long": "a" * 20_000}), {400}),
    "too-many-headers": (
        http_request("GET", "/healthz", headers={f"X-H{i}": "v" for i in range(300)}),
        {400, 431},
    ),
    "header-without-colon": (
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nnot a header\r\nConnection: close\r\n\r\n",
        {400},
    ),
    "nul-in-header": (http_request("GET", "/healthz", headers={"X-Nul": "a\x00b"}), {400, 200}),
    "chunked-valid": (
        http_request(
            "POST",
            BATCH,
            headers=CHUNKED,
            body=b'a\r\n[{"name": \r\n18\r\n"x", "recipient_id": 1}]\r\n0\r\n\r\n',
        ),
        {202},
    ),
    "chunked-bad-size": (
        http_request("POST", BATCH, headers=CHUNKED, body=b"zz\r\n[]\r\n0\r\n\r\n"),
        {400},
    ),
    "chunked-size-overflow": (
        http_request("POST", BATCH, headers=CHUNKED, body=b"ffffffffffffffffffff\r\n[]\r\n"),
        {400, 413},
    ),
    "chunked-and-content-length": (
        http_request("POST", BATCH, headers={**CHUNKED, "Content-Length": "5"}, body=b"0\r\n\r\n"),
        {400},
    ),
    "content-length-negative": (
        b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\nConnection: close\r\n\r\n",
        {400},
    ),
    "content-length-twice": (
        b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 2\r\nContent-Length: 3\r\nConnection: close\r\n\r\n[]]",
        {400},
    ),
    "not-http": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 tls hello?\r\n\r\n", {400}),
    "http-0.9-ish": (b"GET /healthz\r\n\r\n", {400, 200}),
    "http-1.0": (b"GET /healthz HTTP/1.0\r\n\r\n", {200}),
}


@pytest.mark.parametrize(("request_bytes", "expected"), list(RAW.values()), ids=list(RAW))
async def test_raw_requests(served: Served, request_bytes: bytes, expected: set[int]) -> None:
    status, head, body = await raw_exchange(served, request_bytes)
    assert status < 500, (status, body[:300])
    assert status in expected, (status, body[:300])
    if b"application/json" in head.lower():
        answer = json.loads(body)
        assert isinstance(answer, dict)
        if status >= 400:
            assert answer["success"] is False
    queued = served.state.queue.take_all()
    assert not unencodable(queued)
