"""Every relative link and image in README.md and docs/*.md points at a file of the repository,
and the README (the front door) links to every page of docs/."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # http:, https:, mailto:


def relative_links(page: Path) -> list[str]:
    """Link and image targets of a Markdown page outside code, without #fragments or URLs."""
    text = INLINE_CODE.sub("", FENCE.sub("", page.read_text(encoding="utf-8")))
    targets = (match.group(1).split("#", 1)[0] for match in LINK.finditer(text))
    return [t for t in targets if t and not EXTERNAL.match(t)]


def test_link_parser_sees_links_and_skips_code(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("[a](docs/a.md#x) ![f](figures/f.png) [w](https://example.org) [s](#top)\n"
                    "`[no](inline.md)`\n```\n[no](fenced.md)\n```\n", encoding="utf-8")
    assert relative_links(page) == ["docs/a.md", "figures/f.png"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    missing = [t for t in relative_links(page) if not (page.parent / t).exists()]
    assert not missing, f"{page.relative_to(ROOT)} links to missing files: {missing}"


def test_readme_links_every_docs_page() -> None:
    linked = {(ROOT / t).resolve() for t in relative_links(ROOT / "README.md")}
    unlinked = [p.name for p in PAGES[1:] if p.resolve() not in linked]
    assert len(PAGES) > 1, "docs/ has no Markdown pages"
    assert not unlinked, f"README.md does not link to docs pages: {unlinked}"
