"""The README's numbers point at files in the repo, and its tables render."""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
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


def test_tables_have_one_column_count():
    bad = []
    for table in tables(README):
        widths = {cells(row) for row in table}
        if len(widths) != 1 or not re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", table[1].strip()):
            bad.append(table[0][:70])
    assert not bad, f"tables with rows of different widths or no separator row: {bad}"


def test_table_checker_catches_a_short_separator():
    assert {cells(r) for r in tables("| a | b | c |\n|---|---|\n| 1 | 2 | 3 |\n")[0]} == {2, 3}


@pytest.mark.parametrize(
    "kind", ["configs/*.yaml", "benchmarks/*.py", "benchmarks/results/*.json", "examples/*"]
)
def test_named_files_exist(kind):
    folder, pattern = kind.rsplit("/", 1)
    names = set(re.findall(re.escape(folder) + r"/([A-Za-z0-9_.-]+)", README))
    names = {n.rstrip(".") for n in names if fnmatch.fnmatch(n.rstrip("."), pattern)}
    assert names, f"the README names no {kind}"
    missing = sorted(n for n in names if not (ROOT / folder / n).is_file())
    assert not missing, f"the README names {kind} files that do not exist: {missing}"


def test_named_result_files_exist():
    """Results named by file name alone (`exp_x.json`, or a glob such as `exp_x_*`) match a stored file."""
    names = set(
        re.findall(
            r"`((?:exp_|embedded_|text_use|laterality|free_text|effusion_probe)[A-Za-z0-9_.*]*)`", README
        )
    )
    names = {n for n in names if not n.endswith(".py")}
    assert len(names) > 10
    missing = sorted(n for n in names if not fnmatch.filter(RESULTS, n if "*" in n or "." in n else n + "*"))
    assert not missing, f"the README names results that benchmarks/results does not hold: {missing}"
