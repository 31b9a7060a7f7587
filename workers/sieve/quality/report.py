"""Write a :class:`~sieve.quality.report_data.Report` into one folder: Markdown, JSON and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from sieve.quality.report_data import Report
from sieve.quality.report_markdown import render_markdown
from sieve.quality.report_plots import write_plots


def write_report(report: Report, directory: Path, *, plots: bool = True) -> dict[str, Path]:
    """report.md, report.json and (unless ``plots`` is off) the PNG plots; their paths by name."""
    directory.mkdir(parents=True, exist_ok=True)
    written = write_plots(report, directory) if plots else {}
    markdown = render_markdown(report, written)
    (directory / "report.md").write_text(markdown, encoding="utf-8")
    (directory / "report.json").write_text(
        json.dumps(report.as_dict(), indent=2, default=_json_default) + "\n", encoding="utf-8"
    )
    paths = {"markdown": directory / "report.md", "json": directory / "report.json"}
    paths.update({name: directory / file for name, file in written.items()})
    return paths


def _json_default(value: object) -> object:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
