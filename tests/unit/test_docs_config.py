"""The shipped config/forwarder.toml and the configuration reference are generated from the schema.

Every setting is declared once, as a field of forwarder/config/schema.py's section dataclasses
with its `forwarder.config.setting.Setting` metadata; forwarder/config/generate.py writes the TOML
file and the reference page's key table from it. These tests fail when either file differs from
what the generator writes now (run `make settings-docs`), and check that what it writes says what
the code does.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path

import pytest

from forwarder.config import generate as settings_doc
from forwarder.config import schema as cfg
from forwarder.config.schema import RESTART_ONLY, AccountConfig, Config

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "reference" / "configuration.md"
TOML = ROOT / "config" / "forwarder.toml"
# | `section.key` | default | bounds | applied | secret | meaning |
ROW = re.compile(r"^\| `([a-z_]+\.[A-Za-z_.]+)` \|([^|]*)\|([^|]*)\|([^|]*)\|([^|]*)\|")
STALE = f"is stale: run `{settings_doc.REGENERATE}` and commit the result"


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


def page_rows() -> dict[str, tuple[str, str, str]]:
    """The page's Keys table: key -> (default cell, applied cell, secret cell)."""
    rows: dict[str, tuple[str, str, str]] = {}
    for line in PAGE.read_text().splitlines():
        match = ROW.match(line)
        if match:
            key, default, _bounds, applied, secret = (part.strip() for part in match.groups())
            assert key not in rows, f"{key} is listed twice on {PAGE.name}"
            rows[key] = (default, applied, secret)
    assert len(rows) > 40, f"the Keys table of {PAGE} was not found"
    return rows


def test_the_shipped_toml_is_what_the_schema_generates() -> None:
    assert TOML.read_text() == settings_doc.render_toml(), f"{TOML} {STALE}"


def test_the_reference_table_is_what_the_schema_generates() -> None:
    page = PAGE.read_text()
    wanted = settings_doc.splice_table(page, settings_doc.render_table())
    assert page == wanted, f"{PAGE} {STALE}"


def test_every_setting_is_declared_with_its_metadata() -> None:
    # A field without `setting(...)` would be neither checked, documented nor loadable.
    declared = set(cfg.SETTINGS) | {f"accounts.NAME.{key}" for key in cfg.ACCOUNT_SETTINGS}
    assert declared == set(section_keys()) | account_keys()
    # The first key of each section has its own comment (later ones may share the one before).
    for name, cls in cfg.SECTIONS.items():
        first = next(iter(cfg.SETTINGS[f"{name}.{f.name}"] for f in dataclasses.fields(cls)))
        assert first.doc, f"the first key of [{name}] has no doc"


def test_the_page_lists_every_setting_and_nothing_else() -> None:
    documented = set(page_rows())
    expected = set(section_keys()) | account_keys()
    assert sorted(expected - documented) == [], f"settings missing from {PAGE.name}"
    assert sorted(documented - expected) == [], f"{PAGE.name} lists settings that do not exist"


def test_the_page_says_what_a_reload_applies_and_what_is_secret() -> None:
    rows = page_rows()
    for key in section_keys():
        _, applied, secret = rows[key]
        assert applied.startswith("restart" if key in RESTART_ONLY else "reload"), (key, applied)
        assert (secret != "") == cfg.is_secret_key(key), (key, secret)


def test_restart_only_is_what_the_schema_declares() -> None:
    assert set(RESTART_ONLY) == {k for k, meta in cfg.SETTINGS.items() if not meta.reload}
    assert {"queue.mode", "queue.max_disk_bytes", "state.dir", "log.format"} <= set(RESTART_ONLY)


def test_the_shipped_toml_sets_every_key_to_its_default() -> None:
    text = TOML.read_text()
    document = tomllib.loads(text)
    for key, default in section_keys().items():
        section, name = key.split(".")
        assert name in document.get(section, {}), f"{TOML.name} does not mention {key}"
        if key != "state.dir":  # the file names the fallback; systemd's $STATE_DIRECTORY wins
            assert document[section][name] == default, (key, document[section][name], default)
            assert type(document[section][name]) is type(default), key
    # The account keys are shown in a commented-out [accounts.NAME] example.
    example = text.split("# [accounts.", 1)[1]
    for key in account_keys():
        name = key.rsplit(".", 1)[1]
        assert re.search(rf"^# {name} = ", example, re.M), f"{TOML.name} does not mention {key}"
    # ...which loads as a valid account table once uncommented.
    table = "[accounts.us]\n" + "".join(
        line[2:] + "\n" for line in example.splitlines() if re.match(r"# [a-z_]+ = ", line)
    )
    assert set(tomllib.loads(table)["accounts"]["us"]) == {
        k.rsplit(".", 1)[1] for k in account_keys()
    }


def test_check_names_the_stale_file_and_the_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "config").mkdir()
    (tmp_path / "docs" / "reference").mkdir(parents=True)
    (tmp_path / settings_doc.TOML_PATH).write_text(TOML.read_text() + "# a hand edit\n")
    (tmp_path / settings_doc.PAGE_PATH).write_text(PAGE.read_text())
    monkeypatch.chdir(tmp_path)  # the paths are relative: `make` runs in the repository
    assert settings_doc.main(["--check"]) == 1
    assert "config/forwarder.toml is out of date: run `make settings-docs`" in (
        capsys.readouterr().err
    )
    assert settings_doc.main(["--write"]) == 0
    assert settings_doc.main(["--check"]) == 0
    assert (tmp_path / settings_doc.TOML_PATH).read_text() == TOML.read_text()
