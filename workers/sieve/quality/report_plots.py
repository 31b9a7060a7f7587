"""The report's PNG plots: coverage-risk and cascade curves, one line per system."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from sieve.quality.metrics import cascade_curve, coverage_risk_curve
from sieve.quality.report_data import Report

Curve = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


@contextmanager
def _figure(path: Path, title: str, xlabel: str, ylabel: str) -> Iterator[Any]:
    """A figure's axes to draw on; labelled, gridded and saved to ``path`` on leaving."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    try:
        yield axes
        axes.set_xlabel(xlabel)
        axes.set_ylabel(ylabel)
        axes.set_title(title)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
        figure.tight_layout()
        figure.savefig(path, dpi=110)
    finally:
        plt.close(figure)


def _curves(axes: Any, report: Report, curve: Curve, *, operating_points: bool = False) -> None:
    """One line per system of ``curve(correct, confidence)`` (and the point where its policy sits)."""
    for entry in report.systems:
        x, y = curve(entry.run.forced_correct(), entry.run.confidence)
        line = axes.plot(x, y, label=entry.label, linewidth=1.2)[0]
        s = entry.summary
        if operating_points and s.review:
            axes.plot([s.review_share], [s.accuracy_with_review], "o", color=line.get_color())


def write_plots(report: Report, directory: Path) -> dict[str, str]:
    """coverage_risk.png and cascade.png in ``directory``; their file names by plot name."""
    where = f"{report.data.name} {report.split_name}"
    with _figure(
        directory / "coverage_risk.png",
        f"Coverage–risk, {where}",
        "coverage (share decided, most confident first)",
        "risk (error rate)",
    ) as axes:
        _curves(axes, report, coverage_risk_curve)
    with _figure(
        directory / "cascade.png",
        f"Cascade, {where}",
        "share deferred to review (least confident first)",
        "accuracy, reviewer = gold",
    ) as axes:
        _curves(axes, report, cascade_curve, operating_points=True)
        axes.plot(
            [0, 1],
            [report.systems[0].summary.cascade.router_accuracy, 1.0],
            ":",
            color="grey",
            label="random deferral (first system)",
        )
    return {"coverage_risk": "coverage_risk.png", "cascade": "cascade.png"}
