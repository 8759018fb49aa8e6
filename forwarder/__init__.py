"""forwarder: a local daemon that takes recipient events from apps and delivers them to the API."""

from __future__ import annotations

__version__ = "0.1.0"
