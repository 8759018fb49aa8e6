"""Tests for forwarder.config: loading, env overrides, validation, API key, rendering."""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from pathlib import Path

import pytest

from forwarder import config as cfg
from forwarder.config import (
    Config,
    ConfigError,
    IntakeConfig,
    LogConfig,
    RemoteConfig,
    RetryConfig,
    StateConfig,
    load_config,
    render_effective,
)
from forwarder.credentials import ApiKey, Secret, resolve_api_key

SHIPPED_CONFIG = Path(__file__).resolve().parent.parent / "config" / "forwarder.toml"
KEY = "sk_live_0123456789abcdef"


@pytest.fixture(autouse=True)
def _no_system_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Keep a real /etc/forwarder/forwarder.toml on the test machine from leaking in.
    monkeypatch.setattr(cfg, "DEFAULT_CONFIG_PATH", tmp_path / "absent" / "forwarder.toml")


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


def test_default_path_is_read_when_present(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "[queue]\nmax_events = 5\n")
    monkeypatch.setattr(cfg, "DEFAULT_CONFIG_PATH", path)
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


def test_shipped_config_lists_every_key() -> None:
    document = tomllib.loads(SHIPPED_CONFIG.read_text(encoding="utf-8"))
    expected = {
        f.name: {g.name for g in dataclasses.fields(getattr(Config(), f.name))}
        for f in dataclasses.fields(Config)
    }
    assert {name: set(keys) for name, keys in document.items()} == expected


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
        ("[queue]\nmax_events = 0\n", "queue.max_events"),
        ("[remote]\nconcurrency = 0\n", "remote.concurrency"),
        ("[remote]\nconcurrency = 1025\n", "remote.concurrency"),
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
    assert set(document) == {f.name for f in dataclasses.fields(Config)}
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


def test_render_effective_comment_cannot_inject_toml() -> None:
    key = ApiKey(Secret(KEY), "file /x\n[evil]\na = 1")
    text = render_effective(Config(), key)
    assert "evil" not in tomllib.loads(text)
    assert KEY not in text


def test_render_effective_floats_stay_floats() -> None:
    document = tomllib.loads(render_effective(Config(), None))
    assert isinstance(document["remote"]["timeout_s"], float)
    assert math.isclose(document["retry"]["initial_backoff_s"], 0.5)
