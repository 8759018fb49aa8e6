"""The API key: resolution order, errors that never show it, the Secret wrapper."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from forwarder.config import Config, ConfigError, RemoteConfig
from forwarder.credentials import ApiKey, Secret, resolve_api_key

KEY = "sk_live_0123456789abcdef"


def write(tmp_path: Path, text: str, name: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def with_key_file(path: Path) -> Config:
    return Config(remote=RemoteConfig(api_key_file=str(path)))


def test_api_key_resolution_order(tmp_path: Path) -> None:
    key_file = write(tmp_path, "from-file\n", "api_key_file")
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "api_key").write_text("  from-credential \n", encoding="utf-8")

    env = {"FORWARDER_API_KEY": "from-env", "CREDENTIALS_DIRECTORY": str(creds)}
    key = resolve_api_key(with_key_file(key_file), env)
    assert key == ApiKey(Secret("from-env"), "environment FORWARDER_API_KEY")

    env["FORWARDER_API_KEY"] = ""  # empty counts as unset
    key = resolve_api_key(with_key_file(key_file), env)
    assert key == ApiKey(Secret("from-file"), f"file {key_file}")

    key = resolve_api_key(Config(), env)
    assert key == ApiKey(Secret("from-credential"), "systemd credential api_key")

    assert resolve_api_key(Config(), {}) is None


def test_api_key_credentials_directory_without_key(tmp_path: Path) -> None:
    assert resolve_api_key(Config(), {"CREDENTIALS_DIRECTORY": str(tmp_path)}) is None


def test_api_key_from_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORWARDER_API_KEY", f" {KEY}\n")
    key = resolve_api_key(Config())
    assert key is not None
    assert key.secret.reveal() == KEY


def test_api_key_missing_file_names_path(tmp_path: Path) -> None:
    path = tmp_path / "missing_key"
    with pytest.raises(ConfigError, match=rf"^remote\.api_key_file: .*{re.escape(str(path))}"):
        resolve_api_key(with_key_file(path), {})


def test_api_key_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"from file {tmp_path}")):
        resolve_api_key(with_key_file(tmp_path), {})  # a directory


@pytest.mark.parametrize("content", ["", "  \n\t\n"])
def test_api_key_empty_file(tmp_path: Path, content: str) -> None:
    path = write(tmp_path, content, "api_key")
    with pytest.raises(ConfigError, match=re.escape(f"API key from file {path} is empty")):
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
