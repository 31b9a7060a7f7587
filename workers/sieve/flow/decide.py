"""Decide: route scores in, one three-way :class:`~sieve.contracts.Decision` per event out.

The policy, per event, with the top route ``r1`` (score ``s1``) and runner-up ``r2``:

1. ``s1 >= accept(r1)``: ``r1``'s outcome, unless ``r2`` has a different outcome,
   is itself inside its review band and trails by less than ``margin`` — then
   ``needs_review`` (reason ``ambiguous``).
2. Otherwise, if any route whose outcome differs from the set's default scores
   at least its own ``review`` threshold: ``needs_review`` (reason
   ``review_band``, the best such route). A route with the default outcome has
   no review band: below its accept threshold it is the default anyway.
3. Otherwise the set's default outcome (reason ``no_match``, no route), or
   ``needs_review`` when the set says ``defaults.no_match: needs_review``.

Novelty, when the set has a threshold (``defaults.novelty``): an event is *novel* when
its novelty (``1 -`` its best similarity to any example of the set, :func:`novelty_scores`)
is above the threshold. A novel event never gets the set's default outcome
automatically: whatever step 1-3 gave it the default outcome (``no_match``, or accepted
by a default-outcome route, which raw nearest-example scores cannot do for a novel event
but a learned head's combined scores can), it gets ``needs_review``, its reason and
route kept — unless the set says ``novelty.on_novel: default``. A novel event accepted
by a route of another outcome keeps it (a route claimed it), and one in a review band
is reviewed anyway; its decision says ``novel: true`` all the same.

Lead, when the set has one (``defaults.default_lead``): an event gets the default outcome
automatically only when its best default-outcome route scores at least that much above
its best route of any other outcome; otherwise ``needs_review``, reason and route kept.
Clean is then decided by being close to clean examples, not by being far from violating
ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np

from sieve.contracts import (
    NEEDS_REVIEW,
    DecisionReason,
)
from sieve.flow import multi
from sieve.flow.match import RouteIndex
from sieve.thresholds import ThresholdOverrides


@dataclass(frozen=True)
class Policy:
    """Per-route thresholds as arrays aligned with a :class:`RouteIndex`'s routes (one space)."""

    accept: np.ndarray
    review: np.ndarray
    margin: np.ndarray
    outcomes: tuple[str, ...]
    default_outcome: str
    # True: an event no route accepts or holds in its review band goes to review, not the default.
    no_match_review: bool = False
    # Events with a novelty above this are novel (None: no threshold, nothing is novel).
    novelty_threshold: float | None = None
    # True: a novel event never gets the default outcome automatically (False: on_novel default).
    novel_review: bool = True
    # An event gets the default outcome automatically only when its best default-outcome route
    # leads its best route of another outcome by at least this (None: no such condition).
    default_lead: float | None = None
    # mode: multi (sieve.flow.multi): every route judged on its own thresholds.
    multi: bool = False
    # multi mode: per route, its outcome's place in the set's severity order (0: most severe).
    rank: np.ndarray | None = None

    @classmethod
    def for_index(cls, index: RouteIndex, overrides: ThresholdOverrides | None = None,
                  route_overrides: Mapping[str, ThresholdOverrides] | None = None) -> Policy:
        """Thresholds of the index's routes in its space: set defaults < topology overrides < route's own.

        ``route_overrides`` (route name -> overrides, a tenant's) go over the route's own.
        """
        route_set = index.route_set
        merged = [route_set.thresholds_for(route, overrides, index.space) for route in index.routes]
        if route_overrides:
            merged = [route_overrides[route.name].over(t) if route.name in route_overrides else t
                      for route, t in zip(index.routes, merged, strict=True)]
        defaults = route_set.defaults if index.space == "text" else route_set.image_defaults
        novelty = defaults.novelty
        return cls(
            accept=np.array([t.accept for t in merged], dtype=np.float32),
            review=np.array([t.review for t in merged], dtype=np.float32),
            margin=np.array([t.margin for t in merged], dtype=np.float32),
            outcomes=tuple(route.outcome for route in index.routes),
            default_outcome=route_set.default_outcome,
            no_match_review=defaults.no_match == "needs_review",
            novelty_threshold=novelty.threshold if novelty is not None else None,
            novel_review=novelty is None or novelty.on_novel == "needs_review",
            default_lead=defaults.default_lead,
            multi=route_set.mode == "multi",
            rank=np.array([route_set.severity_order.index(route.outcome) for route in index.routes],
                          dtype=np.int64),
        )

    def novel(self, novelty: np.ndarray) -> np.ndarray | None:
        """Per event, whether it is novel (None when the policy has no novelty threshold)."""
        if self.novelty_threshold is None:
            return None
        return is_novel(novelty, self.novelty_threshold)

    def short_lead(self, route_scores: np.ndarray) -> np.ndarray | None:
        """Per event, whether the default outcome's lead is short of ``default_lead`` (None: no lead set)."""
        if self.default_lead is None:
            return None
        return lead_short(route_scores, self.outcomes, self.default_outcome, self.default_lead)


def lead_short(route_scores: np.ndarray, outcomes: tuple[str, ...], default_outcome: str,
               lead: float) -> np.ndarray:
    """Per event, whether its best default-outcome route leads every other outcome's best by less than lead.

    Compared in float32, as the worker holds scores and thresholds. A set with no route of the
    default outcome, or none of another, has no lead to measure: every event is short, or none.
    """
    scores = np.asarray(route_scores, dtype=np.float32)
    default = np.array([o == default_outcome for o in outcomes], dtype=bool)
    if not default.any():
        return np.ones(len(scores), dtype=bool)
    if default.all():
        return np.zeros(len(scores), dtype=bool)
    gap = scores[:, default].max(axis=1) - scores[:, ~default].max(axis=1)
    return np.asarray(gap < np.float32(lead), dtype=bool)


def is_novel(novelty: np.ndarray, threshold: float) -> np.ndarray:
    """Per event, novelty above the threshold (compared in float32, as the worker holds both)."""
    return np.asarray(novelty, dtype=np.float32) > np.float32(threshold)


def novelty_scores(nearest_score: np.ndarray) -> np.ndarray:
    """Novelty per event from a match's ``(n, k)`` nearest-example scores (best first).

    ``1 -`` the best cosine similarity to any example of the set, every route's
    (default-outcome routes included): 0 for an event equal to an example, 1 for one
    orthogonal to all. docs/quality.md (Novelty) compares it with a k-nearest score
    relative to the examples' own spread, on labelled in- and out-of-domain data.
    """
    best = np.asarray(nearest_score, dtype=np.float32)
    if best.shape[0] == 0 or best.ndim < 2 or best.shape[1] == 0:
        return np.zeros(best.shape[0], dtype=np.float32)
    return (np.float32(1.0) - best[:, 0]).astype(np.float32)


@dataclass(frozen=True, slots=True)
class Verdict:
    """The policy's answer for one event, before it is dressed as a Decision."""

    outcome: str
    reason: DecisionReason
    route: int | None  # index position of the route behind the outcome
    novel: bool | None = None  # None: the policy has no novelty threshold
    # multi mode: every route that fired, as (index position, band, ambiguous), best score first
    fired: tuple[tuple[int, str, bool], ...] | None = None


def decide_scores(
    route_scores: np.ndarray, policy: Policy, novelty: np.ndarray | None = None
) -> list[Verdict]:
    """Apply the three-way policy to a ``(n, routes)`` score matrix (vectorised over the batch).

    ``novelty``: :func:`novelty_scores` of the events, required when the policy has a
    novelty threshold (ignored otherwise).
    """
    verdicts: list[Verdict] = []
    scores = np.asarray(route_scores, dtype=np.float32)
    n, routes = scores.shape
    if n == 0:
        return verdicts
    if policy.multi:
        return _with_lead(_with_novelty(_decide_multi(scores, policy), policy, novelty), policy, scores)
    outcomes = policy.outcomes
    outcome_of = np.array(outcomes, dtype=object)
    rows = np.arange(n)
    order = np.argsort(-scores, axis=1)
    first = order[:, 0]
    s1 = scores[rows, first]
    accepted = s1 >= policy.accept[first]
    if routes > 1:
        second = order[:, 1]
        s2 = scores[rows, second]
        # s1 - s2 in double precision, compared with the float32 margin in float32
        lead = (s1.astype(np.float64) - s2.astype(np.float64)).astype(np.float32)
        ambiguous = (accepted & (outcome_of[second] != outcome_of[first])
                     & (lead < policy.margin[first]) & (s2 >= policy.review[second]))
    else:
        ambiguous = np.zeros(n, dtype=bool)
    non_default = np.array([o != policy.default_outcome for o in outcomes])
    band = non_default[None, :] & (scores >= policy.review[None, :])
    in_band = ~accepted & band.any(axis=1)
    best_in_band = np.argmax(np.where(band, scores, -np.inf), axis=1)
    no_match = NEEDS_REVIEW if policy.no_match_review else policy.default_outcome
    for top, is_accepted, is_ambiguous, is_in_band, best in zip(
        first.tolist(), accepted.tolist(), ambiguous.tolist(), in_band.tolist(), best_in_band.tolist(),
        strict=True,
    ):
        if is_accepted:
            verdicts.append(Verdict(NEEDS_REVIEW, "ambiguous", top) if is_ambiguous
                            else Verdict(outcomes[top], "accept", top))
        elif is_in_band:
            verdicts.append(Verdict(NEEDS_REVIEW, "review_band", best))
        else:
            verdicts.append(Verdict(no_match, "no_match", None))
    return _with_lead(_with_novelty(verdicts, policy, novelty), policy, scores)


def _with_lead(verdicts: list[Verdict], policy: Policy, scores: np.ndarray) -> list[Verdict]:
    """Default outcomes whose lead is short of ``default_lead`` go to review, reason and route kept."""
    short = policy.short_lead(scores)
    if short is None:
        return verdicts
    default = policy.default_outcome
    return [replace(v, outcome=NEEDS_REVIEW) if flag and v.outcome == default else v
            for v, flag in zip(verdicts, short.tolist(), strict=True)]


def _decide_multi(scores: np.ndarray, policy: Policy) -> list[Verdict]:
    """Multi mode (:mod:`sieve.flow.multi`): the most severe accepted outcome, or review, or default."""
    outcomes = policy.outcomes
    benign = np.array([o == policy.default_outcome for o in outcomes], dtype=bool)
    rank = policy.rank if policy.rank is not None else np.zeros(len(outcomes), dtype=np.int64)
    fired = multi.bands(scores, policy.accept, policy.review, policy.margin, benign)
    accept_rank, accept_best = multi.best_of_rank(scores, fired.accept, rank)
    review_rank, review_best = multi.best_of_rank(scores, fired.review, rank)
    benign_accepted = benign[None, :] & (scores >= policy.accept[None, :])
    benign_best = np.where(benign_accepted, scores, -np.inf).argmax(axis=1)
    no_match = NEEDS_REVIEW if policy.no_match_review else policy.default_outcome
    verdicts: list[Verdict] = []
    fired_any = (fired.accept | fired.review).tolist()
    benign_any_rows: list[bool] = np.asarray(benign_accepted.any(axis=1), dtype=bool).tolist()
    # per event in plain Python over lists made once per batch (no numpy call per event)
    for row, accepted, ambiguous, any_fired, a_rank, a_best, r_rank, r_best, benign_any, b_best in zip(
        scores.tolist(), fired.accept.tolist(), fired.ambiguous.tolist(), fired_any,
        accept_rank.tolist(), accept_best.tolist(), review_rank.tolist(), review_best.tolist(),
        benign_any_rows, benign_best.tolist(), strict=True,
    ):
        routes = sorted((r for r, on in enumerate(any_fired) if on), key=row.__getitem__, reverse=True)
        listed = tuple((r, "accept" if accepted[r] else "review", ambiguous[r]) for r in routes)
        if a_best >= 0 and a_rank <= r_rank:
            verdicts.append(Verdict(outcomes[a_best], "accept", a_best, fired=listed))
        elif r_best >= 0:
            reason: DecisionReason = "ambiguous" if ambiguous[r_best] else "review_band"
            verdicts.append(Verdict(NEEDS_REVIEW, reason, r_best, fired=listed))
        elif benign_any:
            verdicts.append(Verdict(outcomes[b_best], "accept", b_best, fired=((b_best, "accept", False),)))
        else:
            verdicts.append(Verdict(no_match, "no_match", None, fired=()))
    return verdicts


def _with_novelty(verdicts: list[Verdict], policy: Policy, novelty: np.ndarray | None) -> list[Verdict]:
    """Novel events never get the default outcome automatically (unless the set says on_novel: default)."""
    if policy.novelty_threshold is None:
        return verdicts
    if novelty is None:
        raise ValueError("the policy has a novelty threshold: decide_scores needs the events' novelty")
    novel = policy.novel(novelty)
    assert novel is not None
    default, review = policy.default_outcome, policy.novel_review
    return [
        Verdict(NEEDS_REVIEW if flag and review and v.outcome == default else v.outcome,
                v.reason, v.route, flag, v.fired)
        for v, flag in zip(verdicts, novel.tolist(), strict=True)
    ]
