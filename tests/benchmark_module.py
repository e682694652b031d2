"""Load a script of ``benchmarks/`` as a module, for tests of its pieces (benchmarks are not a package)."""

import importlib.util
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str):
    """``benchmarks/{name}.py``, executed as a fresh module (its ``if __name__ == "__main__"`` part not run)."""
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def table_rows(text: str) -> dict[str, list[str]]:
    """A benchmark's printed markdown table as {first cell: the rest of the row split on ' | '} (the
    last cell keeps its closing ' |'), for asserting its cells."""
    return {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1:] for line in text.splitlines()}
