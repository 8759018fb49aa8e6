"""The rate window learner of `forwarder/delivery/flow/ratewindow.py`: its per-answer fast path.

Every delivered event's answer goes through `WindowLearner.observe`. An answer that agrees with
a group already counted changes nothing the length depends on, and is not followed by a
recomputation; the property test holds the learner to a plain reading of the module's rules
(every answer recomputes) over arbitrary answers, window ends and reloads.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from forwarder.delivery.flow import ratewindow
from forwarder.delivery.flow.ratewindow import (
    AGREE_S,
    DEFAULT_WINDOW_S,
    KEEP,
    MAX_GROUPS,
    MAX_WINDOW_S,
    MIN_WINDOW_S,
    WindowLearner,
)


@dataclass
class _RefGroup:
    first_end: float
    last_end: float
    reset_s: float
    answers: int = 1


class Reference:
    """The module docstring's rules, read plainly: each answer recomputes the length."""

    def __init__(self) -> None:
        self.peaks: deque[float] = deque(maxlen=KEEP)
        self.groups: list[_RefGroup] = []
        self.window_s = DEFAULT_WINDOW_S

    def observe(self, reset_s: float, now: float) -> None:
        reset = min(max(reset_s, MIN_WINDOW_S), MAX_WINDOW_S)
        end = now + reset_s
        for group in self.groups:
            if max(group.last_end, end) - min(group.first_end, end) <= AGREE_S:
                group.first_end = min(group.first_end, end)
                group.last_end = max(group.last_end, end)
                group.reset_s = max(group.reset_s, reset)
                group.answers += 1
                break
        else:
            if len(self.groups) >= MAX_GROUPS:
                self.groups.remove(min(self.groups, key=lambda g: g.answers))
            self.groups.append(_RefGroup(end, end, reset))
        self.update()

    def next_window(self) -> None:
        evidence = self.evidence()
        if evidence:
            self.peaks.append(evidence)
        self.groups.clear()
        self.update()

    def forget(self) -> None:
        self.peaks.clear()
        self.window_s = DEFAULT_WINDOW_S
        self.update()

    def evidence(self) -> float:
        agreed = [g for g in self.groups if g.answers >= 2]
        return min(agreed, key=lambda g: g.first_end).reset_s if agreed else 0.0

    def update(self) -> None:
        evidence = max(max(self.peaks, default=0.0), self.evidence())
        if evidence:
            self.window_s = evidence
        elif self.groups:
            self.window_s = min(
                min(self.groups, key=lambda g: g.first_end).reset_s, DEFAULT_WINDOW_S
            )


def test_an_answer_that_changes_nothing_is_not_recomputed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    learner = WindowLearner()
    calls: list[None] = []
    real = ratewindow.WindowLearner._update

    def counting(self: WindowLearner) -> None:
        calls.append(None)
        real(self)

    monkeypatch.setattr(ratewindow.WindowLearner, "_update", counting)
    learner.observe(10.0, 100.0)  # a new group
    learner.observe(9.0, 101.0)  # agrees: the group now counts (two answers)
    assert len(calls) == 2
    assert learner.window_s == 10.0
    for second in range(2, 9):  # the same window's end, later answers: nothing new
        learner.observe(10.0 - second, 100.0 + second)
    assert len(calls) == 2
    assert learner.window_s == 10.0
    learner.observe(9.0, 100.5)  # an earlier end: the group's first end moves
    assert len(calls) == 3
    assert learner.window_s == 10.0
    learner.observe(12.0, 99.0)  # a longer reset that still agrees
    assert len(calls) == 4
    assert learner.window_s == 12.0


answers = st.lists(
    st.one_of(
        st.tuples(
            st.just("answer"),
            st.floats(min_value=0.0, max_value=3600.0, allow_nan=False),
            st.floats(min_value=0.0, max_value=5.0, allow_nan=False),
        ),
        st.tuples(st.sampled_from(["next_window", "forget"]), st.just(0.0), st.just(0.0)),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(steps=answers, resets=st.lists(st.integers(0, 70), min_size=1, max_size=8))
def test_the_learner_follows_the_plain_rules(
    steps: list[tuple[str, float, float]], resets: list[int]
) -> None:
    learner, reference = WindowLearner(), Reference()
    now = 1000.0
    for index, (kind, value, gap) in enumerate(steps):
        if kind == "answer":
            now += gap
            # Mostly the whole seconds a remote sends (agreeing answers), at times anything.
            reset = float(resets[index % len(resets)]) if index % 3 else value
            learner.observe(reset, now)
            reference.observe(reset, now)
        elif kind == "next_window":
            learner.next_window()
            reference.next_window()
        else:
            learner.forget()
            reference.forget()
        assert learner.window_s == reference.window_s
