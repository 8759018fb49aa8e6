"""Reading a request's body: bytes within `intake.body_timeout_s`, UTF-8 text, JSON, forms.

Anything a client got wrong becomes `BadBody` (a 400 naming the fault), never a 500; a body too
slow to arrive becomes `SlowBody` (a 408). Urlencoded forms are read as the remote's own kind
reads them (PHP), not as aiohttp's ``request.post()`` does.
"""

from __future__ import annotations

import asyncio
from urllib.parse import parse_qsl

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError
from multidict import MultiDict

from forwarder.events.model import FieldError
from forwarder.events.parse import describe_error, loads_json
from forwarder.intake.state import STATE

MAX_FORM_FIELDS = 1000  # aiohttp's own bound for urlencoded forms


def request_content_type(request: web.Request) -> str:
    return request.content_type.lower() if "Content-Type" in request.headers else ""


class SlowBody(Exception):
    """The body did not arrive within intake.body_timeout_s."""


class BadBody(Exception):
    """The body could not be read as the content type it claims."""

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.field = field


async def read_body(request: web.Request) -> bytes:
    try:
        if request.content.is_eof():
            # The whole body is here already (a small one comes with the head): reading cannot
            # wait, so no deadline. asyncio.timeout schedules and cancels a timer each time.
            return await request.read()  # raises 413 past client_max_size
        async with asyncio.timeout(request.app[STATE].body_timeout_s):
            return await request.read()
    except TimeoutError:
        raise SlowBody from None
    except (web.RequestPayloadError, HttpProcessingError) as exc:  # e.g. corrupt gzip
        raise BadBody(f"body cannot be read: {describe_error(exc)}") from None


async def read_text(request: web.Request) -> str:
    body = await read_body(request)
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadBody(f"body is not valid UTF-8 (byte {exc.start})") from None


async def read_json(request: web.Request) -> object:
    body = await read_body(request)
    try:
        return loads_json(body)
    except UnicodeDecodeError as exc:
        raise BadBody(f"body is not valid UTF-8 (byte {exc.start})") from None
    except (ValueError, RecursionError) as exc:
        raise BadBody(f"not valid JSON: {describe_error(exc)}") from None


_UTF8 = frozenset({"", "utf-8", "utf8"})


async def simple_form(request: web.Request) -> dict[str, object] | None:
    """The fields of an urlencoded form in the common case, or None for `read_form` to read.

    The common case: the whole body is here, UTF-8, with no percent escapes and no field given
    twice. It is split exactly as aiohttp's own parser splits such a body (yarl's
    query_to_pairs), without the two multidicts that request.post() and `read_form` build for
    a handful of fields. Anything else, errors included, takes `read_form`'s way as before
    (the body read here stays cached in the request).
    """
    charset = request.charset
    if not request.content.is_eof() or (charset is not None and charset.lower() not in _UTF8):
        return None
    try:
        body = await request.read()  # at once, the body is here; 413 past client_max_size
        # Not stripped (aiohttp's own parser strips): a trailing space is the last value's.
        text = body.decode("utf-8")
    except (UnicodeDecodeError, web.RequestPayloadError, HttpProcessingError):
        return None
    if "%" in text:
        return None
    pairs = text.replace("+", " ").split("&")
    if len(pairs) > MAX_FORM_FIELDS:
        return None
    fields: dict[str, object] = {}
    for pair in pairs:
        if pair:
            name, _, value = pair.partition("=")
            if name in fields:
                return None
            fields[name] = value
    return fields


async def read_form(request: web.Request, limit: int) -> MultiDict[str]:
    """The form's text fields; anything aiohttp cannot parse becomes a 400, never a 500."""
    try:
        if request.content_type != "multipart/form-data":
            return parse_urlencoded(await read_body(request), request.charset)
        async with asyncio.timeout(request.app[STATE].body_timeout_s):
            return await _read_multipart(request, limit)
    except TimeoutError:
        raise SlowBody from None
    except UnicodeDecodeError as exc:
        raise BadBody(f"form is not valid UTF-8 (byte {exc.start})") from None
    except _FORM_ERRORS as exc:
        raise BadBody(f"form cannot be read: {describe_error(exc)}") from None


def parse_urlencoded(body: bytes, charset: str | None) -> MultiDict[str]:
    """An urlencoded body's fields as the remote's own kind parses them (PHP: split at "&",
    "+" is a space, nothing stripped), not as request.post() does: it strips the body's end,
    and with it a trailing space of the last value."""
    encoding = charset or "utf-8"
    text = body.decode(encoding)
    pairs = parse_qsl(
        text,
        keep_blank_values=True,
        encoding=encoding,
        errors="strict",
        max_num_fields=MAX_FORM_FIELDS,
    )
    return MultiDict(pairs)


# What aiohttp raises on a form a client got wrong: bad charset names, broken multipart headers,
# unknown transfer encodings, corrupt compression.
_FORM_ERRORS = (
    ValueError,
    LookupError,
    RuntimeError,
    AssertionError,
    HttpProcessingError,
    web.RequestPayloadError,
)


async def _read_multipart(request: web.Request, limit: int) -> MultiDict[str]:
    # Walked by hand rather than with request.post(): that spools file parts to temporary files
    # it leaks when the body turns out broken, and a file is never an event field anyway.
    fields: MultiDict[str] = MultiDict()
    total = 0
    reader = await request.multipart()
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader):
            raise BadBody("nested multipart bodies are not supported")
        name = part.name or ""
        if part.filename is not None:
            raise BadBody("must be a text field, not a file", field=name)
        data = bytearray()
        while chunk := await part.read_chunk(64 * 1024):
            total += len(chunk)
            if total > limit:
                raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=total)
            data.extend(chunk)
        fields.add(name, part.decode(bytes(data)).decode(part.get_charset(default="utf-8")))
        if len(fields) > MAX_FORM_FIELDS:
            raise BadBody(f"more than {MAX_FORM_FIELDS} form fields")
    return fields


def form_to_mapping(form: MultiDict[str]) -> tuple[dict[str, object], list[FieldError]]:
    fields: dict[str, object] = {}
    errors: list[FieldError] = []
    for key in form:
        if key in fields:
            continue
        values = form.getall(key)
        if len(values) > 1:
            errors.append(FieldError(0, key, "given more than once"))
        else:
            fields[key] = values[0]
    return fields, errors
