"""The paired probes' counts of one or more results, as a markdown table: `laterality.py` (the same
body under a left and a right effusion report) and `nodule_pairs.py` (under a nodule and a clear
report).

    python benchmarks/pairs_table.py [RESULT ...]   (default: laterality, then nodule_pairs: the embedded model)

A result is a name in ``benchmarks/results`` without ``.json``. A column may pool results with ``+``
(``exp_skip01amd_laterality_n24+exp_skip01amd_laterality_seed63000``): one model's pairs from two
seed sets counted together, as docs/results.md's "both sets" figures are. A column name ending in
``:vae`` counts the same phantoms through the VAE instead (the results' ``real_through_vae``): what
a generator can reach. All columns must come from one of the two probes.

It prints the table; it reads the results' counts and measures nothing new.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS  # noqa: E402

# per probe: (table row, counted key, out of key); ``None`` as counted key: found minus false
ROWS = {
    "laterality": (
        ("volumes with fluid", "drawn", "volumes"),
        ("fluid on the named side alone", "on_named_side", "volumes"),
        ("fluid on the other side alone", "on_other_side", "volumes"),
        ("fluid on both sides", "bilateral", "volumes"),
        ("pairs whose fluid follows the side", "pairs_following_side", "pairs_read"),
    ),
    "nodule_pairs": (
        ("nodule found under the nodule report", "found", "pairs"),
        ("nodule found under the clear report", "false", "pairs"),
        ("found minus false", None, "pairs"),
        ("pairs whose score follows the report", "pairs_following_report", "pairs_read"),
        ("nodule report, rule fitted through the VAE", "found_vae_rule", "pairs"),
        ("clear report, rule fitted through the VAE", "false_vae_rule", "pairs"),
    ),
}
MARKS = {"laterality": "pairs_following_side", "nodule_pairs": "pairs_following_report"}


def pooled(name: str) -> tuple[str, dict]:
    """(probe, summed counts) of a column: ``+``-joined results, ``:vae`` for the reconstructions.
    A count that some pooled result lacks (written before it was measured) is left out."""
    part_key = "real_through_vae" if name.endswith(":vae") else "generated"
    probes, parts = set(), []
    for part in name.removesuffix(":vae").split("+"):
        path = RESULTS / f"{part}.json"
        if not path.is_file():
            raise SystemExit(
                f"no result {path}; run benchmarks/laterality.py or nodule_pairs.py --result {part}"
            )
        counts = json.loads(path.read_text()).get(part_key)
        probe = next((p for p, mark in MARKS.items() if isinstance(counts, dict) and mark in counts), None)
        if probe is None:
            raise SystemExit(f"{path} is neither a laterality.py nor a nodule_pairs.py result")
        probes.add(probe)
        parts.append(counts)
    if len(probes) > 1:
        raise SystemExit(f"column {name} pools results of different probes ({', '.join(sorted(probes))})")
    keys = set.intersection(*(set(c) for c in parts))
    return probes.pop(), {k: sum(c[k] for c in parts) for k in keys if isinstance(parts[0][k], int)}


def cell(counts: dict, key: str | None, of: str) -> str:
    if key is None:
        return str(counts["found"] - counts["false"])
    return f"{counts[key]}/{counts[of]}" if key in counts else "–"


def table(names: list[str]) -> str:
    columns = [pooled(name) for name in names]
    probes = {probe for probe, _ in columns}
    if len(probes) > 1:
        raise SystemExit("pairs_table.py: give results of one probe at a time (laterality or nodule_pairs)")
    lines = [f"| measure | {' | '.join(names)} |", "|---|" + "---|" * len(names)]
    for label, key, of in ROWS[probes.pop()]:
        lines.append(f"| {label} | " + " | ".join(cell(c, key, of) for _, c in columns) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="*", metavar="RESULT")
    names = p.parse_args().results
    # no names: the embedded model's own results of both probes, one table each
    columns = [names] if names else [["laterality"], ["nodule_pairs"]]
    print("\n\n".join(table(names) for names in columns))
