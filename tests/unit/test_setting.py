"""A setting's declaration (forwarder/config/setting.py) checks it: bounds, choices, secrecy."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest

from forwarder.config.setting import Setting, bounds_error, setting, settings_of


@dataclass(frozen=True, slots=True)
class Example:
    """A section as forwarder/config/schema.py declares one: adding a key is one `setting(...)`."""

    name: str
    count: int = setting(5, doc="How many.", lo=1, hi=10)
    floor: int = setting(1024, doc="At least this.", lo=1024)
    wait_s: float = setting(2.0, doc="Seconds.", unit="seconds", reload=False)
    window_ms: float = setting(8.0, doc="", lo=0, hi=100.0, unit="milliseconds")
    mode: int = setting(0o600, doc="A file mode.", lo=0, hi=0o777, octal=True)
    colour: str = setting("red", doc="A colour.", choices=("red", "blue"), fold_case=True)
    token: str = setting("", doc="A secret.", secret="holds")


def meta(name: str) -> Setting:
    return dict((f.name, m) for f, m in settings_of(Example))[name]


def test_only_declared_fields_are_settings_in_declaration_order() -> None:
    names = [f.name for f, _ in settings_of(Example)]
    assert names == ["count", "floor", "wait_s", "window_ms", "mode", "colour", "token"]
    assert Example("x").count == 5  # the declared default is the field's default
    assert [m.reload for _, m in settings_of(Example)].count(False) == 1


@pytest.mark.parametrize(
    ("name", "value", "error"),
    [
        ("count", 5, None),
        ("count", 0, "must be within 1..10, got 0"),
        ("count", 11, "must be within 1..10, got 11"),
        ("floor", 1023, "must be at least 1024, got 1023"),
        ("floor", 10**9, None),
        ("wait_s", 0.5, None),
        ("wait_s", 0.0, "must be a positive number of seconds, got 0.0"),
        ("wait_s", float("nan"), "must be a positive number of seconds, got nan"),
        ("wait_s", float("inf"), "must be a positive number of seconds, got inf"),
        ("window_ms", 0.0, None),
        ("window_ms", 100.5, "must be within 0..100 milliseconds, got 100.5"),
        ("window_ms", float("nan"), "must be within 0..100 milliseconds, got nan"),
        ("mode", 0o1777, "must be within 0o000..0o777, got 0o1777"),
        ("colour", "blue", None),
        ("colour", "green", "must be one of red, blue; got 'green'"),
    ],
)
def test_bounds_come_from_the_declaration(name: str, value: object, error: str | None) -> None:
    assert bounds_error(meta(name), value) == error


def test_a_secret_setting_stays_out_of_the_repr() -> None:
    shown = repr(dataclasses.replace(Example("x"), token="s3cret-value"))
    assert "s3cret-value" not in shown
    assert "count=5" in shown
