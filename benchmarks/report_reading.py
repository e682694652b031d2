"""How often the report reader misreads sentences people type.

The finding flags the embedded model is conditioned on, and the report side of ``ctflow evaluate``'s
attribute accuracy, come from ``ctflow.data.reports.finding_vector``. Phantom reports come from one
template; people type lists, hedges, headings, bullets and other words. This reads every sentence of
``benchmarks/reports/typed_sentences.txt`` through ``clean_report`` (as the pipeline does) and counts
the sentences whose flags differ from the hand-written ones, by the group the file puts them in.

    python benchmarks/report_reading.py [--show]

Writes ``results/report_reading.json``. No model, no torch work: a second or two.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

SENTENCES = Path(__file__).resolve().parent / "reports" / "typed_sentences.txt"
LETTERS = {"L": 0, "R": 1, "C": 2, "N": 3, "E": 4, "X": 5}  # finding_vector's order


def expected(flags: str) -> list[float]:
    """``"L R C"`` / ``"L.5 R.5"`` -> finding_vector's six numbers."""
    out = [0.0] * 6
    for token in flags.split():
        out[LETTERS[token[0]]] = float(token[1:]) if token[1:] else 1.0
    return out


def cases(path: Path = SENTENCES) -> list[tuple[str, str, list[float]]]:
    """(group, sentence, expected flags) for every line; a group is the ``# ...`` line above it."""
    group, out = "", []
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            group = line.lstrip("# ").strip()
        elif " || " in line:
            text, flags = line.rsplit(" || ", 1)
            out.append((group, text.replace("\\n", "\n"), expected(flags)))
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--show", action="store_true", help="print every misread sentence")
    args = ap.parse_args(argv)
    from ctflow.data.reports import finding_vector
    from ctflow.models.text import clean_report

    groups: dict[str, list[int]] = {}
    misread = []
    for group, text, want in cases():
        got = finding_vector(clean_report(text))
        counts = groups.setdefault(group, [0, 0])
        counts[1] += 1
        if got != want:
            counts[0] += 1
            misread.append({"sentence": text, "got": got, "expected": want})
            if args.show:
                print(f"{got} != {want}  {text!r}")
    total = sum(n for _, n in groups.values())
    result = {
        "sentences": total,
        "misread": len(misread),
        "misread_by_group": {g: {"misread": m, "of": n} for g, (m, n) in groups.items()},
        "misread_sentences": misread,
    }
    print(f"{len(misread)} of {total} sentences misread")
    write_result("report_reading", result)
    return result


if __name__ == "__main__":
    main()
