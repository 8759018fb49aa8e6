"""The configuration reference and the shipped config/forwarder.toml name every setting there is.

The settings are the fields of forwarder/config/schema.py's dataclasses, one section each, plus the
keys of an ``[accounts.NAME]`` table. docs/reference/configuration.md must list each exactly once in
its table, and nothing else; its defaults and its reload-or-restart column must agree with the code.
config/forwarder.toml must set each section key to its default, and show each account key in its
commented example.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path

from forwarder.config.schema import AccountConfig, Config
from forwarder.daemon.lifecycle import RESTART_ONLY

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "reference" / "configuration.md"
TOML = ROOT / "config" / "forwarder.toml"
# | `section.key` | default | bounds | applied | secret | meaning |
ROW = re.compile(r"^\| `([a-z_]+\.[A-Za-z_.]+)` \|([^|]*)\|([^|]*)\|([^|]*)\|")


def section_keys() -> dict[str, object]:
    """`section.key` -> built-in default, from the dataclasses of `Config`."""
    defaults = Config()
    keys: dict[str, object] = {}
    for section in dataclasses.fields(Config):
        if section.name == "accounts":
            continue
        value = getattr(defaults, section.name)
        for item in dataclasses.fields(value):
            keys[f"{section.name}.{item.name}"] = getattr(value, item.name)
    return keys


def account_keys() -> set[str]:
    """`accounts.NAME.key` for each key of an [accounts.NAME] table (`name` is the table's)."""
    return {
        f"accounts.NAME.{f.name}" for f in dataclasses.fields(AccountConfig) if f.name != "name"
    }


def page_rows() -> dict[str, tuple[str, str]]:
    """The page's Keys table: key -> (default cell, applied cell)."""
    rows: dict[str, tuple[str, str]] = {}
    for line in PAGE.read_text().splitlines():
        match = ROW.match(line)
        if match:
            key, default, _bounds, applied = (part.strip() for part in match.groups())
            assert key not in rows, f"{key} is listed twice on {PAGE.name}"
            rows[key] = (default, applied)
    assert len(rows) > 40, f"the Keys table of {PAGE} was not found"
    return rows


def rendered(value: object) -> str:
    """A default as the page writes it (TOML, as `forwarder check-config` prints it)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


def test_the_page_lists_every_setting_and_nothing_else() -> None:
    documented = set(page_rows())
    expected = set(section_keys()) | account_keys()
    assert sorted(expected - documented) == [], f"settings missing from {PAGE.name}"
    assert sorted(documented - expected) == [], f"{PAGE.name} lists settings that do not exist"


def test_the_page_gives_each_default_and_whether_a_reload_applies_it() -> None:
    rows = page_rows()
    for key, default in section_keys().items():
        cell, applied = rows[key]
        shown = "0o660" if key == "intake.unix_socket_mode" else rendered(default)
        if key == "state.dir":  # $STATE_DIRECTORY first, then the fallback
            assert shown in cell, (key, cell)
        else:
            assert cell.startswith(f"`{shown}`"), (key, cell, shown)
        assert applied.startswith(("reload", "restart")), (key, applied)
        if key in RESTART_ONLY:
            assert applied.startswith("restart"), f"{key} needs a restart (daemon.RESTART_ONLY)"


def test_the_shipped_toml_sets_every_key_to_its_default() -> None:
    text = TOML.read_text()
    document = tomllib.loads(text)
    for key, default in section_keys().items():
        section, name = key.split(".")
        assert name in document.get(section, {}), f"{TOML.name} does not mention {key}"
        if key != "state.dir":  # the file names the fallback; systemd's $STATE_DIRECTORY wins
            assert document[section][name] == default, (key, document[section][name], default)
    # The account keys are shown in a commented-out [accounts.NAME] example.
    example = text.split("# [accounts.", 1)[1]
    for key in account_keys():
        name = key.rsplit(".", 1)[1]
        assert re.search(rf"^# {name} = ", example, re.M), f"{TOML.name} does not mention {key}"
