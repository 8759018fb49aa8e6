"""Fleet mode over mutual TLS with a private CA, as a server configured the default way asks.

One `redis-server` listens with TLS and `--tls-auth-clients yes` (Redis's own default): it
refuses a client without a certificate its CA signed. The test CA is in no system trust store
(SSL_CERT_FILE is removed): only `fleet.ca_bundle` makes the server's certificate trusted. The
host is configured from a TOML file and started as the daemon starts it (`FleetHost.start`).
The config checks of the three settings need no server.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, MutableMapping
from pathlib import Path
from typing import Any

import pytest
import structlog

from forwarder.config import load as config_load
from forwarder.config.load import load_config
from forwarder.config.schema import Config, ConfigError
from forwarder.fleet.budget import RedisRateBudget, SharedTicket
from forwarder.fleet.connection import RedisUnavailable
from forwarder.fleet.host import FleetHost
from tests.conftest import TlsFiles
from tests.redisserver import RedisServer, free_port

PREFIX = "fwd-tls"


@pytest.fixture(autouse=True)
def _no_system_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config_load, "DEFAULT_CONFIG_PATH", tmp_path / "absent" / "forwarder.toml")
    # The test CA must be trusted through fleet.ca_bundle alone, never the environment.
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)


@pytest.fixture
async def mtls_redis(tls_files: TlsFiles) -> AsyncIterator[str]:
    """A redis-server asking every TLS client for a certificate; its `rediss://` URL."""
    tls_port = free_port()
    with tempfile.TemporaryDirectory(prefix="fwd-redis-") as tmp:
        server = RedisServer(
            Path(tmp),
            extra_args=(
                "--tls-port", str(tls_port),
                "--tls-cert-file", str(tls_files.cert),
                "--tls-key-file", str(tls_files.key),
                "--tls-ca-cert-file", str(tls_files.ca),
                "--tls-auth-clients", "yes",
            ),
        )  # fmt: skip
        await server.start()  # waits for PING on the plain port
        try:
            yield f"rediss://127.0.0.1:{tls_port}/0"
        finally:
            await server.stop()


def load(tmp_path: Path, fleet: dict[str, str]) -> Config:
    """The configuration of a fleet host from a TOML file, as `forwarder run` reads it."""
    lines = [f'{key} = "{value}"' for key, value in {"key_prefix": PREFIX, **fleet}.items()]
    path = tmp_path / "forwarder.toml"
    path.write_text('[fleet]\nmember = "host-a"\n' + "\n".join(lines) + "\n", encoding="utf-8")
    return load_config(path, env={})


async def start_host(config: Config) -> tuple[FleetHost, list[MutableMapping[str, Any]]]:
    """`FleetHost.start` as the daemon calls it, with the log lines it wrote."""
    with structlog.testing.capture_logs() as logs:
        host = await FleetHost.start(config, in_delivery=lambda: 0)
    return host, logs


async def test_a_client_certificate_and_a_private_ca_reach_a_server_that_asks_for_one(
    mtls_redis: str, tls_files: TlsFiles, tmp_path: Path
) -> None:
    config = load(
        tmp_path,
        {
            "redis_url": mtls_redis,
            "ca_bundle": str(tls_files.ca),
            "tls_cert_file": str(tls_files.cert),
            "tls_key_file": str(tls_files.key),
        },
    )
    host, logs = await start_host(config)
    try:
        assert host.mode.name == "fleet", logs
        budget = RedisRateBudget("acct", 6000, fleet=host.client, mode=host.mode)
        assert isinstance(await budget.acquire(), SharedTicket)
        assert await host.client.client.exists(f"{{{PREFIX}:acct}}:budget") == 1
        key = tls_files.key.read_text(encoding="ascii")
        shown = repr(logs) + repr(host.client) + repr(host.client.client) + repr(host.view())
        assert key.splitlines()[1] not in shown
    finally:
        await host.stop()


async def test_without_the_client_certificate_or_the_ca_the_host_is_in_fallback_naming_why(
    mtls_redis: str, tls_files: TlsFiles, tmp_path: Path
) -> None:
    ca = str(tls_files.ca)
    # The server wants a certificate: unavailable (fallback, not a refusal), saying so.
    no_cert = await unavailable(load(tmp_path, {"redis_url": mtls_redis, "ca_bundle": ca}))
    assert no_cert == "redis ping: ConnectionError (SSLError TLSV13_ALERT_CERTIFICATE_REQUIRED)"
    # Without fleet.ca_bundle nothing trusts the test CA: the server's certificate is refused.
    pair = {"tls_cert_file": str(tls_files.cert), "tls_key_file": str(tls_files.key)}
    no_ca = await unavailable(load(tmp_path, {"redis_url": mtls_redis, **pair}))
    assert no_ca == "redis ping: ConnectionError (SSLCertVerificationError)"


async def unavailable(config: Config) -> str:
    """Start a host the server does not let in: the error of a call (and its logs)."""
    host, logs = await start_host(config)
    try:
        assert host.mode.name == "fallback", logs
        with pytest.raises(RedisUnavailable) as caught:
            await host.client.call("ping", host.client.client.ping)
        assert not caught.value.refused
        return str(caught.value)
    finally:
        await host.stop()


def key_lines(path: Path) -> list[str]:
    """The base64 lines of a PEM key: none may appear in an error."""
    return [line for line in path.read_text(encoding="ascii").splitlines() if "-----" not in line]


def test_the_tls_settings_are_refused_naming_the_setting(
    tls_files: TlsFiles, tmp_path: Path
) -> None:
    url = "rediss://redis.internal:6380/0"
    cert, key, ca = str(tls_files.cert), str(tls_files.key), str(tls_files.ca)
    cases: list[tuple[dict[str, str], str, str]] = [
        ({"redis_url": url, "tls_cert_file": cert}, "fleet.tls_cert_file",
         "needs fleet.tls_key_file"),
        ({"redis_url": url, "tls_key_file": key}, "fleet.tls_key_file",
         "needs fleet.tls_cert_file"),
        ({"redis_url": url, "tls_cert_file": "client.pem", "tls_key_file": key},
         "fleet.tls_cert_file", "must be an absolute path"),
        ({"redis_url": url, "tls_cert_file": cert, "tls_key_file": "client.key"},
         "fleet.tls_key_file", "must be an absolute path"),
        ({"redis_url": "redis://redis.internal:6379/0", "tls_cert_file": cert, "tls_key_file": key},
         "fleet.tls_cert_file", "needs a TLS fleet.redis_url"),
        ({"redis_url": "redis+cluster://n1:7000", "ca_bundle": ca}, "fleet.ca_bundle",
         "needs a TLS fleet.redis_url"),
        ({"redis_url": url, "ca_bundle": key}, "fleet.ca_bundle", "no usable PEM CA certificate"),
    ]  # fmt: skip
    for fleet, setting, detail in cases:
        with pytest.raises(ConfigError) as caught:
            load(tmp_path, fleet)
        assert str(caught.value).startswith(setting), (fleet, caught.value)
        assert detail in str(caught.value), (fleet, caught.value)


@pytest.fixture
def encrypted(tls_files: TlsFiles, tmp_path: Path) -> Path:
    """The test key, encrypted with a password."""
    openssl = shutil.which("openssl")
    assert openssl is not None  # tls_files made the certificates with it
    path = tmp_path / "encrypted.key"
    subprocess.run(
        [openssl, "pkey", "-in", str(tls_files.key), "-aes256", "-passout", "pass:pw-SECRET",
         "-out", str(path)],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    return path


async def test_unusable_client_certificate_files_fail_the_start_never_showing_the_key(
    tls_files: TlsFiles, encrypted: Path, tmp_path: Path
) -> None:
    cert, key = tls_files.cert, tls_files.key
    absent = tmp_path / "absent.pem"  # unreadable whoever runs the test
    cases = [
        # The CA's key is a valid key, but not the certificate's.
        (cert, tls_files.ca.with_suffix(".key"), "fleet.tls_key_file: is not an unencrypted PEM "
         "private key matching fleet.tls_cert_file's certificate (KEY_VALUES_MISMATCH)"),
        (cert, encrypted, "fleet.tls_key_file: is an encrypted key"),
        (cert, absent, "fleet.tls_key_file: cannot read it: No such file or directory"),
        (key, key, f"fleet.tls_cert_file: {key} holds no PEM certificate"),
        (absent, key, f"fleet.tls_cert_file: cannot read {absent}: No such file or directory"),
    ]  # fmt: skip
    url = "rediss+sentinel://127.0.0.1:1/fwd"  # never reached: the files fail first
    for cert_file, key_file, error in cases:
        pair = {"tls_cert_file": str(cert_file), "tls_key_file": str(key_file)}
        config = load(tmp_path, {"redis_url": url, **pair})  # a check-config would pass
        with pytest.raises(ConfigError) as caught:
            await FleetHost.start(config, in_delivery=lambda: 0)
        message = str(caught.value)
        assert message.startswith(error), message
        assert "pw-SECRET" not in message
        if "tls_key_file" in error:
            assert str(key_file) not in message
            if key_file.exists():
                assert not any(line in message for line in key_lines(key_file))
