"""Progress on stderr: a rich bar in a terminal; elsewhere (nohup, a job's log file) a plain line
every 30 seconds and at the end, where a bar would show nothing until the work was over."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field

PLAIN_EVERY_S = 30.0


def show_bar(console=None) -> bool:
    """Whether stderr (``console``'s file, when one is given) is a terminal a bar can redraw, or
    ``CTFLOW_PROGRESS=1`` asks for one."""
    if console is None:
        from rich.console import Console

        console = Console(stderr=True)
    return console.is_terminal or os.environ.get("CTFLOW_PROGRESS") == "1"


@dataclass
class _Task:
    description: str
    total: float | None
    completed: float = 0
    started: float = field(default_factory=time.monotonic)
    shown: float = field(default_factory=time.monotonic)
    ended: bool = False


class PlainProgress:
    """The part of rich's ``Progress`` the CLI uses (``add_task``, ``advance``, ``update``, ``tasks``, a
    context manager), written as a plain line ``DESCRIPTION done/total, elapsed, eta`` every ``every``
    seconds and when a task completes."""

    def __init__(self, every: float = PLAIN_EVERY_S):
        self.every = every
        self.tasks: list[_Task] = []

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def add_task(self, description: str, total: float | None = None, **_) -> int:
        self.tasks.append(_Task(description, total))
        return len(self.tasks) - 1

    def advance(self, task: int, advance: float = 1) -> None:
        self.update(task, completed=self.tasks[task].completed + advance)

    def update(
        self,
        task: int,
        completed: float | None = None,
        total: float | None = None,
        description: str | None = None,
        **_,
    ) -> None:
        t = self.tasks[task]
        if total is not None and t.total is not None and total > t.total:
            t.ended = False  # the work grew past what was expected (a scan running on): it goes on
        t.total = t.total if total is None else total
        t.completed = t.completed if completed is None else completed
        t.description = t.description if description is None else description
        now = time.monotonic()
        finished = t.total is not None and t.completed >= t.total
        if t.ended or not (finished or now - t.shown >= self.every):
            return
        t.shown, t.ended = now, finished
        elapsed = now - t.started
        line = f"{t.description} {t.completed:g}" + (f"/{t.total:g}" if t.total else "")
        line += f", {elapsed / 60:.1f} min"
        if t.total and 0 < t.completed < t.total:
            line += f", eta {elapsed / t.completed * (t.total - t.completed) / 60:.1f} min"
        print(line, file=sys.stderr, flush=True)
