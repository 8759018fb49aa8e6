"""The remote API key: where it comes from, and a wrapper that never shows it.

The key is not a setting. It comes from the environment, a file or a systemd credential, lives in
memory as a `Secret`, and is revealed only where the Authorization header is built.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from forwarder.config import Config, ConfigError

API_KEY_VAR = "FORWARDER_API_KEY"
_CREDENTIAL_NAME = "api_key"
# An API key is a short token; refusing huge files avoids reading e.g. a mistakenly named log.
_MAX_KEY_FILE_BYTES = 4096


class Secret:
    """A string that never shows itself in ``repr``/``str`` (and so not in logs or tracebacks)."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """Return the secret value; call only where it is actually sent."""
        return self._value

    def __repr__(self) -> str:
        return "<secret>"

    def __str__(self) -> str:
        return "<secret>"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        # Constant-time: cheap, and keeps comparisons from leaking the key through timing.
        return hmac.compare_digest(
            self._value.encode("utf-8", "surrogatepass"),
            other._value.encode("utf-8", "surrogatepass"),
        )

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True, slots=True)
class ApiKey:
    """The resolved API key and a human description of where it came from."""

    secret: Secret
    source: str


def _make_key(raw: str, source: str, where: str | None = None) -> ApiKey:
    """Strip and check a key; errors name ``where`` (default ``source``), never the content."""
    where = where or source
    key = raw.strip()
    if not key:
        raise ConfigError(f"API key from {where} is empty")
    # Anything else would corrupt (or inject into) the auth header; typical cause: a pasted quote.
    if not key.isascii() or not key.isprintable() or any(ch.isspace() for ch in key):
        raise ConfigError(f"API key from {where} must be printable ASCII without whitespace")
    return ApiKey(secret=Secret(key), source=source)


def _read_limited(path: Path) -> bytes:
    with path.open("rb") as fh:
        return fh.read(_MAX_KEY_FILE_BYTES + 1)


def _reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def _key_from_bytes(data: bytes, source: str, where: str) -> ApiKey:
    if len(data) > _MAX_KEY_FILE_BYTES:
        raise ConfigError(
            f"API key from {where} is too large (over {_MAX_KEY_FILE_BYTES} bytes) to be a key"
        )
    try:
        # utf-8-sig: a BOM is not part of the key.
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ConfigError(f"API key from {where} is not valid UTF-8") from None
    return _make_key(text, source, where)


def resolve_api_key(config: Config, env: Mapping[str, str] | None = None) -> ApiKey | None:
    """Find the remote API key.

    Order: ``FORWARDER_API_KEY`` (if non-empty), then the file ``remote.api_key_file`` (if set),
    then the systemd credential ``$CREDENTIALS_DIRECTORY/api_key`` (if present). Surrounding
    whitespace is stripped. Returns None when no source is configured; raises :class:`ConfigError`
    naming the source (never the content) if a configured source is unreadable or empty.
    """
    environ: Mapping[str, str] = os.environ if env is None else env

    value = environ.get(API_KEY_VAR, "")
    if value:
        return _make_key(value, f"environment {API_KEY_VAR}")

    if config.remote.api_key_file:
        path = Path(config.remote.api_key_file)
        source = f"file {path}"
        try:
            data = _read_limited(path)
        except OSError as exc:
            raise ConfigError(
                f"remote.api_key_file: cannot read API key from {source}: {_reason(exc)}"
            ) from None
        return _key_from_bytes(data, source, source)

    credentials = environ.get("CREDENTIALS_DIRECTORY", "")
    if credentials:
        path = Path(credentials) / _CREDENTIAL_NAME
        source = f"systemd credential {_CREDENTIAL_NAME}"
        where = f"{source} ({path})"
        try:
            data = _read_limited(path)
        except (FileNotFoundError, NotADirectoryError):
            return None  # the service has credentials, just not this one
        except OSError as exc:
            raise ConfigError(f"cannot read API key from {where}: {_reason(exc)}") from None
        return _key_from_bytes(data, source, where)
    return None
