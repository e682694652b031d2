"""The README's and the experiment notebook's numbers point at files in the repo, and their tables render."""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = {name: (ROOT / name).read_text() for name in ("README.md", "docs/experiments.md")}
RESULTS = sorted(p.name for p in (ROOT / "benchmarks" / "results").iterdir())


def tables(text: str) -> list[list[str]]:
    """Each markdown table as its lines (a run of lines starting with '|')."""
    found, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            found.append(current)
            current = []
    return found


def cells(row: str) -> int:
    return len(row.strip().strip("|").split("|"))


@pytest.mark.parametrize("doc", DOCS)
def test_tables_have_one_column_count(doc):
    bad = []
    for table in tables(DOCS[doc]):
        widths = {cells(row) for row in table}
        if len(widths) != 1 or not re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", table[1].strip()):
            bad.append(table[0][:70])
    assert not bad, f"tables with rows of different widths or no separator row: {bad}"


def test_table_checker_catches_a_short_separator():
    assert {cells(r) for r in tables("| a | b | c |\n|---|---|\n| 1 | 2 | 3 |\n")[0]} == {2, 3}


@pytest.mark.parametrize("doc", DOCS)
@pytest.mark.parametrize(
    "kind", ["configs/*.yaml", "benchmarks/*.py", "benchmarks/results/*.json", "examples/*"]
)
def test_named_files_exist(doc, kind):
    folder, pattern = kind.rsplit("/", 1)
    names = set(re.findall(re.escape(folder) + r"/([A-Za-z0-9_.-]+)", DOCS[doc]))
    names = {n.rstrip(".") for n in names if fnmatch.fnmatch(n.rstrip("."), pattern)}
    if doc == "docs/experiments.md" and kind == "examples/*":
        return  # the notebook quotes benchmark reports, not the examples
    assert names, f"{doc} names no {kind}"
    missing = sorted(n for n in names if not (ROOT / folder / n).is_file())
    assert not missing, f"{doc} names {kind} files that do not exist: {missing}"


@pytest.mark.parametrize("doc", DOCS)
def test_named_result_files_exist(doc):
    """Results named by file name alone (`exp_x.json`, or a glob such as `exp_x_*`) match a stored file."""
    names = set(
        re.findall(
            r"`((?:exp_|embedded_|text_use|laterality|free_text|effusion_probe)[A-Za-z0-9_.*]*)`", DOCS[doc]
        )
    )
    names = {n for n in names if not n.endswith(".py")}
    assert len(names) > 3  # the pattern still matches how the text names results
    missing = sorted(n for n in names if not fnmatch.filter(RESULTS, n if "*" in n or "." in n else n + "*"))
    assert not missing, f"{doc} names results that benchmarks/results does not hold: {missing}"
