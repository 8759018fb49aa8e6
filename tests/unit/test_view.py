"""The status view: the queue's oldest stamp is walked for at most once a second."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any, cast

from forwarder.daemon.view import OLDEST_WALK_S, StatusView


class CountingQueue:
    """A queue whose oldest-stamp walk is counted."""

    def __init__(self, oldest: float | None) -> None:
        self.oldest = oldest
        self.walks = 0

    def oldest_accepted_at(self) -> float | None:
        self.walks += 1
        return self.oldest


def test_polls_within_a_second_walk_the_queue_once_and_the_age_still_moves() -> None:
    now = [100.0]
    queue = CountingQueue(time.time() - 30.0)
    daemon = cast(Any, SimpleNamespace(queue=queue, log=None))
    view = StatusView(daemon, clock=lambda: now[0])
    first = view.oldest_age_s()
    assert 29.0 < first < 40.0
    for _ in range(50):  # monitoring polling 50 times within the second
        now[0] += OLDEST_WALK_S / 100
        assert view.oldest_age_s() >= first  # worked out from the kept stamp
    assert queue.walks == 1
    now[0] += OLDEST_WALK_S
    queue.oldest = None  # settled meanwhile: the next walk says so
    assert view.oldest_age_s() == 0.0
    assert queue.walks == 2
