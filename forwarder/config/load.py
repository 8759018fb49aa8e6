"""Loading the configuration: the TOML file, ``FORWARDER_<SECTION>_<KEY>`` overrides, values
converted to each setting's kind.

`load_config` reads the file (``/etc/forwarder/forwarder.toml`` by default), lays the
environment's overrides over it, builds the section dataclasses of schema.py and has
validate.py check the result; every error names the offending key, variable or file, and never
shows the value of a setting that holds or names a secret.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from forwarder.config.schema import (
    ACCOUNT_KINDS,
    ACCOUNT_NAME_RE,
    DEFAULT_ACCOUNT,
    FALLBACK_STATE_DIR,
    FIELD_KINDS,
    SECRET_ACCOUNT_KEYS,
    SECTIONS,
    AccountConfig,
    Config,
    ConfigError,
    Kind,
    RemoteConfig,
    is_secret_key,
)
from forwarder.config.setting import short
from forwarder.config.validate import suggest, validate_config

__all__ = ["DEFAULT_CONFIG_PATH", "NOT_SHOWN", "load_config"]

DEFAULT_CONFIG_PATH = Path("/etc/forwarder/forwarder.toml")
_ENV_PREFIX = "FORWARDER_"

_EXPECTED: dict[Kind, str] = {
    "str": "a string",
    "int": "an integer",
    "float": "a number",
    "mode": 'an octal mode (0o660 or "0660")',
    "bool": "a boolean (true or false)",
}

_INT_RE = re.compile(r"[+-]?[0-9]+")
_FLOAT_RE = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_OCTAL_RE = re.compile(r"(?:0[oO])?([0-7]+)")
_ENV_BOOLS = {"true": True, "1": True, "yes": True, "on": True}
_ENV_BOOLS |= {"false": False, "0": False, "no": False, "off": False}

# A value this short is no secret worth hiding, and scrubbing it would garble the message.
_MIN_SCRUBBED_CHARS = 6
NOT_SHOWN = "<not shown>"


def _describe(value: object, secret: bool = False) -> str:
    if secret:
        # The type only: an unquoted `auth_token = 4815...` must not come back in the error.
        kind = _describe(value).split(" (", 1)[0]
        return f"{kind} (the value is not shown: this setting holds or names a secret)"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, int):
        return f"an integer ({value})"
    if isinstance(value, float):
        return f"a float ({value})"
    if isinstance(value, str):
        return f"a string ({short(value)})"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return f"a {type(value).__name__}"  # TOML dates and times


def _parse_octal(text: str) -> int | None:
    match = _OCTAL_RE.fullmatch(text)
    return int(match.group(1), 8) if match else None


def _from_toml(kind: Kind, value: object, key: str) -> object:
    # bool is a subclass of int; a TOML `true` is never a number here.
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if kind == "str" and isinstance(value, str):
        return value
    if kind in ("int", "mode") and is_int:
        return value
    if kind == "float" and (is_int or isinstance(value, float)):
        return float(typing.cast(float, value))
    if kind == "bool" and isinstance(value, bool):
        return value
    if kind == "mode" and isinstance(value, str):
        mode = _parse_octal(value)
        if mode is not None:
            return mode
    raise ConfigError(
        f"{key}: expected {_EXPECTED[kind]}, got {_describe(value, is_secret_key(key))}"
    )


def _from_env(kind: Kind, text: str, var: str, secret: bool = False) -> object:
    if kind == "str":
        return text
    if secret:
        raise ConfigError(f"{var}: expected {_EXPECTED[kind]} (the value is not shown)")
    stripped = text.strip()
    if kind == "int" and _INT_RE.fullmatch(stripped):
        return int(stripped)
    if kind == "float" and _FLOAT_RE.fullmatch(stripped):
        return float(stripped)
    if kind == "mode":
        mode = _parse_octal(stripped)
        if mode is not None:
            return mode
    if kind == "bool":
        flag = _ENV_BOOLS.get(stripped.lower())
        if flag is not None:
            return flag
        raise ConfigError(
            f"{var}: expected a boolean (true/false, 1/0, yes/no or on/off), got {short(text)}"
        )
    raise ConfigError(f"{var}: expected {_EXPECTED[kind]}, got {short(text)}")


def _read_toml(path: Path, *, missing_ok: bool) -> dict[str, Any] | None:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        if missing_ok:
            return None
        raise ConfigError(f"config file {path} not found") from None
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot read: {exc.strerror or exc}") from exc
    try:
        # utf-8-sig: tolerate a BOM left by Windows editors.
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: not UTF-8 (at byte {exc.start})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from exc


def _file_values(document: Mapping[str, Any]) -> dict[str, dict[str, object]]:
    values: dict[str, dict[str, object]] = {}
    for name, body in document.items():
        if name == "accounts":
            continue  # see _account_values
        if name not in SECTIONS:
            if isinstance(body, dict):
                hint = suggest(name, [*SECTIONS, "accounts"])
                raise ConfigError(f"unknown section [{name}]{hint}")
            raise ConfigError(f"unknown key {name} (settings belong in a [section])")
        if not isinstance(body, dict):
            raise ConfigError(f"{name}: expected a table [{name}], got {_describe(body)}")
        kinds = FIELD_KINDS[name]
        section = values.setdefault(name, {})
        for key, raw in body.items():
            if key not in kinds:
                hint = suggest(key, kinds, f"{name}.")
                raise ConfigError(f"unknown key {name}.{key}{hint}")
            section[key] = _from_toml(kinds[key], raw, f"{name}.{key}")
    return values


def _account_values(document: Mapping[str, Any]) -> dict[str, dict[str, object]]:
    """The keys each ``[accounts.NAME]`` table sets, by account name."""
    tables = document.get("accounts", {})
    if not isinstance(tables, dict):
        raise ConfigError(f"accounts: expected tables [accounts.NAME], got {_describe(tables)}")
    values: dict[str, dict[str, object]] = {}
    for name, body in tables.items():
        if name == DEFAULT_ACCOUNT:
            raise ConfigError(
                f'accounts.{DEFAULT_ACCOUNT}: the name "{DEFAULT_ACCOUNT}" is reserved for the '
                "[remote] account; choose another name"
            )
        if not ACCOUNT_NAME_RE.fullmatch(name):
            raise ConfigError(
                f"accounts: invalid account name {short(name)}: "
                "use 1-64 characters of letters, digits, - and _"
            )
        where = f"accounts.{name}"
        if not isinstance(body, dict):
            raise ConfigError(
                f"{where}: expected a table [{where}] (each account is a table of its own), "
                f"got {_describe(body)}"
            )
        account = values[name] = {}
        for key, raw in body.items():
            if key not in ACCOUNT_KINDS:
                raise ConfigError(
                    f"unknown key {where}.{key}{suggest(key, ACCOUNT_KINDS, f'{where}.')}"
                )
            account[key] = _from_toml(ACCOUNT_KINDS[key], raw, f"{where}.{key}")
    return values


def _env_section(rest: str) -> str | None:
    for name in SECTIONS:
        if rest.startswith(name.upper() + "_"):
            return name
    return None


def _env_values(
    env: Mapping[str, str], key_vars: typing.Collection[str] = ()
) -> tuple[dict[str, dict[str, object]], dict[str, str]]:
    """Overrides from ``FORWARDER_<SECTION>_<KEY>``, and which variable set each ``section.key``.

    ``key_vars`` are the variables named by ``accounts.*.api_key_env``: they hold keys, not
    settings, whatever their names look like.
    """
    values: dict[str, dict[str, object]] = {}
    origins: dict[str, str] = {}
    for var in sorted(env):  # sorted: the same error first on every run
        # FORWARDER_API_KEY is not a setting (see credentials.py).
        if not var.startswith(_ENV_PREFIX) or var == "FORWARDER_API_KEY" or var in key_vars:
            continue
        rest = var[len(_ENV_PREFIX) :]
        # Account tables have no overrides: names may contain "_", so FORWARDER_ACCOUNTS_A_B_C
        # could not say which part is the account and which the key.
        if rest.startswith("ACCOUNTS_"):
            raise ConfigError(
                f"{var}: [accounts.NAME] tables cannot be set from the environment; "
                "set them in the config file"
            )
        section = _env_section(rest)
        if section is None:
            continue  # not a setting; other FORWARDER_* variables may belong to other components
        key = rest[len(section) + 1 :].lower()
        kinds = FIELD_KINDS[section]
        if key not in kinds:
            hint = suggest(key, kinds, f"{section}.")
            raise ConfigError(f"{var}: no such setting {section}.{key}{hint}")
        values.setdefault(section, {})[key] = _from_env(
            kinds[key], env[var], var, is_secret_key(f"{section}.{key}")
        )
        origins[f"{section}.{key}"] = var
    return values, origins


def _default_state_dir(env: Mapping[str, str]) -> str:
    # systemd's StateDirectory= may list several directories, colon-separated; the first is ours.
    first = env.get("STATE_DIRECTORY", "").split(":", 1)[0]
    return first or FALLBACK_STATE_DIR


def load_config(path: Path | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Load, override and validate the configuration.

    ``path`` None means :data:`DEFAULT_CONFIG_PATH` if it exists, else the built-in defaults; a
    given path must exist. ``env`` (default ``os.environ``) supplies ``FORWARDER_<SECTION>_<KEY>``
    overrides and ``STATE_DIRECTORY``. Raises :class:`ConfigError` naming the key at fault.
    """
    environ: Mapping[str, str] = os.environ if env is None else env
    if path is None:
        document = _read_toml(DEFAULT_CONFIG_PATH, missing_ok=True) or {}
    else:
        document = _read_toml(path, missing_ok=False) or {}
    try:
        return _load(document, environ)
    except ConfigError as exc:
        # Every error path already leaves secret settings' values out; this is the second line
        # of defence, so that a message added later cannot echo one either.
        message = str(exc)
        for secret in _secret_values(document, environ):
            message = message.replace(secret, NOT_SHOWN)
        if message == str(exc):
            raise
        raise ConfigError(message) from None


def _secret_values(document: Mapping[str, Any], env: Mapping[str, str]) -> list[str]:
    """The values given to secret settings (`is_secret_key`), longest first, as text."""
    found: list[object] = []
    for name, body in document.items():
        if isinstance(body, dict) and name != "accounts":
            found += [v for k, v in body.items() if is_secret_key(f"{name}.{k}")]
    tables = document.get("accounts")
    if isinstance(tables, dict):
        for body in tables.values():
            if isinstance(body, dict):
                found += [v for k, v in body.items() if k in SECRET_ACCOUNT_KEYS]
    for var, text in env.items():
        section = _env_section(var[len(_ENV_PREFIX) :]) if var.startswith(_ENV_PREFIX) else None
        key = var[len(_ENV_PREFIX) + len(section or "") + 1 :].lower()
        if section is not None and is_secret_key(f"{section}.{key}"):
            found.append(text)
    texts = {str(v) for v in found if isinstance(v, str | int | float)}
    texts |= {text.strip() for text in texts}
    return sorted((t for t in texts if len(t) >= _MIN_SCRUBBED_CHARS), key=len, reverse=True)


def _load(document: Mapping[str, Any], environ: Mapping[str, str]) -> Config:
    values = _file_values(document)
    account_values = _account_values(document)
    key_vars = {str(a["api_key_env"]) for a in account_values.values() if "api_key_env" in a}
    overrides, origins = _env_values(environ, key_vars)
    for name, section in overrides.items():
        values.setdefault(name, {}).update(section)
    state = values.setdefault("state", {})
    if "dir" not in state:
        state["dir"] = _default_state_dir(environ)

    sections: dict[str, Any] = {
        name: dataclasses.replace(cls(), **values.get(name, {})) for name, cls in SECTIONS.items()
    }
    remote: RemoteConfig = sections["remote"]
    # Filled in here, not from a sentinel later: an explicit `rate_limit_per_minute = 0` or
    # `base_url = ""` is then an error rather than silently inherited.
    inherited = AccountConfig(
        name="", base_url=remote.base_url, rate_limit_per_minute=remote.rate_limit_per_minute
    )
    sections["accounts"] = {
        name: dataclasses.replace(inherited, name=name, **typing.cast(dict[str, Any], keys))
        for name, keys in sorted(account_values.items())
    }
    return validate_config(dataclasses.replace(Config(), **sections), origins)
