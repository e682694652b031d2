"""Does the model hold up on a report written in other words than its training template?

The embedded model learned from phantom reports built from one template (``ctflow.data.reports``);
people type free text. This generates the ``make demo`` report (``examples/report.txt``: an enlarged
heart, a left pleural effusion and a right upper-lobe nodule, in wording the template never uses) with
seeds 0..n-1 and 96 slices, and reads every volume with the phantom attribute reader: lung volume
(a phantom chest holds thousands of ml), and which of the report's findings it finds.
A model that leans on template wording draws a volume with little or no lung here.

``--report-file`` takes another report with the same three findings; ``benchmarks/reports/`` holds
them in template sentences, all of the template's (``full_template.txt``) or only the three findings
(``short_template.txt``), which separates wording from length.

    python benchmarks/free_text.py [--model DIR] [--n 8] [--steps 20] [--guidance 2] [--report-file F]

Writes ``results/free_text.json`` (another guidance: ``free_text_guidance{G}.json``; ``--result NAME``:
``NAME.json``; pass ``--result`` with ``--report-file``).
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import generate, generation_settings, generation_setup, result_name, write_result  # noqa: E402

REPORT = Path(__file__).resolve().parents[1] / "examples" / "report.txt"
SLICES = 96
LUNG_ML_FLOOR = 1000.0  # below this the reader's lungs are fragments, not a chest


def main() -> dict:
    args, pipe = generation_setup(
        8,
        __doc__.splitlines()[0],
        lambda p: p.add_argument(
            "--report-file", type=Path, default=REPORT, help="default: the make demo report"
        ),
    )
    if args.report_file.resolve() != REPORT and not args.result:
        sys.exit("free_text.py: --report-file needs --result NAME, so free_text.json stays the demo report's")
    from ctflow.eval.attributes import attribute_scores, attributes_from_scores

    report = args.report_file.read_text()
    rows = []
    for seed in range(args.n):
        out = generate(pipe, args, report, seed, num_slices=SLICES)
        read = attributes_from_scores(attribute_scores(out.volumes[0]))
        rows.append({"seed": seed, **read})
        print(f"seed {seed}: lungs {read['lung_volume_ml']:.0f} ml, {read}")
    lungs = [r["lung_volume_ml"] for r in rows]
    result = {
        "report": report,
        "n": args.n,
        "slices": SLICES,
        **generation_settings(args),
        "median_lung_volume_ml": round(statistics.median(lungs), 1),
        "volumes_with_lungs_over_1000_ml": sum(v >= LUNG_ML_FLOOR for v in lungs),
        "found": {
            "cardiomegaly": sum(bool(r["cardiomegaly"]) for r in rows),
            # fluid on the left: a left or a bilateral read (stored results count it so)
            "left_effusion": sum(r["effusion"] in ("left", "bilateral") for r in rows),
            "nodule": sum(bool(r["nodule"]) for r in rows),
        },
        "rows": rows,
    }
    write_result(args.result or result_name("free_text", args.guidance), result)
    return result


if __name__ == "__main__":
    main()
