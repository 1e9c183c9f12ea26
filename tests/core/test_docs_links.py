"""Every relative link and image in README.md and docs/*.md points at a file of the repository
(and a #fragment at a heading of the page it names), and the README, the front door, links to
every page of docs/."""

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
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)


def without_code(text: str) -> str:
    return INLINE_CODE.sub("", FENCE.sub("", text))


def relative_links(page: Path) -> list[tuple[str, str]]:
    """(path, fragment) of each link and image of a Markdown page outside code, URLs left out;
    a link to a heading of the same page has path ''."""
    targets = (m.group(1) for m in LINK.finditer(without_code(page.read_text(encoding="utf-8"))))
    return [tuple(t.split("#", 1)) if "#" in t else (t, "")
            for t in targets if not EXTERNAL.match(t)]


def anchors(page: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens, -1 for repeats."""
    seen: dict[str, int] = {}
    for title in HEADING.findall(FENCE.sub("", page.read_text(encoding="utf-8"))):
        slug = re.sub(r"[^\w\- ]", "", title.replace("`", "").lower()).replace(" ", "-")
        seen[slug] = seen.get(slug, -1) + 1
        if seen[slug]:
            seen[f"{slug}-{seen[slug]}"] = 0
    return set(seen)


def broken_links(page: Path) -> list[str]:
    broken = []
    for path, fragment in relative_links(page):
        target = page.parent / path if path else page
        if not target.exists():
            broken.append(f"{path} (no such file)")
        elif fragment and target.suffix == ".md" and fragment not in anchors(target):
            broken.append(f"{path}#{fragment} (no such heading)")
    return broken


def test_link_checker_finds_broken_links_and_skips_code(tmp_path: Path) -> None:
    (tmp_path / "a.md").write_text("# Set-up: two commands\n## Set-up: two commands\n")
    page = tmp_path / "page.md"
    page.write_text("# Top\n[a](a.md#set-up-two-commands) [a1](a.md#set-up-two-commands-1) "
                    "[w](https://example.org) [t](#top) ![f](figures/f.png) [b](a.md#nowhere) "
                    "[s](#bottom)\n`[no](inline.md)`\n```\n[no](fenced.md)\n```\n",
                    encoding="utf-8")
    assert broken_links(page) == ["figures/f.png (no such file)",
                                  "a.md#nowhere (no such heading)", "#bottom (no such heading)"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    broken = broken_links(page)
    assert not broken, f"{page.relative_to(ROOT)} has broken links: {broken}"


def test_readme_links_every_docs_page() -> None:
    readme = ROOT / "README.md"
    linked = {(ROOT / path).resolve() for path, _ in relative_links(readme)}
    unlinked = [p.name for p in PAGES[1:] if p.resolve() not in linked]
    assert len(PAGES) > 1, "docs/ has no Markdown pages"
    assert not unlinked, f"README.md does not link to docs pages: {unlinked}"
