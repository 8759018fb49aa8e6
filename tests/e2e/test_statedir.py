"""The state directory: links are never followed, an unsafe dir is refused, one daemon per dir."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import pytest
import structlog

from forwarder.config.schema import Config, IntakeConfig, RemoteConfig, StateConfig
from forwarder.daemon.lifecycle import Daemon
from forwarder.events import Event
from forwarder.ops.statedir import (
    LOCK_FILE,
    StateDirError,
    StateDirLocked,
    StateLock,
    lock_holder,
    open_state_file,
    prepare_state_dir,
    replace_state_file,
)
from forwarder.storage.sqlite.file import SPOOL_FILE, SpoolError
from forwarder.storage.sqlite.spool import Spool
from forwarder.storage.sqlite.upgrade import PENDING_FILE, REJECTED_FILE, load_pending, save_pending
from tests.conftest import (
    START_TIMEOUT_S,
    DaemonProc,
    MockProc,
    spawn,
    spooled,
    write_config,
)
from tests.integration.test_daemon import KEY

StartMock = Callable[..., Awaitable[MockProc]]
StartDaemon = Callable[..., Awaitable[DaemonProc]]
KEPT = b"precious: not forwarder's\n"


def _config(state: Path) -> Config:
    return Config(
        intake=IntakeConfig(http_listen="127.0.0.1:0"),
        remote=RemoteConfig(base_url="http://127.0.0.1:9/v1"),  # nothing is sent in these tests
        state=StateConfig(dir=str(state)),
    )


async def _start_and_stop(state: Path) -> tuple[int, list[MutableMapping[str, Any]]]:
    """Run the daemon in-process until it is ready (or fails), stop it; (exit code, logs)."""
    daemon = Daemon(_config(state), KEY)
    with structlog.testing.capture_logs() as logs:
        task = asyncio.create_task(daemon.run())
        ready = asyncio.create_task(daemon.ready.wait())
        await asyncio.wait({task, ready}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        daemon.request_stop()
        code = await asyncio.wait_for(task, 10)
    return code, logs


def _targets(short_tmp: Path, *names: str) -> dict[str, Path]:
    """For each name, a file outside the state dir holding KEPT."""
    made = {}
    for name in names:
        target = short_tmp / f"target{name}"
        target.write_bytes(KEPT)
        made[name] = target
    return made


async def test_links_at_the_write_test_and_pid_names_leave_their_targets_untouched(
    short_tmp: Path,
) -> None:
    state = short_tmp / "s"
    state.mkdir(mode=0o700)
    targets = _targets(short_tmp, ".write-test", "forwarder.tmp", "forwarder.pid")
    for name, target in targets.items():
        (state / name).symlink_to(target)
    code, logs = await _start_and_stop(state)
    assert code == 0, logs
    for name, target in targets.items():
        assert target.read_bytes() == KEPT, name
    # The PID file was written as a file of its own (replacing the link), then removed.
    assert not (state / "forwarder.pid").exists()


@pytest.mark.parametrize("name", [PENDING_FILE, REJECTED_FILE, LOCK_FILE])
async def test_a_link_at_a_state_file_name_is_refused_not_followed(
    short_tmp: Path, name: str
) -> None:
    state = short_tmp / "s"
    state.mkdir(mode=0o700)
    target = short_tmp / "elsewhere.jsonl"
    # A valid pending line: followed, it would be imported as an event.
    line = json.dumps(Event(event_id="planted-0001", recipient_id="1", name="X").to_dict())
    target.write_text(line + "\n")
    if name == REJECTED_FILE:
        (state / PENDING_FILE).write_text("not json\n")  # a damaged line goes to the rejected file
    (state / name).symlink_to(target)
    code, logs = await _start_and_stop(state)
    assert code == 1
    (failed,) = [line for line in logs if line["event"] == "startup_failed"]
    assert "is a symbolic link" in str(failed["error"]), failed
    assert str(state / name) in str(failed["error"])
    assert target.read_text() == line + "\n"
    assert all(e["event_id"] != "planted-0001" for e in spooled(state))


async def test_the_pending_file_helpers_never_follow_links(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_bytes(KEPT)
    (tmp_path / PENDING_FILE).symlink_to(target)
    with pytest.raises(StateDirError, match="symbolic link"):
        save_pending(tmp_path, [Event(event_id="e-000000001", recipient_id="1", name="X")])
    with pytest.raises(StateDirError, match="symbolic link"):
        load_pending(tmp_path)
    assert target.read_bytes() == KEPT


@pytest.mark.parametrize("suffix", ["", "-wal", "-shm"])
async def test_a_link_at_a_spool_file_name_is_refused(tmp_path: Path, suffix: str) -> None:
    state = tmp_path / "s"
    state.mkdir()
    spool = await Spool.open(state)
    await spool.close()
    target = tmp_path / "target"
    target.write_bytes(KEPT * 2000)  # big enough to pass for a -shm SQLite would map and clear
    link = state / (SPOOL_FILE + suffix)
    link.unlink(missing_ok=True)
    link.symlink_to(target)
    with pytest.raises(SpoolError, match="symbolic link"):
        await Spool.open(state)
    assert target.read_bytes() == KEPT * 2000
    assert link.is_symlink()


def test_replace_state_file_replaces_a_link_not_its_target(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_bytes(KEPT)
    (tmp_path / "f").symlink_to(target)
    replace_state_file(tmp_path / "f", b"mine\n")
    assert target.read_bytes() == KEPT
    assert not (tmp_path / "f").is_symlink()
    assert (tmp_path / "f").read_bytes() == b"mine\n"
    assert (tmp_path / "f").stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f", "target"]  # no temp file left
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(StateDirError, match="symbolic link"):
        open_state_file(tmp_path / "link", os.O_RDONLY)


@pytest.mark.parametrize(("mode", "who"), [(0o777, "group and others"), (0o720, "group")])
async def test_a_state_dir_others_can_write_to_is_refused(
    short_tmp: Path, mode: int, who: str
) -> None:
    state = short_tmp / "s"
    state.mkdir()
    state.chmod(mode)
    code, logs = await _start_and_stop(state)
    assert code == 1
    (failed,) = [line for line in logs if line["event"] == "startup_failed"]
    assert f"state.dir {state} is writable by {who}" in str(failed["error"])
    assert "chmod go-w" in str(failed["error"])
    assert not (state / SPOOL_FILE).exists()  # refused before anything was made in it


def test_a_state_dir_of_another_user_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uid = os.geteuid()
    monkeypatch.setattr(os, "geteuid", lambda: uid + 1)
    with pytest.raises(StateDirError, match=f"belongs to uid {uid}, not to this process's user"):
        prepare_state_dir(tmp_path)


def test_prepare_creates_a_private_dir_and_leaves_nothing_behind(tmp_path: Path) -> None:
    state = tmp_path / "new" / "state"
    prepare_state_dir(state)
    assert state.stat().st_mode & 0o777 == 0o700
    assert list(state.iterdir()) == []
    state.chmod(0o755)  # readable by others is fine (the unit's default StateDirectoryMode)
    prepare_state_dir(state)


def test_the_lock_is_exclusive_and_names_its_holder(tmp_path: Path) -> None:
    first = StateLock.acquire(tmp_path, "forwarder run")
    try:
        assert lock_holder(tmp_path) == os.getpid()
        # flock locks belong to the open file: a second open conflicts even in this process.
        with pytest.raises(StateDirLocked) as refused:
            StateLock.acquire(tmp_path, "forwarder spool recover")
        assert refused.value.pid == os.getpid()
        assert f"PID {os.getpid()} (forwarder run) holds the lock" in str(refused.value)
    finally:
        first.release()
    first.release()  # twice is harmless
    again = StateLock.acquire(tmp_path, "forwarder spool recover")
    again.release()
    assert (tmp_path / LOCK_FILE).stat().st_mode & 0o777 == 0o600


async def test_a_second_daemon_on_the_same_state_dir_exits_naming_the_first(
    mock_remote: StartMock, daemon: StartDaemon, short_tmp: Path
) -> None:
    remote = await mock_remote()
    first = await daemon(remote.base_url, queue={"mode": "durable"})
    config = short_tmp / "second.toml"
    write_config(
        config,
        {
            "intake": {"http_listen": "127.0.0.1:0", "unix_socket": str(short_tmp / "2nd.sock")},
            "remote": {"base_url": remote.base_url},
            "state": {"dir": str(first.state_dir)},
            "queue": {"mode": "durable"},
            "log": {"format": "json"},
        },
    )
    second = await spawn(
        "run", "--config", str(config), env={"FORWARDER_API_KEY": "sk-x-0123456789abcdef"}
    )
    try:
        line = await second.wait_for_line(
            lambda s: '"startup_failed"' in s or '"started"' in s, START_TIMEOUT_S
        )
        assert await second.wait() == 1
    finally:
        await second.stop()
    record = json.loads(line)
    assert record["event"] == "startup_failed"
    assert f"PID {first.proc.process.pid} (forwarder run) holds the lock" in record["error"]
    assert str(first.state_dir) in record["error"]
    assert not second.events("spool_replay")  # it never opened the spool
    assert first.proc.process.returncode is None  # the first runs on, undisturbed
