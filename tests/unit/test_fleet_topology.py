"""`fleet.redis_url` forms: what a Sentinel URL parses into."""

from __future__ import annotations

import pytest

from forwarder.fleet.topology import (
    BadRedisUrl,
    SentinelTarget,
    is_sentinel_url,
    parse_sentinel_url,
)


def test_a_sentinel_url_names_every_sentinel_the_master_and_the_database() -> None:
    target = parse_sentinel_url("redis+sentinel://10.0.0.1:26380,s2.internal,[::1]:26381/fwd/3")
    assert target == SentinelTarget(
        sentinels=(("10.0.0.1", 26380), ("s2.internal", 26379), ("::1", 26381)),
        service="fwd",
        db=3,
        tls=False,
    )


def test_an_acl_user_before_the_sentinels_is_the_data_nodes_user() -> None:
    target = parse_sentinel_url("redis+sentinel://forwarder@s1:26379,s2:26379/fwd")
    assert target.username == "forwarder"
    assert target.sentinels == (("s1", 26379), ("s2", 26379))
    assert parse_sentinel_url("redis+sentinel://s1/fwd").username is None


def test_rediss_sentinel_is_tls_and_the_database_defaults_to_0() -> None:
    target = parse_sentinel_url("REDISS+SENTINEL://s1:26379/mymaster")
    assert (target.tls, target.db, target.service) == (True, 0, "mymaster")


@pytest.mark.parametrize(
    ("url", "sentinel"),
    [
        ("redis+sentinel://s1/m", True),
        ("rediss+sentinel://s1/m", True),
        ("redis://s1:6379/0", False),
        ("redis+cluster://s1:7000", False),
        ("unix:///run/redis.sock", False),
    ],
)
def test_which_urls_go_through_sentinel(url: str, sentinel: bool) -> None:
    assert is_sentinel_url(url) is sentinel


def test_errors_never_repeat_the_value() -> None:
    secret = "pw-SECRET-123"
    for url in (
        f"redis+sentinel://u:{secret}@s1/m",
        f"redis+sentinel://{secret}:x/m",
        f"redis+sentinel://s1/{secret}/x",
        f"redis+sentinel://s1/m?{secret}",
    ):
        with pytest.raises(BadRedisUrl) as caught:
            parse_sentinel_url(url)
        assert secret not in str(caught.value)
