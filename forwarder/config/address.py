"""Addresses in the settings: ``host:port`` listen syntax, loopback hosts, a socket's group.

Used by the checks (validate.py), by `IntakeConfig.tcp_address`, and where the daemon binds its
listeners.
"""

from __future__ import annotations

import grp
import ipaddress
import re

from forwarder.config.setting import short

__all__ = ["is_loopback_host", "parse_listen", "resolve_group"]

_HOST_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?")
_PORT_RE = re.compile(r"[0-9]{1,5}")


def parse_listen(value: str) -> tuple[str, int]:
    """Parse ``host:port`` / ``[v6]:port``; ValueError with the reason otherwise."""
    example = "expected host:port such as 127.0.0.1:8787 or [::1]:8787"
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            raise ValueError(f"{example}, got {short(value)} (missing ']')")
        host, rest = value[1:end], value[end + 1 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{short(host)} is not an IPv6 address") from None
        if not rest.startswith(":"):
            raise ValueError(f"{example}, got {short(value)}")
        port_text = rest[1:]
    else:
        host, sep, port_text = value.rpartition(":")
        if not sep:
            raise ValueError(f"{example}, got {short(value)}")
        if not host:
            raise ValueError(
                f"missing host in {short(value)} (use 0.0.0.0:PORT or [::]:PORT for all interfaces)"
            )
        if ":" in host:
            raise ValueError(f"IPv6 addresses need brackets, e.g. [::1]:8787, got {short(value)}")
        if not _HOST_RE.fullmatch(host):
            raise ValueError(f"invalid host {short(host)}")
    if not _PORT_RE.fullmatch(port_text) or int(port_text) > 65535:
        raise ValueError(f"port must be a number 0..65535, got {short(port_text)}")
    return host, int(port_text)


_MAX_GID = 2**32 - 2  # (gid_t)-1 means "unchanged" to chown


def resolve_group(value: str) -> int:
    """The gid that ``intake.unix_socket_group`` names: a number as given, else a group name.

    Looking a name up may block (NSS), so call it off the event loop. ValueError says why not.
    """
    text = value.strip()
    if text.isdigit() and text.isascii():
        gid = int(text)
        if gid > _MAX_GID:
            raise ValueError(f"gid {gid} is out of range (0..{_MAX_GID})")
        return gid
    try:
        return grp.getgrnam(text).gr_gid
    except KeyError:
        raise ValueError(f"no such group {short(value)} (give a group name or a gid)") from None


def is_loopback_host(host: str) -> bool:
    """Whether `host` (a name or an address) is loopback: localhost, 127.0.0.0/8, ::1.

    Any other name counts as not loopback: it may resolve anywhere. ``0.0.0.0`` and ``::`` (every
    interface) are not loopback.
    """
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])  # an IPv6 zone is no part of it
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback  # ::ffff:127.0.0.1 from a dual-stack socket
    return address.is_loopback
