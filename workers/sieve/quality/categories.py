"""Per-category measures and per-category thresholds, on score matrices and labels (pure functions).

A *category* is a route whose name is one of the data set's labels and whose outcome is
not the set's default (openai-moderation: ``sexual``, ``hate``, ... of
``routes/moderation.yaml``, :data:`sieve.quality.datasets.MODERATION_CATEGORIES`).
An event is *flagged* in a category:

- **multi-label** (``mode: multi``, :mod:`sieve.flow.multi`): when the category's route
  fired in its accept band (the decision's ``categories`` says true);
- **top-1** (``mode: single``): when the decision accepted that category's route.

Per category: precision, recall and F1, with Wilson intervals and the counts behind them;
events whose label is unknown for a category count neither for nor against it.
:func:`binary_measures` gives the any-category view: the share decided automatically and
the accuracy of those decisions against the gold outcome.

:func:`fit_category_thresholds` fits, per category route, the lowest accept threshold on
:data:`ACCEPT_GRID` at which the route's accepted events (multi mode, ambiguity with the
best benign route included) reach the route's precision target at the Wilson lower bound
(``z``; 0: the point estimate). :func:`kfold` splits events into seeded, stratified folds.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from sieve.contracts import NEEDS_REVIEW
from sieve.flow.decide import Policy, Verdict, decide_scores
from sieve.quality.datasets import LabelledExample
from sieve.quality.fit import ACCEPT_GRID
from sieve.quality.metrics import f1, ratio, wilson
from sieve.quality.targets import Targets, lower_bounds
from sieve.routeset import Route

# The precision a category route must reach when neither it, its outcome nor an accuracy target is named.
DEFAULT_PRECISION = 0.9


@dataclass(frozen=True)
class CategoryLabels:
    """Per event and category: labelled positive, and whether the label is known at all."""

    names: tuple[str, ...]
    positive: np.ndarray  # (n, categories) bool
    known: np.ndarray  # (n, categories) bool

    def rows(self, index: np.ndarray) -> CategoryLabels:
        """The labels of some events."""
        return CategoryLabels(self.names, self.positive[index], self.known[index])


def category_labels(examples: Sequence[LabelledExample], names: Sequence[str]) -> CategoryLabels:
    """The examples' labels for the categories ``names``."""
    positive = np.array([[name in ex.labels for name in names] for ex in examples], dtype=bool)
    known = np.array([[name not in ex.unknown for name in names] for ex in examples], dtype=bool)
    shape = (len(examples), len(names))
    return CategoryLabels(tuple(names), positive.reshape(shape), known.reshape(shape))


def category_positions(
    routes: Sequence[Route], default_outcome: str, label_names: Sequence[str]
) -> list[int]:
    """Index positions of the category routes: named like a label, outcome not the default."""
    labels = set(label_names)
    return [i for i, route in enumerate(routes) if route.name in labels and route.outcome != default_outcome]


def multi_flags(verdicts: Sequence[Verdict], positions: Sequence[int]) -> np.ndarray:
    """``(n, categories)``: the category's route fired in its accept band (multi-mode verdicts)."""
    column = {p: j for j, p in enumerate(positions)}
    flags = np.zeros((len(verdicts), len(positions)), dtype=bool)
    for i, verdict in enumerate(verdicts):
        for route, band, _ in verdict.fired or ():
            if band == "accept" and route in column:
                flags[i, column[route]] = True
    return flags


def top1_flags(verdicts: Sequence[Verdict], positions: Sequence[int]) -> np.ndarray:
    """``(n, categories)``: the decision accepted the category's route (single-mode verdicts)."""
    column = {p: j for j, p in enumerate(positions)}
    flags = np.zeros((len(verdicts), len(positions)), dtype=bool)
    for i, verdict in enumerate(verdicts):
        if verdict.outcome != NEEDS_REVIEW and verdict.reason == "accept" and verdict.route in column:
            flags[i, column[verdict.route]] = True
    return flags


@dataclass(frozen=True)
class CategoryMeasure:
    """One category's precision, recall and F1 (Wilson intervals), and the counts behind them."""

    name: str
    positives: int  # labelled positive (label known)
    flagged: int  # flagged, among events whose label is known
    true_positives: int
    unknown: int  # events whose label is unknown: left out
    precision: float | None
    precision_ci: tuple[float, float]
    recall: float | None
    recall_ci: tuple[float, float]
    f1: float | None

    def as_dict(self) -> dict[str, object]:
        """JSON-ready."""
        return {
            "category": self.name, "positives": self.positives, "flagged": self.flagged,
            "true_positives": self.true_positives, "unknown": self.unknown,
            "precision": self.precision, "precision_ci": list(self.precision_ci),
            "recall": self.recall, "recall_ci": list(self.recall_ci), "f1": self.f1,
        }


def category_measures(flags: np.ndarray, labels: CategoryLabels, z: float = 1.96) -> list[CategoryMeasure]:
    """Per category, flags ``(n, categories)`` measured against the labels (unknowns left out)."""
    measures = []
    for j, name in enumerate(labels.names):
        known = labels.known[:, j]
        flagged = flags[:, j] & known
        positive = labels.positive[:, j] & known
        n_flagged, n_positive = int(flagged.sum()), int(positive.sum())
        tp = int((flagged & positive).sum())
        precision, recall = ratio(tp, n_flagged), ratio(tp, n_positive)
        measures.append(CategoryMeasure(
            name, n_positive, n_flagged, tp, int((~known).sum()), precision, wilson(tp, n_flagged, z),
            recall, wilson(tp, n_positive, z), f1(precision, recall),
        ))
    return measures


@dataclass(frozen=True)
class BinaryMeasure:
    """Any category: the share decided automatically and the accuracy of those decisions."""

    events: int
    auto: int
    correct: int
    auto_share: float
    accuracy: float | None
    accuracy_ci: tuple[float, float]

    def as_dict(self) -> dict[str, object]:
        """JSON-ready."""
        return {"events": self.events, "auto": self.auto, "correct": self.correct,
                "auto_share": self.auto_share, "accuracy": self.accuracy,
                "accuracy_ci": list(self.accuracy_ci)}


def binary_measures(outcomes: Sequence[str], gold: Sequence[str], z: float = 1.96) -> BinaryMeasure:
    """Decisions not ``needs_review`` are automatic; correct when the outcome is the gold one."""
    auto = [o != NEEDS_REVIEW for o in outcomes]
    correct = sum(1 for o, g, a in zip(outcomes, gold, auto, strict=True) if a and o == g)
    n_auto = sum(auto)
    return BinaryMeasure(len(outcomes), n_auto, correct, n_auto / len(outcomes) if outcomes else 0.0,
                         ratio(correct, n_auto), wilson(correct, n_auto, z))


def category_targets(routes: Sequence[Route], positions: Sequence[int], targets: Targets) -> list[float]:
    """Each category route's precision target: its own, its outcome's, the accuracy target, or the default."""
    chosen = []
    for p in positions:
        route = routes[p]
        named = targets.precision.get(route.name, targets.precision.get(route.outcome, targets.accuracy))
        chosen.append(DEFAULT_PRECISION if named is None else named)
    return chosen


@dataclass(frozen=True)
class CategoryFit:
    """Fitted accept and review thresholds of every route (category routes moved; others as given)."""

    accept: np.ndarray  # (routes,) float64
    review: np.ndarray
    targets: tuple[float, ...]  # per category
    met: tuple[bool, ...]  # per category: some threshold below 1.0 reached the target
    calibration: tuple[tuple[int, int], ...]  # per category at the fitted threshold: (flagged, correct)

    def policy(self, base: Policy) -> Policy:
        """``base`` with these accept and review thresholds."""
        return replace(base, accept=self.accept.astype(np.float32), review=self.review.astype(np.float32))


def _ambiguous(scores: np.ndarray, policy: Policy, benign: np.ndarray) -> np.ndarray:
    """``(n, routes)``: too close to the best benign route to accept (as :func:`sieve.flow.multi.bands`)."""
    n, routes = scores.shape
    if not benign.any():
        return np.zeros((n, routes), dtype=bool)
    best = np.where(benign[None, :], scores, -np.inf).argmax(axis=1)
    best_score = scores[np.arange(n), best]
    in_band = best_score >= policy.review[best]
    lead = (scores.astype(np.float64) - best_score.astype(np.float64)[:, None]).astype(np.float32)
    return in_band[:, None] & (lead < policy.margin[None, :])


def fit_category_thresholds(
    scores: np.ndarray, labels: CategoryLabels, positions: Sequence[int], base: Policy,
    targets: Sequence[float], *, z: float = 1.0, grid: Sequence[float] = ACCEPT_GRID,
) -> CategoryFit:
    """Per category route, the lowest accept threshold on ``grid`` whose accepted events meet its target.

    Precision counts events whose label is known; it must reach the target at the Wilson
    lower bound with ``z``. A grid value that accepts nothing does not count as meeting it;
    with none below 1.0 meeting it the route gets 1.0 (nothing accepted but exact matches).
    Review keeps the route's width (``accept - review`` of ``base``); margins stay as given.
    """
    scores = np.asarray(scores, dtype=np.float32)
    benign = np.array([o == base.default_outcome for o in base.outcomes], dtype=bool)
    ambiguous = _ambiguous(scores, base, benign)
    thresholds = np.asarray(grid, dtype=np.float64)
    accept = base.accept.astype(np.float64).copy()
    review = base.review.astype(np.float64).copy()
    met, calibration = [], []
    for j, p in enumerate(positions):
        known = labels.known[:, j]
        over = scores[:, p][:, None] >= thresholds.astype(np.float32)[None, :]
        accepted = over & ~ambiguous[:, p][:, None] & known[:, None]
        flagged = accepted.sum(axis=0)
        correct = (accepted & labels.positive[:, j][:, None]).sum(axis=0)
        ok = (flagged > 0) & (lower_bounds(correct, flagged, z) >= targets[j]) & (thresholds < 1.0)
        column = int(np.argmax(ok)) if ok.any() else len(thresholds) - 1
        chosen = float(thresholds[column]) if ok.any() else 1.0
        width = float(base.accept[p]) - float(base.review[p])
        accept[p] = chosen
        review[p] = max(-1.0, round(chosen - width, 3))
        met.append(bool(ok.any()))
        calibration.append((int(flagged[column]), int(correct[column])) if ok.any() else (0, 0))
    return CategoryFit(accept, review, tuple(targets), tuple(met), tuple(calibration))


def check_fit_agrees_with_worker(
    scores: np.ndarray, labels: CategoryLabels, positions: Sequence[int], base: Policy, fit: CategoryFit
) -> None:
    """The worker's multi-mode decide_scores must accept, per category, what the fit counted."""
    policy = replace(fit.policy(base), multi=True, novelty_threshold=None)
    flags = multi_flags(decide_scores(scores, policy), positions) & labels.known
    for j in range(len(positions)):
        if not fit.met[j]:
            continue
        flagged = int(flags[:, j].sum())
        correct = int((flags[:, j] & labels.positive[:, j]).sum())
        if (flagged, correct) != fit.calibration[j]:
            raise AssertionError(
                f"category fit disagrees with decide_scores on {labels.names[j]}: fit counted "
                f"{fit.calibration[j]}, the worker {(flagged, correct)} (flagged, correct)"
            )


def kfold(strata: Sequence[str], folds: int, seed: int) -> list[np.ndarray]:
    """Event indices of each fold: seeded, every stratum dealt round-robin over the folds.

    The folds partition ``range(len(strata))``; the same strata, folds and seed give the same folds.
    """
    if folds < 2:
        raise ValueError(f"k-fold needs at least 2 folds, got {folds}")
    rng = random.Random(seed)
    groups: dict[str, list[int]] = {}
    for i, stratum in enumerate(strata):
        groups.setdefault(stratum, []).append(i)
    parts: list[list[int]] = [[] for _ in range(folds)]
    start = 0
    for stratum in sorted(groups):
        members = groups[stratum]
        rng.shuffle(members)
        for k, i in enumerate(members):
            parts[(start + k) % folds].append(i)
        start = (start + len(members)) % folds
    return [np.array(sorted(part), dtype=np.int64) for part in parts]


def strata_of(examples: Sequence[LabelledExample], names: Sequence[str]) -> list[str]:
    """A stratum per example: its rarest positive category among ``names`` (their order), else none."""
    counts: Mapping[str, int] = {n: sum(n in ex.labels for ex in examples) for n in names}
    rarest = sorted(names, key=lambda n: (counts[n], n))
    return [next((n for n in rarest if n in ex.labels), "") for ex in examples]
