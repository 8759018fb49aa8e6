"""Event numbers: reserved in blocks in state.dir, never given out twice (storage/numbering.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from forwarder.storage import numbering
from forwarder.storage.numbering import (
    BLOCK,
    NUMBERS_FILE,
    EventNumbers,
    NumbersError,
    read_ceiling,
)


def test_a_fresh_state_dir_starts_at_one_and_reserves_a_block(tmp_path: Path) -> None:
    numbers = EventNumbers.open(tmp_path)
    assert [numbers.take() for _ in range(3)] == [1, 2, 3]
    assert read_ceiling(tmp_path) == 1 + BLOCK
    assert (tmp_path / NUMBERS_FILE).stat().st_mode & 0o777 == 0o600


def test_a_crash_never_gives_a_number_twice(tmp_path: Path) -> None:
    first = EventNumbers.open(tmp_path)
    taken = [first.take() for _ in range(10)]
    # No stop, no save (kill -9): the next start begins at the reserved ceiling.
    second = EventNumbers.open(tmp_path)
    later = second.take()
    assert later > max(taken)
    assert later == 1 + BLOCK
    assert read_ceiling(tmp_path) == later + BLOCK


def test_the_floor_lifts_the_start(tmp_path: Path) -> None:
    numbers = EventNumbers.open(tmp_path, floor=5000)
    assert numbers.take() == 5000


async def test_the_next_block_is_reserved_in_the_background(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(numbering, "BLOCK", 8)
    numbers = EventNumbers.open(tmp_path)
    assert read_ceiling(tmp_path) == 9
    assert [numbers.take() for _ in range(4)] == [1, 2, 3, 4]
    await numbers.wait()
    assert read_ceiling(tmp_path) == 9  # half a block left: nothing yet
    numbers.take()  # 5: within half a block of the ceiling
    await numbers.wait()
    assert read_ceiling(tmp_path) == numbers.ceiling == 17
    # Past the ceiling before a background write could land: written at once.
    taken = [numbers.take() for _ in range(20)]
    await numbers.wait()
    assert read_ceiling(tmp_path) > max(taken)
    assert EventNumbers.open(tmp_path).take() > max(taken)


async def test_observed_spool_positions_keep_the_ceiling_above_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(numbering, "BLOCK", 1024)
    numbers = EventNumbers.open(tmp_path)
    numbers.observe(4096)  # a durable append's seq, past the ceiling
    await numbers.wait()
    assert read_ceiling(tmp_path) > 4096
    assert EventNumbers.open(tmp_path).take() > 4096


def test_a_symlink_or_garbage_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("7\n")
    os.symlink(target, tmp_path / NUMBERS_FILE)
    with pytest.raises(NumbersError, match="cannot read"):
        EventNumbers.open(tmp_path)
    (tmp_path / NUMBERS_FILE).unlink()
    (tmp_path / NUMBERS_FILE).write_text("twelve\n")
    with pytest.raises(NumbersError, match="does not hold a number"):
        EventNumbers.open(tmp_path)
    (tmp_path / NUMBERS_FILE).write_text(f"{2**53}\n")
    with pytest.raises(NumbersError, match="below 2\\*\\*53"):
        EventNumbers.open(tmp_path)
