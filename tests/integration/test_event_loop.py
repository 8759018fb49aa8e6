"""Which event loop `forwarder run` and `forwarder mock-remote` pick: uvloop when importable."""

from __future__ import annotations

import asyncio
import gc
import os
import subprocess
import sys
import types

import pytest

from forwarder.cli.main import (
    GC_THRESHOLDS,
    EventLoopChoice,
    _event_loop_runner,
    choose_event_loop,
    tune_gc,
)

START_TIMEOUT_S = 20.0


def _fake_uvloop(monkeypatch: pytest.MonkeyPatch) -> list[asyncio.AbstractEventLoop]:
    """Install a stand-in `uvloop` module whose factory records the loops it made."""
    made: list[asyncio.AbstractEventLoop] = []

    def new_event_loop() -> asyncio.AbstractEventLoop:
        loop = asyncio.new_event_loop()
        made.append(loop)
        return loop

    fake = types.ModuleType("uvloop")
    fake.__dict__.update(__version__="0.0-test", new_event_loop=new_event_loop)
    monkeypatch.setitem(sys.modules, "uvloop", fake)
    return made


async def _running_loop() -> asyncio.AbstractEventLoop:
    return asyncio.get_running_loop()


def _run_on(choice: EventLoopChoice) -> asyncio.AbstractEventLoop:
    with _event_loop_runner(choice) as runner:
        return runner.run(_running_loop())


def test_uvloop_is_used_when_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    made = _fake_uvloop(monkeypatch)
    choice = choose_event_loop({})
    assert (choice.name, choice.version, choice.reason) == ("uvloop", "0.0-test", "installed")
    assert _run_on(choice) is made[0]
    # "0" means "not disabled".
    assert choose_event_loop({"FORWARDER_NO_UVLOOP": "0"}).name == "uvloop"


def test_the_environment_variable_keeps_asyncio(monkeypatch: pytest.MonkeyPatch) -> None:
    made = _fake_uvloop(monkeypatch)
    choice = choose_event_loop({"FORWARDER_NO_UVLOOP": "1"})
    assert choice.name == "asyncio"
    assert choice.factory is None
    assert "FORWARDER_NO_UVLOOP" in choice.reason
    loop = _run_on(choice)
    assert not made
    assert type(loop).__module__.startswith("asyncio")


def test_asyncio_when_uvloop_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # makes `import uvloop` raise ImportError
    choice = choose_event_loop({})
    assert choice.name == "asyncio"
    assert "not installed" in choice.reason
    assert "forwarder[speed]" in choice.reason
    assert type(_run_on(choice)).__module__.startswith("asyncio")
    assert choice.log_fields() == {
        "loop": "asyncio",
        "version": sys.version.split()[0],
        "reason": choice.reason,
    }


def test_the_real_uvloop_runs_the_coroutine() -> None:
    uvloop = pytest.importorskip("uvloop")
    loop = _run_on(choose_event_loop({}))
    assert isinstance(loop, uvloop.Loop)


@pytest.mark.parametrize("disabled", [False, True])
def test_mock_remote_says_which_loop_runs(disabled: bool) -> None:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        expected = "asyncio"
    else:
        expected = "asyncio" if disabled else "uvloop"
    env = {k: v for k, v in os.environ.items() if k != "FORWARDER_NO_UVLOOP"}
    if disabled:
        env["FORWARDER_NO_UVLOOP"] = "1"
    with subprocess.Popen(
        [sys.executable, "-m", "forwarder", "mock-remote", "--port", "0"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    ) as proc:
        try:
            assert proc.stdout is not None
            first = proc.stdout.readline()
            second = proc.stdout.readline()
        finally:
            proc.terminate()
            proc.wait(START_TIMEOUT_S)
    assert first.startswith("mock-remote listening on http://127.0.0.1:")
    assert second.startswith(f"mock-remote event loop: {expected} ")


def test_run_collects_less_often_and_freezes_start_up() -> None:
    before = gc.get_threshold()
    try:
        tune_gc()
        assert gc.get_threshold() == GC_THRESHOLDS
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
