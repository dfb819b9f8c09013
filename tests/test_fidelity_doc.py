"""docs/fidelity.md: every behaviour row of the three methods names a test that exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEST_REF = re.compile(r"`(test_[a-z0-9_]+\.py)::(test_[A-Za-z0-9_]+)`")


def _rows(text: str) -> list[str]:
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    return [r for r in rows if not r.startswith("| behaviour |")]


def test_every_fidelity_row_names_a_test_that_exists():
    text = (ROOT / "docs" / "fidelity.md").read_text(encoding="utf-8")
    sections = {name: text.index(f"\n## {name}\n") for name in ("Mind", "RAIL", "RD-MLDG")}
    assert list(sections) == sorted(sections, key=sections.get)
    rows = _rows(text)
    assert len(rows) >= 60
    defined: dict[str, set[str]] = {}
    for row in rows:
        refs = TEST_REF.findall(row.split(" | ")[-1])
        assert refs, f"row names no test: {row[:80]}"
        for file, name in refs:
            if file not in defined:
                source = (ROOT / "tests" / file).read_text(encoding="utf-8")
                defined[file] = set(re.findall(r"^def (test_\w+)", source, re.MULTILINE))
            assert name in defined[file], f"{file}::{name} (cited in docs/fidelity.md) not found"


def test_nothing_users_get_points_at_the_developers_notes():
    """Recipes, code and docs cite papers and docs/, never a folder users do not have."""
    for folder in ("cdfsl", "recipes", "docs"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in {".py", ".yaml", ".md", ".txt", ".json"}:
                assert "shared/" not in path.read_text(encoding="utf-8"), path
    assert "shared/" not in (ROOT / "README.md").read_text(encoding="utf-8")
