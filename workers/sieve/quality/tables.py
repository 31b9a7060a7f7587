"""How right a system's decisions were: the headline summary and the detailed tables.

- :func:`summarise`: the share decided automatically and its accuracy, the review
  share, precision per automatic outcome, the coverage-risk points and the cascade;
- per route precision / recall / F1 (:func:`per_route_table`), per outcome, per
  label (category);
- a confusion table (gold outcome x decided outcome, ``needs_review`` included);
- what the events far from every example (``no_match``) really were.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from sieve.contracts import NEEDS_REVIEW
from sieve.quality.datasets import LabelledData
from sieve.quality.metrics import CascadeSummary, coverage_risk_curve, f1, ratio, summarise_cascade, wilson
from sieve.quality.systems import SystemKind, SystemRun

NOISY_BELOW = 30  # a class with fewer gold examples than this is marked noisy
COVERAGES = (0.5, 0.6, 0.7, 0.75, 0.8, 0.9, 1.0)  # coverages at which a summary reads the risk


@dataclass(frozen=True)
class Summary:
    """The headline numbers of one system on one split."""

    system: str
    kind: SystemKind
    events: int
    auto: int
    auto_correct: int
    review: int
    reasons: dict[str, int]
    outcome_precision: dict[str, dict[str, float | int | None]]
    forced_accuracy: float
    accuracy_with_review: float  # gold labels standing in for the reviewer
    coverage_risk: dict[str, float]  # risk at these coverages
    aurc: float
    cascade: CascadeSummary
    novel: int | None = None  # events above the novelty threshold; None: the set has none

    @property
    def novel_share(self) -> float | None:
        """Share of events that were novel (None without a novelty threshold)."""
        return None if self.novel is None else ratio(self.novel, self.events)

    @property
    def auto_share(self) -> float:
        """Share decided without review."""
        return self.auto / self.events if self.events else 0.0

    @property
    def review_share(self) -> float:
        """Share sent to review."""
        return self.review / self.events if self.events else 0.0

    @property
    def auto_accuracy(self) -> float | None:
        """Accuracy of what was decided automatically."""
        return ratio(self.auto_correct, self.auto)

    def as_dict(self) -> dict[str, object]:
        """JSON-ready."""
        low, high = wilson(self.auto_correct, self.auto)
        return {
            "system": self.system,
            "kind": self.kind,
            "events": self.events,
            "auto": self.auto,
            "auto_share": self.auto_share,
            "auto_correct": self.auto_correct,
            "auto_accuracy": self.auto_accuracy,
            "auto_accuracy_wilson95": [low, high],
            "review": self.review,
            "review_share": self.review_share,
            "reasons": self.reasons,
            "outcome_precision": self.outcome_precision,
            "forced_accuracy": self.forced_accuracy,
            "accuracy_with_review": self.accuracy_with_review,
            "coverage_risk": self.coverage_risk,
            "aurc": self.aurc,
            "cascade": self.cascade.as_dict(),
            "novel": self.novel,
            "novel_share": self.novel_share,
        }


def summarise(run: SystemRun) -> Summary:
    """Headline numbers of a system run."""
    gold = np.array(run.gold, dtype=object)
    decided = np.array(run.outcomes, dtype=object)
    auto = decided != NEEDS_REVIEW
    correct_auto = auto & (decided == gold)
    n = len(gold)
    outcome_precision: dict[str, dict[str, float | int | None]] = {}
    for outcome in sorted(set(decided[auto]) | set(gold)):
        mask = auto & (decided == outcome)
        hits = int((mask & (gold == outcome)).sum())
        total = int(mask.sum())
        low, high = wilson(hits, total)
        outcome_precision[str(outcome)] = {
            "decided": total,
            "correct": hits,
            "precision": ratio(hits, total),
            "wilson95_low": low if total else None,
            "wilson95_high": high if total else None,
            "gold": int((gold == outcome).sum()),
        }
    forced_correct = run.forced_correct()
    coverage, risk = coverage_risk_curve(forced_correct, run.confidence)
    risk_at = {}
    for c in COVERAGES:
        k = max(1, int(round(c * n)))
        risk_at[f"{c:.2f}"] = float(risk[k - 1]) if n else 0.0
    return Summary(
        system=run.name,
        kind=run.kind,
        events=n,
        auto=int(auto.sum()),
        auto_correct=int(correct_auto.sum()),
        review=int((~auto).sum()),
        reasons=dict(Counter(run.reasons)),
        outcome_precision=outcome_precision,
        forced_accuracy=float(forced_correct.mean()) if n else 0.0,
        accuracy_with_review=float((correct_auto.sum() + (~auto).sum()) / n) if n else 0.0,
        coverage_risk=risk_at,
        aurc=float(risk.mean()) if n else 0.0,
        cascade=summarise_cascade(forced_correct, run.confidence),
        novel=int(run.novel.sum()) if run.novel is not None else None,
    )


def per_route_table(run: SystemRun, data: LabelledData) -> list[dict[str, object]]:
    """Per route: what it decided automatically and how right that was.

    A route named like a label of the data is measured against that label
    (examples whose label is unknown are left out); any other route against its
    outcome (precision only). Recall counts events sent to review as misses.
    """
    label_names = set(data.label_names)
    rows: list[dict[str, object]] = []
    decided = run.outcomes
    for position, route in enumerate(run.index.routes):
        accepted = [
            i
            for i, (r, o) in enumerate(zip(run.routes, decided, strict=True))
            if r == position and o == route.outcome
        ]
        reviewed = sum(
            1 for r, o in zip(run.routes, decided, strict=True) if r == position and o == NEEDS_REVIEW
        )
        row: dict[str, object] = {
            "route": route.name,
            "outcome": route.outcome,
            "decided": len(accepted),
            "reviewed_with_route": reviewed,
        }
        if route.name in label_names:
            known = [i for i, ex in enumerate(data.examples) if route.name not in ex.unknown]
            known_set = set(known)
            positives = {i for i in known if route.name in data.examples[i].labels}
            judged = [i for i in accepted if i in known_set]
            tp = sum(1 for i in judged if i in positives)
            precision = ratio(tp, len(judged))
            recall = ratio(tp, len(positives))
            row.update(
                {
                    "against": "label",
                    "support": len(positives),
                    "known": len(known),
                    "tp": tp,
                    "precision": precision,
                    "recall": recall,
                    "f1": f1(precision, recall),
                    "noisy": len(positives) < NOISY_BELOW,
                }
            )
        else:
            tp = sum(1 for i in accepted if run.gold[i] == route.outcome)
            row.update(
                {
                    "against": "outcome",
                    "support": None,
                    "tp": tp,
                    "precision": ratio(tp, len(accepted)),
                    "recall": None,
                    "f1": None,
                    "noisy": None,
                }
            )
        rows.append(row)
    return rows


def per_outcome_table(run: SystemRun) -> list[dict[str, object]]:
    """Per gold outcome: support, precision / recall / F1 of automatic decisions, share reviewed."""
    gold = np.array(run.gold, dtype=object)
    decided = np.array(run.outcomes, dtype=object)
    rows: list[dict[str, object]] = []
    for outcome in sorted(set(gold) | (set(decided) - {NEEDS_REVIEW})):
        support = int((gold == outcome).sum())
        predicted = int((decided == outcome).sum())
        tp = int(((decided == outcome) & (gold == outcome)).sum())
        precision, recall = ratio(tp, predicted), ratio(tp, support)
        rows.append(
            {
                "outcome": str(outcome),
                "support": support,
                "decided": predicted,
                "tp": tp,
                "precision": precision,
                "recall": recall,
                "f1": f1(precision, recall),
                "reviewed": int(((decided == NEEDS_REVIEW) & (gold == outcome)).sum()),
                "noisy": support < NOISY_BELOW,
            }
        )
    return rows


def per_label_table(run: SystemRun, data: LabelledData) -> list[dict[str, object]]:
    """Per label (moderation category): its examples decided positive, reviewed, missed.

    Only for data with one outcome for every labelled example (``positive_outcome``).
    """
    if data.positive_outcome is None:
        return []
    rows: list[dict[str, object]] = []
    for label in data.label_names:
        members = [i for i, ex in enumerate(data.examples) if label in ex.labels]
        caught = sum(1 for i in members if run.outcomes[i] == data.positive_outcome)
        reviewed = sum(1 for i in members if run.outcomes[i] == NEEDS_REVIEW)
        n = len(members)
        rows.append(
            {
                "label": label,
                "count": n,
                "unknown": sum(1 for ex in data.examples if label in ex.unknown),
                "caught": caught,
                "reviewed": reviewed,
                "missed": n - caught - reviewed,
                "caught_share": ratio(caught, n),
                "reviewed_share": ratio(reviewed, n),
                "missed_share": ratio(n - caught - reviewed, n),
                "noisy": n < NOISY_BELOW,
            }
        )
    return rows


def confusion(run: SystemRun) -> dict[str, dict[str, int]]:
    """``{gold outcome: {decided outcome: count}}`` (needs_review a column of its own)."""
    table: dict[str, dict[str, int]] = {}
    for gold, decided in zip(run.gold, run.outcomes, strict=True):
        row = table.setdefault(gold, {})
        row[decided] = row.get(decided, 0) + 1
    return table


def no_match_table(run: SystemRun) -> dict[str, object]:
    """Events far from every example (reason ``no_match``): how many, and what they really were."""
    members = [i for i, reason in enumerate(run.reasons) if reason == "no_match"]
    gold = Counter(run.gold[i] for i in members)
    default = run.route_set.default_outcome
    return {
        "events": len(members),
        "share": ratio(len(members), len(run.reasons)),
        "given": dict(Counter(run.outcomes[i] for i in members)),
        "gold": dict(gold),
        "gold_default_share": ratio(gold.get(default, 0), len(members)),
        "default_outcome": default,
    }
