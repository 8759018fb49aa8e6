"""forwarder: a local daemon that accepts recipient events from apps and delivers them to the remote API."""

from __future__ import annotations

__version__ = "0.1.0"
