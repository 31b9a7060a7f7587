"""A per-category report (:class:`~sieve.quality.categories_run.CategoryReport`) as Markdown and JSON."""

from __future__ import annotations

import json
from pathlib import Path

from sieve.quality.categories import BinaryMeasure, CategoryMeasure
from sieve.quality.categories_run import CategoryReport, SystemCategories


def _share(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _ci(value: float | None, ci: tuple[float, float]) -> str:
    return "–" if value is None else f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def _cells(m: CategoryMeasure) -> list[str]:
    return [str(m.flagged), str(m.true_positives), _ci(m.precision, m.precision_ci),
            _ci(m.recall, m.recall_ci), _share(m.f1)]


def category_table(first: SystemCategories, second: SystemCategories, targets: dict[str, float]) -> list[str]:
    """Markdown rows: per category, the counts and measures of two systems side by side."""
    head = ("| category | target | positives | unknown | "
            f"{first.label}: flagged | TP | precision | recall | F1 | "
            f"{second.label}: flagged | TP | precision | recall | F1 |")
    lines = [head, "|" + "---|" * 14]
    for a, b in zip(first.measures, second.measures, strict=True):
        target = targets.get(a.name)
        lines.append("| " + " | ".join([a.name, "–" if target is None else f"{target:g}", str(a.positives),
                                          str(a.unknown), *_cells(a), *_cells(b)]) + " |")
    return lines


def _binary_cells(b: BinaryMeasure) -> list[str]:
    return [f"{b.auto} / {b.events}", f"{b.auto_share:.1%}", f"{b.correct}", _ci(b.accuracy, b.accuracy_ci)]


def binary_table(systems: list[SystemCategories]) -> list[str]:
    """Markdown rows: any category, automatic share and accuracy, and accuracy at the common share."""
    lines = ["| system | automatic | automatic share | correct | accuracy [95% CI] | "
             "at the common share: automatic | correct | accuracy [95% CI] |", "|" + "---|" * 8]
    for s in systems:
        matched = s.matched
        rest = ([f"{matched.auto}", f"{matched.correct}", _ci(matched.accuracy, matched.accuracy_ci)]
                if matched is not None else ["–", "–", "–"])
        lines.append("| " + " | ".join([s.label, *_binary_cells(s.binary), *rest]) + " |")
    return lines


def category_markdown(report: CategoryReport) -> str:
    """The report as Markdown."""
    lines = [f"# {report.title}", "", f"- Command: `{report.command}`" if report.command else "",
             f"- Data: {report.data} ({report.source}), {report.events} events",
             f"- Encoder: {report.encoder_id}", f"- Route file: {report.route_file}",
             f"- Method: {report.method}",
             f"- Targets: per-category precision at the Wilson lower bound with z = {report.z_target:g}"
             + (" (the point estimate)" if report.z_target <= 0 else ""),
             "- Intervals: Wilson 95%; events whose label is unknown for a category are left out of it", ""]
    systems = report.systems
    for first, second in zip(systems[::2], systems[1::2], strict=False):
        lines += [f"## Per category: {first.label} against {second.label}", "",
                  *category_table(first, second, report.targets), ""]
    lines += ["## Any category (binary: violating or clean)", "",
              "Automatic: not needs_review. At the common share: each system keeps automatic only its "
              "most confident decisions, as many as the system with the fewest automatic decisions has "
              "(within each pair); most confident: the highest accuracy estimated, per outcome, from how "
              "far the decision is from changing (an isotonic fit on the events the thresholds were "
              "fitted on, or the other folds, never on the events ranked).", "", *binary_table(systems), ""]
    if report.thresholds:
        lines += ["## Fitted accept thresholds", "", "| category | accept (per fold) |", "|---|---|"]
        lines += [f"| {name} | {', '.join(f'{a:g}' for a in values)} |"
                  for name, values in report.thresholds.items()]
        lines.append("")
    lines += [f"- {note}" for note in report.notes]
    return "\n".join(line for line in lines if line is not None) + "\n"


def category_json(report: CategoryReport) -> dict[str, object]:
    """The report as JSON-ready data."""
    return {
        "title": report.title, "command": report.command, "data": report.data, "source": report.source,
        "encoder": report.encoder_id, "route_file": report.route_file, "method": report.method,
        "events": report.events, "z_target": report.z_target, "targets": report.targets,
        "systems": [{"label": s.label, "categories": [m.as_dict() for m in s.measures],
                     "binary": s.binary.as_dict(),
                     "at_common_share": s.matched.as_dict() if s.matched is not None else None}
                    for s in report.systems],
        "thresholds": report.thresholds, "notes": report.notes,
    }


def write_category_report(report: CategoryReport, out: Path, stem: str = "categories") -> dict[str, str]:
    """Write ``<stem>.md`` and ``<stem>.json`` under ``out``; their paths."""
    out.mkdir(parents=True, exist_ok=True)
    markdown, data = out / f"{stem}.md", out / f"{stem}.json"
    markdown.write_text(category_markdown(report), encoding="utf-8")
    data.write_text(json.dumps(category_json(report), indent=2) + "\n", encoding="utf-8")
    return {"markdown": str(markdown), "json": str(data)}
