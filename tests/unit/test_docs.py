"""The documentation holds together: every relative link (and its #anchor) resolves, and the
README fits on a few screens (everything else lives in docs/)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README_MAX_LINES = 200
DOCUMENTS = sorted(
    {
        ROOT / "README.md",
        ROOT / "CHANGELOG.md",
        ROOT / "publisher" / "README.md",
        ROOT / "subscriber" / "README.md",
        ROOT / "exporter" / "README.md",
        *(ROOT / "docs").glob("*.md"),
    }
)

_FENCE = re.compile(r"^\s*(```|~~~)")
_CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
# [text](target) and ![alt](target); the target up to whitespace or ')', an optional "title".
_LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")


def _prose_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of the lines outside fenced code blocks, code spans removed."""
    lines, fenced = [], False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append((number, _CODE_SPAN.sub("", line)))
    return lines


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*\*|__", "", heading)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link in a heading: its text
    text = "".join(c for c in text.lower() if c.isalnum() or c in " -_")
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor the headings of a markdown file define (GitHub numbers repeats -1, -2)."""
    seen: dict[str, int] = {}
    found = set()
    fenced = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        match = None if fenced else _HEADING.match(line)
        if match:
            slug = _slug(match.group(2))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def relative_links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every link that is not to another site."""
    return [
        (number, target)
        for number, line in _prose_lines(path)
        for target in _LINK.findall(line)
        if not re.match(r"[a-z][a-z0-9+.-]*:", target, re.IGNORECASE)
    ]


def test_the_documents_exist() -> None:
    for path in DOCUMENTS:
        assert path.is_file(), path
    assert {p.name for p in (ROOT / "docs").glob("*.md")} >= {
        "design.md",
        "library.md",
        "operating.md",
        "performance.md",
        "scaling.md",
        "semantics.md",
        "testing.md",
    }


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(path: Path) -> None:
    broken = []
    for number, target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(ROOT)}:{number}: {target}"
        if not resolved.exists():
            broken.append(f"{where} (no such file)")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{where} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_the_readme_fits_in_200_lines() -> None:
    lines = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines; move detail into docs/ (at most {README_MAX_LINES})"
    )


def test_the_link_checker_sees_links_and_anchors(tmp_path: Path) -> None:
    """The checker itself: links in prose are found, those in code are not, anchors are
    GitHub's."""
    doc = tmp_path / "a.md"
    doc.write_text(
        "# One event's story (`lookup`)\n"
        "## Limits\n## Limits\n"
        'See [b](b.md#x), ![img](i.png "t"), [web](https://example.com), `[no](c.md)`.\n'
        "```\n[no](d.md)\n# not a heading\n```\n"
    )
    assert relative_links(doc) == [(4, "b.md#x"), (4, "i.png")]
    assert anchors(doc) == {"one-events-story-lookup", "limits", "limits-1"}
