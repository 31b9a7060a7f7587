"""Markdown for reports: cells, tables, and the page every section renders from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sieve.quality.metrics import CPT_TARGETS, cpt_key, wilson
from sieve.quality.report_data import Report

MAX_ROWS = 40  # longer tables: the rows with the most support in Markdown, all of them in the JSON
CPT_KEYS = tuple(cpt_key(target) for target in CPT_TARGETS)


@dataclass(frozen=True)
class Page:
    """What the sections render from: the report, its plot files, the primary system's tables."""

    report: Report
    plots: dict[str, str]
    tables: dict[str, object]

    def rows(self, name: str) -> list[dict[str, Any]]:
        """One of the primary system's list tables (``per_route``, ``per_outcome``, ``per_label``)."""
        rows = self.tables[name]
        assert isinstance(rows, list)
        return rows

    def plot(self, name: str) -> list[str]:
        """The lines that show plot ``name`` (none when it was not written)."""
        if name not in self.plots:
            return []
        return ["", f"![{name.replace('_', '-')}]({self.plots[name]})"]


def pct(value: float | None, digits: int = 1) -> str:
    """A share as a percentage (``—`` when unknown)."""
    return "—" if value is None else f"{100 * value:.{digits}f}%"


def num(value: float | None, digits: int = 3) -> str:
    """A number with ``digits`` decimals (``—`` when unknown)."""
    return "—" if value is None else f"{value:.{digits}f}"


def ci(correct: int, total: int) -> str:
    """A proportion with its Wilson 95% interval."""
    if total == 0:
        return "—"
    low, high = wilson(correct, total)
    return f"{correct / total:.3f} [{low:.3f}, {high:.3f}]"


def noisy(row: dict[str, Any]) -> str:
    """The cell that marks a row with too few gold examples."""
    return "noisy" if row["noisy"] else ""


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table (``|`` in a cell escaped)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines.extend("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows)
    return lines
