"""Labels back: the labels topic's verdicts as labelled JSONL for ``eval``, ``fit`` and ``routes build``.

Every final verdict (the LLM reviewer's, a moderator's) is a :class:`~sieve.contracts.Label`.
Export keeps one row per content (the text, NFC-normalised, or the image's digest):

- the same label read again (at-least-once delivery) counts as a **repeat**;
- other labels of the same content that agree (same outcome and routes) are **duplicates**;
- labels that disagree are a **conflict**: a human's label wins over an LLM's, then the latest;
  every conflict is reported with what won and what lost, never an error.

Image labels export only when the event referred to its image by URI (inline images are not
kept anywhere); they are counted as ``no_content``.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from sieve.contracts import NEEDS_REVIEW, Label


@dataclass(frozen=True)
class Conflict:
    """One content whose labels disagree: the label kept and the ones it overruled."""

    content: str
    kept: Label
    overruled: tuple[Label, ...]


@dataclass
class LabelReport:
    """What an export read, kept and left out."""

    read: int = 0
    unreadable: int = 0  # not a label: bad JSON or not the schema
    repeats: int = 0  # the same label id again
    duplicates: int = 0  # another label of the same content that agrees
    no_content: int = 0  # an inline image: nothing to export
    not_final: int = 0  # a label whose outcome is needs_review
    exported: int = 0
    conflicts: list[Conflict] = field(default_factory=list)


def content_key(label: Label) -> str | None:
    """What makes two labels about the same content; None when there is nothing to export."""
    if label.text is not None:
        return "text:" + unicodedata.normalize("NFC", label.text)
    if label.image_uri is not None:
        return "image:" + (label.image_sha256 or label.image_uri)
    return None


def _verdict(label: Label) -> tuple[str, tuple[str, ...]]:
    return label.outcome, tuple(sorted(label.routes))


def _rank(label: Label) -> tuple[int, float, str]:
    """Which of two disagreeing labels wins: a human's, then the later, then the larger id."""
    return (1 if label.labeller_kind == "human" else 0, label.labelled_at.timestamp(), label.id)


def parse_labels(lines: Iterable[bytes | str], report: LabelReport) -> list[Label]:
    """Labels from JSON messages (one per item); what is not a label is counted, not raised."""
    labels = []
    for line in lines:
        if not line.strip():
            continue
        report.read += 1
        try:
            labels.append(Label.model_validate_json(line))
        except (ValidationError, ValueError):
            report.unreadable += 1
    return labels


def export_rows(labels: Iterable[Label], report: LabelReport | None = None) -> tuple[list[dict[str, Any]],
                                                                                     LabelReport]:
    """One labelled-JSONL row per content (:mod:`sieve.quality.datasets` reads them), and the report."""
    report = report if report is not None else LabelReport()
    seen: set[str] = set()
    by_content: dict[str, list[Label]] = {}
    for label in labels:
        if label.id in seen:
            report.repeats += 1
            continue
        seen.add(label.id)
        if label.outcome == NEEDS_REVIEW:
            report.not_final += 1
            continue
        key = content_key(label)
        if key is None:
            report.no_content += 1
            continue
        by_content.setdefault(key, []).append(label)
    rows = []
    for key, group in by_content.items():
        kept = max(group, key=_rank)
        overruled = tuple(other for other in group if _verdict(other) != _verdict(kept))
        report.duplicates += len(group) - 1 - len(overruled)
        if overruled:
            report.conflicts.append(Conflict(key, kept, overruled))
        rows.append(_row(kept))
    report.exported = len(rows)
    return rows, report


def _row(label: Label) -> dict[str, Any]:
    row: dict[str, Any] = {"id": label.id}
    if label.text is not None:
        row["text"] = label.text
    else:
        row["image_uri"] = label.image_uri
    row["outcome"] = label.outcome
    if label.routes:
        row["labels"] = sorted(label.routes)
    row.update({"labeller": f"{label.labeller_kind}:{label.labeller}", "route_set": label.route_set,
                "route_set_version": label.route_set_version})
    return row


def write_jsonl(rows: list[dict[str, Any]], path: Any) -> None:
    """The rows as JSONL (UTF-8, one object per line)."""
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
