"""The guide and the results stay what a user can read: short, current, and consistent."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
RESULTS = (ROOT / "benchmarks" / "RESULTS.md").read_text()


def _normalised(text: str) -> str:
    """4.33e-02 and 4.33e-2 are the same number: drop exponents' leading zeros."""
    return re.sub(r"e([-+]?)0+(\d)", r"e\1\2", text)


def test_readme_is_a_short_guide_that_starts_with_the_path():
    lines = README.splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move detail to RESULTS or docs"
    first = "\n".join(lines[:60])
    for command in ("train.py fit", "sample.py", "calibrate.py", "--schedule"):
        assert command in first, f"the first 60 lines of README.md lack {command!r}"


def test_results_are_dated_by_date_and_commit_not_by_work_period():
    history = sorted((ROOT / "benchmarks" / "history").glob("*.md"))
    texts = [("README.md", README), ("RESULTS.md", RESULTS)]
    texts += [(p.name, p.read_text()) for p in history]
    period = r"(?i)\b(?:(?:session|sprint|work period|round) \d+|(?:this|previous|last|first|"
    period += r"earlier|next) (?:round|session)s?\b)"
    for name, text in texts:
        found = re.findall(period, text)
        assert not found, f"{name} names work periods: {found}"


def test_every_headline_number_appears_in_its_section():
    start = RESULTS.index("## Headline figures")
    end = RESULTS.index("\n## ", start + 5)
    rest = _normalised(RESULTS[end:])
    rows = [r for r in RESULTS[start:end].splitlines() if r.startswith("| ")][1:]
    assert len(rows) >= 10
    for row in rows:
        what, number = (c.strip() for c in row.strip("|").split("|")[:2])
        for value in re.findall(r"\d+(?:[.,]\d+)*(?:e[-+]?\d+)?", _normalised(number)):
            assert value in rest, f"headline {what!r}: {value} is not in any section below"
