"""Anchors: the active version's own automatic decisions, so that a candidate keeps what it decides.

Reviewers label only what the router was unsure of. A candidate learned from those labels
alone knows nothing of what the active version decides by itself (on Davidson: the tweets
it decides clean), and can overturn those decisions where it has never been told it is
wrong, which a shadow check then rightly refuses (docs/reviewer.md). ``sieve labels
anchors`` exports a sample of the active version's automatic decisions (from its outcome
topics) as labelled rows; ``routes learn --anchors`` adds them to the labels' train and
calibration splits, never to test, so the candidate's head and thresholds are fitted to
keep them while the held-back comparison stays on reviewers' labels alone. They are the
router's word, not a reviewer's: at most as many anchors as labels are used.
"""

from __future__ import annotations

import random
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from pydantic import ValidationError

from sieve.contracts import NEEDS_REVIEW, Decision
from sieve.quality.datasets import LabelledData
from sieve.quality.splits import Splits, split_data
from sieve.quality.workbench import Workbench


@dataclass
class AnchorReport:
    """What an anchors export read and kept."""

    read: int = 0
    unreadable: int = 0  # not a decision
    other_version: int = 0  # another route-set version's decisions
    not_automatic: int = 0  # needs_review, or decided by the LLM reviewer
    no_text: int = 0  # image events: no text to learn from
    repeats: int = 0  # the same text decided again (at-least-once delivery, a repeated post)
    exported: int = 0


def _routes(decision: Decision) -> list[str]:
    if decision.categories is not None:  # multi mode: every category that accepted
        return sorted(name for name, fired in decision.categories.items() if fired)
    return [decision.route] if decision.route is not None else []


def anchor_rows(messages: Iterable[bytes | str], version: str | None,
                report: AnchorReport | None = None) -> tuple[list[dict[str, Any]], AnchorReport]:
    """One labelled row per text the router decided automatically (of ``version``, when given)."""
    report = report if report is not None else AnchorReport()
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for message in messages:
        if not message.strip():
            continue
        report.read += 1
        try:
            decision = Decision.model_validate_json(message)
        except (ValidationError, ValueError):
            report.unreadable += 1
            continue
        if version is not None and decision.route_set_version != version:
            report.other_version += 1
        elif decision.outcome == NEEDS_REVIEW or decision.decided_by != "router":
            report.not_automatic += 1
        elif not decision.event.text:
            report.no_text += 1
        elif (key := unicodedata.normalize("NFC", decision.event.text)) in seen:
            report.repeats += 1
        else:
            seen.add(key)
            rows.append({"id": f"anchor:{decision.id}", "text": decision.event.text,
                         "outcome": decision.outcome, "labels": _routes(decision),
                         "labeller": f"router:{decision.route_set_version}",
                         "route_set": decision.route_set, "route_set_version": decision.route_set_version})
    report.exported = len(rows)
    return rows, report


def with_anchors(bench: Workbench, anchors: LabelledData, *, seed: int = 0,
                 cap: int | None = None) -> tuple[Workbench, dict[str, int]]:
    """``bench`` with ``anchors`` (at most ``cap``, a seeded sample) added to train and calibration.

    Two thirds of the anchors go to train, one third to calibration (stratified by outcome and
    route, as the labels are split); the test split and the labelled data are the labels' own.
    """
    labelled = {ex.text for ex in bench.data.examples}
    rows = [ex for ex in anchors.examples if ex.text and ex.text not in labelled]
    if cap is not None and len(rows) > cap:
        rows = random.Random(seed).sample(rows, cap)
    parts = split_data(anchors.with_examples(rows), seed=seed, fractions=(2 / 3, 1 / 3, 0.0),
                       source_splits=False)
    splits = bench.splits
    grown = Splits(splits.train.with_examples([*splits.train.examples, *parts.train.examples]),
                   splits.calibration.with_examples([*splits.calibration.examples,
                                                     *parts.calibration.examples]),
                   splits.test, splits.record)
    counts = {"read": len(anchors.examples), "used": len(rows), "train": len(parts.train.examples),
              "calibration": len(parts.calibration.examples)}
    return replace(bench, splits=grown, _vectors={}), counts
