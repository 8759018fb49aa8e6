"""Secrets (remote API keys, the intake token, the fleet's Redis and Sentinel passwords): where
they come from, a wrapper that hides them.

A key is not a setting. It comes from the environment, a file or a systemd credential, lives in
memory as a `Secret`, and is revealed only where the Authorization header is built. The default
account's key is found by `resolve_api_key`, those of ``[accounts.NAME]`` by
`resolve_account_keys`. The token apps must present to intake (when it is set) is found the same
way by `resolve_intake_token`.
"""

from __future__ import annotations

import base64
import hmac
import os
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from forwarder.config.schema import Config, ConfigError
from forwarder.fleet.topology import is_sentinel_url

API_KEY_VAR = "FORWARDER_API_KEY"
_CREDENTIAL_NAME = "api_key"
# The systemd credential holding the intake token (LoadCredential=intake_auth_token:PATH).
INTAKE_TOKEN_CREDENTIAL = "intake_auth_token"
# A token guards a listener other machines can reach: too short would be guessable.
MIN_TOKEN_CHARS = 16
# The shortest text taken as an API key (configured or a client's). Real keys are long random
# strings; a shorter one ("4", "delivered") would be a word, and the log redactor, which replaces
# every key wherever it occurs, would then mangle ordinary log text. The redactor takes nothing
# shorter (logs.Redactor), so every key it is given is one it can scrub.
MIN_KEY_CHARS = 16
_TOKEN = "intake auth token"
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


def basic_token(key: str) -> str:
    """The credentials of an HTTP Basic header with ``key`` as user name and no password."""
    return base64.b64encode(f"{key}:".encode()).decode("ascii")


def secret_forms(key: str) -> tuple[str, ...]:
    """The ways ``key`` can show up in text: as itself, as the Basic header carries it (base64
    of "key:", without its padding, so an echo that drops the "=" is caught too), and
    percent-encoded (a query string). Scrub all of them from anything shown or stored.
    """
    if not key:
        return ()
    forms = [key, basic_token(key).rstrip("="), urllib.parse.quote(key, safe="")]
    # Longest first, so a form that contains another is replaced whole.
    return tuple(sorted(dict.fromkeys(forms), key=len, reverse=True))


@dataclass(frozen=True, slots=True)
class ApiKey:
    """The resolved API key and a human description of where it came from."""

    secret: Secret
    source: str


def check_key_text(raw: str, min_chars: int = MIN_KEY_CHARS) -> str:
    """The key ``raw`` without surrounding whitespace, if usable in an Authorization header.

    Raises ValueError with a reason that fits after "API key ..." and never shows the content.
    A key shorter than ``min_chars`` is refused: it could not be told apart from ordinary text.
    """
    key = raw.strip()
    if not key:
        raise ValueError("is empty")
    # Anything else would corrupt (or inject into) the auth header; typical cause: a pasted quote.
    if not key.isascii() or not key.isprintable() or any(ch.isspace() for ch in key):
        raise ValueError("must be printable ASCII without whitespace")
    if len(key) < min_chars:
        raise ValueError(
            f"is shorter than {min_chars} characters: too short to be an API key "
            "(real keys are long random strings)"
        )
    return key


def _make_key(raw: str, source: str, where: str | None = None, what: str = "API key") -> ApiKey:
    """Strip and check a key; errors name ``where`` (default ``source``), never the content."""
    try:
        # The intake token's own length check below gives a hint how to make one.
        key = check_key_text(raw, 1 if what == _TOKEN else MIN_KEY_CHARS)
    except ValueError as exc:
        raise ConfigError(f"{what} from {where or source} {exc}") from None
    return ApiKey(secret=Secret(key), source=source)


def _read_limited(path: Path) -> bytes:
    with path.open("rb") as fh:
        return fh.read(_MAX_KEY_FILE_BYTES + 1)


def _reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def _key_from_bytes(data: bytes, source: str, where: str, what: str = "API key") -> ApiKey:
    if len(data) > _MAX_KEY_FILE_BYTES:
        raise ConfigError(
            f"{what} from {where} is too large (over {_MAX_KEY_FILE_BYTES} bytes) to be a key"
        )
    try:
        # utf-8-sig: a BOM is not part of the key.
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ConfigError(f"{what} from {where} is not valid UTF-8") from None
    return _make_key(text, source, where, what)


def _key_from_file(path: Path, setting: str, what: str = "API key") -> ApiKey:
    """The key in the file ``path``, which the setting ``setting`` names.

    Errors name the setting, never the path: a secret pasted into the setting instead of a
    path ("cannot read ... from file sk-...") must not be echoed. Once read, the file is one,
    and its path is the key's `source` (the `started` line, check-config).
    """
    where = f"the file named by {setting}"
    try:
        data = _read_limited(path)
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the path
        reason = _reason(exc) if isinstance(exc, OSError) else "not a usable path"
        raise ConfigError(
            f"{setting}: cannot read {what} from the file it names: {reason} "
            "(the path is not shown: it could be a secret pasted there by mistake)"
        ) from None
    return _key_from_bytes(data, f"file {path}", where, what)


def _key_from_credential(directory: str, name: str, what: str = "API key") -> ApiKey | None:
    """The systemd credential ``name`` in ``directory``; None if the service has no such one."""
    path = Path(directory) / name
    source = f"systemd credential {name}"
    where = f"{source} ({path})"
    try:
        data = _read_limited(path)
    except (FileNotFoundError, NotADirectoryError):
        return None  # the service has credentials, just not this one
    except OSError as exc:
        raise ConfigError(f"cannot read {what} from {where}: {_reason(exc)}") from None
    return _key_from_bytes(data, source, where, what)


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
        return _key_from_file(Path(config.remote.api_key_file), "remote.api_key_file")

    credentials = environ.get("CREDENTIALS_DIRECTORY", "")
    if credentials:
        return _key_from_credential(credentials, _CREDENTIAL_NAME)
    return None


def resolve_account_keys(config: Config, env: Mapping[str, str] | None = None) -> dict[str, ApiKey]:
    """Find the API key of every ``[accounts.NAME]`` account, by name.

    Order for each: the variable named by ``api_key_env`` (if set and non-empty), then the file
    ``api_key_file`` (if set), then the systemd credential ``$CREDENTIALS_DIRECTORY/api_key.NAME``
    (if present). Raises :class:`ConfigError` naming the source (never the content) if a source is
    unreadable or holds no valid key, or if no source yields a key for an account.
    """
    environ: Mapping[str, str] = os.environ if env is None else env
    credentials = environ.get("CREDENTIALS_DIRECTORY", "")
    keys: dict[str, ApiKey] = {}
    for name, account in sorted(config.accounts.items()):
        where = f"accounts.{name}"
        key: ApiKey | None = None
        value = environ.get(account.api_key_env, "") if account.api_key_env else ""
        if value:
            key = _make_key(value, f"environment {account.api_key_env}")
        elif account.api_key_file:
            key = _key_from_file(Path(account.api_key_file), f"{where}.api_key_file")
        elif credentials:
            key = _key_from_credential(credentials, f"{_CREDENTIAL_NAME}.{name}")
        if key is None:
            # The variable is not named: a key pasted into api_key_env must not reach the logs.
            unset = (
                f" ({where}.api_key_env names a variable that is unset or empty)"
                if account.api_key_env
                else ""
            )
            raise ConfigError(
                f"{where}: no API key: set api_key_file or api_key_env, or provide the systemd "
                f"credential {_CREDENTIAL_NAME}.{name}{unset}"
            )
        keys[name] = key
    return keys


def resolve_intake_token(config: Config, env: Mapping[str, str] | None = None) -> ApiKey | None:
    """Find the token apps must present to intake; None when none is configured.

    Order: ``intake.auth_token`` (the config file, or ``FORWARDER_INTAKE_AUTH_TOKEN``), then the
    file ``intake.auth_token_file``, then the systemd credential
    ``$CREDENTIALS_DIRECTORY/intake_auth_token``. It must be printable ASCII without whitespace,
    at least `MIN_TOKEN_CHARS` long. Raises :class:`ConfigError` naming the source, never the
    content. Reads files: call it off the event loop.
    """
    environ: Mapping[str, str] = os.environ if env is None else env
    intake = config.intake
    token: ApiKey | None = None
    where = ""
    if intake.auth_token:
        token = _make_key(intake.auth_token, "intake.auth_token", what=_TOKEN)
    elif intake.auth_token_file:
        token = _key_from_file(Path(intake.auth_token_file), "intake.auth_token_file", _TOKEN)
        where = "the file named by intake.auth_token_file"  # errors never show the setting
    elif environ.get("CREDENTIALS_DIRECTORY", ""):
        token = _key_from_credential(
            environ["CREDENTIALS_DIRECTORY"], INTAKE_TOKEN_CREDENTIAL, _TOKEN
        )
    if token is not None and len(token.secret.reveal()) < MIN_TOKEN_CHARS:
        raise ConfigError(
            f"{_TOKEN} from {where or token.source} is shorter than {MIN_TOKEN_CHARS} characters; "
            "make a long random one, e.g. with `openssl rand -hex 32`"
        )
    return token


# The systemd credential holding the Redis password of a fleet (LoadCredential=redis_password:PATH).
REDIS_PASSWORD_CREDENTIAL = "redis_password"
_REDIS_PASSWORD = "Redis password"


def resolve_redis_password(config: Config, env: Mapping[str, str] | None = None) -> Secret | None:
    """The fleet's Redis password; None when none is configured (a server without AUTH).

    Order: the file ``fleet.redis_password_file``, then the systemd credential
    ``$CREDENTIALS_DIRECTORY/redis_password``. At least `MIN_KEY_CHARS` long, so the log
    redactor can scrub it. Raises :class:`ConfigError` naming the source, never the content.
    Reads files: call it off the event loop.
    """
    environ: Mapping[str, str] = os.environ if env is None else env
    found: ApiKey | None = None
    if config.fleet.redis_password_file:
        found = _key_from_file(
            Path(config.fleet.redis_password_file), "fleet.redis_password_file", _REDIS_PASSWORD
        )
    elif environ.get("CREDENTIALS_DIRECTORY", ""):
        found = _key_from_credential(
            environ["CREDENTIALS_DIRECTORY"], REDIS_PASSWORD_CREDENTIAL, _REDIS_PASSWORD
        )
    return None if found is None else found.secret


# The systemd credential of the Sentinels' own password (LoadCredential=sentinel_password:PATH).
SENTINEL_PASSWORD_CREDENTIAL = "sentinel_password"
_SENTINEL_PASSWORD = "Sentinel password"


def resolve_sentinel_password(
    config: Config, env: Mapping[str, str] | None = None
) -> Secret | None:
    """The Sentinels' own password (their `requirepass`); None without a Sentinel URL or when
    none is configured (Sentinels asked without a password).

    Same rules as `resolve_redis_password`: the file ``fleet.sentinel_password_file``, then the
    systemd credential ``$CREDENTIALS_DIRECTORY/sentinel_password``; at least `MIN_KEY_CHARS`
    long; errors name the source, never the content. The credential is ignored without a
    Sentinel URL (the setting is refused then, by the config check): there is no Sentinel to
    send it to. Reads files: call it off the event loop.
    """
    if not is_sentinel_url(config.fleet.redis_url):
        return None
    environ: Mapping[str, str] = os.environ if env is None else env
    found: ApiKey | None = None
    if config.fleet.sentinel_password_file:
        found = _key_from_file(
            Path(config.fleet.sentinel_password_file),
            "fleet.sentinel_password_file",
            _SENTINEL_PASSWORD,
        )
    elif environ.get("CREDENTIALS_DIRECTORY", ""):
        found = _key_from_credential(
            environ["CREDENTIALS_DIRECTORY"], SENTINEL_PASSWORD_CREDENTIAL, _SENTINEL_PASSWORD
        )
    return None if found is None else found.secret


@dataclass(frozen=True, slots=True)
class RedisSecrets:
    """The fleet's passwords: the data nodes' and, behind Sentinel, the Sentinels' own."""

    password: Secret | None = None
    sentinel_password: Secret | None = None

    def revealed(self) -> list[str]:
        """Both as text, for the log redactor only."""
        return [s.reveal() for s in (self.password, self.sentinel_password) if s is not None]


def resolve_redis_secrets(config: Config, env: Mapping[str, str] | None = None) -> RedisSecrets:
    """Both of the fleet's passwords (see the two resolvers). Reads files: off the event loop."""
    return RedisSecrets(resolve_redis_password(config, env), resolve_sentinel_password(config, env))
