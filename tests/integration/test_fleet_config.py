"""The `[fleet]` section: defaults, accepted forms, and refusals that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from forwarder.config import load as config_load
from forwarder.config import schema as cfg
from forwarder.config.load import load_config
from forwarder.config.schema import ConfigError

PASSWORD = "hunter2-redis-SECRET"
FLEET = 'redis_url = "redis://127.0.0.1:6379"\n'
SENTINEL = 'redis_url = "redis+sentinel://127.0.0.1:26379/fwd-master/0"\n'


@pytest.fixture(autouse=True)
def _no_system_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config_load, "DEFAULT_CONFIG_PATH", tmp_path / "absent" / "forwarder.toml")


def load(tmp_path: Path, fleet: str, extra: str = "") -> cfg.Config:
    path = tmp_path / "forwarder.toml"
    path.write_text(f"{extra}\n[fleet]\n{fleet}\n", encoding="utf-8")
    return load_config(path, env={})


def test_fleet_is_off_by_default() -> None:
    fleet = load_config(env={}).fleet
    assert not fleet.enabled
    assert (fleet.partitions, fleet.claim_idle_s, fleet.lease_s) == (16, 60.0, 10.0)
    assert fleet.key_prefix == "forwarder"


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0",
        "rediss://redis.internal:6380/2",
        "unix:///run/redis.sock",
        "redis://default@10.0.0.5:6379",
        "redis+sentinel://10.0.0.1:26379,10.0.0.2:26379,s3.internal/fwd-master/2",
        "rediss+sentinel://[::1]:26380/mymaster",
        "redis+cluster://10.0.0.1:7000,10.0.0.2:7000,r3.internal",
        "rediss+cluster://forwarder@[::1]:7001/0",
    ],
)
def test_redis_urls_accepted(tmp_path: Path, url: str) -> None:
    fleet = load(tmp_path, f'redis_url = "{url}"').fleet
    assert fleet.enabled
    assert fleet.redis_url == url


@pytest.mark.parametrize(
    ("text", "key", "detail"),
    [
        ('redis_url = "http://redis:6379"', "fleet.redis_url", "must start with"),
        (f'redis_url = "redis://:{PASSWORD}@redis:6379"', "fleet.redis_url", "password"),
        ('redis_url = "unix://relative.sock"', "fleet.redis_url", "absolute socket path"),
        ('redis_url = "redis://"', "fleet.redis_url", "no host"),
        ('redis_url = "redis+sentinel://s1:26379"', "fleet.redis_url", "master's name"),
        ('redis_url = "redis+sentinel://s1:26379/m/16"', "fleet.redis_url", "0 to 15"),
        ('redis_url = "redis+sentinel://s1:26379/m/x"', "fleet.redis_url", "database number"),
        ('redis_url = "redis+sentinel://s1:99999/m"', "fleet.redis_url", "port"),
        ('redis_url = "redis+sentinel://s1,,s2/m"', "fleet.redis_url", "valid host"),
        ('redis_url = "redis+sentinel://s1/m?db=1"', "fleet.redis_url", "no query"),
        (
            f'redis_url = "redis+sentinel://:{PASSWORD}@s1:26379/m"',
            "fleet.redis_url",
            "password",
        ),
        (
            f'redis_url = "redis+cluster://:{PASSWORD}@r1:7000,r2:7000"',
            "fleet.redis_url",
            "password",
        ),
        ('redis_url = "redis+cluster://r1:7000/1"', "fleet.redis_url", "only database 0"),
        ('redis_url = "redis+cluster://r1:7000?timeout=1"', "fleet.redis_url", "no query"),
        ('redis_url = "redis+cluster://r1:0"', "fleet.redis_url", "port"),
        ('redis_url = "redis+cluster://"', "fleet.redis_url", "valid host"),
        (f'redis_password_file = "{PASSWORD}"', "fleet.redis_password_file", "absolute path"),
        (
            f'{SENTINEL}sentinel_password_file = "{PASSWORD}"',
            "fleet.sentinel_password_file",
            "absolute path",
        ),
        (
            f'{FLEET}sentinel_password_file = "/etc/forwarder/sentinel-password"',
            "fleet.sentinel_password_file",
            "redis+sentinel://",
        ),
        (
            'sentinel_password_file = "/etc/forwarder/sentinel-password"',
            "fleet.sentinel_password_file",
            "redis+sentinel://",
        ),
        ('member = "web 1"', "fleet.member", "letters, digits"),
        ('key_prefix = "a{b}"', "fleet.key_prefix", "letters, digits"),
        ("partitions = 0", "fleet.partitions", ""),
        ("partitions = 5000", "fleet.partitions", ""),
        (f"{FLEET}claim_idle_s = 5.0", "fleet.claim_idle_s", "remote.timeout_s"),
        (f"{FLEET}lease_s = 90.0", "fleet.lease_s", "fleet.claim_idle_s"),
        ("lease_s = -1.0", "fleet.lease_s", ""),
    ],
)
def test_bad_fleet_settings_are_refused_naming_the_key(
    tmp_path: Path, text: str, key: str, detail: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    message = str(info.value)
    assert message.startswith(key), message
    assert detail in message
    assert PASSWORD not in message  # a password pasted into the URL or the file key


def test_the_sentinel_password_file_goes_with_a_sentinel_url(tmp_path: Path) -> None:
    path = "/etc/forwarder/sentinel-password"
    fleet = load(tmp_path, f'{SENTINEL}sentinel_password_file = "{path}"').fleet
    assert fleet.sentinel_password_file == path


def test_fleet_settings_from_the_environment(tmp_path: Path) -> None:
    env = {"FORWARDER_FLEET_REDIS_URL": "redis://127.0.0.1:7000", "FORWARDER_FLEET_MEMBER": "h-2"}
    fleet = load_config(env=env).fleet
    assert (fleet.redis_url, fleet.member) == ("redis://127.0.0.1:7000", "h-2")


def test_restart_only_fleet_settings() -> None:
    assert {"fleet.redis_url", "fleet.partitions", "fleet.member", "fleet.key_prefix"} <= set(
        cfg.RESTART_ONLY
    )
    assert not {"fleet.lease_s", "fleet.claim_idle_s"} & set(cfg.RESTART_ONLY)


def test_fleet_timings_bind_only_in_a_fleet(tmp_path: Path) -> None:
    # A host alone may wait on the remote as long as it likes.
    config = load(tmp_path, "", extra="[remote]\ntimeout_s = 120.0\n")
    assert config.remote.timeout_s == 120.0
    with pytest.raises(ConfigError, match=r"^fleet\.claim_idle_s"):
        load(tmp_path, FLEET, extra="[remote]\ntimeout_s = 120.0\n")
