"""Progress where no terminal shows a bar: plain lines, and one process's progress under torchrun."""

from ctflow.progress import PlainProgress


def test_plain_progress_prints_a_line_at_each_interval_and_at_the_end(capsys):
    with PlainProgress(every=0.0) as bar:
        task = bar.add_task("encode", total=4)
        bar.advance(task)
        bar.update(task, completed=4, description="encode all")
        bar.advance(task)  # past the end: nothing more
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("encode 1/4, ") and ", eta " in lines[0]
    assert lines[1].startswith("encode all 4/4, ") and "eta" not in lines[1] and len(lines) == 2
    grown = PlainProgress(every=0.0)  # the scan ran past the chunks expected: the total grows, lines go on
    task = grown.add_task("generate", total=2)
    for done, total in ((2, 2), (3, 3)):
        grown.update(task, completed=done, total=total)
    assert [line.split(",")[0] for line in capsys.readouterr().err.splitlines()] == [
        "generate 2/2",
        "generate 3/3",
    ]
    quiet = PlainProgress(every=3600.0)
    task = quiet.add_task("generate", total=None)
    quiet.update(task, completed=3, total=10)  # mid-way, before the interval: silent
    assert capsys.readouterr().err == "" and quiet.tasks[0].total == 10


def test_the_cli_writes_plain_progress_lines_to_a_log_and_none_from_other_processes(
    run_cli, tmp_path, monkeypatch
):
    """encode or phantoms in a job's log showed nothing until they were over; under torchrun every
    process drew its own bar on one line."""
    monkeypatch.delenv("CTFLOW_PROGRESS", raising=False)
    r = run_cli(
        "phantoms", "--n", 2, "--size", 32, "--min-slices", 6, "--max-slices", 8, "--out", tmp_path / "a"
    )
    assert r.code == 0 and "phantoms 2/2, " in r.err
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    r = run_cli(
        "phantoms", "--n", 2, "--size", 32, "--min-slices", 6, "--max-slices", 8, "--out", tmp_path / "b"
    )
    assert r.code == 0 and "phantoms 2/2" not in r.err
