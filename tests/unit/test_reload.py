"""A reload applies every reloadable setting, and only those: the table agrees with the schema."""

from __future__ import annotations

from forwarder.config.schema import RESTART_ONLY, SETTINGS
from forwarder.daemon.reload import APPLIED_ELSEWHERE, APPLY


def test_every_reloadable_setting_is_applied_somewhere() -> None:
    reloadable = {key for key in SETTINGS if key not in RESTART_ONLY}
    # A new reloadable setting must say how a reload applies it (or be declared reload=False).
    assert reloadable == set(APPLY) | APPLIED_ELSEWHERE


def test_no_setting_is_applied_twice_or_needs_a_restart() -> None:
    assert not set(APPLY) & APPLIED_ELSEWHERE
    assert not (set(APPLY) | APPLIED_ELSEWHERE) & set(RESTART_ONLY)
