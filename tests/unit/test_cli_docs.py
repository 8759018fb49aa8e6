"""`forwarder --help` and every subcommand's help end with a link to a page of the docs site.

The link is a path in the repository (`Docs: docs/how-to/reload.md#anchor`; there is no hosted
site). It must name a Markdown file that exists under docs/ and is in mkdocs.yml's nav, and an
anchor, when it has one, must be a heading of that page: a renamed page or heading fails here.
"""

from __future__ import annotations

import argparse
import re
import unicodedata
from collections.abc import Iterator
from pathlib import Path

import pytest

from forwarder.cli.main import build_parser

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
LINK = re.compile(r"\bdocs/([\w./-]+\.md)(?:#([\w-]+))?")


def commands(
    parser: argparse.ArgumentParser, name: str = "forwarder"
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """The parser and every subcommand's parser under it, with its full command line."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for verb, sub in action.choices.items():
                yield from commands(sub, f"{name} {verb}")


def nav_pages() -> set[str]:
    """The pages mkdocs.yml's nav lists (`- Title: path.md`)."""
    text = (ROOT / "mkdocs.yml").read_text()
    nav = text.split("\nnav:\n", 1)[1]
    return set(re.findall(r":\s*([\w./-]+\.md)\s*$", nav, flags=re.MULTILINE))


def slug(heading: str) -> str:
    """The anchor MkDocs (Python-Markdown's toc extension) gives a heading."""
    text = unicodedata.normalize("NFKD", heading).encode("ascii", "ignore").decode()
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(page: Path) -> set[str]:
    """The anchors of a page's headings (outside fenced code)."""
    found: set[str] = set()
    fenced = False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (match := re.match(r"#{1,6} (.+?)\s*$", line)):
            found.add(slug(match.group(1)))
    return found


ALL = list(commands(build_parser()))


def test_every_command_is_walked() -> None:
    names = {name for name, _ in ALL}
    expected = {"forwarder", "forwarder run", "forwarder dlq replay", "forwarder spool recover"}
    assert expected <= names
    assert len(ALL) > 15


@pytest.mark.parametrize(("name", "parser"), ALL, ids=[name for name, _ in ALL])
def test_help_links_an_existing_docs_page(name: str, parser: argparse.ArgumentParser) -> None:
    text = parser.format_help()
    last = text.rstrip().splitlines()[-1]
    assert last.startswith("Docs: "), f"`{name} --help` does not end with a Docs: line"
    links = LINK.findall(last)
    assert links, f"`{name} --help` names no docs page: {last!r}"
    nav = nav_pages()
    for page, anchor in links:
        path = DOCS / page
        assert path.is_file(), f"`{name} --help` links docs/{page}, which does not exist"
        assert page in nav, f"`{name} --help` links docs/{page}, which mkdocs.yml's nav lacks"
        if anchor:
            assert anchor in anchors(path), f"docs/{page} has no heading #{anchor}"
