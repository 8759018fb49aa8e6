"""A request's account: the events' own, the ``X-Forwarder-Account`` header, or the client's key.

Worked out once per request, before the events are built; an account no event may use makes the
request `Unroutable`, answered by `answers.unroutable_answer`.
"""

from __future__ import annotations

import base64
import binascii

from aiohttp import web

from forwarder.events import Event
from forwarder.events.model import FieldError
from forwarder.intake.accounts import AccountError, Accounts
from forwarder.intake.state import IntakeState

ACCOUNT_HEADER = "X-Forwarder-Account"


def presented_client_key(request: web.Request) -> str | None:
    """The API key an app sent the remote's way (Basic auth user name), if any."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "basic" or not token:
        return None
    try:
        user = base64.b64decode(token.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return user.partition(":")[0] or None


def request_account(
    state: IntakeState, items: list[object], header: str, client_key: str | None = None
) -> str:
    """The account of this request's events that name none; raises Unroutable.

    Worked out once per request, before the events are built, so that no event is copied to set
    its account. Only when some item names no account: an explicit account wins over the header
    and the client key, which are then not looked at (a client key would open a lane).
    """
    router = state.accounts
    if router is None or not any(
        not isinstance(item, dict) or item.get("account") is None for item in items
    ):
        return ""
    return route_fallback(router, header, client_key)


def route_fallback(router: Accounts, header: str, client_key: str | None) -> str:
    """The account for events that name none; raises Unroutable."""
    try:
        return router.route("", header=header, client_key=client_key)
    except AccountError as exc:
        raise Unroutable([FieldError(-1, exc.field, str(exc))], exc.status) from None


def open_client(router: Accounts | None, client_key: str) -> None:
    """Create (or touch) the account of a valid request's client key; raises Unroutable."""
    assert router is not None
    try:
        router.open_client(client_key)
    except AccountError as exc:
        raise Unroutable([FieldError(-1, exc.field, str(exc))], exc.status) from None


def check_accounts(state: IntakeState, events: list[Event], fallback: str) -> None:
    """Every account an event names must be configured; raises Unroutable (with the items)."""
    router = state.accounts
    if router is None:
        return
    errors: list[FieldError] = []
    status = 400
    for index, event in enumerate(events):
        if event.account == fallback:
            continue  # the router chose it
        try:
            router.route(event.account)
        except AccountError as exc:
            errors.append(FieldError(index, exc.field, str(exc)))
            status = max(status, exc.status)
    if errors:
        raise Unroutable(errors, status)


class Unroutable(Exception):
    def __init__(self, errors: list[FieldError], status: int) -> None:
        super().__init__(errors[0].message)
        self.errors = errors
        self.status = status
