"""Quality of the embedded default model on 50 held-out phantom reports.

The model was trained on phantoms with seeds 1000-1299 (``make train-default``);
here seeds 50000-50049 give reports it has never seen. Each report carries the
meta line "Volume: N slices, d mm spacing." and generation runs with no hard
slice count, so the model itself decides where to stop (EOS). Measures:

* slice count within one chunk (8 slices) of the requested N (goal >= 90%);
* attribute accuracy: the rule-based phantom reader on the generated volume vs
  the findings named in the report (effusion side, cardiomegaly, nodule, ...);
* the same reader on the VAE reconstruction of each held-out phantom: the best a
  generator can score through this VAE (the reader's fluid band is 37 HU wide and
  the tiny VAE's error is larger, so effusions fade in reconstruction);
* the nodule call again with the reader's nodule rule fitted through this VAE
  (``common.vae_nodule_rule``; rows' ``nodule_vae_rule``), on generated volumes and
  reconstructions: the shipped rule calls a nodule in about a fifth of nodule-free
  reconstructions, so its nodule counts cannot tell models apart;
* continuity across chunk seams, slice-to-slice change (flicker) relative to the
  reconstructed phantoms, and the patch-seam ratio (change between slices that
  different tokens predict over change between slices of one token; 1 for the
  reconstructions); a tri-planar grid of the first 6 volumes;
* latent drift: RMS of each generated latent chunk, and per volume the RMS of its last chunk before
  the end-of-scan chunk over that of its second chunk (the phantoms' own latents: about 1). A model
  whose errors add up from chunk to chunk (the full context residual) grows it far above 1.

    python benchmarks/embedded_quality.py [--n 50] [--steps 20] [--guidance 2] [--model DIR] [--first-seed S]

``--meta none`` strips the meta line from each report (no slice count at all, as `ctflow generate
"REPORT"` without --slices): the pipeline then aims for the model's ``typical_slices`` as a number,
its text without a meta line. ``--meta typical`` writes that target into the text as a meta line
instead, the pairing training shows. Both need ``--result``; their slice-count figures compare the
generated count with ``typical_slices`` (rows' ``requested``), not with the phantom's.

``--first-seed 1000`` reads the first training reports instead (seeds 1000-1299): whether a finding the
model misses on held-out reports is one it never learned (missed on its training reports too) or one it
learned but does not carry over to new reports (pass ``--result``, so the held-out figures stay).

Results go to ``embedded_quality.json`` (and the grid to ``embedded_samples.png``); another guidance
scale writes ``embedded_quality_guidance{G}.json`` and ``embedded_samples_guidance{G}.png`` instead,
so a sweep leaves the default's figures (which the model card quotes) alone; ``--result NAME`` names
them for an experiment (``NAME.json``, ``NAME_samples.png``).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    RESULTS,
    generate,
    generation_settings,
    generation_setup,
    heldout_reports,
    nodule_calls,
    result_name,
    rms,
    through_vae,
    vae_nodule_rule,
    write_result,
)

SEED0 = 50000


def samples_name(name: str) -> str:
    """The sample grid's file name (no suffix) beside the result ``name``."""
    return (
        name.replace("embedded_quality", "embedded_samples")
        if "embedded_quality" in name
        else f"{name}_samples"
    )


def attribute_baselines(rows: list[dict], accuracy: dict) -> dict:
    """What the accuracies mean: the accuracy of always answering the commonest value, and the share of
    reported findings (values other than none/False) that the reader finds in the generated volume."""
    from collections import Counter

    from ctflow.eval.attributes import finding_counts

    counts = finding_counts([r["pred"] for r in rows], [r["truth"] for r in rows])["found"]
    majority, found = {}, {}
    for key in accuracy:
        truths = [str(r["truth"][key]) for r in rows]
        majority[key] = round(Counter(truths).most_common(1)[0][1] / len(rows), 3)
        hits, named = counts[key]
        if named:
            found[key] = round(hits / named, 3)
    return {"attribute_majority_baseline": majority, "findings_found": found}


def record_chunks(pipe) -> list:
    """Every latent chunk [C,K,h,w] the pipeline decodes from now on, in order: wraps this pipeline's
    ``vae.decode_volume`` (the pipeline decodes each generated chunk once, as it is made)."""
    seen, decode = [], pipe.vae.decode_volume

    def recording(z, *args, **kwargs):
        seen.append(z.detach().clone())
        return decode(z, *args, **kwargs)

    pipe.vae.decode_volume = recording
    return seen


def last_over_second(chunks: list) -> float:
    """RMS of the last of a volume's anatomy chunks over the RMS of its second."""
    return rms(chunks[-1]) / rms(chunks[1]) if len(chunks) >= 2 else float("nan")


def meta_option(parser) -> None:
    parser.add_argument(
        "--meta",
        choices=("line", "none", "typical"),
        default="line",
        help="the reports' slice-count meta line: as written (line), removed (none), or removed and"
        " replaced by one asking for the model's typical_slices (typical)",
    )


def conditioning(text: str, meta: str, pipe) -> tuple[str, int]:
    """The report generated from under ``--meta`` and the slice count it asks for (for ``none`` and
    ``typical``, the model's ``typical_slices`` at its own spacing, as the pipeline takes a report
    without a meta line)."""
    from ctflow.models.text import parse_meta, strip_meta, with_meta

    if meta == "line":
        return text, parse_meta(text)[0]
    bare, typical = strip_meta(text), int(pipe.config.get("typical_slices") or 0)
    return (bare if meta == "none" else with_meta(bare, typical, pipe.config["slice_spacing"])), typical


def main() -> dict:
    args, pipe = generation_setup(50, __doc__.splitlines()[0], meta_option, first_seed=SEED0)
    if args.meta != "line" and not args.result:
        raise SystemExit("embedded_quality.py: --meta needs --result NAME, so the default figures stay")
    name = args.result or result_name("embedded_quality", args.guidance)
    k = pipe.chunk_slices
    patch_slices = pipe.transformer.config.patch_size[0]
    try:
        from ctflow.eval.attributes import (
            attribute_accuracy,
            attribute_scores,
            attributes_from_report,
            attributes_from_scores,
        )
        from ctflow.eval.metrics import continuity
    except ImportError:  # the evaluation package is optional for this measurement
        attribute_scores = None
    # the nodule rule fitted through this VAE, scored beside the shipped one in the same read
    rules = {"vae_rule": vae_nodule_rule(pipe)} if attribute_scores is not None else None
    rows, previews, seconds = [], [], 0.0  # seconds: generation only (not the reader or the VAE ceiling)
    chunks = record_chunks(pipe)
    for i, (spec, phantom, _truth, text) in enumerate(heldout_reports(args.first_seed, args.n)):
        # the held-out phantom itself through the VAE: what a generator can score at most
        z_real, real = through_vae(pipe, phantom)
        chunks.clear()
        prompt, requested = conditioning(text, args.meta, pipe)
        t0 = time.perf_counter()
        out = generate(pipe, args, prompt, i, max_slices=200)
        seconds += time.perf_counter() - t0
        vol = out.volumes[0]
        row = {
            "seed": spec.seed,
            "requested": requested,
            "generated": vol.num_slices,
            "end": out.end_reasons[0],
            "within_chunk": abs(vol.num_slices - requested) <= k,
            "latent_rms_by_chunk": [round(rms(c), 3) for c in chunks],
            # generated: all chunks but the one where the scan ended; the phantom's own: its full chunks
            "latent_rms_late_over_early": round(last_over_second(chunks[:-1]), 3),
            "reconstruction_latent_rms_late_over_early": round(
                last_over_second([c for c in torch.split(z_real, k, dim=1) if c.shape[1] == k]), 3
            ),
        }
        if attribute_scores is not None:
            scores = attribute_scores(vol, nodule_rules=rules)
            real_scores = attribute_scores(real, nodule_rules=rules)
            row["pred"] = attributes_from_scores(scores)
            row["truth"] = attributes_from_report(text)
            row["continuity"] = continuity(vol, chunk=k)
            row["pred_reconstruction"] = attributes_from_scores(real_scores)
            row["nodule_vae_rule"] = attributes_from_scores(scores, "nodule_score_vae_rule")["nodule"]
            row["reconstruction_nodule_vae_rule"] = attributes_from_scores(
                real_scores, "nodule_score_vae_rule"
            )["nodule"]
            row["reconstruction_within_diff"] = continuity(real, chunk=k)["within_diff"]
            # patch seams: continuity's chunk-seam measure at the transformer's temporal patch size
            row["patch_seam_ratio"] = continuity(vol, chunk=patch_slices)["ratio"]
            row["reconstruction_patch_seam_ratio"] = continuity(real, chunk=patch_slices)["ratio"]
        rows.append(row)
        if i < 6:
            from ctflow.data.preview import triplanar_image

            previews.append(triplanar_image(vol))
        print(
            f"{i + 1}/{args.n}: requested {row['requested']} got {row['generated']} ({row['end']})",
            flush=True,
        )
    result = {
        "n": len(rows),
        "seeds": [args.first_seed, args.first_seed + args.n - 1],
        **generation_settings(args),
        **(
            {"meta": args.meta, "typical_slices": pipe.config.get("typical_slices")}
            if args.meta != "line"
            else {}
        ),
        "seconds_per_volume": round(seconds / len(rows), 2),
        "slice_count_within_one_chunk": round(float(np.mean([r["within_chunk"] for r in rows])), 3),
        "ended_by_eos": round(float(np.mean([r["end"] == "eos" for r in rows])), 3),
        "mean_abs_slice_error": round(
            float(np.mean([abs(r["generated"] - r["requested"]) for r in rows])), 2
        ),
        "latent_rms_late_over_early": round(
            float(np.nanmean([r["latent_rms_late_over_early"] for r in rows])), 3
        ),
        "reconstruction_latent_rms_late_over_early": round(
            float(np.nanmean([r["reconstruction_latent_rms_late_over_early"] for r in rows])), 3
        ),
        "rows": rows,
    }
    if attribute_scores is not None:
        result["attribute_accuracy"] = attribute_accuracy(
            [r["pred"] for r in rows], [r["truth"] for r in rows]
        )
        result.update(attribute_baselines(rows, result["attribute_accuracy"]))
        result["attribute_accuracy_vae_reconstruction"] = attribute_accuracy(
            [r["pred_reconstruction"] for r in rows], [r["truth"] for r in rows]
        )
        result["nodule_vae_rule"] = {
            name: nodule_calls(rows, key)
            for name, key in (
                ("generated", "nodule_vae_rule"),
                ("reconstruction", "reconstruction_nodule_vae_rule"),
            )
        }
        result["findings_found_vae_reconstruction"] = attribute_baselines(
            [{**r, "pred": r["pred_reconstruction"]} for r in rows], result["attribute_accuracy"]
        )["findings_found"]
        seams = [r["continuity"]["ratio"] for r in rows if np.isfinite(r["continuity"]["ratio"])]
        result["mean_seam_ratio"] = round(float(np.mean(seams)), 3)
        for key in ("patch_seam_ratio", "reconstruction_patch_seam_ratio"):
            result[key] = round(float(np.mean([r[key] for r in rows])), 3)
        result["flicker_vs_reconstruction"] = round(
            float(np.mean([r["continuity"]["within_diff"] for r in rows]))
            / float(np.mean([r["reconstruction_within_diff"] for r in rows])),
            3,
        )
    if previews:
        import imageio.v3 as iio

        width = max(p.shape[1] for p in previews)
        grid = np.concatenate([np.pad(p, ((0, 4), (0, width - p.shape[1]))) for p in previews], axis=0)
        iio.imwrite(RESULTS / f"{samples_name(name)}.png", grid.repeat(2, 0).repeat(2, 1))  # 2x, nearest
    write_result(name, result)
    return result


if __name__ == "__main__":
    main()
