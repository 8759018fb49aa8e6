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


def test_the_fleet_timings_reload_and_its_identity_and_secrets_need_a_restart() -> None:
    fleet = {key for key in SETTINGS if key.startswith("fleet.")}
    # The lease timings reach the running leases; the rest names the fleet, its layout or a
    # secret read when the client is made (see the declarations in config/schema.py).
    assert fleet - set(RESTART_ONLY) == {"fleet.lease_s", "fleet.claim_idle_s"}
    assert {"fleet.lease_s", "fleet.claim_idle_s"} <= set(APPLY)
    assert {
        "fleet.redis_url",
        "fleet.redis_password_file",
        "fleet.sentinel_password_file",
        "fleet.member",
        "fleet.partitions",
        "fleet.key_prefix",
        "queue.mode",
    } <= set(RESTART_ONLY)
