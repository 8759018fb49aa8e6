"""The API keys: resolution order, errors that never show them, the Secret wrapper."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from forwarder.config.schema import (
    AccountConfig,
    Config,
    ConfigError,
    FleetConfig,
    IntakeConfig,
    RemoteConfig,
)
from forwarder.ops.credentials import (
    MIN_KEY_CHARS,
    ApiKey,
    Secret,
    check_key_text,
    resolve_account_keys,
    resolve_api_key,
    resolve_intake_token,
    resolve_redis_secrets,
    resolve_sentinel_password,
)

KEY = "sk_live_0123456789abcdef"


def write(tmp_path: Path, text: str, name: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def with_key_file(path: Path) -> Config:
    return Config(remote=RemoteConfig(api_key_file=str(path)))


def with_accounts(*accounts: AccountConfig) -> Config:
    return Config(accounts={a.name: a for a in accounts})


def test_api_key_resolution_order(tmp_path: Path) -> None:
    key_file = write(tmp_path, "from-file-0123456789\n", "api_key_file")
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "api_key").write_text("  from-credential-0123456789 \n", encoding="utf-8")

    env = {"FORWARDER_API_KEY": "from-env-0123456789", "CREDENTIALS_DIRECTORY": str(creds)}
    key = resolve_api_key(with_key_file(key_file), env)
    assert key == ApiKey(Secret("from-env-0123456789"), "environment FORWARDER_API_KEY")

    env["FORWARDER_API_KEY"] = ""  # empty counts as unset
    key = resolve_api_key(with_key_file(key_file), env)
    assert key == ApiKey(Secret("from-file-0123456789"), f"file {key_file}")

    key = resolve_api_key(Config(), env)
    assert key == ApiKey(Secret("from-credential-0123456789"), "systemd credential api_key")

    assert resolve_api_key(Config(), {}) is None


def test_api_key_credentials_directory_without_key(tmp_path: Path) -> None:
    assert resolve_api_key(Config(), {"CREDENTIALS_DIRECTORY": str(tmp_path)}) is None


def test_api_key_from_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORWARDER_API_KEY", f" {KEY}\n")
    key = resolve_api_key(Config())
    assert key is not None
    assert key.secret.reveal() == KEY


# Errors about a key file name the setting, never its value: it may be a key pasted there.
UNREADABLE = "{}: cannot read {} from the file it names: {} (the path is not shown"


def test_api_key_missing_file_names_the_setting_not_the_path(tmp_path: Path) -> None:
    path = tmp_path / "missing_key"
    message = UNREADABLE.format("remote.api_key_file", "API key", "No such file or directory")
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}") as info:
        resolve_api_key(with_key_file(path), {})
    assert str(tmp_path) not in str(info.value)


def test_api_key_unreadable_file(tmp_path: Path) -> None:
    message = UNREADABLE.format("remote.api_key_file", "API key", "Is a directory")
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}") as info:
        resolve_api_key(with_key_file(tmp_path), {})  # a directory
    assert str(tmp_path) not in str(info.value)


@pytest.mark.parametrize("content", ["", "  \n\t\n"])
def test_api_key_empty_file(tmp_path: Path, content: str) -> None:
    path = write(tmp_path, content, "api_key")
    message = "API key from the file named by remote.api_key_file is empty"
    with pytest.raises(ConfigError, match=re.escape(message)):
        resolve_api_key(with_key_file(path), {})


def test_api_key_empty_credential_names_path(tmp_path: Path) -> None:
    path = write(tmp_path, "\n", "api_key")
    with pytest.raises(ConfigError, match=re.escape(str(path))):
        resolve_api_key(Config(), {"CREDENTIALS_DIRECTORY": str(tmp_path)})


def test_api_key_blank_env_is_an_error() -> None:
    with pytest.raises(ConfigError, match="environment FORWARDER_API_KEY is empty"):
        resolve_api_key(Config(), {"FORWARDER_API_KEY": "   "})


@pytest.mark.parametrize(
    "bad", [f"{KEY} {KEY}", f"{KEY}\n{KEY}", f"{KEY}\x00", f"\u201c{KEY}\u201d"]
)
def test_api_key_error_never_contains_key(tmp_path: Path, bad: str) -> None:
    path = write(tmp_path, bad, "api_key")
    for env, config in [({"FORWARDER_API_KEY": bad}, Config()), ({}, with_key_file(path))]:
        with pytest.raises(ConfigError) as info:
            resolve_api_key(config, env)
        assert KEY not in str(info.value)
        assert KEY not in repr(info.value)


@pytest.mark.parametrize("short", ["4", "delivered", KEY[: MIN_KEY_CHARS - 1]])
def test_a_key_too_short_to_be_redacted_is_refused(tmp_path: Path, short: str) -> None:
    # The log redactor takes nothing shorter (it would mangle ordinary words): so no key is.
    path = write(tmp_path, short, "api_key")
    account = AccountConfig("us", api_key_env="US_KEY")
    for resolve in (
        lambda: resolve_api_key(Config(), {"FORWARDER_API_KEY": short}),
        lambda: resolve_api_key(with_key_file(path), {}),
        lambda: resolve_account_keys(with_accounts(account), {"US_KEY": short}),
    ):
        with pytest.raises(ConfigError, match=f"shorter than {MIN_KEY_CHARS} characters") as info:
            resolve()
        assert KEY[: MIN_KEY_CHARS - 1] not in str(info.value)  # never echoed
    assert resolve_api_key(Config(), {"FORWARDER_API_KEY": KEY[:MIN_KEY_CHARS]}) is not None


def test_secret_hides_value() -> None:
    secret = Secret(KEY)
    assert repr(secret) == "<secret>"
    assert str(secret) == "<secret>"
    assert f"{secret}" == "<secret>"
    assert secret.reveal() == KEY
    assert secret == Secret(KEY)
    assert secret != Secret("other")
    assert hash(secret) == hash(Secret(KEY))
    api_key = ApiKey(secret, "environment FORWARDER_API_KEY")
    assert KEY not in repr(api_key)
    assert KEY not in str(api_key)


# --- further accounts ----------------------------------------------------------------------------


def test_account_key_resolution_order(tmp_path: Path) -> None:
    key_file = write(tmp_path, "from-file-0123456789\n", "us.key")
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "api_key.us").write_text(" from-credential-0123456789\n", encoding="utf-8")
    (creds / "api_key").write_text("default-credential", encoding="utf-8")
    both = AccountConfig("us", api_key_file=str(key_file), api_key_env="US_KEY")

    env = {"US_KEY": "from-env-0123456789", "CREDENTIALS_DIRECTORY": str(creds)}
    keys = resolve_account_keys(with_accounts(both), env)
    assert keys == {"us": ApiKey(Secret("from-env-0123456789"), "environment US_KEY")}

    env["US_KEY"] = ""  # empty counts as unset
    keys = resolve_account_keys(with_accounts(both), env)
    assert keys == {"us": ApiKey(Secret("from-file-0123456789"), f"file {key_file}")}

    for account in (AccountConfig("us"), AccountConfig("us", api_key_env="US_KEY")):
        keys = resolve_account_keys(with_accounts(account), env)
        assert keys == {
            "us": ApiKey(Secret("from-credential-0123456789"), "systemd credential api_key.us")
        }


def test_account_keys_for_several_accounts(tmp_path: Path) -> None:
    uk_file = write(tmp_path, "uk-key-0123456789", "uk.key")
    config = with_accounts(
        AccountConfig("us", api_key_env="US_KEY"), AccountConfig("uk", api_key_file=str(uk_file))
    )
    keys = resolve_account_keys(config, {"US_KEY": " us-key-0123456789\n"})
    assert {name: key.secret.reveal() for name, key in keys.items()} == {
        "uk": "uk-key-0123456789",
        "us": "us-key-0123456789",
    }
    assert resolve_account_keys(Config(), {}) == {}


def test_account_keys_from_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORWARDER_US_KEY", KEY)
    keys = resolve_account_keys(with_accounts(AccountConfig("us", api_key_env="FORWARDER_US_KEY")))
    assert keys["us"].secret.reveal() == KEY


@pytest.mark.parametrize(
    ("account", "env"),
    [
        (AccountConfig("us"), {}),
        (AccountConfig("us"), {"CREDENTIALS_DIRECTORY": "/nonexistent"}),
        (AccountConfig("us", api_key_env="US_KEY"), {"US_KEY": ""}),
    ],
)
def test_account_without_key(tmp_path: Path, account: AccountConfig, env: dict[str, str]) -> None:
    # The default account's credential is not a fallback for another account.
    (tmp_path / "api_key").write_text(KEY, encoding="utf-8")
    env = {"CREDENTIALS_DIRECTORY": str(tmp_path), **env}
    message = (
        "accounts.us: no API key: set api_key_file or api_key_env, "
        "or provide the systemd credential api_key.us"
    )
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}") as info:
        resolve_account_keys(with_accounts(account), {**env, "FORWARDER_API_KEY": KEY})
    assert ("api_key_env names a variable that is unset" in str(info.value)) == bool(
        account.api_key_env
    )


def test_account_missing_file_names_the_setting_not_the_path(tmp_path: Path) -> None:
    path = tmp_path / "missing.key"
    account = AccountConfig("us", api_key_file=str(path))
    message = UNREADABLE.format("accounts.us.api_key_file", "API key", "No such file or directory")
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}") as info:
        resolve_account_keys(with_accounts(account), {})
    assert str(tmp_path) not in str(info.value)


def test_account_blank_env_is_an_error() -> None:
    account = AccountConfig("us", api_key_env="FORWARDER_US_KEY")
    message = "API key from environment FORWARDER_US_KEY is empty"
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        resolve_account_keys(with_accounts(account), {"FORWARDER_US_KEY": " \n "})


@pytest.mark.parametrize("content", ["", "\n"])
def test_account_empty_file_or_credential(tmp_path: Path, content: str) -> None:
    path = write(tmp_path, content, "api_key.us")
    account = AccountConfig("us", api_key_file=str(path))
    message = "API key from the file named by accounts.us.api_key_file is empty"
    with pytest.raises(ConfigError, match=re.escape(message)):
        resolve_account_keys(with_accounts(account), {})
    with pytest.raises(ConfigError, match=re.escape(f"systemd credential api_key.us ({path})")):
        resolve_account_keys(
            with_accounts(AccountConfig("us")), {"CREDENTIALS_DIRECTORY": str(tmp_path)}
        )


def test_account_key_file_checks(tmp_path: Path) -> None:
    big = tmp_path / "big.key"
    big.write_bytes(b"k" * 5000)
    with pytest.raises(ConfigError, match="too large"):
        resolve_account_keys(with_accounts(AccountConfig("us", api_key_file=str(big))), {})
    bom = tmp_path / "bom.key"
    bom.write_bytes(b"\xef\xbb\xbf" + KEY.encode() + b"\r\n")
    keys = resolve_account_keys(with_accounts(AccountConfig("us", api_key_file=str(bom))), {})
    assert keys["us"].secret.reveal() == KEY
    latin1 = tmp_path / "latin1.key"
    latin1.write_bytes(b"\xe9" + KEY.encode())
    with pytest.raises(ConfigError, match="not valid UTF-8"):
        resolve_account_keys(with_accounts(AccountConfig("us", api_key_file=str(latin1))), {})


@pytest.mark.parametrize(
    "bad", [f"{KEY} {KEY}", f"{KEY}\n{KEY}", f"{KEY}\x00", f"\u201c{KEY}\u201d"]
)
def test_account_key_error_never_contains_key(tmp_path: Path, bad: str) -> None:
    write(tmp_path, bad, "api_key.us")
    path = write(tmp_path, bad, "us.key")
    cases = [
        ({"US_KEY": bad}, AccountConfig("us", api_key_env="US_KEY")),
        ({}, AccountConfig("us", api_key_file=str(path))),
        ({"CREDENTIALS_DIRECTORY": str(tmp_path)}, AccountConfig("us")),
    ]
    for env, account in cases:
        with pytest.raises(ConfigError, match="printable ASCII without whitespace") as info:
            resolve_account_keys(with_accounts(account), env)
        assert KEY not in str(info.value)
        assert KEY not in repr(info.value)


def test_account_key_source_never_contains_key(tmp_path: Path) -> None:
    path = write(tmp_path, KEY, "us.key")
    config = with_accounts(
        AccountConfig("a", api_key_env="A_KEY"),
        AccountConfig("b", api_key_file=str(path)),
        AccountConfig("c"),
    )
    write(tmp_path, KEY, "api_key.c")
    keys = resolve_account_keys(config, {"A_KEY": KEY, "CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert [key.source for key in keys.values()] == [
        "environment A_KEY",
        f"file {path}",
        "systemd credential api_key.c",
    ]
    for key in keys.values():
        assert KEY not in key.source
        assert KEY not in repr(key)


def test_check_key_text() -> None:
    assert check_key_text(f" {KEY}\r\n") == KEY
    with pytest.raises(ValueError, match=r"^is empty$"):
        check_key_text(" \t\n")
    for bad in (f"{KEY} x", f"{KEY}\x7f", f"\u00e9{KEY}"):
        with pytest.raises(
            ValueError, match=r"^must be printable ASCII without whitespace$"
        ) as info:
            check_key_text(bad)
        assert KEY not in str(info.value)


# --- the intake token ----------------------------------------------------------------------------

TOKEN = "tok-0123456789abcdef-XYZ"


def with_token(token: str = "", token_file: str = "") -> Config:
    return Config(intake=IntakeConfig(auth_token=token, auth_token_file=token_file))


def test_intake_token_resolution_order(tmp_path: Path) -> None:
    token_file = write(tmp_path, "from-file-0123456789\n", "token")
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "intake_auth_token").write_text("from-credential-0123456789", encoding="utf-8")
    env = {"CREDENTIALS_DIRECTORY": str(creds)}
    assert resolve_intake_token(with_token(TOKEN, str(token_file)), env) == ApiKey(
        Secret(TOKEN), "intake.auth_token"
    )
    assert resolve_intake_token(with_token("", str(token_file)), env) == ApiKey(
        Secret("from-file-0123456789"), f"file {token_file}"
    )
    assert resolve_intake_token(with_token(), env) == ApiKey(
        Secret("from-credential-0123456789"), "systemd credential intake_auth_token"
    )
    assert resolve_intake_token(with_token(), {}) is None
    assert resolve_intake_token(with_token(), {"CREDENTIALS_DIRECTORY": str(tmp_path)}) is None


@pytest.mark.parametrize(
    ("token", "message"),
    [
        ("short-secret-15", "shorter than 16 characters"),
        ("has space inside 0123456789", "must be printable ASCII without whitespace"),
        ("caf\u00e9-0123456789abcdef", "must be printable ASCII without whitespace"),
    ],
)
def test_intake_token_must_be_long_and_plain_and_is_never_shown(
    tmp_path: Path, token: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as inline:
        resolve_intake_token(with_token(token), {})
    assert str(inline.value).startswith("intake auth token from intake.auth_token ")
    token_file = write(tmp_path, token, "token")
    with pytest.raises(ConfigError, match=message) as from_file:
        resolve_intake_token(with_token(token_file=str(token_file)), {})
    for error in (inline.value, from_file.value):
        assert token not in str(error)
        assert token.split()[0] not in str(error)


def test_intake_token_file_errors_name_the_setting(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    message = UNREADABLE.format(
        "intake.auth_token_file", "intake auth token", "No such file or directory"
    )
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}") as info:
        resolve_intake_token(with_token(token_file=str(missing)), {})
    assert str(tmp_path) not in str(info.value)


SENTINEL_URL = "redis+sentinel://127.0.0.1:26379/fwd-master/0"
SENTINEL_PASSWORD = "sentinel-pw-SECRET-0a1b2c3d4e"


def with_fleet(url: str, sentinel_file: str = "") -> Config:
    return Config(fleet=FleetConfig(redis_url=url, sentinel_password_file=sentinel_file))


def test_the_sentinel_password_from_its_file_then_its_credential(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    write(creds, "credential-" + SENTINEL_PASSWORD, "sentinel_password")
    env = {"CREDENTIALS_DIRECTORY": str(creds)}
    path = write(tmp_path, SENTINEL_PASSWORD + "\n", "sentinel-password")

    from_file = resolve_sentinel_password(with_fleet(SENTINEL_URL, str(path)), env)
    assert from_file is not None
    assert from_file.reveal() == SENTINEL_PASSWORD
    from_credential = resolve_sentinel_password(with_fleet(SENTINEL_URL), env)
    assert from_credential is not None
    assert from_credential.reveal() == "credential-" + SENTINEL_PASSWORD
    assert resolve_sentinel_password(with_fleet(SENTINEL_URL), {}) is None
    # One server: there is no Sentinel to send the credential to.
    assert resolve_sentinel_password(with_fleet("redis://127.0.0.1:6379/0"), env) is None
    # Both passwords, for the redactor; the data nodes' stays its own.
    both = resolve_redis_secrets(with_fleet(SENTINEL_URL, str(path)), env)
    assert both.password is None
    assert both.revealed() == [SENTINEL_PASSWORD]


def test_a_bad_sentinel_password_is_refused_naming_the_source_only(tmp_path: Path) -> None:
    short = write(tmp_path, "short-pw", "sentinel-password")
    with pytest.raises(ConfigError) as caught:
        resolve_sentinel_password(with_fleet(SENTINEL_URL, str(short)), {})
    assert "Sentinel password from the file named by fleet.sentinel_password_file" in str(
        caught.value
    )
    assert f"shorter than {MIN_KEY_CHARS}" in str(caught.value)
    assert "short-pw" not in str(caught.value)

    missing = tmp_path / SENTINEL_PASSWORD  # a password pasted as the path is not echoed
    with pytest.raises(ConfigError) as caught:
        resolve_sentinel_password(with_fleet(SENTINEL_URL, str(missing)), {})
    assert str(caught.value).startswith("fleet.sentinel_password_file: cannot read")
    assert SENTINEL_PASSWORD not in str(caught.value)
