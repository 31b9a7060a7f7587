"""Evaluate decisions on labelled data with the worker's own batch functions.

A labelled split goes through exactly what a worker runs on a batch: the text
encoder, :func:`~sieve.flow.match.match_batch`, then :func:`~sieve.flow.decide.decide_scores`
(the core of :func:`~sieve.flow.decide.decide`). Gold labels then say how good the
decisions were:

- per route precision / recall / F1, per outcome, per label (category);
- the share decided automatically and its accuracy, the review share;
- a confusion table (gold outcome x decided outcome, ``needs_review`` included);
- the coverage-risk curve: the router's answer *without* review, events ranked
  by confidence, the error rate among the most confident ``c`` of them;
- the cascade, with gold labels standing in for the reviewer: accuracy against
  the share deferred to review, and RouteLLM's CPT(50%/80%/95%) and APGR.

The confidence of an event is the smallest change of a route score that would
flip the router's answer without review (see :func:`forced_answers`): how far the
event sits from the policy's decision boundary, in cosine units.

Side by side, on the same split, the semantic-router way: the 5 nearest examples,
a route's score the mean of its hits among them, the best route taken when its
best hit passes one threshold (0.5 for MiniLM), no review band.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from sieve.contracts import NEEDS_REVIEW
from sieve.encoders.core import TextEncoder
from sieve.flow.decide import Policy, decide_scores
from sieve.flow.head import LearnedHead
from sieve.flow.match import MatchResult, RouteIndex, match_batch
from sieve.quality.datasets import LabelledData
from sieve.routeset import RouteSet

SEMANTIC_ROUTER_TOP_K = 5
SEMANTIC_ROUTER_THRESHOLD = 0.5  # semantic-router's default score_threshold for MiniLM encoders
NOISY_BELOW = 30  # a class with fewer gold examples than this is marked noisy
COVERAGES = (0.5, 0.6, 0.7, 0.75, 0.8, 0.9, 1.0)
DEFERRALS = (0.0, 0.05, 0.1, 0.2, 0.25, 0.3, 0.4, 0.5)

SystemKind = Literal["three-way", "single-threshold"]


# --------------------------------------------------------------------------- statistics


def wilson(successes: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion (``(0, 1)`` when ``total`` is 0)."""
    if total == 0:
        return 0.0, 1.0
    p = successes / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def _ratio(num: int | float, den: int | float) -> float | None:
    return float(num) / float(den) if den else None


def _f1(precision: float | None, recall: float | None) -> float | None:
    if precision is None or recall is None or precision + recall == 0:
        return None if precision is None or recall is None else 0.0
    return 2 * precision * recall / (precision + recall)


# --------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class ScoredSplit:
    """A labelled split run through encode and match_batch against one route index."""

    data: LabelledData
    index: RouteIndex
    vectors: np.ndarray
    match: MatchResult  # nearest_k = SEMANTIC_ROUTER_TOP_K
    gold: tuple[str, ...]  # gold outcomes, "matches nothing" resolved to the set's default

    @property
    def route_set(self) -> RouteSet:
        """The route set scored against."""
        return self.index.route_set


def text_of(data: LabelledData) -> list[str]:
    """The texts of a split (image examples need an image encoder, which eval does not run)."""
    images = [ex.id for ex in data.examples if ex.text is None]
    if images:
        raise ValueError(
            f"{data.name}: {len(images)} examples have no text (image references, e.g. {images[0]!r}); "
            "evaluating image routes needs the image encoder, which `sieve eval` does not run yet"
        )
    return [str(ex.text) for ex in data.examples]


def score_split(
    data: LabelledData, index: RouteIndex, encoder: TextEncoder, vectors: np.ndarray | None = None
) -> ScoredSplit:
    """Encode (unless ``vectors`` are given) and match: the worker's encode and match stages."""
    if vectors is None:
        vectors = encoder.encode(text_of(data))
    if encoder.id != index.encoder_id:
        raise ValueError(f"index encoded with {index.encoder_id!r}, events with {encoder.id!r}")
    match = match_batch(vectors, index, index.aggregation, nearest_k=SEMANTIC_ROUTER_TOP_K)
    default = index.route_set.default_outcome
    return ScoredSplit(data, index, vectors, match, tuple(ex.gold(default) for ex in data.examples))


# --------------------------------------------------------------------------- systems


@dataclass(frozen=True)
class SystemRun:
    """One decision system's answers on one split."""

    name: str
    kind: SystemKind
    index: RouteIndex
    outcomes: tuple[str, ...]  # decided outcome, NEEDS_REVIEW included
    reasons: tuple[str, ...]
    routes: tuple[int | None, ...]  # route (index position) behind each decision
    forced: tuple[str, ...]  # the answer with review switched off (for the cascade)
    confidence: np.ndarray  # distance to the decision boundary; higher = surer
    gold: tuple[str, ...]
    details: dict[str, object] = field(default_factory=dict)

    @property
    def route_set(self) -> RouteSet:
        """The route set decided with."""
        return self.index.route_set


def forced_answers(route_scores: np.ndarray, policy: Policy) -> tuple[list[str], np.ndarray]:
    """The policy's answer with review switched off, and how sure it is.

    Each route's review band ``[review, accept)`` is collapsed to its midpoint
    ``b``. Answer: the top route's outcome when its score reaches its ``b``, else
    the default. Confidence: the smallest score change that flips that answer —
    for an accepted event, its lead over ``b`` (unless the route's outcome is the
    default anyway) and over the best route of another outcome; for a default
    one, how far every other-outcome route is below its ``b``. Events inside a
    review band or near a route of another outcome are the least confident, so
    the policy's own review set is (close to) a prefix of this ranking.
    """
    outcomes = np.array(policy.outcomes, dtype=object)
    non_default = outcomes != policy.default_outcome
    boundary = (policy.accept.astype(np.float64) + policy.review.astype(np.float64)) / 2.0
    n, routes = route_scores.shape
    answers: list[str] = []
    confidence = np.empty(n, dtype=np.float64)
    firsts = np.argsort(-route_scores, axis=1)[:, 0] if routes else np.zeros(n, dtype=np.int64)
    for i, scores in enumerate(route_scores):
        first = int(firsts[i])  # the same top route as decide_scores picks, ties included
        s1 = float(scores[first])
        if non_default[first] and s1 >= boundary[first]:
            outcome = str(outcomes[first])
            gaps = [s1 - float(boundary[first])]
            others = outcomes != outcome
            if others.any():
                gaps.append(s1 - float(scores[others].max()))
            answers.append(outcome)
            confidence[i] = min(gaps)
        else:
            answers.append(policy.default_outcome)
            if not non_default.any():
                confidence[i] = 2.0
                continue
            # route r takes over when it reaches its b and passes every other route
            top_other = np.full(routes, s1)
            if routes > 1:
                top_other[first] = float(scores[int(np.argsort(-scores)[1])])
            need = np.maximum(boundary - scores, top_other - scores)
            confidence[i] = max(0.0, float(need[non_default].min()))
    return answers, confidence


def three_way_run(
    name: str, scored: ScoredSplit, policy: Policy | None = None, head: LearnedHead | None = None
) -> SystemRun:
    """Sieve's policy (the route set's thresholds unless ``policy`` is given) on a scored split."""
    index = scored.index
    policy = policy or Policy.for_index(index)
    route_scores = scored.match.route_scores
    if head is not None:
        route_scores = head.combine(route_scores, scored.vectors, index)
    verdicts = decide_scores(route_scores, policy)
    forced, confidence = forced_answers(route_scores, policy)
    return SystemRun(
        name=name,
        kind="three-way",
        index=index,
        outcomes=tuple(v.outcome for v in verdicts),
        reasons=tuple(v.reason for v in verdicts),
        routes=tuple(v.route for v in verdicts),
        forced=tuple(forced),
        confidence=confidence,
        gold=scored.gold,
        details={"head_weight": head.weight if head is not None else None},
    )


def semantic_router_scores(scored: ScoredSplit) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per event: the semantic-router top route, its mean score and its best hit among the top 5.

    Route ``-1`` where no example is among the nearest (an empty index cannot happen).
    """
    owner = scored.index.example_route
    n = scored.match.nearest_index.shape[0]
    top_route = np.full(n, -1, dtype=np.int64)
    top_mean = np.zeros(n, dtype=np.float64)
    top_best = np.zeros(n, dtype=np.float64)
    for i in range(n):
        hits: dict[int, list[float]] = {}
        for row, score in zip(scored.match.nearest_index[i], scored.match.nearest_score[i], strict=True):
            hits.setdefault(int(owner[row]), []).append(float(score))
        means = {route: sum(values) / len(values) for route, values in hits.items()}
        best_route = max(means, key=lambda route: (means[route], -route))
        top_route[i] = best_route
        top_mean[i] = means[best_route]
        top_best[i] = max(hits[best_route])
    return top_route, top_mean, top_best


def semantic_router_run(
    name: str, scored: ScoredSplit, threshold: float = SEMANTIC_ROUTER_THRESHOLD
) -> SystemRun:
    """The semantic-router way: top-5 hits, mean per route, one threshold on the best hit, no review.

    As in semantic-router 0.x ``RouteLayer``: the route with the highest mean over its
    hits among the 5 nearest examples is chosen when its best hit exceeds the
    threshold; otherwise no route (here: the route set's default outcome).
    """
    route_set = scored.route_set
    routes_in_index = scored.index.routes
    top_route, _top_mean, top_best = semantic_router_scores(scored)
    outcomes: list[str] = []
    routes: list[int | None] = []
    reasons: list[str] = []
    for route, best in zip(top_route, top_best, strict=True):
        if route >= 0 and best > threshold:
            outcomes.append(routes_in_index[int(route)].outcome)
            routes.append(int(route))
            reasons.append("accept")
        else:
            outcomes.append(route_set.default_outcome)
            routes.append(None)
            reasons.append("no_match")
    return SystemRun(
        name=name,
        kind="single-threshold",
        index=scored.index,
        outcomes=tuple(outcomes),
        reasons=tuple(reasons),
        routes=tuple(routes),
        forced=tuple(outcomes),
        confidence=np.abs(top_best - threshold),
        gold=scored.gold,
        details={"threshold": threshold, "top_k": SEMANTIC_ROUTER_TOP_K, "aggregation": "mean"},
    )


# --------------------------------------------------------------------------- metrics


def cascade_curve(correct: np.ndarray, confidence: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Accuracy when the least confident ``k`` events go to a perfect reviewer, k = 0..n.

    Returns ``(deferred_share, accuracy)``, both of length n + 1.
    """
    n = len(correct)
    if n == 0:
        return np.array([0.0]), np.array([1.0])
    order = np.argsort(confidence, kind="stable")  # least confident first
    wrong_sorted = (~correct[order]).astype(np.int64)
    # deferring the first k fixes the errors among them
    fixed = np.concatenate([[0], np.cumsum(wrong_sorted)])
    errors = int((~correct).sum())
    accuracy = 1.0 - (errors - fixed) / n
    return np.arange(n + 1) / n, accuracy


def coverage_risk_curve(correct: np.ndarray, confidence: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Error rate among the ``k`` most confident events, k = 1..n: ``(coverage, risk)``."""
    n = len(correct)
    if n == 0:
        return np.array([1.0]), np.array([0.0])
    order = np.argsort(-confidence, kind="stable")
    wrong = np.cumsum((~correct[order]).astype(np.int64))
    k = np.arange(1, n + 1)
    return k / n, wrong / k


@dataclass(frozen=True)
class CascadeSummary:
    """RouteLLM's cascade measures with a perfect (gold) reviewer as the strong model."""

    router_accuracy: float  # everything decided automatically (the weak model alone)
    cpt: dict[str, float | None]  # share deferred to recover 50/80/95% of the gap
    apgr: float | None  # area under the performance-gap-recovered curve
    accuracy_at: dict[str, float]  # accuracy with these shares deferred

    def as_dict(self) -> dict[str, object]:
        """JSON-ready."""
        return {
            "router_accuracy": self.router_accuracy,
            "cpt": self.cpt,
            "apgr": self.apgr,
            "accuracy_at_deferred": self.accuracy_at,
        }


def summarise_cascade(correct: np.ndarray, confidence: np.ndarray) -> CascadeSummary:
    """CPT(x): the least share deferred whose accuracy recovers x of the gap to 1.0; APGR."""
    deferred, accuracy = cascade_curve(correct, confidence)
    weak = float(accuracy[0])
    gap = 1.0 - weak
    cpt: dict[str, float | None] = {}
    apgr: float | None
    if gap <= 0:
        cpt = {"50%": 0.0, "80%": 0.0, "95%": 0.0}
        apgr = None
    else:
        pgr = (accuracy - weak) / gap
        for target in (0.5, 0.8, 0.95):
            reached = np.nonzero(pgr >= target - 1e-12)[0]
            cpt[f"{int(target * 100)}%"] = float(deferred[reached[0]]) if reached.size else None
        apgr = float(np.trapezoid(pgr, deferred))
    at = {}
    for share in DEFERRALS:
        k = min(len(accuracy) - 1, int(math.floor(share * (len(accuracy) - 1) + 1e-9)))
        at[f"{share:.2f}"] = float(accuracy[k])
    return CascadeSummary(weak, cpt, apgr, at)


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
        return _ratio(self.auto_correct, self.auto)

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
        }


def summarise(run: SystemRun) -> Summary:
    """Headline numbers of a system run."""
    gold = np.array(run.gold, dtype=object)
    decided = np.array(run.outcomes, dtype=object)
    forced = np.array(run.forced, dtype=object)
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
            "precision": _ratio(hits, total),
            "wilson95_low": low if total else None,
            "wilson95_high": high if total else None,
            "gold": int((gold == outcome).sum()),
        }
    forced_correct = forced == gold
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
            precision = _ratio(tp, len(judged))
            recall = _ratio(tp, len(positives))
            row.update(
                {
                    "against": "label",
                    "support": len(positives),
                    "known": len(known),
                    "tp": tp,
                    "precision": precision,
                    "recall": recall,
                    "f1": _f1(precision, recall),
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
                    "precision": _ratio(tp, len(accepted)),
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
        precision, recall = _ratio(tp, predicted), _ratio(tp, support)
        rows.append(
            {
                "outcome": str(outcome),
                "support": support,
                "decided": predicted,
                "tp": tp,
                "precision": precision,
                "recall": recall,
                "f1": _f1(precision, recall),
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
                "caught_share": _ratio(caught, n),
                "reviewed_share": _ratio(reviewed, n),
                "missed_share": _ratio(n - caught - reviewed, n),
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
        "share": _ratio(len(members), len(run.reasons)),
        "given": dict(Counter(run.outcomes[i] for i in members)),
        "gold": dict(gold),
        "gold_default_share": _ratio(gold.get(default, 0), len(members)),
        "default_outcome": default,
    }


def semantic_router_fit(scored: ScoredSplit, grid: Sequence[float] | None = None) -> tuple[float, float]:
    """semantic-router's ``fit``: the one threshold with the best accuracy; ``(threshold, accuracy)``."""
    route_set = scored.route_set
    top_route, _mean, top_best = semantic_router_scores(scored)
    gold = np.array(scored.gold, dtype=object)
    route_outcome = np.array(
        [r.outcome for r in scored.index.routes] + [route_set.default_outcome], dtype=object
    )
    outcome_if_pass = route_outcome[np.where(top_route >= 0, top_route, len(scored.index.routes))]
    best = (SEMANTIC_ROUTER_THRESHOLD, -1.0)
    for threshold in grid if grid is not None else np.round(np.arange(0.0, 1.0, 0.01), 2):
        decided = np.where(top_best > threshold, outcome_if_pass, route_set.default_outcome)
        accuracy = float((decided == gold).mean()) if len(gold) else 0.0
        if accuracy > best[1] + 1e-12:
            best = (float(threshold), accuracy)
    return best
