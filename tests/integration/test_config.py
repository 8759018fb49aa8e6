"""Tests for forwarder.config: loading, env overrides, validation, API key, rendering."""

from __future__ import annotations

import asyncio
import dataclasses
import grp
import math
import os
import re
import tomllib
from pathlib import Path

import pytest

from forwarder.cli import main as cli
from forwarder.config import address as config_address
from forwarder.config import load as config_load
from forwarder.config import schema as cfg
from forwarder.config import validate as config_validate
from forwarder.config.load import load_config
from forwarder.config.render import render_effective
from forwarder.config.schema import (
    AccountConfig,
    Config,
    ConfigError,
    IntakeConfig,
    LogConfig,
    RemoteConfig,
    RetryConfig,
    StateConfig,
)
from forwarder.events import model as event_model
from forwarder.ops.credentials import ApiKey, Secret, resolve_account_keys, resolve_api_key
from tests.conftest import Proc, TlsFiles, spawn

SHIPPED_CONFIG = Path(__file__).resolve().parents[2] / "config" / "forwarder.toml"
KEY = "sk_live_0123456789abcdef"


@pytest.fixture(autouse=True)
def _no_system_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Keep a real /etc/forwarder/forwarder.toml on the test machine from leaking in.
    monkeypatch.setattr(config_load, "DEFAULT_CONFIG_PATH", tmp_path / "absent" / "forwarder.toml")


def write(tmp_path: Path, text: str, name: str = "forwarder.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def load_text(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> Config:
    return load_config(write(tmp_path, text), env={} if env is None else env)


# --- defaults and files --------------------------------------------------------------------------


def test_defaults_without_file() -> None:
    config = load_config(env={})
    assert config == Config()
    assert config.intake.http_listen == "127.0.0.1:8787"
    assert config.intake.tcp_address == ("127.0.0.1", 8787)
    assert config.intake.unix_socket_mode == 0o660
    assert config.remote.base_url == "https://api-eu1.stannp.com/v1"
    assert config.remote.timeout_s == 30.0
    assert config.state.path == Path("/var/lib/forwarder")
    assert config.log == LogConfig(level="info", format="auto")
    assert config.intake.accept_client_keys is False
    assert config.queue.max_bytes == 256 * 1024 * 1024
    assert (config.intake.header_timeout_s, config.intake.body_timeout_s) == (10.0, 30.0)
    assert (config.intake.keepalive_timeout_s, config.intake.max_connections) == (75.0, 512)
    assert config.intake.write_timeout_s == 10.0
    assert config.accounts == {}
    assert config.account_names() == ("default",)


def test_flow_control_defaults() -> None:
    remote = load_config(env={}).remote
    assert remote.rate_limit_per_minute == 300
    assert remote.concurrency == 0  # adaptive
    assert (remote.min_concurrency, remote.max_concurrency) == (1, 64)
    assert remote.per_recipient_order is True
    assert remote.breaker_failures == 5
    assert (remote.breaker_probe_initial_s, remote.breaker_probe_max_s) == (1.0, 60.0)
    assert remote.default_account == "default"


def test_default_path_is_read_when_present(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "[queue]\nmax_events = 5\n")
    monkeypatch.setattr(config_load, "DEFAULT_CONFIG_PATH", path)
    assert load_config(env={}).queue.max_events == 5


def test_state_directory_from_systemd() -> None:
    env = {"STATE_DIRECTORY": "/var/lib/forwarder-a:/var/lib/forwarder-b"}
    assert load_config(env=env).state.dir == "/var/lib/forwarder-a"
    assert load_config(env={"STATE_DIRECTORY": ""}).state.dir == "/var/lib/forwarder"


def test_state_dir_setting_beats_state_directory(tmp_path: Path) -> None:
    env = {"STATE_DIRECTORY": "/run/systemd-state"}
    assert load_text(tmp_path, '[state]\ndir = "/srv/fw"\n', env).state.dir == "/srv/fw"
    env["FORWARDER_STATE_DIR"] = "/srv/env"
    assert load_text(tmp_path, '[state]\ndir = "/srv/fw"\n', env).state.dir == "/srv/env"


def test_shipped_config_equals_defaults_except_state_dir() -> None:
    env = {"STATE_DIRECTORY": "/var/lib/private/forwarder"}
    defaults = load_config(env=env)
    assert defaults.state.dir == "/var/lib/private/forwarder"
    shipped = load_config(SHIPPED_CONFIG, env=env)
    assert shipped == dataclasses.replace(defaults, state=StateConfig(dir="/var/lib/forwarder"))


def test_shipped_config_lists_every_key(tmp_path: Path) -> None:
    text = SHIPPED_CONFIG.read_text(encoding="utf-8")
    document = tomllib.loads(text)
    expected = {
        f.name: {g.name for g in dataclasses.fields(getattr(Config(), f.name))}
        for f in dataclasses.fields(Config)
        if f.name != "accounts"
    }
    assert {name: set(keys) for name, keys in document.items()} == expected
    # The [accounts.NAME] example is commented out; uncommented, it lists every key and loads.
    example = re.sub(r"^# ", "", text[text.index("# [accounts.us]") :], flags=re.MULTILINE)
    assert set(tomllib.loads(example)["accounts"]["us"]) == {
        f.name for f in dataclasses.fields(AccountConfig) if f.name != "name"
    }
    config = load_text(tmp_path, text + example)
    assert config.accounts["us"] == AccountConfig(
        name="us",
        base_url="https://api-us1.stannp.com/v1",
        api_key_file="/etc/forwarder/us.key",
        api_key_env="FORWARDER_US_KEY",
        rate_limit_per_minute=600,
    )


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=re.escape(f"config file {path} not found")):
        load_config(path, env={})


def test_unreadable_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"config file {tmp_path}: cannot read")):
        load_config(tmp_path, env={})  # a directory


def test_invalid_toml_names_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[intake\nhttp_listen = 1\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: invalid TOML: .+"):
        load_config(path, env={})


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[log]\nlevel = "\xe9"\n')
    with pytest.raises(ConfigError, match="invalid TOML: not UTF-8"):
        load_config(path, env={})


# --- accepted values -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("listen", "address"),
    [
        ("127.0.0.1:8787", ("127.0.0.1", 8787)),
        ("localhost:0", ("localhost", 0)),
        ("0.0.0.0:65535", ("0.0.0.0", 65535)),
        ("[::1]:8787", ("::1", 8787)),
        ("[::]:9000", ("::", 9000)),
    ],
)
def test_listen_addresses(tmp_path: Path, listen: str, address: tuple[str, int]) -> None:
    config = load_text(tmp_path, f'[intake]\nhttp_listen = "{listen}"\n')
    assert config.intake.tcp_address == address


def test_unix_socket_group_by_name_or_number(tmp_path: Path) -> None:
    name = grp.getgrgid(os.getegid()).gr_name
    config = load_text(tmp_path, f'[intake]\nunix_socket_group = "{name}"\n')
    assert config.intake.unix_socket_group == name
    assert config_address.resolve_group(name) == os.getegid()
    assert config_address.resolve_group("4242") == 4242  # a gid need not have a name


def test_ca_bundle_must_be_a_readable_pem_ca_file(tmp_path: Path, tls_files: TlsFiles) -> None:
    config = load_text(tmp_path, f'[remote]\nca_bundle = "{tls_files.ca}"\n')
    assert config.remote.ca_bundle == str(tls_files.ca)
    missing = tmp_path / "nope.pem"
    with pytest.raises(ConfigError, match=rf"^remote\.ca_bundle: cannot read {missing}: "):
        load_text(tmp_path, f'[remote]\nca_bundle = "{missing}"\n')
    junk = write(tmp_path, "not a certificate\n", "junk.pem")
    with pytest.raises(ConfigError, match=r"^remote\.ca_bundle: .*holds no usable PEM CA"):
        load_text(tmp_path, f'[remote]\nca_bundle = "{junk}"\n')
    with pytest.raises(ConfigError, match=r"^remote\.ca_bundle \(from FORWARDER_REMOTE_CA_BUNDLE"):
        load_config(env={"FORWARDER_REMOTE_CA_BUNDLE": str(tmp_path)})  # a directory


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "127.0.0.9", "::1", "localhost", "LOCALHOST.", "::ffff:127.0.0.1"]
)
def test_loopback_listeners_need_no_token(host: str) -> None:
    assert config_address.is_loopback_host(host)
    config_validate.check_exposure([("intake.http_listen", host)], has_token=False)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.7", "192.168.1.2", "fe80::1", "myhost"])
def test_other_listeners_need_a_token(host: str) -> None:
    assert not config_address.is_loopback_host(host)
    with pytest.raises(ConfigError, match=rf"^intake\.http_listen: {re.escape(host)} is not a"):
        config_validate.check_exposure([("intake.http_listen", host)], has_token=False)
    config_validate.check_exposure([("intake.http_listen", host)], has_token=True)


def test_the_intake_token_is_masked_and_kept_out_of_repr(tmp_path: Path) -> None:
    token = "tok-0123456789abcdef-SECRET"
    config = load_config(env={"FORWARDER_INTAKE_AUTH_TOKEN": token})
    assert config.intake.auth_token == token
    assert token not in repr(config)
    text = render_effective(config, None, intake_token=ApiKey(Secret(token), "intake.auth_token"))
    assert token not in text
    assert 'auth_token = "****"' in text
    assert "# intake auth token: **** (from intake.auth_token)" in text
    assert 'auth_token = ""' in render_effective(Config(), None)


def test_unix_socket_only(tmp_path: Path) -> None:
    config = load_text(tmp_path, '[intake]\nhttp_listen = ""\nunix_socket = "/run/fw.sock"\n')
    assert config.intake.tcp_address is None
    assert config.intake.unix_socket == "/run/fw.sock"


@pytest.mark.parametrize("mode", ["0o640", '"0640"', '"640"', '"0o640"', "416"])
def test_unix_socket_mode_forms(tmp_path: Path, mode: str) -> None:
    config = load_text(tmp_path, f"[intake]\nunix_socket_mode = {mode}\n")
    assert config.intake.unix_socket_mode == 0o640


@pytest.mark.parametrize(
    ("url", "normalised"),
    [
        ("https://api.example.com/v1/", "https://api.example.com/v1"),
        ("https://api.example.com:8443", "https://api.example.com:8443"),
        ("http://localhost:8080/v1", "http://localhost:8080/v1"),
        ("http://127.0.0.1:9/", "http://127.0.0.1:9"),
        ("http://127.1.2.3/v1", "http://127.1.2.3/v1"),
        ("http://[::1]:8080/v1", "http://[::1]:8080/v1"),
    ],
)
def test_base_url_accepted(tmp_path: Path, url: str, normalised: str) -> None:
    config = load_text(tmp_path, f'[remote]\nbase_url = "{url}"\n')
    assert config.remote.base_url == normalised


def test_int_accepted_for_float_and_log_names_lowercased(tmp_path: Path) -> None:
    config = load_text(
        tmp_path, '[remote]\ntimeout_s = 5\n[log]\nlevel = "DEBUG"\nformat = "JSON"\n'
    )
    assert config.remote.timeout_s == 5.0
    assert isinstance(config.remote.timeout_s, float)
    assert config.log == LogConfig(level="debug", format="json")


# --- rejected values -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[intake]\nfoo = 1\n", "unknown key intake.foo"),
        (
            "[remote]\nconcurency = 4\n",
            "unknown key remote.concurency (did you mean remote.concurrency?)",
        ),
        ("[intake.extra]\nx = 1\n", "unknown key intake.extra"),
        ("[foo]\nx = 1\n", "unknown section [foo]"),
        ("listen = 1\n", "unknown key listen"),
        ("intake = 1\n", "intake: expected a table"),
        (
            '[remote]\nconcurrency = "eight"\n',
            "remote.concurrency: expected an integer, got a string ('eight')",
        ),
        (
            "[remote]\nconcurrency = true\n",
            "remote.concurrency: expected an integer, got a boolean",
        ),
        ("[remote]\nconcurrency = 8.0\n", "remote.concurrency: expected an integer, got a float"),
        (
            "[retry]\nmax_backoff_s = false\n",
            "retry.max_backoff_s: expected a number, got a boolean",
        ),
        ('[retry]\nmax_backoff_s = "60"\n', "retry.max_backoff_s: expected a number, got a string"),
        ("[log]\nlevel = 3\n", "log.level: expected a string, got an integer (3)"),
        ("[state]\ndir = [1]\n", "state.dir: expected a string, got an array"),
        ('[intake]\nunix_socket_mode = "rw-"\n', "intake.unix_socket_mode: expected an octal mode"),
        ("[intake]\nunix_socket_mode = true\n", "intake.unix_socket_mode: expected an octal mode"),
        (
            '[intake]\naccept_client_keys = "true"\n',
            "intake.accept_client_keys: expected a boolean (true or false), got a string ('true')",
        ),
        (
            "[remote]\nper_recipient_order = 1\n",
            "remote.per_recipient_order: expected a boolean (true or false), got an integer (1)",
        ),
        ("[acounts.us]\nx = 1\n", "unknown section [acounts] (did you mean accounts?)"),
    ],
)
def test_structure_and_type_errors(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}"):
        load_text(tmp_path, text)


@pytest.mark.parametrize(
    "listen",
    ["127.0.0.1", "127.0.0.1:99999", "127.0.0.1:http", "::1:8787", ":8787", "[::1]8787", "[x]:1"],
)
def test_bad_listen_address(tmp_path: Path, listen: str) -> None:
    with pytest.raises(ConfigError, match=r"^intake\.http_listen: "):
        load_text(tmp_path, f'[intake]\nhttp_listen = "{listen}"\n')


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://api.example.com/v1", "clear text"),
        ("http://10.0.0.1/v1", "clear text"),
        ("ftp://api.example.com/v1", "absolute https:// URL"),
        ("api.example.com/v1", "absolute https:// URL"),
        ("https:///v1", "no host"),
        ("https://api.example.com/v1?x=1", "query string"),
        ("https://api.example.com/v1#top", "fragment"),
        ("https://user:pw@api.example.com/v1", "user:password@"),
        ("", "absolute https:// URL"),
    ],
)
def test_bad_base_url(tmp_path: Path, url: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=r"^remote\.base_url: ") as info:
        load_text(tmp_path, f'[remote]\nbase_url = "{url}"\n')
    assert reason in str(info.value)
    assert "pw" not in str(info.value)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[intake]\nunix_socket_mode = 0o1000\n", "intake.unix_socket_mode"),
        ("[intake]\nmax_body_bytes = 1023\n", "intake.max_body_bytes"),
        ("[intake]\nmax_batch = 0\n", "intake.max_batch"),
        ("[intake]\nheader_timeout_s = 0\n", "intake.header_timeout_s"),
        ("[intake]\nbody_timeout_s = -1.0\n", "intake.body_timeout_s"),
        ("[intake]\nkeepalive_timeout_s = nan\n", "intake.keepalive_timeout_s"),
        ("[intake]\nwrite_timeout_s = 0\n", "intake.write_timeout_s"),
        ("[intake]\nwrite_timeout_s = -2.5\n", "intake.write_timeout_s"),
        ("[intake]\nwrite_timeout_s = inf\n", "intake.write_timeout_s"),
        ('[intake]\nwrite_timeout_s = "10"\n', "intake.write_timeout_s"),
        ("[intake]\nmax_connections = 0\n", "intake.max_connections"),
        ("[queue]\nmax_events = 0\n", "queue.max_events"),
        ("[queue]\nmax_bytes = 1048575\n", "queue.max_bytes"),
        ('[intake]\nunix_socket_group = "no-such-group-x"\n', "intake.unix_socket_group"),
        ('[intake]\nunix_socket_group = "4294967295"\n', "intake.unix_socket_group"),
        ("[remote]\nconcurrency = -1\n", "remote.concurrency"),
        ("[remote]\nconcurrency = 1025\n", "remote.concurrency"),
        ("[remote]\nrate_limit_per_minute = 0\n", "remote.rate_limit_per_minute"),
        ("[remote]\nrate_limit_per_minute = 1000001\n", "remote.rate_limit_per_minute"),
        ("[remote]\nmin_concurrency = 0\n", "remote.min_concurrency"),
        ("[remote]\nmax_concurrency = 1025\n", "remote.max_concurrency"),
        ("[remote]\nmin_concurrency = 8\nmax_concurrency = 4\n", "remote.min_concurrency"),
        ("[remote]\nbreaker_failures = 0\n", "remote.breaker_failures"),
        ("[remote]\nbreaker_failures = 10001\n", "remote.breaker_failures"),
        ("[remote]\nbreaker_probe_initial_s = 0\n", "remote.breaker_probe_initial_s"),
        ("[remote]\nbreaker_probe_max_s = -1.0\n", "remote.breaker_probe_max_s"),
        (
            "[remote]\nbreaker_probe_initial_s = 10\nbreaker_probe_max_s = 5\n",
            "remote.breaker_probe_initial_s",
        ),
        ('[remote]\ndefault_account = "us"\n', "remote.default_account"),
        ("[remote]\ntimeout_s = 0\n", "remote.timeout_s"),
        ("[remote]\nconnect_timeout_s = -1.0\n", "remote.connect_timeout_s"),
        ("[remote]\nauth_retry_s = nan\n", "remote.auth_retry_s"),
        ("[retry]\nmax_elapsed_s = inf\n", "retry.max_elapsed_s"),
        ("[retry]\ninitial_backoff_s = 0.0\n", "retry.initial_backoff_s"),
        ("[retry]\ninitial_backoff_s = 10\nmax_backoff_s = 5\n", "retry.initial_backoff_s"),
        ("[shutdown]\ntimeout_s = 0\n", "shutdown.timeout_s"),
        ('[state]\ndir = ""\n', "state.dir"),
        ('[log]\nlevel = "verbose"\n', "log.level"),
        ('[log]\nformat = "xml"\n', "log.format"),
        (f'[intake]\nunix_socket = "/{"s" * 120}"\n', "intake.unix_socket"),
    ],
)
def test_validation_errors_name_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError, match=f"^{re.escape(key)}: "):
        load_text(tmp_path, text)


def test_initial_backoff_above_max_says_why(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"must not exceed retry\.max_backoff_s"):
        load_text(tmp_path, "[retry]\ninitial_backoff_s = 10\nmax_backoff_s = 5\n")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "[remote]\nmin_concurrency = 8\nmax_concurrency = 4\n",
            "remote.min_concurrency: must not exceed remote.max_concurrency (4), got 8",
        ),
        (
            "[remote]\nbreaker_probe_initial_s = 10\nbreaker_probe_max_s = 5\n",
            "remote.breaker_probe_initial_s: must not exceed remote.breaker_probe_max_s (5.0), "
            "got 10.0",
        ),
        ("[remote]\nconcurrency = 1025\n", "remote.concurrency: must be within 0..1024, got 1025"),
        (
            "[remote]\nrate_limit_per_minute = 0\n",
            "remote.rate_limit_per_minute: must be within 1..1000000, got 0",
        ),
    ],
)
def test_flow_control_errors_say_why(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        load_text(tmp_path, text)


@pytest.mark.parametrize("value", ["150", "-1", "nan", "inf"])
def test_group_commit_window_is_bounded(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError, match=r"^queue\.group_commit_ms: must be within 0\.\.100 "):
        load_text(tmp_path, f"[queue]\ngroup_commit_ms = {value}\n")


def test_group_commit_window_from_file_and_env(tmp_path: Path) -> None:
    assert load_text(tmp_path, "").queue.group_commit_ms == 8.0
    assert load_text(tmp_path, "[queue]\ngroup_commit_ms = 0\n").queue.group_commit_ms == 0
    config = load_text(tmp_path, "", {"FORWARDER_QUEUE_GROUP_COMMIT_MS": "2.5"})
    assert config.queue.group_commit_ms == 2.5


def test_drop_in_answer_and_outcome_retention(tmp_path: Path) -> None:
    config = load_text(tmp_path, "")
    assert config.intake.drop_in_answer == "remote"
    assert (config.state.outcome_retention_s, config.state.outcome_max_count) == (86400, 20_000)
    config = load_text(
        tmp_path,
        '[intake]\ndrop_in_answer = "accepted"\n[state]\noutcome_retention_s = 60\n',
        {"FORWARDER_STATE_OUTCOME_MAX_COUNT": "0"},
    )
    assert config.intake.drop_in_answer == "accepted"
    assert (config.state.outcome_retention_s, config.state.outcome_max_count) == (60, 0)
    with pytest.raises(
        ConfigError, match=r"^intake\.drop_in_answer: must be one of remote, accepted; got "
    ):
        load_text(tmp_path, '[intake]\ndrop_in_answer = "200"\n')
    with pytest.raises(ConfigError, match=r"^state\.outcome_retention_s: must be a positive"):
        load_text(tmp_path, "[state]\noutcome_retention_s = 0\n")
    with pytest.raises(ConfigError, match=r"^state\.outcome_max_count: must be within 0\.\."):
        load_text(tmp_path, "[state]\noutcome_max_count = -1\n")


def test_concurrency_fixed_or_adaptive(tmp_path: Path) -> None:
    assert load_text(tmp_path, "[remote]\nconcurrency = 0\n").remote.concurrency == 0
    config = load_text(tmp_path, "[remote]\nconcurrency = 1024\nmax_concurrency = 2\n")
    assert config.remote.concurrency == 1024  # a fixed concurrency ignores the adaptive bounds
    config = load_text(tmp_path, "[remote]\nmin_concurrency = 7\nmax_concurrency = 7\n")
    assert (config.remote.min_concurrency, config.remote.max_concurrency) == (7, 7)


# --- booleans ------------------------------------------------------------------------------------


def test_bool_from_toml(tmp_path: Path) -> None:
    config = load_text(
        tmp_path, "[intake]\naccept_client_keys = true\n[remote]\nper_recipient_order = false\n"
    )
    assert config.intake.accept_client_keys is True
    assert config.remote.per_recipient_order is False


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("true", True),
        ("TRUE", True),
        (" yes\n", True),
        ("On", True),
        ("1", True),
        ("false", False),
        ("No", False),
        ("off", False),
        (" 0 ", False),
    ],
)
def test_bool_from_env(value: str, expected: bool) -> None:
    config = load_config(env={"FORWARDER_INTAKE_ACCEPT_CLIENT_KEYS": value})
    assert config.intake.accept_client_keys is expected
    config = load_config(env={"FORWARDER_REMOTE_PER_RECIPIENT_ORDER": value})
    assert config.remote.per_recipient_order is expected


@pytest.mark.parametrize("value", ["", "maybe", "2", "t", "y", "truee", "-1"])
def test_bad_bool_from_env(value: str) -> None:
    var = "FORWARDER_INTAKE_ACCEPT_CLIENT_KEYS"
    message = f"{var}: expected a boolean (true/false, 1/0, yes/no or on/off), got {value!r}"
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        load_config(env={var: value})


def test_env_bool_overrides_file(tmp_path: Path) -> None:
    env = {"FORWARDER_INTAKE_ACCEPT_CLIENT_KEYS": "off"}
    config = load_text(tmp_path, "[intake]\naccept_client_keys = true\n", env)
    assert config.intake.accept_client_keys is False


# --- accounts ------------------------------------------------------------------------------------

US_ACCOUNT = """
[accounts.us]
base_url = "https://api-us1.stannp.com/v1/"
api_key_env = "FORWARDER_US_KEY"
rate_limit_per_minute = 600
"""


def test_accounts_defaults_come_from_remote(tmp_path: Path) -> None:
    text = (
        '[remote]\nbase_url = "https://api.example.com/v2/"\nrate_limit_per_minute = 120\n'
        '[accounts.uk-2]\napi_key_file = "/etc/forwarder/uk.key"\n'
        "[accounts.A_b]\n"
    )
    config = load_text(tmp_path, text)
    assert config.accounts == {
        "uk-2": AccountConfig(
            name="uk-2",
            base_url="https://api.example.com/v2",
            api_key_file="/etc/forwarder/uk.key",
            rate_limit_per_minute=120,
        ),
        "A_b": AccountConfig(
            name="A_b", base_url="https://api.example.com/v2", rate_limit_per_minute=120
        ),
    }
    assert config.account_names() == ("default", "A_b", "uk-2")


def test_account_inherits_remote_overrides_from_env(tmp_path: Path) -> None:
    env = {"FORWARDER_REMOTE_RATE_LIMIT_PER_MINUTE": "50"}
    config = load_text(tmp_path, "[accounts.us]\n", env)
    assert config.accounts["us"].rate_limit_per_minute == 50


def test_account_own_values_normalised(tmp_path: Path) -> None:
    config = load_text(tmp_path, f'[remote]\ndefault_account = "us"\n{US_ACCOUNT}')
    assert config.remote.default_account == "us"
    assert config.accounts["us"] == AccountConfig(
        name="us",
        base_url="https://api-us1.stannp.com/v1",
        api_key_env="FORWARDER_US_KEY",
        rate_limit_per_minute=600,
    )


def test_account_lookup(tmp_path: Path) -> None:
    config = load_text(
        tmp_path, f'[remote]\napi_key_file = "/k"\nrate_limit_per_minute = 9\n{US_ACCOUNT}'
    )
    assert config.account("default") == AccountConfig(
        name="default",
        base_url="https://api-eu1.stannp.com/v1",
        api_key_file="/k",
        api_key_env="FORWARDER_API_KEY",
        rate_limit_per_minute=9,
    )
    assert config.account("us") is config.accounts["us"]
    with pytest.raises(KeyError):
        config.account("uk")


def test_account_name_rule_matches_events() -> None:
    # Events name their account; a name the config accepts must be one an event can carry.
    assert cfg.ACCOUNT_NAME_RE.pattern == event_model.ACCOUNT_RE.pattern


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "[accounts.default]\n",
            'accounts.default: the name "default" is reserved for the [remote] account; '
            "choose another name",
        ),
        ('[accounts."a b"]\n', "accounts: invalid account name 'a b': use 1-64 characters"),
        (f"[accounts.{'x' * 65}]\n", "accounts: invalid account name 'xxxx"),
        ('[accounts.""]\n', "accounts: invalid account name ''"),
        ('[accounts."é"]\n', "accounts: invalid account name 'é'"),
        (
            "[accounts.us]\nrate_limit = 5\n",
            "unknown key accounts.us.rate_limit (did you mean accounts.us.rate_limit_per_minute?)",
        ),
        ('[accounts.us]\nname = "us"\n', "unknown key accounts.us.name"),
        ("[accounts.us.extra]\n", "unknown key accounts.us.extra"),
        ("accounts = 1\n", "accounts: expected tables [accounts.NAME], got an integer (1)"),
        ("accounts = [1]\n", "accounts: expected tables [accounts.NAME], got an array"),
        (
            '[accounts]\nbase_url = "https://x.example.com"\n',
            "accounts.base_url: expected a table [accounts.base_url] (each account is a table",
        ),
        (
            '[accounts.us]\nrate_limit_per_minute = "600"\n',
            "accounts.us.rate_limit_per_minute: expected an integer, got a string ('600')",
        ),
        ("[accounts.us]\napi_key_env = 1\n", "accounts.us.api_key_env: expected a string"),
        (
            '[remote]\ndefault_account = "uss"\n[accounts.us]\n[accounts.uk]\n',
            "remote.default_account: no account named 'uss' (did you mean us?); "
            "known accounts: default, uk, us",
        ),
        (
            '[remote]\ndefault_account = "Default"\n',
            "remote.default_account: no account named 'Default' (did you mean default?); "
            "known accounts: default",
        ),
    ],
)
def test_account_structure_errors(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}"):
        load_text(tmp_path, text)


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ('base_url = "http://api.example.com/v1"', "accounts.us.base_url"),
        ('base_url = ""', "accounts.us.base_url"),
        ('base_url = "https://u:p@x.example.com"', "accounts.us.base_url"),
        ("rate_limit_per_minute = 0", "accounts.us.rate_limit_per_minute"),
        ("rate_limit_per_minute = 1000001", "accounts.us.rate_limit_per_minute"),
        ('api_key_env = "1ABC"', "accounts.us.api_key_env"),
        ('api_key_env = "MY-KEY"', "accounts.us.api_key_env"),
        ('api_key_env = "A B"', "accounts.us.api_key_env"),
    ],
)
def test_account_validation_errors_name_the_key(tmp_path: Path, table: str, key: str) -> None:
    with pytest.raises(ConfigError, match=f"^{re.escape(key)}: "):
        load_text(tmp_path, f"[accounts.us]\n{table}\n")


def test_account_api_key_env_never_echoed(tmp_path: Path) -> None:
    # Someone pastes the key where the variable's name belongs.
    pasted = "sk-live/0123456789abcdef"
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, f'[accounts.us]\napi_key_env = "{pasted}"\n')
    assert pasted not in str(info.value)


def test_api_key_file_must_be_absolute_and_is_never_echoed(tmp_path: Path) -> None:
    # Someone pastes the key where the file's path belongs.
    pasted = "sk-live-0123456789abcdef"
    for text, env, where in (
        (f'[remote]\napi_key_file = "{pasted}"\n', {}, "remote.api_key_file"),
        ("", {"FORWARDER_REMOTE_API_KEY_FILE": pasted}, "remote.api_key_file"),
        (f'[accounts.us]\napi_key_file = "{pasted}"\n', {}, "accounts.us.api_key_file"),
    ):
        with pytest.raises(ConfigError, match=rf"^{re.escape(where)}.*absolute path") as info:
            load_text(tmp_path, text, env)
        assert pasted not in str(info.value)
    assert load_text(tmp_path, '[remote]\napi_key_file = "/k"\n').remote.api_key_file == "/k"


def test_account_env_var_names_that_look_like_settings(tmp_path: Path) -> None:
    # An api_key_env variable holds a key, whatever its name; it is not read as a setting.
    text = '[accounts.us]\napi_key_env = "FORWARDER_REMOTE_US_KEY"\n'
    config = load_text(tmp_path, text, {"FORWARDER_REMOTE_US_KEY": KEY})
    assert config.accounts["us"].api_key_env == "FORWARDER_REMOTE_US_KEY"


def test_accounts_cannot_be_set_from_env(tmp_path: Path) -> None:
    var = "FORWARDER_ACCOUNTS_US_RATE_LIMIT_PER_MINUTE"
    with pytest.raises(ConfigError, match=f"^{var}: .*cannot be set from the environment"):
        load_text(tmp_path, US_ACCOUNT, {var: "5"})
    text = '[accounts.us]\napi_key_env = "FORWARDER_ACCOUNTS_US_KEY"\n'
    config = load_text(tmp_path, text, {"FORWARDER_ACCOUNTS_US_KEY": KEY})
    assert "us" in config.accounts


def test_no_listener(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"intake\.http_listen and intake\.unix_socket"):
        load_text(tmp_path, '[intake]\nhttp_listen = ""\n')


# --- environment overrides -----------------------------------------------------------------------


def test_env_overrides_each_type(tmp_path: Path) -> None:
    env = {
        "FORWARDER_REMOTE_CONCURRENCY": "16",
        "FORWARDER_RETRY_MAX_BACKOFF_S": "2.5",
        "FORWARDER_REMOTE_TIMEOUT_S": "7",
        "FORWARDER_INTAKE_HTTP_LISTEN": "[::1]:0",
        "FORWARDER_INTAKE_UNIX_SOCKET_MODE": "0600",
        "FORWARDER_LOG_LEVEL": "Warning",
    }
    config = load_text(tmp_path, "[remote]\nconcurrency = 2\n", env)
    assert config.remote.concurrency == 16
    assert config.retry.max_backoff_s == 2.5
    assert config.remote.timeout_s == 7.0
    assert config.intake.tcp_address == ("::1", 0)
    assert config.intake.unix_socket_mode == 0o600
    assert config.log.level == "warning"


def test_env_can_disable_tcp(tmp_path: Path) -> None:
    env = {"FORWARDER_INTAKE_HTTP_LISTEN": "", "FORWARDER_INTAKE_UNIX_SOCKET": "/run/f.sock"}
    assert load_config(env=env).intake.tcp_address is None


@pytest.mark.parametrize(
    ("var", "value", "message"),
    [
        ("FORWARDER_REMOTE_CONCURRENCY", "abc", "expected an integer, got 'abc'"),
        ("FORWARDER_REMOTE_CONCURRENCY", "true", "expected an integer, got 'true'"),
        ("FORWARDER_REMOTE_CONCURRENCY", "", "expected an integer, got ''"),
        ("FORWARDER_RETRY_MAX_BACKOFF_S", "soon", "expected a number, got 'soon'"),
        ("FORWARDER_RETRY_MAX_BACKOFF_S", "nan", "expected a number, got 'nan'"),
        ("FORWARDER_INTAKE_UNIX_SOCKET_MODE", "0689", "expected an octal mode"),
    ],
)
def test_bad_env_value_names_variable(var: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=f"^{re.escape(f'{var}: {message}')}"):
        load_config(env={var: value})


def test_unknown_env_setting_names_variable() -> None:
    with pytest.raises(ConfigError, match=r"^FORWARDER_REMOTE_X: no such setting remote\.x"):
        load_config(env={"FORWARDER_REMOTE_X": "1"})
    with pytest.raises(ConfigError, match=r"did you mean remote\.concurrency\?"):
        load_config(env={"FORWARDER_REMOTE_CONCURENCY": "1"})


def test_env_value_never_echoed_for_unknown_setting() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(env={"FORWARDER_REMOTE_API_KEY": KEY})
    assert KEY not in str(info.value)


def test_other_forwarder_variables_are_ignored() -> None:
    env = {"FORWARDER_API_KEY": KEY, "FORWARDER_CONFIG": "/x", "FORWARDERX_LOG_LEVEL": "bad"}
    assert load_config(env=env) == Config()


def test_env_validation_error_names_variable() -> None:
    with pytest.raises(
        ConfigError, match=r"^remote\.base_url \(from FORWARDER_REMOTE_BASE_URL\): .*clear text"
    ):
        load_config(env={"FORWARDER_REMOTE_BASE_URL": "http://example.com"})


def test_env_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORWARDER_QUEUE_MAX_EVENTS", "42")
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/fw-test")
    config = load_config()
    assert config.queue.max_events == 42
    assert config.state.dir == "/var/lib/fw-test"


# --- rendering -----------------------------------------------------------------------------------


def test_render_effective_defaults_round_trip(tmp_path: Path) -> None:
    config = load_config(env={})
    text = render_effective(config, None)
    assert text.rstrip().endswith("# api key: not configured")
    assert "unix_socket_mode = 0o660" in text
    document = tomllib.loads(text)
    # No [accounts.NAME] tables when there are no further accounts.
    assert set(document) == {f.name for f in dataclasses.fields(Config)} - {"accounts"}
    assert document["intake"]["accept_client_keys"] is False
    assert document["remote"]["per_recipient_order"] is True
    assert load_text(tmp_path, text) == config


def test_render_effective_odd_values_round_trip(tmp_path: Path) -> None:
    config = Config(
        intake=IntakeConfig(
            http_listen="[::1]:0", unix_socket='/run/a "b"\\c\n\u00e9.sock', unix_socket_mode=0o600
        ),
        remote=RemoteConfig(base_url="http://127.0.0.1:9999/v1", timeout_s=1e-3, concurrency=3),
        retry=RetryConfig(initial_backoff_s=0.1, max_backoff_s=1e6, max_elapsed_s=7.25),
        state=StateConfig(dir="/tmp/x\ty"),
        log=LogConfig(level="debug", format="json"),
        accounts={
            "us": AccountConfig(
                "us", "https://api-us1.stannp.com/v1", "/etc/k\n[x]", "US_KEY", 1_000_000
            ),
            "b-2": AccountConfig("b-2", "http://[::1]:1", rate_limit_per_minute=1),
        },
    )
    key_file = write(tmp_path, KEY, "api_key")
    key = resolve_api_key(
        dataclasses.replace(config, remote=RemoteConfig(api_key_file=str(key_file))), {}
    )
    assert key is not None
    text = render_effective(config, key)
    assert KEY not in text
    assert text.rstrip().endswith(f"# api key: **** (from file {key_file})")
    assert "unix_socket_mode = 0o600" in text
    assert load_text(tmp_path, text) == config


def test_render_effective_accounts_round_trip(tmp_path: Path) -> None:
    text = (
        "[intake]\naccept_client_keys = true\n"
        '[remote]\nrate_limit_per_minute = 120\nconcurrency = 4\ndefault_account = "us"\n'
        "per_recipient_order = false\n"
        f"{US_ACCOUNT}"
        '[accounts.uk]\napi_key_file = "/etc/forwarder/uk.key"\n'
    )
    config = load_text(tmp_path, text)
    us_key = tmp_path / "us.key"
    us_key.write_text(KEY, encoding="utf-8")
    env = {"FORWARDER_US_KEY": KEY + "-us"}
    account_keys = resolve_account_keys(
        dataclasses.replace(
            config,
            accounts={
                "us": config.accounts["us"],
                "uk": dataclasses.replace(config.accounts["uk"], api_key_file=str(us_key)),
            },
        ),
        env,
    )
    rendered = render_effective(config, None, account_keys)
    assert KEY not in rendered
    document = tomllib.loads(rendered)
    assert document["accounts"] == {
        "uk": {
            "base_url": "https://api-eu1.stannp.com/v1",
            "api_key_file": "/etc/forwarder/uk.key",
            "api_key_env": "",
            "rate_limit_per_minute": 120,
        },
        "us": {
            "base_url": "https://api-us1.stannp.com/v1",
            "api_key_file": "",
            "api_key_env": "FORWARDER_US_KEY",
            "rate_limit_per_minute": 600,
        },
    }
    # Accounts come after the other sections, in name order; the default key's comment is last.
    assert (
        rendered.index("[log]") < rendered.index("[accounts.uk]") < rendered.index("[accounts.us]")
    )
    assert "# api key of this account: **** (from environment FORWARDER_US_KEY)" in rendered
    assert f"# api key of this account: **** (from file {us_key})" in rendered
    assert rendered.rstrip().endswith("# api key: not configured")
    assert load_text(tmp_path, rendered) == config
    # Without account_keys there is no per-account comment.
    assert "api key of this account" not in render_effective(config, None)


def test_render_effective_comment_cannot_inject_toml() -> None:
    key = ApiKey(Secret(KEY), "file /x\n[evil]\na = 1")
    text = render_effective(Config(), key)
    assert "evil" not in tomllib.loads(text)
    assert KEY not in text


def test_render_effective_floats_stay_floats() -> None:
    document = tomllib.loads(render_effective(Config(), None))
    assert isinstance(document["remote"]["timeout_s"], float)
    assert math.isclose(document["retry"]["initial_backoff_s"], 0.5)


# --- secret settings: no error ever shows their value ---------------------------------------------

# Each case: a config file's text and environment, and the secret in them (or its distinctive
# part) that no error may show. Every secret setting, with the mistakes one makes: a wrong type
# (an unquoted token), a secret pasted where a path or a variable name belongs, the env var form.
PASTED = "tok0123456789abcdefSECRET"
SECRET_MISTAKES: dict[str, tuple[str, dict[str, str], str]] = {
    "auth_token unquoted digits": ("[intake]\nauth_token = 4815162342108423\n", {}, "4815162342"),
    "auth_token unquoted float": ("[intake]\nauth_token = 4815162342.1084\n", {}, "4815162342"),
    "auth_token with a space": (f'[intake]\nauth_token = "{PASTED} x"\n', {}, PASTED),
    "auth_token too short": ('[intake]\nauth_token = "SECRETtok42"\n', {}, "SECRETtok42"),
    "auth_token_file holds the token": (f'[intake]\nauth_token_file = "{PASTED}"\n', {}, PASTED),
    "auth_token_file holds a /token": (f'[intake]\nauth_token_file = "/{PASTED}="\n', {}, PASTED),
    "auth_token_file unquoted digits": (
        "[intake]\nauth_token_file = 4815162342108423\n",
        {},
        "4815162342",
    ),
    "auth_token_file with a NUL": (
        f'[intake]\nauth_token_file = "/{PASTED}\\u0000x"\n',
        {},
        PASTED,
    ),
    "FORWARDER_INTAKE_AUTH_TOKEN too short": (
        "",
        {"FORWARDER_INTAKE_AUTH_TOKEN": "SECRETtok42"},
        "SECRETtok42",
    ),
    "FORWARDER_INTAKE_AUTH_TOKEN with a space": (
        "",
        {"FORWARDER_INTAKE_AUTH_TOKEN": f"{PASTED} x"},
        PASTED,
    ),
    "FORWARDER_INTAKE_AUTH_TOKEN_FILE holds the token": (
        "",
        {"FORWARDER_INTAKE_AUTH_TOKEN_FILE": PASTED},
        PASTED,
    ),
    "FORWARDER_INTAKE_AUTH_TOKEN_FILE holds a /token": (
        "",
        {"FORWARDER_INTAKE_AUTH_TOKEN_FILE": f"/{PASTED}"},
        PASTED,
    ),
    "api_key_file holds the key": (f'[remote]\napi_key_file = "{PASTED}"\n', {}, PASTED),
    "api_key_file holds a /key": (
        f'[remote]\napi_key_file = "/{PASTED}"\n',
        {"FORWARDER_API_KEY": ""},  # unset: the file is looked at
        PASTED,
    ),
    "api_key_file unquoted digits": (
        "[remote]\napi_key_file = 4815162342108423\n",
        {},
        "4815162342",
    ),
    "FORWARDER_REMOTE_API_KEY_FILE holds a /key": (
        "",
        {"FORWARDER_REMOTE_API_KEY_FILE": f"/{PASTED}", "FORWARDER_API_KEY": ""},
        PASTED,
    ),
    "account api_key_file holds a /key": (
        f'[accounts.us]\napi_key_file = "/{PASTED}"\n',
        {},
        PASTED,
    ),
    "account api_key_file unquoted digits": (
        "[accounts.us]\napi_key_file = 4815162342108423\n",
        {},
        "4815162342",
    ),
    "account api_key_env holds the key": (
        f'[accounts.us]\napi_key_env = "sk-live-{PASTED}"\n',
        {},
        PASTED,
    ),
    "account api_key_env holds a key shaped like a name": (
        f'[accounts.us]\napi_key_env = "sk_live_{PASTED}"\n',
        {},
        PASTED,
    ),
    "account api_key_env unquoted digits": (
        "[accounts.us]\napi_key_env = 4815162342108423\n",
        {},
        "4815162342",
    ),
}


def _check_config(
    tmp_path: Path, text: str, env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, text)
    for var in [v for v in os.environ if v.startswith("FORWARDER_")]:
        monkeypatch.delenv(var)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    monkeypatch.setenv("FORWARDER_API_KEY", KEY)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    assert cli.main(["check-config", "--config", str(path)]) == 2


@pytest.mark.parametrize("case", sorted(SECRET_MISTAKES))
def test_no_config_error_shows_a_secret_settings_value(
    case: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    text, env, secret = SECRET_MISTAKES[case]
    _check_config(tmp_path, text, env, monkeypatch)
    out, err = capsys.readouterr()
    assert err.startswith("forwarder: config error: "), err
    assert secret not in err
    assert secret not in out


async def test_check_config_never_shows_a_secret_settings_value(tmp_path: Path) -> None:
    # The command itself, as an operator runs it: one case of each kind, as subprocesses.
    base = {"FORWARDER_API_KEY": KEY}

    async def run(n: int, text: str, env: dict[str, str]) -> Proc:
        path = write(tmp_path, text, f"case{n}.toml")
        proc = await spawn("check-config", "--config", str(path), env={**base, **env})
        await proc.wait(60)
        return proc

    kinds = (
        "auth_token unquoted digits",
        "auth_token_file holds a /token",
        "FORWARDER_INTAKE_AUTH_TOKEN_FILE holds the token",
        "api_key_file holds a /key",
        "account api_key_env holds a key shaped like a name",
    )
    cases = [SECRET_MISTAKES[case] for case in kinds]
    procs = await asyncio.gather(*(run(n, text, env) for n, (text, env, _) in enumerate(cases)))
    for proc, (_, _, secret) in zip(procs, cases, strict=True):
        assert proc.process.returncode == 2, proc.stderr
        assert proc.stderr[0].startswith("forwarder: config error: ")
        assert secret not in "\n".join(proc.stderr + proc.stdout)


def test_every_setting_that_holds_or_names_a_secret_is_marked() -> None:
    names = [f"{section}.{key}" for section, kinds in cfg.FIELD_KINDS.items() for key in kinds]
    names += [f"accounts.us.{key}" for key in cfg.ACCOUNT_KINDS]
    secret = [n for n in names if any(w in n for w in ("token", "api_key", "password", "secret"))]
    assert secret  # the list below is not vacuous
    assert [n for n in secret if not cfg.is_secret_key(n)] == []


def test_a_secret_settings_value_is_scrubbed_from_any_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The second line of defence: whatever a (future) check says, the value does not show.
    def echo(document: dict[str, object], env: object) -> Config:
        raise ConfigError(f"intake.auth_token: cannot use {PASTED}, nor /{PASTED}")

    monkeypatch.setattr(config_load, "_load", echo)
    for text, env in (
        (f'[intake]\nauth_token = "{PASTED}"\n', {}),
        ("", {"FORWARDER_INTAKE_AUTH_TOKEN": PASTED}),
        (f'[accounts.us]\napi_key_env = "{PASTED}"\n', {}),
    ):
        with pytest.raises(ConfigError) as info:
            load_text(tmp_path, text, env)
        assert str(info.value) == "intake.auth_token: cannot use <not shown>, nor /<not shown>"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("held_max_events = 0", "queue.held_max_events: must be within 1..1000000, got 0"),
        ("held_max_events = 1000001", "queue.held_max_events: must be within 1..1000000, got"),
        ("held_max_events = 1.5", "queue.held_max_events"),
        ("held_max_events = true", "queue.held_max_events"),
        ("held_max_age_s = 0", "queue.held_max_age_s: must be a positive number of seconds"),
        ("held_max_age_s = -1", "queue.held_max_age_s: must be a positive number of seconds"),
        ("held_max_age_s = nan", "queue.held_max_age_s: must be a positive number of seconds"),
        ("held_max_age_s = inf", "queue.held_max_age_s: must be a positive number of seconds"),
        ('held_max_age_s = "1h"', "queue.held_max_age_s"),
    ],
)
def test_held_event_bounds_are_validated(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}"):
        load_text(tmp_path, f"[queue]\n{text}\n")


def test_held_event_bounds_default_and_from_env(tmp_path: Path) -> None:
    config = load_text(tmp_path, "")
    assert (config.queue.held_max_events, config.queue.held_max_age_s) == (1000, 86_400.0)
    config = load_text(tmp_path, "[queue]\nheld_max_events = 5\nheld_max_age_s = 30\n")
    assert (config.queue.held_max_events, config.queue.held_max_age_s) == (5, 30.0)
    env = {"FORWARDER_QUEUE_HELD_MAX_EVENTS": "7", "FORWARDER_QUEUE_HELD_MAX_AGE_S": "2.5"}
    config = load_text(tmp_path, "", env)
    assert (config.queue.held_max_events, config.queue.held_max_age_s) == (7, 2.5)
