"""Findings found and false findings of one or more `embedded_quality.py` results, as a markdown table.

For each result (a name in ``benchmarks/results``, without ``.json``) and each finding the attribute
reader scores: how many of the reports that name it give a volume where the reader finds it (an
effusion on the reported side; also on any side, since laterality is where models fail first), and
how many of the reports that do not name it give a volume where the reader finds it anyway.

    python benchmarks/findings_table.py [RESULT ...]   (default: embedded_quality, the embedded model)

A column may pool results with ``+`` (``embedded_quality+exp_installed_quality_seed55000``): one
model's reports from two seed sets counted together. About a dozen reports name each finding in a
set of 50, and a finding's count moves by about four between sets (docs/experiments.md, "Pooled report
tokens").

A column name ending in ``:vae`` (``embedded_quality+exp_installed_quality_seed55000:vae``) counts the
same reports' phantoms through the VAE instead (the rows' ``pred_reconstruction``): what the reader
finds, and calls where nothing was reported, with no generation at all. That is the floor under a
model's false findings and the ceiling over what it finds.

Two rows count nodules with the reader's nodule rule fitted through the model's VAE (results written
since 2026-12-04; older ones show "–"): the shipped rule, fitted on sharp phantoms, calls a nodule
in about a fifth of nodule-free reconstructions. The last two rows split the false consolidations by
whether the report names an effusion.

It prints the table; it reads the results' rows and measures nothing new.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ctflow.eval.attributes import finding_counts

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, nodule_calls  # noqa: E402

FINDINGS = ("emphysema", "cardiomegaly", "consolidation", "nodule", "effusion")  # the table's row order


def table(names: list[str]) -> str:
    counts, beside_fluid, refitted = {}, {}, {}
    for name in names:
        rows = []
        pred = "pred_reconstruction" if name.endswith(":vae") else "pred"
        rule = "reconstruction_nodule_vae_rule" if name.endswith(":vae") else "nodule_vae_rule"
        for part in name.removesuffix(":vae").split("+"):
            path = RESULTS / f"{part}.json"
            if not path.is_file():
                raise SystemExit(
                    f"no result {path}; run benchmarks/embedded_quality.py --result {part} first"
                )
            rows += json.loads(path.read_text())["rows"]
        counts[name] = finding_counts([r[pred] for r in rows], [r["truth"] for r in rows])
        beside_fluid[name] = false_consolidation_by_effusion(rows, pred)
        refitted[name] = nodule_calls(rows, rule) if all(rule in r for r in rows) else None  # older results

    def frac(pair):
        return f"{pair[0]}/{pair[1]}"

    lines = [f"| measure | {' | '.join(names)} |", "|---|" + "---|" * len(names)]
    for key in FINDINGS:
        lines.append(f"| {key} found | " + " | ".join(frac(c["found"][key]) for c in counts.values()) + " |")
    lines.append(
        "| effusion found, any side | "
        + " | ".join(frac(c["effusion_any_side"]) for c in counts.values())
        + " |"
    )
    total = [
        (sum(f for f, _ in c["found"].values()), sum(n for _, n in c["found"].values()))
        for c in counts.values()
    ]
    lines.append("| all findings found | " + " | ".join(map(frac, total)) + " |")
    for key in FINDINGS:
        lines.append(f"| false {key} | " + " | ".join(str(c["false"][key]) for c in counts.values()) + " |")
    lines.append(
        "| all false findings | " + " | ".join(str(sum(c["false"].values())) for c in counts.values()) + " |"
    )
    for label, part in (
        ("nodule found", lambda c: frac(c["found"])),
        ("false nodule", lambda c: str(c["false"][0])),
    ):
        lines.append(
            f"| {label}, rule fitted through the VAE | "
            + " | ".join("–" if c is None else part(c) for c in refitted.values())
            + " |"
        )
    for i, which in enumerate(("names an effusion", "names no effusion")):
        lines.append(
            f"| false consolidation where the report {which} | "
            + " | ".join(frac(split[i]) for split in beside_fluid.values())
            + " |"
        )
    return "\n".join(lines)


def false_consolidation_by_effusion(rows: list[dict], pred: str = "pred") -> tuple[tuple[int, int], ...]:
    """Among the reports without a consolidation: (consolidations read, reports) where the report names
    an effusion, then where it names none. A model that draws a reported effusion as dense tissue that
    is not fluid gets the first count, not an effusion."""
    out = []
    for with_fluid in (True, False):
        picked = [
            r
            for r in rows
            if not r["truth"]["consolidation"] and (r["truth"]["effusion"] != "none") == with_fluid
        ]
        out.append((sum(bool(r[pred]["consolidation"]) for r in picked), len(picked)))
    return tuple(out)


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="*", default=["embedded_quality"], metavar="RESULT")
    print(table(p.parse_args().results))
