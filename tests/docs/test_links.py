"""Every relative link of the README and of ``docs/*.md`` points at a file that exists, and
every ``#anchor`` at a heading of its page (GitHub's and mkdocs' heading ids)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from _blocks import PAGES, ROOT, fences

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$")


def prose(page: Path) -> str:
    """The page without its fenced blocks and inline code (links there are not links)."""
    lines = page.read_text().splitlines()
    for fence, code, _ in fences(page):
        n = code.count("\n")
        lines[fence.line - 1:fence.line + n] = [""] * (n + 1)
    return re.sub(r"`[^`\n]*`", "", "\n".join(lines))


def anchors(page: Path) -> set[str]:
    """Heading ids: lower case, punctuation dropped, spaces to hyphens."""
    out = set()
    for line in prose(page).splitlines():
        m = HEADING.match(line)
        if m:
            text = re.sub(r"[^\w\- ]", "", m.group(1).lower())
            out.add(re.sub(r" ", "-", text.strip()))
    return out


def links(page: Path) -> list[str]:
    return [t for t in LINK.findall(prose(page)) if not re.match(r"[a-z]+:", t)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.name}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_the_docs_pages_are_all_linked() -> None:
    """Every page under docs/ is reachable from the README or the docs index."""
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in links(ROOT / "README.md")}
    linked |= {(ROOT / "docs" / t.partition("#")[0]).resolve() for t in links(ROOT / "docs/index.md")}
    missing = [p.name for p in PAGES[1:] if p.name != "index.md" and p.resolve() not in linked]
    assert not missing, missing
