"""The shared queue's Redis client, opened from `[fleet]` (until the connection module lands)."""

from __future__ import annotations

from typing import Any

from forwarder.config.schema import Config, ConfigError

INSTALL_HINT = "pip install 'forwarder[fleet]'"


def open_client(config: Config) -> Any:
    """A `redis.asyncio` client for fleet.redis_url (no I/O yet; close it with `aclose`)."""
    try:
        import redis.asyncio as aioredis
    except ImportError:
        raise ConfigError(
            f"fleet.redis_url is set but redis-py is not installed: {INSTALL_HINT}"
        ) from None
    return aioredis.Redis.from_url(
        config.fleet.redis_url, socket_timeout=1.0, socket_connect_timeout=1.0
    )
