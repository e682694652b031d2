import json

from tests.benchmark_module import load_benchmark, table_rows


def row(effusion: str, nodule: bool, pred_effusion: str, pred_nodule: bool, vae_nodule: bool = False) -> dict:
    truth = {
        "effusion": effusion,
        "cardiomegaly": False,
        "nodule": nodule,
        "emphysema": False,
        "consolidation": False,
    }
    return {
        "truth": truth,
        "pred": {**truth, "effusion": pred_effusion, "nodule": pred_nodule},
        "pred_reconstruction": {**truth, "nodule": vae_nodule},
    }


def test_a_plus_column_counts_the_reports_of_both_results_together(tmp_path, monkeypatch):
    table = load_benchmark("findings_table")
    monkeypatch.setattr(table, "RESULTS", tmp_path)
    a = [row("left", True, "left", False), row("none", False, "right", False)]  # effusion found; one false
    b = [row("right", False, "left", False), row("none", True, "none", True)]  # wrong side; nodule found
    for name, rows in (("a", a), ("b", b)):
        (tmp_path / f"{name}.json").write_text(json.dumps({"rows": rows}))
    lines = table_rows(table.table(["a", "b", "a+b"]))
    assert lines["effusion found"] == ["1/1", "0/1", "1/2 |"]
    assert lines["effusion found, any side"] == ["1/1", "1/1", "2/2 |"]
    assert lines["nodule found"] == ["0/1", "1/1", "1/2 |"]
    assert lines["all false findings"] == ["1", "0", "1 |"]


def test_a_vae_column_counts_the_reconstructions_of_the_same_reports(tmp_path, monkeypatch):
    table = load_benchmark("findings_table")
    monkeypatch.setattr(table, "RESULTS", tmp_path)
    # generated: an effusion on the wrong side, no nodule; through the VAE: the effusion right, a
    # nodule called where none was reported
    rows = [row("left", False, "right", False, vae_nodule=True)]
    (tmp_path / "a.json").write_text(json.dumps({"rows": rows}))
    lines = table_rows(table.table(["a", "a:vae"]))
    assert lines["effusion found"] == ["0/1", "1/1 |"]
    assert lines["false nodule"] == ["0", "1 |"]


def test_false_consolidations_are_split_by_whether_the_report_names_an_effusion(tmp_path, monkeypatch):
    table = load_benchmark("findings_table")
    monkeypatch.setattr(table, "RESULTS", tmp_path)
    dense = {"consolidation": True}
    rows = [
        row("left", False, "none", False),  # the effusion drawn as dense tissue: a false consolidation
        row("right", False, "right", False),  # the effusion drawn as fluid
        row("none", False, "none", False),  # nothing named, nothing read
        row("none", True, "none", True),  # a nodule named; a consolidation read
    ]
    rows[0]["pred"].update(dense)
    rows[3]["pred"].update(dense)
    rows.append({**row("left", False, "left", False), "truth": {**rows[0]["truth"], "consolidation": True}})
    (tmp_path / "a.json").write_text(json.dumps({"rows": rows}))
    lines = table_rows(table.table(["a"]))
    assert lines["false consolidation where the report names an effusion"] == ["1/2 |"]
    assert lines["false consolidation where the report names no effusion"] == ["1/2 |"]
    assert lines["false consolidation"] == ["2 |"]


def test_the_refitted_nodule_rule_rows_count_its_calls_and_mark_older_results(tmp_path, monkeypatch):
    table = load_benchmark("findings_table")
    monkeypatch.setattr(table, "RESULTS", tmp_path)
    rows = [
        row("none", True, "none", True),
        row("none", False, "none", True),
        row("none", False, "none", False),
    ]
    # the refitted rule: misses the reported nodule, calls none where none was reported; through the VAE
    # it finds the reported one and calls one false
    for r, gen, rec in zip(rows, (False, False, False), (True, True, False), strict=True):
        r["nodule_vae_rule"], r["reconstruction_nodule_vae_rule"] = gen, rec
    (tmp_path / "new.json").write_text(json.dumps({"rows": rows}))
    (tmp_path / "old.json").write_text(json.dumps({"rows": [row("none", True, "none", True)]}))
    lines = table_rows(table.table(["new", "new:vae", "old"]))
    assert lines["nodule found"] == ["1/1", "0/1", "1/1 |"]  # the shipped rule's calls
    assert lines["false nodule"] == ["1", "0", "0 |"]
    assert lines["nodule found, rule fitted through the VAE"] == ["0/1", "1/1", "– |"]
    assert lines["false nodule, rule fitted through the VAE"] == ["0", "1", "– |"]
