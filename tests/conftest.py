import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run several times faster on one thread than on two on a shared CPU."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class CLIResult:
    def __init__(self, code: int, out: str, err: str):
        self.code, self.out, self.err = code, out, err

    @property
    def error_line(self) -> str:
        lines = [line for line in self.err.strip().splitlines() if line.strip()]
        return lines[-1] if lines else ""


@pytest.fixture
def run_cli(capsys):
    """Run ``ctflow ARGS`` in-process and return its exit code and output."""
    from ctflow.cli import console, main

    def run(*args) -> CLIResult:
        capsys.readouterr()
        import sys

        console.file = sys.stderr  # capsys replaces sys.stderr per test
        try:
            code = main([str(a) for a in args])
        finally:
            # None: back to whatever sys.stderr is then (the console's default), not pinned to this
            # test's capture stream, which is closed once the test ends
            console.file = None
        captured = capsys.readouterr()
        return CLIResult(code, captured.out, captured.err)

    return run


def assert_clean_error(result: CLIResult, *words: str) -> None:
    """Non-zero exit, one `error:` line naming the problem, and no traceback."""
    assert result.code != 0, result.err
    assert "Traceback" not in result.err
    line = result.error_line
    assert line.startswith("error:"), result.err
    for w in words:
        assert w.lower() in line.lower(), f"{w!r} not in {line!r}"
