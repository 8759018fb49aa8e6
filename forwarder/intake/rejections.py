"""What intake tells a client whose request aiohttp refused, without quoting the request.

aiohttp's own answers to a malformed request are text/plain and quote the offending bytes (its
log lines do too). connections.py answers with these JSON bodies instead, in the same
`{"success": false, "error": ...}` shape as every other intake error.
"""

from __future__ import annotations

import re

from aiohttp import http_exceptions

UNMET_EXPECTATION = {
    "success": False,
    "error": "unsupported Expect header: only '100-continue' is understood",
    "reason": "expectation_failed",
}
INTERNAL_ERROR = {
    "success": False,
    "error": "internal error while handling the request (see forwarder's log); retry later",
    "reason": "internal_error",
}


def describe_rejection(exc: BaseException) -> str:
    """What is wrong with a request aiohttp's parser refused, never echoing the request's bytes.

    aiohttp's messages quote the offending bytes (llhttp's reason, then the line and a caret).
    Only a first line made of plain words (llhttp's fixed reasons, "Too many headers received")
    is kept; the kinds whose message is built from the request get a fixed text.
    """
    for kind in type(exc).__mro__:
        fixed = _FIXED_FAULTS.get(kind)
        if fixed is not None:
            return fixed
    message = getattr(exc, "message", "")
    first = (message if isinstance(message, str) else "").split("\n", 1)[0].strip()
    first = first.removesuffix(":").strip()
    if _PLAIN_WORDS.fullmatch(first):
        return first
    return "the request is malformed"


# Built from the request's own bytes in aiohttp's message (a line, a header, a method, a path).
_FIXED_FAULTS: dict[type, str] = {
    http_exceptions.LineTooLong: "a request line or header is longer than 8190 bytes",
    http_exceptions.InvalidHeader: "a header is malformed",
    http_exceptions.BadHttpMethod: "the method is malformed",
    http_exceptions.BadStatusLine: "the request line is malformed",
    http_exceptions.InvalidURLError: "the request target is malformed",
    http_exceptions.ContentEncodingError: "the Content-Encoding cannot be decoded",
}
# Letters, digits, spaces and a little punctuation; an apostrophe only inside a word ("can't").
_PLAIN_WORDS = re.compile(r"[A-Za-z](?:[A-Za-z0-9 ,.()-]|(?<=[a-z])'(?=[a-z])){0,119}")
