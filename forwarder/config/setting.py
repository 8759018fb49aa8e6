"""One setting's declaration: its default, bounds, reload behaviour, secrecy and documentation.

Each field of the configuration dataclasses (forwarder/config/schema.py) is declared with
:func:`setting`, which keeps a :class:`Setting` in the field's metadata. Everything else about a
setting is derived from that one declaration: the range checks (:func:`bounds_error`), the list of
settings a reload cannot apply (`schema.RESTART_ONLY`), `check-config`'s masking, and the
shipped config/forwarder.toml and docs/reference/configuration.md (written by
forwarder/config/generate.py).

Rules that tie two settings together (``min_concurrency <= max_concurrency``) or need the outside
world (a group that exists, a readable CA file) cannot be a per-field bound; they stay as code in
`validate.validate_config`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

__all__ = ["Setting", "bounds_error", "setting", "settings_of", "short"]

_T = TypeVar("_T")
_META_KEY = "forwarder.setting"

# "holds": the value is a secret (masked by check-config, never logged or echoed);
# "names": it says where a secret is (a file, a variable) and may hold one pasted by mistake,
# so no error ever shows it.
Secrecy = Literal["", "holds", "names"]


@dataclass(frozen=True, slots=True)
class Setting:
    """What the schema says about one setting (see :func:`setting` for the fields)."""

    doc: str
    lo: int | float | None = None
    hi: int | float | None = None
    choices: tuple[str, ...] = ()
    fold_case: bool = False
    reload: bool = True
    secret: Secrecy = ""
    unit: str = ""
    octal: bool = False
    ref: str = ""
    bounds: str = ""
    default_doc: str = ""
    applied: str = ""
    example: object = None


def setting(
    default: _T,
    *,
    doc: str,
    lo: int | float | None = None,
    hi: int | float | None = None,
    choices: tuple[str, ...] = (),
    fold_case: bool = False,
    reload: bool = True,
    secret: Secrecy = "",
    unit: str = "",
    octal: bool = False,
    ref: str = "",
    bounds: str = "",
    default_doc: str = "",
    applied: str = "",
    example: object = None,
) -> _T:
    """A dataclass field for a setting, with its :class:`Setting` as metadata.

    - ``doc``: its comment in config/forwarder.toml (lines joined by newlines; "" when the
      comment of the key before it covers it too);
    - ``lo``/``hi``: inclusive bounds; a float with ``unit="seconds"`` and no bounds must be a
      positive, finite number of seconds;
    - ``choices``: the accepted strings (``fold_case``: in any case, normalised to lower case);
    - ``reload``: whether a reload applies it (else the running daemon keeps it until a restart);
    - ``secret``: "holds" or "names" a secret (see :data:`Secrecy`);
    - ``octal``: an int file mode, written ``0o660`` or ``"0660"``;
    - ``ref``, ``bounds``, ``default_doc``, ``applied``: the reference page's cells, where the
      generated ones (from ``doc``, the bounds, the default, ``reload``) would say less;
    - ``example``: the value the commented-out example in the TOML shows (account tables).
    """
    meta = Setting(
        doc=doc,
        lo=lo,
        hi=hi,
        choices=choices,
        fold_case=fold_case,
        reload=reload,
        secret=secret,
        unit=unit,
        octal=octal,
        ref=ref,
        bounds=bounds,
        default_doc=default_doc,
        applied=applied,
        example=example,
    )
    # repr=False: a secret's value never shows in a repr (a traceback, a debug log).
    out: _T = dataclasses.field(default=default, metadata={_META_KEY: meta}, repr=secret != "holds")
    return out


def settings_of(cls: type[Any]) -> Iterator[tuple[dataclasses.Field[Any], Setting]]:
    """The fields of a section dataclass that are settings, in declaration order, with metadata."""
    for item in dataclasses.fields(cls):
        meta = item.metadata.get(_META_KEY)
        if isinstance(meta, Setting):
            yield item, meta


def short(value: str, limit: int = 60) -> str:
    """`value` quoted for an error message, cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


def _num(value: int | float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def bounds_error(meta: Setting, value: object) -> str | None:
    """Why ``value`` breaks ``meta``'s per-field bounds or choices, or None if it does not.

    The message follows the key name in a config error: "must be within 1..1024, got 0".
    """
    if meta.choices:
        if isinstance(value, str) and value in meta.choices:
            return None
        return f"must be one of {', '.join(meta.choices)}; got {short(str(value))}"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    lo, hi = meta.lo, meta.hi
    if isinstance(value, float) and meta.unit == "seconds" and lo is None and hi is None:
        # `not (value > 0)` also catches NaN.
        if not (value > 0) or not math.isfinite(value):
            return f"must be a positive number of seconds, got {value}"
        return None
    if meta.octal and isinstance(value, int):
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            return f"must be within 0o{lo or 0:03o}..0o{hi or 0:03o}, got {value:#o}"
        return None
    if lo is not None and hi is not None:
        if not (lo <= value <= hi):  # `not (...)` also catches NaN
            unit = f" {meta.unit}" if meta.unit and meta.unit != "seconds" else ""
            return f"must be within {_num(lo)}..{_num(hi)}{unit}, got {value}"
    elif lo is not None and not (value >= lo):
        return f"must be at least {lo}, got {value}"
    return None
