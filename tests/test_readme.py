"""The README's and docs/'s numbers point at files in the repo, their commands run as written, their
links resolve and their tables render."""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC_NAMES = ["README.md"] + sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))
DOCS = {name: (ROOT / name).read_text() for name in DOC_NAMES}
RESULTS = sorted(p.name for p in (ROOT / "benchmarks" / "results").iterdir())
FENCE = re.compile(r"^```([a-z]*)\n(.*?)^```", flags=re.M | re.S)  # (language, body) of a fenced block


def tables(text: str) -> list[list[str]]:
    """Each markdown table as its lines (a run of lines starting with '|')."""
    found, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            found.append(current)
            current = []
    return found


def cells(row: str) -> int:
    return len(row.strip().strip("|").split("|"))


@pytest.mark.parametrize("doc", DOCS)
def test_tables_have_one_column_count(doc):
    bad = []
    for table in tables(DOCS[doc]):
        widths = {cells(row) for row in table}
        if len(widths) != 1 or not re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", table[1].strip()):
            bad.append(table[0][:70])
    assert not bad, f"tables with rows of different widths or no separator row: {bad}"


def test_table_checker_catches_a_short_separator():
    assert {cells(r) for r in tables("| a | b | c |\n|---|---|\n| 1 | 2 | 3 |\n")[0]} == {2, 3}


KINDS = ["configs/*.yaml", "benchmarks/*.py", "benchmarks/results/*.json", "examples/*"]


def named_files(text: str, kind: str) -> set[str]:
    folder, pattern = kind.rsplit("/", 1)
    names = {n.rstrip(".") for n in re.findall(re.escape(folder) + r"/([A-Za-z0-9_.-]+)", text)}
    return {n for n in names if fnmatch.fnmatch(n, pattern)}


@pytest.mark.parametrize("doc", DOCS)
@pytest.mark.parametrize("kind", KINDS)
def test_named_files_exist(doc, kind):
    folder = kind.rsplit("/", 1)[0]
    missing = sorted(n for n in named_files(DOCS[doc], kind) if not (ROOT / folder / n).is_file())
    assert not missing, f"{doc} names {kind} files that do not exist: {missing}"


@pytest.mark.parametrize("kind", KINDS)
def test_the_docs_still_name_files_the_way_the_checks_read(kind):
    assert named_files(DOCS["README.md"], kind), f"the README names no {kind}: has the pattern gone stale?"


RESULT_NAME = re.compile(
    r"`((?:exp_|embedded_|text_use|laterality|free_text|effusion_probe)[A-Za-z0-9_.*]*)`"
)


@pytest.mark.parametrize("doc", DOCS)
def test_named_result_files_exist(doc):
    """Results named by file name alone (`exp_x.json`, or a glob such as `exp_x_*`) match a stored file."""
    names = {n for n in RESULT_NAME.findall(DOCS[doc]) if not n.endswith(".py")}
    missing = sorted(n for n in names if not fnmatch.filter(RESULTS, n if "*" in n or "." in n else n + "*"))
    assert not missing, f"{doc} names results that benchmarks/results does not hold: {missing}"


def test_result_names_are_still_found():
    """The pattern still matches how the docs name results."""
    assert len(RESULT_NAME.findall(DOCS["docs/results.md"])) > 3


def slug(heading: str) -> str:
    """GitHub's anchor for a markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def link_problems(doc: str, text: str) -> list[str]:
    """Relative links and images in a doc (``[x](path#anchor)``) whose file or heading does not exist."""
    here = (ROOT / doc).parent
    problems = []
    for target in re.findall(r"\]\(([^)\s]+)\)", FENCE.sub("", text)):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        file = (here / path).resolve()
        if path and not file.is_file():
            problems.append(f"no file for {target}")
        elif anchor and (not path or file.suffix == ".md"):
            headings = re.findall(r"^#+ (.+)$", FENCE.sub("", file.read_text() if path else text), flags=re.M)
            if anchor not in {slug(h) for h in headings}:
                problems.append(f"no heading for {target}")
    return problems


@pytest.mark.parametrize("doc", DOCS)
def test_links_resolve(doc):
    problems = link_problems(doc, DOCS[doc])
    assert not problems, f"{doc}: " + "; ".join(problems)


def test_link_checker_catches_missing_files_and_headings():
    text = """# A heading, with: punctuation!\n[ok](#a-heading-with-punctuation) [file](docs/model.md)
[bad](#no-such-heading) ![img](nowhere.png) [deep](docs/results.md#not-there) [web](https://x.org/a)"""
    problems = link_problems("README.md", text)
    assert len(problems) == 3
    assert all(any(w in p for p in problems) for w in ("#no-such-heading", "nowhere.png", "#not-there"))


def code(text: str) -> list[str]:
    """The doc's code: each line of its fenced blocks (backslash continuations joined, comments cut)
    and each inline code span (line breaks inside it read as spaces)."""
    lines = [
        re.split(r"\s#\s", line)[0]
        for _, block in FENCE.findall(text)
        for line in re.sub(r"\\\n\s*", " ", block).splitlines()
    ]
    return lines + [span.replace("\n", " ") for span in re.findall(r"`([^`]+)`", FENCE.sub("", text))]


COMMAND = re.compile(
    r"(?:^|[\s;(])(ctflow|-m ctflow\.cli|(?:\S*python )?-m ctflow\.train\.default"
    r"|(?:\S*python )?benchmarks/(\w+)\.py|make)(?=\s|$)"
)


def command_problems(text: str) -> tuple[list[str], int]:
    """Commands in the doc's code that would fail as written: an unknown ``ctflow`` command or option,
    an option a benchmark script or the recipe (``python -m ctflow.train.default``) does not define,
    a make target the Makefile lacks. Also how many commands were checked."""
    import typer

    from ctflow.cli import app

    cli, makefile = typer.main.get_command(app), (ROOT / "Makefile").read_text()
    problems, checked = [], 0
    for line in code(text):
        for m in COMMAND.finditer(line):
            rest = line[m.end() :]
            following = COMMAND.search(rest)  # a second command on the line is checked on its own
            rest = rest[: following.start()] if following else rest
            words, options = rest.split(), set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", rest))
            head = m.group(1)
            if not words and head in ("ctflow", "make"):
                continue  # the tool's name in a sentence
            checked += 1
            if head == "make":
                if not re.search(rf"^{re.escape(words[0])}:", makefile, flags=re.M):
                    problems.append(f"no make target {words[0]!r}: {line.strip()}")
                continue
            if head in ("ctflow", "-m ctflow.cli"):
                command = cli.commands.get(words[0])
                if command is not None and hasattr(command, "commands"):  # a group: convert ctclip
                    command = command.commands.get(words[1]) if len(words) > 1 else None
                if command is None:
                    problems.append(f"no such ctflow command: {line.strip()}")
                    continue
                known = {o for p in command.params for o in (*p.opts, *p.secondary_opts)} | {"--help"}
                unknown = options - known
            else:
                script = ROOT / (
                    "src/ctflow/train/default.py" if m.group(2) is None else f"benchmarks/{m.group(2)}.py"
                )
                if not script.is_file():
                    problems.append(f"no such script: {line.strip()}")
                    continue
                source = script.read_text() + (ROOT / "benchmarks/common.py").read_text()  # shared options
                unknown = {o for o in options if f'"{o}"' not in source}
            if unknown:
                problems.append(f"unknown options {sorted(unknown)}: {line.strip()}")
    return problems, checked


@pytest.mark.parametrize("doc", DOCS)
def test_commands_in_the_docs_run_as_written(doc):
    problems, _ = command_problems(DOCS[doc])
    assert not problems, f"{doc}: " + "\n".join(problems)


def test_the_command_pattern_still_finds_the_docs_commands():
    checked = {
        doc: command_problems(DOCS[doc])[1] for doc in ("README.md", "docs/results.md", "docs/experiments.md")
    }
    assert all(n > 20 for n in checked.values()), checked


def test_command_checker_catches_unknown_commands_options_scripts_and_targets():
    doc = """Run `ctflow generate "r" --out a.nii.gz --slicez 9` or
```bash
ctflow convert ctclip x.pt --out d --tokeniser t   # a comment --not-an-option
ctflow frobnicate --out x
python benchmarks/laterality.py --n 24 --frist-seed 3
python benchmarks/nowhere.py
python -m ctflow.train.default --work runs/x \\
    --flow-config c.yaml --no-such-flag
make tset
```
and `make demo`, `ctflow generate --report-file r.txt --out x.nii.gz --overwrite` are fine."""
    problems, checked = command_problems(doc)
    assert checked == 9
    wanted = ["--slicez", "--tokeniser", "frobnicate", "--frist-seed", "nowhere", "--no-such-flag", "tset"]
    assert len(problems) == len(wanted)
    assert all(sum(w in p for p in problems) == 1 for w in wanted), problems


def test_the_library_example_runs_as_written(tmp_path, monkeypatch):
    """The README's Python block, run as it stands, writes the volume it promises."""
    from ctflow.data.nifti import read_nifti

    blocks = [body for language, body in FENCE.findall(DOCS["README.md"]) if language == "python"]
    assert len(blocks) == 1
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    assert namespace["out"].end_reasons[0] == "num_slices"
    assert read_nifti(tmp_path / "ct.nii.gz").array.shape[0] == 80
