"""The documentation pages speak to users, and their links lead somewhere.

Every page (README.md, BENCHMARKS.md while it exists, docs/**/*.md) is
checked for words about how the work was organised rather than what the software does, and
for private machine paths; every relative link of those pages must name an existing file
and, for a link into a Markdown page, an existing heading.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def pages() -> list[Path]:
    top = [ROOT / name for name in ("README.md", "BENCHMARKS.md") if (ROOT / name).exists()]
    return top + sorted((ROOT / "docs").rglob("*.md"))


PAGE_IDS = [str(page.relative_to(ROOT)) for page in pages()]

# How the work was organised is not the user's business, nor where it happened.
FORBIDDEN = {
    "a work session": re.compile(r"\bsessions?\b", re.IGNORECASE),
    "a work sitting": re.compile(r"\bsittings?\b", re.IGNORECASE),
    "an issue number": re.compile(r"\bissues?\s*(?:#\s*)?\d+", re.IGNORECASE),
    "machines lent": re.compile(r"\b(?:lent|lending)\b", re.IGNORECASE),
    "helpers": re.compile(r"\bhelpers?\b", re.IGNORECASE),
    "a private machine path": re.compile(r"/tmp/wt|/work/|/root/"),
}

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)


def forbidden_words(text: str) -> list[str]:
    """Every forbidden word or path in ``text``, as "what: line N: the line"."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        for what, pattern in FORBIDDEN.items():
            if pattern.search(line):
                found.append(f"{what}: line {number}: {line.strip()}")
    return found


def slug(heading: str) -> str:
    """The anchor a code host gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The anchors of a Markdown page's headings (repeated headings get -1, -2, ...)."""
    seen: dict[str, int] = {}
    result = set()
    for line in FENCE.sub("", page.read_text()).splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        base = slug(match.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


def broken_links(page: Path) -> list[str]:
    """The relative links of ``page`` whose file, or heading within a Markdown file, is missing."""
    problems = []
    for target in LINK.findall(FENCE.sub("", page.read_text())):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        linked = (page.parent / path_part).resolve() if path_part else page
        if not linked.exists():
            problems.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            problems.append(f"{target}: no heading with that anchor in {path_part or linked.name}")
    return problems


@pytest.mark.parametrize("page", pages(), ids=PAGE_IDS)
def test_page_does_not_speak_of_how_the_work_was_organised(page: Path) -> None:
    found = forbidden_words(page.read_text())
    assert not found, f"{page.relative_to(ROOT)}:\n" + "\n".join(found)


@pytest.mark.parametrize("page", pages(), ids=PAGE_IDS)
def test_every_relative_link_leads_to_a_file_and_heading(page: Path) -> None:
    problems = broken_links(page)
    assert not problems, f"{page.relative_to(ROOT)}:\n" + "\n".join(problems)


def test_the_checks_catch_what_they_look_for(tmp_path: Path) -> None:
    assert forbidden_words("measured in the third session (issue #12), on /tmp/wt4")
    assert forbidden_words("no GPU was lent to this sitting")
    assert not forbidden_words("the run resumes; pytorch/pytorch#107298 is PyTorch's")
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# Other page\n\n## A `small` heading, 10,000 images\n")
    page.write_text("[ok](other.md#a-small-heading-10000-images) [gone](missing.md) "
                    "[bad](other.md#nowhere) [web](https://example.org/x)\n")
    assert broken_links(page) == ["missing.md: no such file",
                                  "other.md#nowhere: no heading with that anchor in other.md"]
