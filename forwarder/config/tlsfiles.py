"""The TLS files a configuration names, checked before they are used.

`check_ca_bundle`: a PEM file of CA certificates (`remote.ca_bundle`, `fleet.ca_bundle`),
checked when the configuration is loaded. `check_client_certificate`: the fleet's client
certificate and key (`fleet.tls_cert_file`, `fleet.tls_key_file`), checked at start, as the
password files are read (`forwarder.fleet.host.open_client`): readable, a certificate, and an
unencrypted key that is the certificate's, so a wrong file is a start error naming the setting,
not a fallback at the first connection. The key is a secret: neither its path nor its content
ever appears in an error (OpenSSL's reason only, e.g. "KEY_VALUES_MISMATCH").
"""

from __future__ import annotations

import ssl

from forwarder.config.schema import FleetConfig

__all__ = ["TlsFileError", "check_ca_bundle", "check_client_certificate"]


class TlsFileError(ValueError):
    """A TLS file that cannot be used: the setting (`key`) and what is wrong (`detail`)."""

    def __init__(self, key: str, detail: str) -> None:
        super().__init__(f"{key}: {detail}")
        self.key = key
        self.detail = detail


def check_ca_bundle(path: str) -> None:
    """ValueError unless `path` is a readable file with at least one PEM CA certificate."""
    try:
        ssl.create_default_context(cafile=path)
    except ssl.SSLError as exc:  # before OSError: SSLError is one
        detail = exc.reason or str(exc)
        raise ValueError(f"{path} holds no usable PEM CA certificate ({detail})") from None
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None


def check_client_certificate(fleet: FleetConfig) -> None:
    """`TlsFileError` unless the fleet's client certificate and key (if set) are readable, and
    the key is unencrypted and the certificate's. Blocking: called off the event loop, at start
    (the files may be systemd credentials, which exist only for the running service)."""
    if not (fleet.tls_cert_file and fleet.tls_key_file):
        return
    cert = fleet.tls_cert_file
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cafile=cert)
    except ssl.SSLError as exc:  # before OSError: SSLError is one
        detail = exc.reason or type(exc).__name__
        raise TlsFileError(
            "fleet.tls_cert_file", f"{cert} holds no PEM certificate ({detail})"
        ) from None
    except OSError as exc:
        raise TlsFileError("fleet.tls_cert_file", f"cannot read {cert}: {_why(exc)}") from None
    try:
        with open(fleet.tls_key_file, "rb"):
            pass
    except OSError as exc:
        raise TlsFileError(
            "fleet.tls_key_file", f"cannot read it: {_why(exc)}; the path is not shown"
        ) from None
    try:
        # No password: an encrypted key would make OpenSSL prompt on the terminal (redis-py is
        # given none either), so the callback refuses it instead.
        context.load_cert_chain(cert, fleet.tls_key_file, password=_no_password)
    except _EncryptedKey:
        raise TlsFileError(
            "fleet.tls_key_file",
            "is an encrypted key: forwarder needs it unencrypted (PEM), protected by the file's "
            "permissions",
        ) from None
    except OSError as exc:  # ssl.SSLError included
        detail = exc.reason if isinstance(exc, ssl.SSLError) and exc.reason else _why(exc)
        raise TlsFileError(
            "fleet.tls_key_file",
            "is not an unencrypted PEM private key matching fleet.tls_cert_file's certificate "
            f"({detail}); the path is not shown",
        ) from None


class _EncryptedKey(Exception):
    """The client key asked for a password."""


def _no_password() -> bytes:
    raise _EncryptedKey


def _why(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__
