"""The command line's :class:`~sieve.progress.Progress`: a rich progress display on stderr.

Each task is a line: spinner, description, bar, done/total and elapsed time. Nested
tasks share one display, which stops when the outermost task ends. Off a terminal,
or with ``--quiet``, the commands pass :data:`~sieve.progress.SILENT` instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.progress import Progress as RichDisplay

from sieve.progress import SILENT, Advance, Progress


class RichProgress:
    """Draws long work's tasks on ``console`` while they run; finished tasks stay on screen."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self._display: RichDisplay | None = None
        self._open = 0

    @contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Advance]:
        """Show a task of ``total`` units (None: unknown, a pulsing bar); yield its ``advance(n)``."""
        display = self._enter()
        task_id = display.add_task(description, total=total)
        try:
            yield lambda n: display.advance(task_id, n)
        finally:
            self._finish(display, task_id, total)
            self._leave()

    def _enter(self) -> RichDisplay:
        if self._display is None:
            self._display = RichDisplay(
                SpinnerColumn(),
                TextColumn("[progress.description]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=self.console,
            )
            self._display.start()
        self._open += 1
        return self._display

    @staticmethod
    def _finish(display: RichDisplay, task_id: TaskID, total: int | None) -> None:
        if total is None:  # a task of unknown size is as big as it got
            (task,) = [task for task in display.tasks if task.id == task_id]
            display.update(task_id, total=task.completed)
        display.stop_task(task_id)

    def _leave(self) -> None:
        self._open -= 1
        if self._open == 0 and self._display is not None:
            self._display.stop()
            self._display = None


def progress_for(console: Console, *, quiet: bool = False) -> Progress:
    """A :class:`RichProgress` on ``console`` when it is a terminal and not ``quiet``; else SILENT."""
    if quiet or not console.is_terminal:
        return SILENT
    return RichProgress(console)
