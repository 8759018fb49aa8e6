"""The shipped config/forwarder.toml and the reference page's key table, written from the schema.

Every setting's default, bounds, reload behaviour, secrecy and text are declared once, on its
dataclass field in forwarder/config/schema.py (see forwarder/config/setting.py). This module
renders them:

- :func:`render_toml`: the whole config/forwarder.toml (the header and the accounts note below are
  the only prose kept here: they are about the file, not about one setting);
- :func:`render_table`: the Keys table of docs/reference/configuration.md, which sits between
  :data:`BEGIN` and :data:`END` markers; the prose around it stays hand-written.

``make settings-docs`` (``python -m forwarder.config.generate --write``) rewrites both;
``--check`` says whether they are up to date (tests/unit/test_docs_config.py fails when not).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from forwarder.config import schema as cfg
from forwarder.config.render import toml_string, toml_value
from forwarder.config.setting import Setting, settings_of

__all__ = ["BEGIN", "END", "main", "render_table", "render_toml", "splice_table"]

TOML_PATH = Path("config/forwarder.toml")
PAGE_PATH = Path("docs/reference/configuration.md")
REGENERATE = "make settings-docs"
BEGIN = f"<!-- settings table: generated from forwarder/config/schema.py by `{REGENERATE}` -->"
END = "<!-- end of the generated settings table -->"

_HEADER = """\
# forwarder configuration. Installed as /etc/forwarder/forwarder.toml (the default path).
# Every value below is the built-in default; delete a line to keep the default.
# (Generated from forwarder/config/schema.py by `make settings-docs`: edit the schema, not this.)
#
# Environment variables FORWARDER_<SECTION>_<KEY> override single keys, for example
#   FORWARDER_REMOTE_CONCURRENCY=16   FORWARDER_LOG_LEVEL=debug   FORWARDER_INTAKE_HTTP_LISTEN=""
# Booleans from the environment may be true/false, 1/0, yes/no or on/off.
# [accounts.NAME] tables have no environment overrides (see the end of this file).
#
# The API key is not stored here. It is taken from the first of:
#   1. the environment variable FORWARDER_API_KEY (if non-empty);
#   2. the file named by remote.api_key_file (if set);
#   3. the systemd credential $CREDENTIALS_DIRECTORY/api_key (LoadCredential=api_key:...).
# Surrounding whitespace in key files is ignored. Further accounts: see [accounts.NAME] below.
"""

_ACCOUNTS = """\
# Further accounts of the same API, one table each; NAME is 1-64 letters, digits, - and _
# ("default" is reserved: it is the [remote] account). Events choose one with "account": "NAME".
# These tables cannot be overridden from the environment. An account's key comes from the first of:
#   1. the environment variable named by api_key_env (if non-empty);
#   2. the file named by api_key_file (if set);
#   3. the systemd credential $CREDENTIALS_DIRECTORY/api_key.NAME (LoadCredential=api_key.NAME:...).
#
# [accounts.us]
"""


def _comment(text: str, prefix: str = "# ") -> list[str]:
    return [f"{prefix}{line}".rstrip() for line in text.splitlines()]


def render_toml() -> str:
    """config/forwarder.toml: every section key at its default with its ``doc`` as a comment."""
    lines = _HEADER.splitlines()
    for name, cls in cfg.SECTIONS.items():
        lines += ["", f"[{name}]"]
        defaults = cls()
        for item, meta in settings_of(cls):
            lines += _comment(meta.doc)
            value = getattr(defaults, item.name)
            lines.append(f"{item.name} = {toml_value(cfg.FIELD_KINDS[name][item.name], value)}")
    lines += ["", *_ACCOUNTS.splitlines()]
    for item, meta in settings_of(cfg.AccountConfig):
        lines += _comment(meta.doc, "# # ")
        value = toml_value(cfg.ACCOUNT_KINDS[item.name], meta.example)
        lines.append(f"# {item.name} = {value}")
    return "\n".join(lines) + "\n"


def _number(value: int | float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def _bounds(meta: Setting, kind: cfg.Kind) -> str:
    if meta.bounds:
        return meta.bounds
    if meta.choices:
        quoted = [f"`{toml_string(choice)}`" for choice in meta.choices]
        text = ", ".join(quoted[:-1]) + f" or {quoted[-1]}"
        return text + " (any case)" if meta.fold_case else text
    if kind == "bool":
        return "boolean"
    unit = f" {meta.unit}" if meta.unit else ""
    if meta.lo is not None and meta.hi is not None:
        return f"{_number(meta.lo)}..{_number(meta.hi)}{unit}"
    if meta.lo is not None:
        return f"at least {_number(meta.lo)}"
    if meta.unit == "seconds":
        return "seconds"
    return ""


def _row(key: str, kind: cfg.Kind, default: object, meta: Setting) -> str:
    shown = meta.default_doc or f"`{toml_value(kind, default)}`"
    applied = meta.applied or ("reload" if meta.reload else "restart")
    secret = {"": "", "holds": "secret", "names": "names a secret"}[meta.secret]
    meaning = meta.ref or " ".join(meta.doc.split())
    cells = [f"`{key}`", shown, _bounds(meta, kind), applied, secret, meaning]
    return "| " + " | ".join(cells).replace("|  |", "| |") + " |"


def render_table() -> str:
    """The reference page's Keys table: one row per setting, then the account table's keys."""
    lines = [
        "| key | default | bounds | applied | secret | meaning |",
        "|---|---|---|---|---|---|",
    ]
    for name, cls in cfg.SECTIONS.items():
        defaults = cls()
        for item, meta in settings_of(cls):
            kind = cfg.FIELD_KINDS[name][item.name]
            lines.append(_row(f"{name}.{item.name}", kind, getattr(defaults, item.name), meta))
    for item, meta in settings_of(cfg.AccountConfig):
        kind = cfg.ACCOUNT_KINDS[item.name]
        lines.append(_row(f"accounts.NAME.{item.name}", kind, item.default, meta))
    return "\n".join(lines) + "\n"


def splice_table(page: str, table: str) -> str:
    """``page`` with the text between its :data:`BEGIN` and :data:`END` lines replaced."""
    head, sep, rest = page.partition(BEGIN + "\n")
    _, sep2, tail = rest.partition(END + "\n")
    if not sep or not sep2:
        raise ValueError(f"the page has no {BEGIN!r} ... {END!r} block")
    return f"{head}{BEGIN}\n\n{table}\n{END}\n{tail}"


def main(argv: list[str] | None = None) -> int:
    """Print, write or check the generated TOML and reference table; 1 when --check finds drift."""
    parser = argparse.ArgumentParser(
        prog="python -m forwarder.config.generate", description=__doc__
    )
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--toml", action="store_true", help="print config/forwarder.toml")
    group.add_argument("--docs", action="store_true", help="print the reference page's table")
    group.add_argument("--write", action="store_true", help="rewrite both files in place")
    group.add_argument("--check", action="store_true", help="exit 1 if either file is stale")
    args = parser.parse_args(argv)
    if args.toml:
        sys.stdout.write(render_toml())
        return 0
    if args.docs:
        sys.stdout.write(render_table())
        return 0
    wanted = {
        TOML_PATH: render_toml(),
        PAGE_PATH: splice_table(PAGE_PATH.read_text(), render_table()),
    }
    stale = [path for path, text in wanted.items() if path.read_text() != text]
    if args.check:
        for path in stale:
            print(f"{path} is out of date: run `{REGENERATE}`", file=sys.stderr)
        return 1 if stale else 0
    for path in stale:
        path.write_text(wanted[path])
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
