"""The effective configuration as TOML (``forwarder check-config``), secrets masked.

Also the TOML value syntax generate.py writes the shipped config/forwarder.toml with.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping

from forwarder.config.schema import (
    ACCOUNT_KINDS,
    ACCOUNT_NAME_RE,
    FIELD_KINDS,
    SETTINGS,
    Config,
    Kind,
)

if typing.TYPE_CHECKING:
    from forwarder.ops.credentials import ApiKey

__all__ = ["MASK", "render_effective", "toml_string", "toml_value"]


_TOML_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}


def toml_string(value: str) -> str:
    out: list[str] = []
    for ch in value:
        if ch in _TOML_ESCAPES:
            out.append(_TOML_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def toml_value(kind: Kind, value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if kind == "mode" and isinstance(value, int) and value >= 0:
        return f"0o{value:o}"
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, float):
        return repr(value)  # repr keeps ".0"/exponent, and inf/nan are valid TOML too
    return str(value)


def _comment_safe(text: str) -> str:
    # A newline in a path must not end the comment and inject TOML.
    return "".join(ch if ch.isprintable() else f"\\x{ord(ch):02x}" for ch in text)


def _key_comment(key: ApiKey | None) -> str:
    return "not configured" if key is None else f"**** (from {_comment_safe(key.source)})"


# Settings whose values are secrets are shown as MASK when set.
MASK = "****"


def render_effective(
    config: Config,
    key: ApiKey | None,
    account_keys: Mapping[str, ApiKey] | None = None,
    intake_token: ApiKey | None = None,
) -> str:
    """The effective configuration as TOML, plus comments saying where the secrets come from.

    Every section and key is included, then every ``[accounts.NAME]`` table; the keys themselves
    never are, and ``intake.auth_token`` is masked. ``key`` is the default account's; with
    ``account_keys`` (from `credentials.resolve_account_keys`) each account table also says where
    its key comes from; ``intake_token`` (`credentials.resolve_intake_token`) likewise.
    """
    lines = ["# forwarder: effective configuration"]
    for name, kinds in FIELD_KINDS.items():
        section = getattr(config, name)
        lines += ["", f"[{name}]"]
        for key_name, kind in kinds.items():
            value = getattr(section, key_name)
            if SETTINGS[f"{name}.{key_name}"].secret == "holds" and value:
                value = MASK
            lines.append(f"{key_name} = {toml_value(kind, value)}")
    for name, account in sorted(config.accounts.items()):
        # A valid account name is a bare TOML key; quote anything else rather than break the TOML.
        header = name if ACCOUNT_NAME_RE.fullmatch(name) else toml_string(name)
        lines += ["", f"[accounts.{header}]"]
        for key_name, kind in ACCOUNT_KINDS.items():
            lines.append(f"{key_name} = {toml_value(kind, getattr(account, key_name))}")
        if account_keys is not None:
            lines.append(f"# api key of this account: {_key_comment(account_keys.get(name))}")
    lines.append("")
    lines.append(f"# intake auth token: {_key_comment(intake_token)}")
    lines.append(f"# api key: {_key_comment(key)}")
    return "\n".join(lines) + "\n"
