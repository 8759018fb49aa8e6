"""The client for the remote's `recipientEvents/create`: one request, its answer classified.

The client never touches the queue and never retries: it turns one attempt into a `Result` whose
`verdict` tells the dispatcher what to do next.

The API key travels only to the configured base URL's origin (scheme, host, port), only over
verified TLS (or plain http to a loopback host, which config/validate.py allows for the mock), and
never along a redirect: a 3xx is not followed but dead-lettered as `redirected`.

One module (just over 400 lines): reading the headers, classifying the answer and sending the
request are one job, the remote's contract; most of the length is the header checks a broken
remote needs.
"""

from __future__ import annotations

import email.utils
import enum
import json
import math
import re
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import quote_plus, urlsplit

import aiohttp
import orjson
import structlog
from yarl import URL

from forwarder import __version__
from forwarder.delivery.flow.ratewindow import MAX_WINDOW_S
from forwarder.events import Event
from forwarder.ops.credentials import Secret, basic_token, secret_forms

log = structlog.get_logger("forwarder.remote")

USER_AGENT = f"forwarder/{__version__}"
MAX_RESPONSE_BYTES = 64 * 1024
MAX_ERROR_CHARS = 300
# A remote id given as text longer than this is not an id (the remote's ids are integers).
MAX_REMOTE_ID_CHARS = 64
# A server's wait hint (Retry-After, X-RateLimit-Reset) beyond this is nonsense: ignored, not
# obeyed for days.
MAX_HINT_S = 3600.0
# An X-RateLimit-Limit or -Remaining beyond this is nonsense (plans go to 3 000 a minute): ignored.
MAX_QUOTA = 1_000_000_000
RETRYABLE_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
AUTH_STATUSES = frozenset({401, 403})
# The dead-letter reason of a 3xx: the base URL is wrong (moved, http->https), not the event.
REDIRECTED = "redirected"


def make_ssl_context(ca_bundle: str = "") -> ssl.SSLContext:
    """The TLS context of the one ClientSession: certificates and host names always verified.

    `ca_bundle` (``remote.ca_bundle``, a PEM file) replaces the system's trust store; "" uses
    the system's. Reads files: call it off the event loop. There is no switch to turn checks off.
    """
    context = ssl.create_default_context(cafile=ca_bundle or None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # create_default_context sets both already; stated here so no later change can drop them.
    context.verify_mode = ssl.CERT_REQUIRED
    context.check_hostname = True
    return context


class KeyOriginError(RuntimeError):
    """A request URL outside the base URL's origin: the key must not go there (a bug)."""


class Verdict(enum.Enum):
    """What an attempt means for the event."""

    DELIVERED = "delivered"
    RETRY = "retry"
    AUTH = "auth"  # the key is refused: true for every event, so pause rather than dead-letter
    PERMANENT = "permanent"


# Not frozen: `classify` and `RemoteClient.send` fill in the rate headers, the scrubbed error and
# the latency on the Result they just made, instead of copying it twice per attempt
# (`dataclasses.replace` cost about as much as the rest of the classification).
@dataclass(slots=True)
class Result:
    """The classified outcome of one attempt."""

    verdict: Verdict
    status: int | None = None
    remote_id: int | str | None = None  # the remote's id of the event (`_remote_id`)
    error: str = ""
    retry_after: float | None = None
    duplicate: bool = False  # 409: the remote already has this event under its idempotency key
    warning: str = ""
    # The dead-letter reason of a PERMANENT verdict when it is not the event's fault ("": rejected).
    reason: str = ""
    latency_s: float = 0.0
    # The account's quota as this answer reported it (X-RateLimit-*), for the rate limiter.
    rate_limit: int | None = None
    rate_remaining: int | None = None
    rate_reset_s: float | None = None

    @property
    def rate_limited(self) -> bool:
        """A 429: the remote did nothing because the account's quota is spent."""
        return self.status == 429

    @property
    def transient_failure(self) -> bool:
        """A failure that says the remote is unwell (timeouts, dropped connections, 5xx, 408).

        These push adaptive concurrency down and count towards the circuit breaker; a 429 does
        neither (the remote is fine, the quota is spent).
        """
        return self.verdict is Verdict.RETRY and not self.rate_limited


def _malformed(header: str) -> None:
    """Say that a header the remote sent was nonsense and is ignored: once per header name.

    Every answer may carry the same broken header; one line says it, later ones add nothing.
    The value is not logged: it could be anything the remote echoes, cut where no redactor
    would recognise it.
    """
    if header not in _REPORTED:
        _REPORTED.add(header)
        log.warning(
            "remote_header_ignored",
            header=header,
            note="not a number in range (or, for Retry-After, an HTTP date); ignored here and "
            "in later answers, which are not logged again",
        )


# Header names already reported by `_malformed` (process-wide: the remote is one remote).
_REPORTED: set[str] = set()


def _retry_after(headers: Mapping[str, str]) -> float | None:
    """Retry-After in seconds (delta-seconds or an HTTP date), or None if absent or nonsense."""
    text = headers.get("Retry-After", "").strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (ValueError, TypeError, OverflowError, IndexError):
            when = None
        if when is None or when.tzinfo is None:
            _malformed("Retry-After")
            return None
        seconds = max(when.timestamp() - time.time(), 0.0)  # a past date: now (clock skew)
    if not 0 <= seconds <= MAX_HINT_S:  # also NaN
        _malformed("Retry-After")
        return None
    return seconds


def _wait_hint(headers: Mapping[str, str], *, rate_limited: bool) -> float | None:
    """Seconds the server asks us to wait: Retry-After, and on a 429 also X-RateLimit-Reset.

    X-RateLimit-Reset comes on every answer; it is a reason to wait only when the quota is spent.
    A malformed hint is ignored (the status is retried as any other), never an error.
    """
    reset = _header_number(headers, "X-RateLimit-Reset", MAX_HINT_S) if rate_limited else None
    if reset is not None:
        # A spent quota comes back when the window ends, and no window is longer than a minute:
        # one odd reset must not hold the account for an hour (an explicit Retry-After may).
        reset = min(reset, MAX_WINDOW_S)
    hints = [hint for hint in (_retry_after(headers), reset) if hint is not None]
    return max(hints) if hints else None


def _header_number(headers: Mapping[str, str], name: str, maximum: float) -> float | None:
    """A number header in 0..`maximum`; None if absent, and (logged once) if anything else."""
    text = headers.get(name, "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value <= maximum:  # also NaN and infinities
        _malformed(name)
        return None
    return value


def _take_rate_headers(result: Result, headers: Mapping[str, str]) -> None:
    """`X-RateLimit-*` into `result`; missing or malformed headers are left out."""
    limit = _header_number(headers, "X-RateLimit-Limit", MAX_QUOTA)
    remaining = _header_number(headers, "X-RateLimit-Remaining", MAX_QUOTA)
    reset = _header_number(headers, "X-RateLimit-Reset", MAX_HINT_S)
    if limit is not None and limit >= 1:
        result.rate_limit = int(limit)
    if remaining is not None:
        result.rate_remaining = int(remaining)
    if reset is not None:
        result.rate_reset_s = reset


def _json_body(body: bytes) -> object:
    """The answer's JSON, or None if it is not JSON (orjson first; the standard module for what
    orjson refuses but JSON allows, such as a lone surrogate escape)."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return None


def _remote_id(data: object) -> int | str | None:
    """The remote's id of a created event from its answer's `data`: a scalar, else None.

    The remote answers an integer. A 64-bit integer or a short printable string is kept as an
    id; anything else (an object, a list, a boolean, a float, a long text) is not an id, and is
    neither kept nor logged: the remote could echo anything there, the key included.
    """
    if isinstance(data, bool):
        return None
    if isinstance(data, int):
        return data if -(2**63) <= data < 2**63 else None
    if isinstance(data, str) and len(data) <= MAX_REMOTE_ID_CHARS and data.isprintable():
        return data
    return None


def _error_text(body: bytes, fallback: str) -> str:
    parsed = _json_body(body)
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), str) and parsed["error"]:
        text: str = parsed["error"]
    else:
        text = body.decode("utf-8", "replace").strip() or fallback
    text = " ".join(text.split())
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


def classify(status: int, body: bytes, headers: Mapping[str, str], reason: str = "") -> Result:
    """Classify one answer of the remote, with its rate-limit headers (pure)."""
    result = _classify(status, body, headers, reason)
    _take_rate_headers(result, headers)
    return result


def _redirect_host(location: str) -> str:
    """The host a Location header points to, and nothing else of it (paths may carry secrets)."""
    try:
        host = urlsplit(location.strip()).hostname
    except ValueError:
        return "an invalid location"
    if not location.strip():
        return "nowhere (no Location header)"
    if not host:
        return "the same host"
    host = "".join(ch for ch in host if ch.isprintable())[:255]
    return host or "an invalid location"


def _classify(status: int, body: bytes, headers: Mapping[str, str], reason: str) -> Result:
    fallback = f"HTTP {status} {reason}".strip()
    if 300 <= status < 400:
        # Not followed (the key would go along), and not retried: the same URL redirects again.
        target = _redirect_host(headers.get("Location", ""))
        return Result(
            Verdict.PERMANENT,
            status,
            error=(
                f"HTTP {status} redirect to {target}: redirects are not followed (the API key "
                "would go with it); check remote.base_url"
            ),
            reason=REDIRECTED,
        )
    if 200 <= status < 300:
        parsed = _json_body(body)
        if isinstance(parsed, dict) and parsed.get("success") is True:
            return Result(Verdict.DELIVERED, status, remote_id=_remote_id(parsed.get("data")))
        if isinstance(parsed, dict) and parsed.get("success") is False:
            return Result(Verdict.PERMANENT, status, error=_error_text(body, fallback))
        # The remote took the request (2xx) but said so oddly: sending again could duplicate it.
        return Result(
            Verdict.DELIVERED,
            status,
            warning="2xx answer without the expected JSON body; counted as delivered",
        )
    if status == 409:
        parsed = _json_body(body)
        remote_id = _remote_id(parsed.get("data")) if isinstance(parsed, dict) else None
        return Result(Verdict.DELIVERED, status, remote_id=remote_id, duplicate=True)
    error = _error_text(body, fallback)
    if status in AUTH_STATUSES:
        return Result(Verdict.AUTH, status, error=error)
    if status in RETRYABLE_STATUSES:
        return Result(
            Verdict.RETRY,
            status,
            error=error,
            retry_after=_wait_hint(headers, rate_limited=status == 429),
        )
    return Result(Verdict.PERMANENT, status, error=error)


async def _read_capped(stream: aiohttp.StreamReader, limit: int) -> bytes:
    """The body up to `limit` bytes: enough for any real answer, bounded against a runaway one.

    `read(n)` returns what has arrived so far, not n bytes, so a body split across packets needs
    the loop.
    """
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = await stream.read(limit - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
        if stream.at_eof():
            break  # the whole body is here: no second read just to learn that
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


# Characters quote_plus leaves as they are: a value made of them alone is its own encoding.
_PLAIN = re.compile(r"[A-Za-z0-9_.~-]*")


def encode_form(fields: Mapping[str, str]) -> bytes:
    """The form as `urllib.parse.urlencode` encodes it, in a third of its time.

    urlencode's generality (bytes, sequences, any key) was the largest part of preparing a
    request; here the keys are our field names and only values holding a character to escape
    go through quote_plus.
    """
    return "&".join(
        [f"{k}={v if _PLAIN.fullmatch(v) else quote_plus(v)}" for k, v in fields.items()]
    ).encode("ascii")


class RemoteClient:
    """Sends events to `{base_url}/recipientEvents/create` over a shared ClientSession."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str, api_key: Secret) -> None:
        self._session = session
        # The only place the key may go: the base URL's scheme, host and port.
        self._origin = URL(base_url).origin()
        self._url = URL(f"{base_url.rstrip('/')}/recipientEvents/create")
        self._checked_url = self._url if self._url.origin() == self._origin else None
        key = api_key.reveal()
        # The key as a remote could echo it back: raw, as the Basic token, percent-encoded.
        self._forms = secret_forms(key)
        # Basic auth, the key as user name and an empty password. Built once, by hand:
        # aiohttp.BasicAuth is deprecated, and its replacement exists only in aiohttp >= 3.14.
        self._headers = {
            "Authorization": f"Basic {basic_token(key)}",
            "User-Agent": USER_AGENT,
            "Content-Type": "application/x-www-form-urlencoded",
        }

    async def send(self, event: Event) -> Result:
        """One attempt; transport failures become RETRY results, never exceptions.

        Raises KeyOriginError, before sending anything, if the request URL has left the base
        URL's origin.
        """
        url = self._url
        # The URL made at start was checked there; any other goes through the check here.
        if url is not self._checked_url and url.origin() != self._origin:
            # Checked on every request, not once: a URL built elsewhere cannot take the key along.
            raise KeyOriginError(
                f"refusing to send the API key to {url.scheme}://{url.host}:{url.port}: "
                f"it goes only to {self._origin}"
            )
        started = time.monotonic()
        try:
            async with self._session.post(
                url,
                # Encoded here: aiohttp's FormData machinery cost more than the rest of the
                # request's preparation, for the same bytes.
                data=encode_form(event.form()),
                headers={**self._headers, "X-Idempotency-Key": event.event_id},
                # A redirect would carry the key to wherever it points: never follow one.
                allow_redirects=False,
            ) as response:
                body = await _read_capped(response.content, MAX_RESPONSE_BYTES)
                result = classify(response.status, body, response.headers, response.reason or "")
        except (aiohttp.ClientError, TimeoutError) as exc:
            kind = "timeout" if isinstance(exc, TimeoutError) else type(exc).__name__
            detail = str(exc)
            result = Result(Verdict.RETRY, error=f"{kind}: {detail}" if detail else kind)
        result.error = self._scrub(result.error)
        if isinstance(result.remote_id, str):
            result.remote_id = self._scrub(result.remote_id)
        result.latency_s = time.monotonic() - started
        return result

    def _scrub(self, text: str) -> str:
        # The remote's free-text errors could echo what we sent (the key, or the whole
        # Authorization header); from here they reach logs, /readyz and dead letters.
        for form in self._forms:
            if form in text:
                text = text.replace(form, "[redacted]")
        return text
