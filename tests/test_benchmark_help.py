"""Every benchmark script answers --help and writes nothing: a script that took no options used to run
on --help and write over the results the docs quote."""

import runpy
import sys

import pytest

from tests.benchmark_module import BENCHMARKS

SCRIPTS = sorted(p for p in BENCHMARKS.glob("*.py") if p.name != "common.py")


def _results_state():
    return {p.name: p.stat().st_mtime_ns for p in (BENCHMARKS / "results").rglob("*") if p.is_file()}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_help_describes_the_script_and_writes_nothing(script, monkeypatch, capsys):
    before = _results_state()
    monkeypatch.setattr(sys, "argv", [script.name, "--help"])
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(script), run_name="__main__")
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: {script.name}")
    assert _results_state() == before
