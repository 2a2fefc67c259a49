"""Docstrings cite docs/methods.md by section: every citation must land on a heading that exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CITATION = re.compile(r"methods\.md §([A-Z][0-9][0-9.]*[0-9]|[A-Z][0-9]*)")


def _headings() -> set[str]:
    text = (ROOT / "docs" / "methods.md").read_text(encoding="utf-8")
    sections = {m.group(1) for m in re.finditer(r"^#+ ([A-Z][0-9.]*[0-9])\b", text, flags=re.M)}
    parts = {m.group(1) for m in re.finditer(r"^# .*\(([A-Z])\)$", text, flags=re.M)}  # "# Lineage (L)"
    return sections | parts


def _sources() -> list[Path]:
    return sorted([*ROOT.glob("src/**/*.py"), *ROOT.glob("tests/*.py"), *ROOT.glob("benchmarks/*.py")])


def test_every_methods_citation_names_an_existing_section():
    headings = _headings()
    dangling = []
    for path in _sources():
        text = path.read_text(encoding="utf-8")
        for line_no, line in enumerate(text.splitlines(), 1):
            for m in CITATION.finditer(line):
                # "§S5–§S12" cites a range: each end is checked where it appears.
                for ref in [m.group(1), *re.findall(r"§([A-Z][0-9][0-9.]*[0-9]|[A-Z][0-9]*)", line[m.end() :])]:
                    if ref not in headings:
                        dangling.append(f"{path.relative_to(ROOT)}:{line_no}: §{ref}")
    assert dangling == []


def test_no_docstring_cites_the_design_document_outside_the_repository():
    stale = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in _sources()
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if re.search(r"\b[Ss]pec §", line)
    ]
    assert stale == []
