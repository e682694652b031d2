import json
import zlib

import numpy as np
import pytest
import torch

from ctflow.data.ctrate import CTRateDataset
from ctflow.errors import CTFlowError, CTFlowWarning
from ctflow.models.text import ReportEncoder
from ctflow.models.vae import SliceVAE
from ctflow.pipeline import DEFAULT_MODEL
from ctflow.train.latents import (
    SENTENCE_BREAK,
    LatentCache,
    encode_dataset,
    latent_mask,
    prepare_slices,
    shortened_reports,
    strip_meta,
)
from tests.train.fake_cache import make_fake_cache


def test_strip_meta_removes_only_the_leading_meta_line():
    assert strip_meta("Volume: 40 slices, 2.5 mm spacing. Findings: clear.") == "Findings: clear."
    assert strip_meta("Findings: clear.") == "Findings: clear."


REPORT = (
    "Volume: 96 slices, 2.5 mm spacing. Findings: Trachea is open. Heart size is enlarged. In the lung"
    " parenchyma window; No emphysema was detected. A 12 mm nodule is seen in the right upper lobe. There"
    " is a left pleural effusion. Bone structures are intact. Impressions: Cardiomegaly. Left pleural"
    " effusion. 12 mm nodule in the right upper lobe."
)


def test_shortened_reports_drop_findings_sentences_but_keep_what_the_report_states():
    meta, rest = REPORT.split(" Findings: ")
    findings, impressions = rest.split(" Impressions: ")
    sentences = SENTENCE_BREAK.split(findings)
    assert len(sentences) == 7 and sentences[2] == "In the lung parenchyma window;"
    versions = shortened_reports(REPORT, 40, seed=3)
    assert versions == shortened_reports(REPORT, 40, seed=3) and versions != shortened_reports(REPORT, 40, 4)
    without_impressions = 0
    for v in versions:
        assert v.startswith(meta + " Findings: ")
        if "Impressions:" not in v:  # the Impressions dropped: every Findings sentence stays
            without_impressions += 1
            assert v == meta + " Findings: " + findings
            continue
        assert v.endswith(" Impressions: " + impressions)  # else all of the Impressions stay
        kept = SENTENCE_BREAK.split(v.split(" Findings: ")[1].split(" Impressions: ")[0])
        assert kept and kept == [s for s in sentences if s in kept]  # a subset, in order
    assert 2 <= without_impressions <= 16
    assert sum(len(v) < len(REPORT) - 90 for v in versions) >= 15  # many drop a third or more
    # nothing to drop without losing a stated finding: the report comes back whole
    assert (
        shortened_reports("Volume: 40 slices. Findings: Clear. Normal heart.", 3)
        == ["Volume: 40 slices. Findings: Clear. Normal heart."] * 3
    )
    assert shortened_reports("Impressions: Normal.", 2) == ["Impressions: Normal."] * 2
    assert shortened_reports(REPORT, 0) == []


def test_encode_writes_a_resumable_cache_with_both_report_variants(tmp_path, run_cli):
    assert (
        run_cli(
            "phantoms",
            "--n",
            2,
            "--out",
            tmp_path / "ph",
            "--size",
            64,
            "--min-slices",
            10,
            "--max-slices",
            12,
        ).code
        == 0
    )
    ds = CTRateDataset.open(tmp_path / "ph")
    vae, text = SliceVAE.load(DEFAULT_MODEL / "vae"), ReportEncoder.from_pretrained()
    encode_dataset(ds, vae, text, tmp_path / "lat", image_size=64, shard_size=1, report_variants=2)
    cache = LatentCache(tmp_path / "lat")
    v = cache[0]
    assert cache.report_variants == 2
    short = cache.rows[0][1]["short_reports"]
    assert short == shortened_reports(ds.load(0).report, 2, zlib.crc32(v.name.encode()))
    for j in range(2):  # each shortened report with and without its meta line
        torch.testing.assert_close(cache.tensor(0, f"pooled_short{j}"), text([short[j]]).pooled[0])
        torch.testing.assert_close(
            cache.tensor(0, f"pooled_short{j}_nometa"), text([strip_meta(short[j])]).pooled[0]
        )
    assert len(cache) == 2 and v.latents.shape == (8, v.num_slices, 16, 16)
    assert v.tokens.shape[0] > v.tokens_nometa.shape[0]  # the meta line adds tokens
    torch.testing.assert_close(v.pooled, text([ds.load(0).report]).pooled[0])
    alone = text([ds.load(0).report]).tokens[0]  # as encoded alone: no padding, float16
    torch.testing.assert_close(v.tokens, alone.half().float(), atol=2e-3, rtol=2e-3)
    assert cache.eos.shape == (8, 16, 16)
    for i in range(2):  # the phantoms' finding extents travel with their rows (FindingBoost reads them)
        assert cache.rows[i][1]["finding_slices"] == ds.load(i).finding_slices
    with pytest.raises(CTFlowError, match="--overwrite"):
        encode_dataset(ds, vae, text, tmp_path / "lat", image_size=64)
    (tmp_path / "lat" / "index.json").unlink()  # as if killed before the end: finished shards are kept
    stamp = (tmp_path / "lat" / "shard_00000.safetensors").stat().st_mtime_ns
    # a resume with other settings would mix shards: refused, naming the setting
    with pytest.raises(CTFlowError, match=r"number of report variants \(2 there, 0 now\); pass --overwrite"):
        encode_dataset(ds, vae, text, tmp_path / "lat", image_size=64, shard_size=1)
    with pytest.raises(CTFlowError, match=r"shard size \(1 there, 2 now\)"):
        encode_dataset(ds, vae, text, tmp_path / "lat", image_size=64, shard_size=2, report_variants=2)
    # the same names with other contents (phantoms made again between the stop and the resume)
    changed = CTRateDataset.open(tmp_path / "ph")
    changed.records[1].findings += " A new sentence."
    with pytest.raises(CTFlowError, match=r"different data set contents \(sha256\)"):
        encode_dataset(changed, vae, text, tmp_path / "lat", image_size=64, shard_size=1, report_variants=2)
    r = run_cli(
        "encode", "--data", tmp_path / "ph", "--vae", DEFAULT_MODEL / "vae", "--out", tmp_path / "lat"
    )
    assert r.code != 0 and "--overwrite" in r.err  # the CLI: the same refusal
    args = ("--vae", DEFAULT_MODEL / "vae", "--out", tmp_path / "lat", "--shard-size", 1, "--report-variants")
    r = run_cli("encode", "--data", tmp_path / "ph", *args, 2)
    assert r.code == 0 and "encoded 2 volumes" in r.err  # (status lines go to stderr)
    assert "slices are resized to 64x64 px, the VAE's sample_size" in r.err
    assert (tmp_path / "lat" / "shard_00000.safetensors").stat().st_mtime_ns == stamp
    assert len(LatentCache(tmp_path / "lat")) == 2


def test_a_shard_of_unreadable_volumes_is_skipped_and_a_resume_reads_the_data_by_any_path(tmp_path, run_cli):
    """A shard whose every volume was unreadable crashed in the report encoder (an empty batch); a
    resume that spelled the data folder another way was refused as another data set."""
    assert run_cli("phantoms", "--n", 2, "--out", tmp_path / "ph", "--size", 32, "--min-slices", 8,
                   "--max-slices", 9).code == 0  # fmt: skip
    ds = CTRateDataset.open(tmp_path / "ph")
    broken = ds.volume_path(ds.records[1].name)
    broken.write_bytes(broken.read_bytes()[:100])
    vae, text = SliceVAE.load(DEFAULT_MODEL / "vae"), ReportEncoder.from_pretrained()
    encode_dataset(ds, vae, text, tmp_path / "lat", image_size=32, shard_size=1)
    assert len(LatentCache(tmp_path / "lat")) == 1
    (tmp_path / "lat" / "index.json").unlink()  # as if stopped: a resume by another spelling of the path
    stamp = json.loads((tmp_path / "lat" / "encoding.json").read_text())
    del stamp["report tokenizer (sha256)"]  # and begun before the tokenizer was recorded
    (tmp_path / "lat" / "encoding.json").write_text(json.dumps(stamp))
    other = CTRateDataset.open(tmp_path / "ph" / ".." / "ph")
    encode_dataset(other, vae, text, tmp_path / "lat", image_size=32, shard_size=1)
    first = ds.volume_path(ds.records[0].name)
    first.write_bytes(first.read_bytes()[:100])
    with pytest.raises(CTFlowError, match="no volume of .* could be encoded"):
        encode_dataset(CTRateDataset.open(tmp_path / "ph"), vae, text, tmp_path / "none", image_size=32)


def test_a_report_cut_at_the_encoders_limit_is_named_once_by_its_volume(tmp_path, run_cli):
    import csv
    import warnings

    assert run_cli("phantoms", "--n", 2, "--out", tmp_path / "ph", "--size", 32, "--min-slices", 6,
                   "--max-slices", 8).code == 0  # fmt: skip
    path = tmp_path / "ph" / "radiology_text_reports" / "train_reports.csv"
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows, columns = list(reader), reader.fieldnames
    rows[1]["Findings_EN"] += " The lungs are clear." * 80
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    ds = CTRateDataset.open(tmp_path / "ph")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        encode_dataset(ds, SliceVAE.load(DEFAULT_MODEL / "vae"), ReportEncoder.from_pretrained(),
                       tmp_path / "lat", image_size=32, report_variants=2)  # fmt: skip
    cut = [str(w.message) for w in seen if "truncated" in str(w.message)]
    assert len(cut) == 1 and cut[0].startswith(f"{rows[1]['VolumeName']}: report truncated by")
    assert not [w for w in seen if "upsampled" in str(w.message)]  # 32 px slices at image_size 32
    with pytest.warns(CTFlowWarning) as seen:  # a VAE input larger than the slices: said, once
        encode_dataset(ds, SliceVAE.load(DEFAULT_MODEL / "vae"), ReportEncoder.from_pretrained(),
                       tmp_path / "up", image_size=64)  # fmt: skip
    up = [str(w.message) for w in seen if "upsampled" in str(w.message)]
    assert len(up) == 1
    assert up[0].startswith(f"{rows[0]['VolumeName']} (32x32) and 1 more volumes were upsampled to 64x64 px")


def test_encode_overwrite_encodes_again_with_the_new_vae_and_settings(tmp_path, run_cli):
    assert (
        run_cli(
            "phantoms", "--n", 2, "--out", tmp_path / "ph", "--size", 64, "--min-slices", 8, "--max-slices", 9
        ).code
        == 0
    )
    ds = CTRateDataset.open(tmp_path / "ph")
    vae, text = SliceVAE.load(DEFAULT_MODEL / "vae"), ReportEncoder.from_pretrained()
    lat = tmp_path / "lat"
    encode_dataset(ds, vae, text, lat, image_size=64, shard_size=1, report_variants=1)
    retrained = SliceVAE.load(DEFAULT_MODEL / "vae")
    with torch.no_grad():  # a VAE retrained: other weights, so other latents
        for p in retrained.vae.encoder.parameters():
            p.mul_(1.05)
    with pytest.raises(CTFlowError, match="--overwrite"):  # a finished cache is never replaced silently
        encode_dataset(ds, retrained, text, lat, image_size=64, shard_size=2)
    (lat / "index.json").unlink()  # an unfinished one is not resumed with another VAE either
    with pytest.raises(CTFlowError, match=r"different VAE \(weights sha256\)"):
        encode_dataset(ds, retrained, text, lat, image_size=64, shard_size=2)
    encode_dataset(ds, retrained, text, lat, image_size=64, shard_size=2, overwrite=True)
    cache = LatentCache(lat)
    # one shard of two volumes, not the old two shards: no stale shard stays to be trained on
    assert sorted(p.name for p in lat.glob("shard_*")) == ["shard_00000.json", "shard_00000.safetensors"]
    assert len(cache) == 2 and cache.report_variants == 0 and "short_reports" not in cache.rows[0][1]
    x = prepare_slices(ds.load(0).volume.hu(), 64, retrained.hu_window)
    torch.testing.assert_close(cache[0].latents, retrained.encode_volume(x).half().float())
    torch.testing.assert_close(cache.eos, retrained.encode_slices(torch.ones(1, 1, 64, 64))[0].float())


def test_latent_mask_is_the_share_of_each_latent_pixel_a_finding_covers():
    mask = np.zeros((2, 64, 64), bool)
    mask[0, :16, :6] = True  # 4x4-pixel footprints: latent rows 0-3 fully, column 1 half covered
    m = latent_mask(mask, 64, 16)
    assert m.shape == (2, 16, 16)
    assert (
        m[0, :4, 0].eq(1).all() and m[0, :4, 1].eq(0.5).all() and m[0].sum() == 4 * 1.5 and m[1].eq(0).all()
    )
    big = np.kron(mask, np.ones((1, 2, 2), bool))  # a 128-pixel volume resized to the 64-pixel VAE input
    torch.testing.assert_close(latent_mask(big, 64, 16), m)


def test_encode_stores_finding_masks_on_the_latent_grid(tmp_path, run_cli):
    args = ("--out", tmp_path / "ph", "--size", 64, "--min-slices", 10, "--max-slices", 12, "--seed", 3)
    assert run_cli("phantoms", "--n", 2, *args).code == 0
    enc = ("encode", "--data", tmp_path / "ph", "--vae", DEFAULT_MODEL / "vae", "--shard-size", 1)
    assert run_cli(*enc, "--out", tmp_path / "lat", "--finding-masks").code == 0
    cache, ds = LatentCache(tmp_path / "lat"), CTRateDataset.open(tmp_path / "ph")
    assert cache.finding_masks and cache.index["finding_masks"] is True
    for i in range(2):
        m = cache.tensor(i, "finding_mask")
        assert m.shape == (cache.num_slices(i), 16, 16)
        torch.testing.assert_close(m, latent_mask(ds.finding_mask(i), 64, 16), atol=1e-3, rtol=0)
    assert not LatentCache(make_fake_cache(tmp_path / "plain")).finding_masks
    (tmp_path / "lat" / "index.json").unlink()  # resuming must not mix shards with and without masks
    with pytest.raises(
        CTFlowError, match=r"different finding-mask setting \(True there, False now\); pass --overwrite"
    ):
        encode_dataset(
            ds, SliceVAE.load(DEFAULT_MODEL / "vae"), ReportEncoder.from_pretrained(), tmp_path / "lat", 64, 1
        )
    for sidecar in (tmp_path / "ph").rglob("*_1.json"):
        sidecar.unlink()  # no ground truth beside the volumes (CT-RATE itself): no masks to store
    r = run_cli(*enc, "--out", tmp_path / "lat2", "--finding-masks")
    assert r.code != 0 and "train_1_a_1.nii.gz and 1 more have no phantom ground truth" in r.err
    assert "encode without --finding-masks" in r.err and not (tmp_path / "lat2").exists()  # refused up front


def test_latent_cache_reads_volumes_from_their_shards_on_demand(tmp_path):
    from safetensors.torch import load_file

    folder = make_fake_cache(tmp_path / "c", n=7, shard_size=2)  # 4 shards
    cache = LatentCache(folder, open_shards=2)
    assert len(cache) == 7 and cache._open == {}  # nothing read until asked
    written = {}
    for shard in sorted(folder.glob("shard_*.safetensors")):
        written.update(load_file(shard))
    for i in (6, 0, 3, 6, 1):
        v = cache[i]
        assert v.latents.dtype == torch.float32 and v.num_slices == cache.num_slices(i) == v.latents.shape[1]
        for key in ("latents", "tokens", "pooled", "tokens_nometa", "pooled_nometa"):
            torch.testing.assert_close(getattr(v, key), written[f"{v.name}.{key}"].float())
        assert len(cache._open) <= 2  # at most open_shards shards held
    assert [v.name for v in cache] == [r["name"] for _, r in cache.rows]


def test_a_cache_whose_index_disagrees_with_its_shards_is_refused_with_the_fix(tmp_path):
    from ctflow.train.config import FlowTrainConfig
    from ctflow.train.flow_trainer import ChunkSampler

    folder = make_fake_cache(tmp_path / "c", n=1)
    rows = json.loads((folder / "shard_00000.json").read_text())
    rows[0]["num_slices"] = 40  # the shard holds 5
    (folder / "shard_00000.json").write_text(json.dumps(rows))
    sampler = ChunkSampler(LatentCache(folder), 4, FlowTrainConfig())
    with pytest.raises(CTFlowError, match="re-encode"):
        sampler.batch(2, torch.Generator().manual_seed(0))
    rows[0]["num_slices"] = 6  # as many chunks as 5 slices make, but not the count the model is given
    (folder / "shard_00000.json").write_text(json.dumps(rows))
    sampler = ChunkSampler(LatentCache(folder), 4, FlowTrainConfig())
    with pytest.raises(CTFlowError, match="has 5 latent slices but its index says 6"):
        sampler.batch(2, torch.Generator().manual_seed(0))


def test_encode_under_several_processes_is_refused(tmp_path, run_cli, monkeypatch):
    """Under torchrun every process encoded every volume into the same folder."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    r = run_cli(
        "encode", "--data", tmp_path / "ph", "--vae", DEFAULT_MODEL / "vae", "--out", tmp_path / "lat"
    )
    assert r.code != 0 and "runs in one process" in r.err and not (tmp_path / "lat").exists()
