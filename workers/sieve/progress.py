"""Progress of long work (syncing routes, building, evaluating, fitting, replaying, exporting).

The work reports through a :class:`Progress`; it never draws anything itself. The CLI
passes one that draws a rich progress bar on a terminal (``sieve.cli.progress``), and
everything else gets :data:`SILENT`, so library calls and tests stay quiet.

    with progress.task("encoding examples", total=len(texts)) as advance:
        for batch in batches:
            ...
            advance(len(batch))
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol

Advance = Callable[[int], None]


class Progress(Protocol):
    """Where long work reports how far it has come."""

    def task(self, description: str, total: int | None = None) -> AbstractContextManager[Advance]:
        """A step of ``total`` units (None: unknown); the context yields ``advance(n)``."""
        ...


class _Silent:
    """Reports nowhere."""

    @contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Advance]:
        yield _ignore


def _ignore(n: int) -> None:
    """Drop an advance."""


SILENT: Progress = _Silent()
