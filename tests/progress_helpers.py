"""RecordingProgress: a :class:`sieve.progress.Progress` that remembers every step it was given."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from sieve.progress import Advance


@dataclass
class Step:
    """One ``progress.task``: what it said, its total, and every ``advance(n)`` made inside it."""

    description: str
    total: int | None
    advances: list[int] = field(default_factory=list)
    finished: bool = False

    @property
    def done(self) -> int:
        return sum(self.advances)


class RecordingProgress:
    """Records the steps; an advance after its step ended fails the test."""

    def __init__(self) -> None:
        self.steps: list[Step] = []

    @contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Advance]:
        step = Step(description, total)
        self.steps.append(step)

        def advance(n: int) -> None:
            assert not step.finished, f"advance({n}) after the step {description!r} ended"
            step.advances.append(n)

        yield advance
        step.finished = True

    def seen(self) -> list[tuple[str, int | None, int]]:
        """``(description, total, units advanced)`` of every step, in order."""
        return [(step.description, step.total, step.done) for step in self.steps]
