"""queue.mode = "fleet": accepted with a Redis server named, refused naming the key without."""

from __future__ import annotations

from pathlib import Path

import pytest

from forwarder.config import load as config_load
from forwarder.config.load import load_config
from forwarder.config.schema import ConfigError


@pytest.fixture(autouse=True)
def _no_system_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config_load, "DEFAULT_CONFIG_PATH", tmp_path / "absent" / "forwarder.toml")


def test_fleet_mode_with_a_redis_server(tmp_path: Path) -> None:
    path = tmp_path / "forwarder.toml"
    path.write_text('[queue]\nmode = "fleet"\n[fleet]\nredis_url = "redis://127.0.0.1:6379/0"\n')
    assert load_config(path, env={}).queue.mode == "fleet"


def test_fleet_mode_without_a_redis_server_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "forwarder.toml"
    path.write_text('[queue]\nmode = "fleet"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert "queue.mode" in str(info.value)
    assert "fleet.redis_url" in str(info.value)


def test_client_keys_are_refused_in_fleet_mode(tmp_path: Path) -> None:
    path = tmp_path / "forwarder.toml"
    path.write_text(
        '[queue]\nmode = "fleet"\n[intake]\naccept_client_keys = true\n'
        '[fleet]\nredis_url = "redis://127.0.0.1:6379/0"\n'
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert "intake.accept_client_keys" in str(info.value)
    assert 'queue.mode "fleet"' in str(info.value)
