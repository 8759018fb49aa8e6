"""The intake token: with `intake.auth_token` set, every request but GET /healthz must carry it.

As ``Authorization: Bearer <token>``, or in ``X-Forwarder-Token`` when the Authorization header
holds an app's own API key; compared in constant time, looked at before any body is read, and
never echoed.
"""

from __future__ import annotations

import hmac

import structlog
from aiohttp import web

from forwarder.intake.answers import json_answer
from forwarder.intake.state import STATE
from forwarder.ops.credentials import Secret

log = structlog.get_logger("forwarder.intake")


TOKEN_HEADER = "X-Forwarder-Token"


_OPEN_ROUTES = frozenset({("GET", "/healthz"), ("HEAD", "/healthz")})


def _presented_tokens(request: web.Request) -> list[str]:
    """What the request offers as the intake token: a Bearer credential, X-Forwarder-Token."""
    offered = [request.headers.get(TOKEN_HEADER, "")]
    scheme, _, credential = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        offered.append(credential.strip())
    return [token for token in offered if token]


def _token_matches(offered: str, token: Secret) -> bool:
    # Bytes, not str: compare_digest takes only ASCII str, and a header may hold anything.
    # Constant-time, so the comparison's duration does not tell how much of a guess was right.
    return hmac.compare_digest(
        offered.encode("utf-8", "surrogatepass"), token.reveal().encode("utf-8", "surrogatepass")
    )


def token_refusal(request: web.Request) -> web.Response | None:
    """With `intake.auth_token` set, the 401 for any request but GET /healthz without it.

    Looked at before any handler runs and before any body is read. The answer never echoes what
    the request sent.
    """
    state = request.app[STATE]
    token = state.auth_token
    if token is None or (request.method, request.path) in _OPEN_ROUTES:
        return None
    offered = _presented_tokens(request)
    if any(_token_matches(candidate, token) for candidate in offered):
        return None
    state.stats.unauthorized += 1
    # Throttled: a scanner must not flood the journal. Keyed by nothing the client chose.
    state.throttle.log(
        log,
        "warning",
        "unauthorized",
        peer=request.remote or "unix socket",
        path=request.path,
        token_sent=bool(offered),
        total=state.stats.unauthorized,
    )
    why = "wrong" if offered else "missing"
    return json_answer(
        401,
        {
            "success": False,
            "error": (
                f"{why} intake token: send it as 'Authorization: Bearer <token>', or in the "
                f"{TOKEN_HEADER} header when Authorization carries your API key "
                "(see intake.auth_token)"
            ),
            "reason": "unauthorized",
        },
        {"WWW-Authenticate": 'Bearer realm="forwarder"'},
    )
