import json

import pytest

from tests.benchmark_module import load_benchmark, table_rows


def laterality(drawn: int, named: int, following: int) -> dict:
    return {"volumes": 48, "drawn": drawn, "on_named_side": named, "on_other_side": 0, "bilateral": 0,
            "side_shift_ml": 20.0, "pairs_following_side": following, "pairs_read": 24}  # fmt: skip


def nodules(found: int, false: int, vae_rule: bool = True) -> dict:
    counts = {"pairs": 24, "found": found, "false": false, "pairs_following_report": 12, "pairs_read": 24,
              "mean_score_shift": 0.3}  # fmt: skip
    return {**counts, "found_vae_rule": 1, "false_vae_rule": 0} if vae_rule else counts


def write(folder, name, generated, real=None):
    (folder / f"{name}.json").write_text(json.dumps({"generated": generated, "real_through_vae": real}))


def test_a_plus_column_sums_the_counts_of_both_seed_sets(tmp_path, monkeypatch):
    table = load_benchmark("pairs_table")
    monkeypatch.setattr(table, "RESULTS", tmp_path)
    write(tmp_path, "a", laterality(26, 25, 19), laterality(43, 42, 24))
    write(tmp_path, "b", laterality(26, 24, 22))
    lines = table_rows(table.table(["a", "b", "a+b", "a:vae"]))
    assert lines["volumes with fluid"] == ["26/48", "26/48", "52/96", "43/48 |"]
    assert lines["fluid on the named side alone"] == ["25/48", "24/48", "49/96", "42/48 |"]
    assert lines["pairs whose fluid follows the side"] == ["19/24", "22/24", "41/48", "24/24 |"]


def test_nodule_pairs_count_found_minus_false_and_mark_results_without_the_refitted_rule(
    tmp_path, monkeypatch
):
    table = load_benchmark("pairs_table")
    monkeypatch.setattr(table, "RESULTS", tmp_path)
    write(tmp_path, "new", nodules(3, 2))
    write(tmp_path, "old", nodules(6, 4, vae_rule=False))
    lines = table_rows(table.table(["new", "new+old", "old"]))
    assert lines["nodule found under the nodule report"] == ["3/24", "9/48", "6/24 |"]
    assert lines["found minus false"] == ["1", "3", "2 |"]
    # pooling an older result leaves the refitted rule's count out rather than undercounting it
    assert lines["nodule report, rule fitted through the VAE"] == ["1/24", "–", "– |"]


def test_it_refuses_columns_of_two_probes_and_results_of_neither(tmp_path, monkeypatch):
    table = load_benchmark("pairs_table")
    monkeypatch.setattr(table, "RESULTS", tmp_path)
    write(tmp_path, "side", laterality(1, 1, 1))
    write(tmp_path, "nod", nodules(1, 0))
    (tmp_path / "quality.json").write_text(json.dumps({"rows": []}))
    with pytest.raises(SystemExit, match="one probe at a time"):
        table.table(["side", "nod"])
    with pytest.raises(SystemExit, match="different probes"):
        table.table(["side+nod"])
    with pytest.raises(SystemExit, match="neither a laterality.py nor a nodule_pairs.py result"):
        table.table(["quality"])
    with pytest.raises(SystemExit, match="no result"):
        table.table(["missing"])
