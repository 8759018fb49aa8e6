"""Logging pipeline: JSON, stdlib records, redaction, batched writes, timestamps."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
import structlog

from forwarder.ops.logs import configure_logging, flush_logs

KEY = "sk-telemetry-0123456789"


@pytest.fixture
def reset_logging() -> Iterator[None]:
    yield
    structlog.reset_defaults()
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(logging.WARNING)


@pytest.mark.usefixtures("reset_logging")
def test_json_lines_with_redaction_for_ours_and_stdlib() -> None:
    out = io.StringIO()
    configure_logging("info", "auto", secrets=[KEY], stream=out)  # not a TTY: JSON
    log = structlog.get_logger("t")
    log.info("delivered", event_id="e1", error=f"remote said {KEY}", nested={"k": [KEY]})
    log.debug("hidden")
    logging.getLogger("aiohttp.server").error("handler failed for %s", KEY)
    try:
        raise ValueError(f"boom {KEY}")
    except ValueError:
        log.exception("internal_error")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["event"] for line in lines] == [
        "delivered",
        "handler failed for [redacted]",
        "internal_error",
    ]
    assert lines[0]["level"] == "info"
    assert lines[0]["event_id"] == "e1"
    assert "timestamp" in lines[0]
    assert lines[1]["logger"] == "aiohttp.server"
    assert "ValueError" in lines[2]["exception"]
    assert KEY not in out.getvalue()


@pytest.mark.usefixtures("reset_logging")
def test_console_format_is_redacted_too() -> None:
    out = io.StringIO()
    configure_logging("debug", "console", secrets=[KEY], stream=out)
    structlog.get_logger("t").debug("retrying", error=KEY)
    text = out.getvalue()
    assert "retrying" in text
    assert KEY not in text


@pytest.mark.usefixtures("reset_logging")
def test_basic_token_of_a_key_is_redacted_too() -> None:
    out = io.StringIO()
    configure_logging("info", "json", secrets=[KEY], stream=out)
    token = base64.b64encode(f"{KEY}:".encode()).decode()
    structlog.get_logger("t").error("delivery_paused", error=f"you sent Basic {token}")
    structlog.get_logger("t").error("x", error=f"unpadded {token.rstrip('=')}")
    text = out.getvalue()
    assert token.rstrip("=") not in text
    assert text.count("[redacted]") == 2


class CountingStream(io.StringIO):
    """A StringIO that counts the writes it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


@pytest.mark.usefixtures("reset_logging")
async def test_lines_of_one_loop_turn_go_out_in_one_write() -> None:
    out = CountingStream()
    configure_logging("info", "json", stream=out)
    log = structlog.get_logger("t")
    for n in range(50):
        log.info("delivered", n=n)
    logging.getLogger("aiohttp.server").warning("stdlib line")
    assert out.getvalue() == ""  # gathered, not written yet
    await asyncio.sleep(0)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line.get("n") for line in lines] == [*range(50), None]
    assert lines[-1]["event"] == "stdlib line"
    assert out.writes == 1


@pytest.mark.usefixtures("reset_logging")
def test_without_a_running_loop_lines_go_out_at_once() -> None:
    out = CountingStream()
    configure_logging("info", "json", stream=out)
    structlog.get_logger("t").info("one")
    assert json.loads(out.getvalue())["event"] == "one"


@pytest.mark.usefixtures("reset_logging")
async def test_flush_logs_writes_what_a_turn_gathered() -> None:
    out = CountingStream()
    configure_logging("info", "json", stream=out)
    structlog.get_logger("t").info("last words")
    flush_logs()  # as the daemon does after its summary line
    assert json.loads(out.getvalue())["event"] == "last words"


@pytest.mark.usefixtures("reset_logging")
def test_timestamps_are_iso_utc_with_microseconds() -> None:
    out = io.StringIO()
    configure_logging("info", "json", stream=out)
    before = datetime.now(UTC)
    for n in range(3):
        structlog.get_logger("t").info("tick", n=n)
    after = datetime.now(UTC)
    stamps = [json.loads(line)["timestamp"] for line in out.getvalue().splitlines()]
    for stamp in stamps:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", stamp)
        moment = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
        assert before - timedelta(seconds=1) <= moment <= after + timedelta(seconds=1)
    assert stamps == sorted(stamps)
