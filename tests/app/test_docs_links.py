"""The documentation stays true: every relative link and image in README.md and docs/*.md
points at a file of the repository (and a #fragment at a heading of the page it names), the
README, the front door, links to every page of docs/, and its example runs as it says."""

from __future__ import annotations

import math
import re
import warnings
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


def test_readme_example_runs_as_commented(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## One example", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DeprecationWarning)
        exec(compile(code, "README.md", "exec"), namespace)
    renamed = [str(w.message) for w in caught if "is deprecated and will be removed" in str(w.message)]
    assert not renamed, f"the README example uses renamed options: {renamed}"
    assert namespace["exact"].diagnostics.log_z == pytest.approx(math.log(2.9543), abs=1e-4)
    assert namespace["dpg"].diagnostics.exact
    assert namespace["dpg"].diagnostics.kl_target_policy < 5e-3  # the comment says ≈ 2.6e-3
    assert (tmp_path / "out" / "dpg").is_dir()
