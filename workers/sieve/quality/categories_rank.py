"""Which automatic decisions are the most confident: the ranking behind "at the common share".

Two systems are compared at the same automatic share by keeping automatic, in each, only
its most confident decisions. Confidence is two steps:

1. :func:`distance`: how far each decision is from changing under its own verdict rule,
   in score units. An accepted decision of a category outcome: multi mode, the largest
   distance of an accepted category route from leaving its accept band, by falling below
   its accept threshold or becoming ambiguous with the best benign route (the decision
   stays while any one of them stays accepted); single mode, the accepted top route's
   distance from falling below its accept threshold or becoming ambiguous with the
   runner-up. A default-outcome decision: how far the closest category route is below
   its review threshold.
2. :class:`Calibrator`: distances of different outcomes are measured against different
   thresholds (accept for one, review for the other) and are not comparable, so each
   outcome's distance is mapped to an estimated accuracy: an isotonic (non-decreasing)
   fit of "the decision was right" on the distance, per outcome, on other events than it
   ranks (those the thresholds were fitted on; the other folds for a file's own thresholds).

:func:`ranked_keep` keeps the ``keep`` automatic decisions with the highest estimated
accuracy (ties: the larger distance, then the earlier event).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.isotonic import IsotonicRegression

from sieve.contracts import NEEDS_REVIEW
from sieve.flow.decide import Policy, Verdict


def distance(verdicts: Sequence[Verdict], scores: np.ndarray, policy: Policy, positions: Sequence[int],
             *, multi: bool) -> np.ndarray:
    """Per decision, how far it is from changing (score units; module docstring); 0 for needs_review."""
    scores = np.asarray(scores, dtype=np.float64)
    pos = np.array(positions, dtype=np.int64)
    review = policy.review.astype(np.float64)
    accept = policy.accept.astype(np.float64)
    below = ((review[pos][None, :] - scores[:, pos]).min(axis=1) if len(pos)
             else np.ones(len(scores)))
    unambiguous = _unambiguous(scores, policy) if multi else None
    contested = np.full(len(scores), np.inf) if multi else _runner_up(scores, policy)
    out = np.zeros(len(verdicts))
    for i, v in enumerate(verdicts):
        if v.outcome == NEEDS_REVIEW:
            continue
        if v.outcome == policy.default_outcome or v.route is None:
            out[i] = below[i]
        elif multi:
            accepted = [r for r, band, _ in v.fired or () if band == "accept"
                        and policy.outcomes[r] == v.outcome]
            assert unambiguous is not None
            out[i] = max((min(scores[i, r] - accept[r], unambiguous[i, r]) for r in accepted),
                         default=scores[i, v.route] - accept[v.route])
        else:
            out[i] = min(scores[i, v.route] - accept[v.route], contested[i])
    return out


def _unambiguous(scores: np.ndarray, policy: Policy) -> np.ndarray:
    """``(n, routes)``, multi mode: how far each route is from being too close to the best benign route.

    Ambiguous when the best benign route ``b`` is at least at its review threshold and the
    route leads it by less than its margin: the distance is the larger of ``b``'s way up to
    its review threshold and the route's lead beyond its margin.
    """
    benign = np.array([o == policy.default_outcome for o in policy.outcomes], dtype=bool)
    if not benign.any():
        return np.full(scores.shape, np.inf)
    best = np.where(benign[None, :], scores, -np.inf).argmax(axis=1)
    best_score = scores[np.arange(len(scores)), best]
    to_band = policy.review.astype(np.float64)[best] - best_score
    lead = scores - best_score[:, None] - policy.margin.astype(np.float64)[None, :]
    return np.maximum(to_band[:, None], lead)


def _runner_up(scores: np.ndarray, policy: Policy) -> np.ndarray:
    """Per event, single mode: how far the top route is from being ambiguous with the runner-up.

    Ambiguous when the runner-up has another outcome, is at least at its review threshold and
    trails by less than the top route's margin: the larger of the runner-up's way up to its
    review threshold and the lead beyond the margin (no limit when the outcomes agree).
    """
    n, routes = scores.shape
    if routes < 2:
        return np.full(n, np.inf)
    order = np.argsort(-scores, axis=1, kind="stable")
    rows = np.arange(n)
    first, second = order[:, 0], order[:, 1]
    outcomes = np.array(policy.outcomes, dtype=object)
    to_band = policy.review.astype(np.float64)[second] - scores[rows, second]
    lead = scores[rows, first] - scores[rows, second] - policy.margin.astype(np.float64)[first]
    return np.where(outcomes[first] != outcomes[second], np.maximum(to_band, lead), np.inf)


@dataclass(frozen=True)
class Calibrator:
    """Per outcome, an isotonic map from a decision's distance to its estimated accuracy."""

    fits: dict[str, IsotonicRegression]

    @classmethod
    def fit(cls, outcomes: Sequence[str], gold: Sequence[str], dist: np.ndarray) -> Calibrator:
        """Fitted on automatic decisions whose gold outcome is known (``outcomes``, ``gold`` aligned)."""
        fits: dict[str, IsotonicRegression] = {}
        out, right = np.array(outcomes, dtype=object), np.array(
            [o == g for o, g in zip(outcomes, gold, strict=True)], dtype=np.float64)
        for outcome in sorted({o for o in outcomes if o != NEEDS_REVIEW}):
            rows = out == outcome
            fits[outcome] = IsotonicRegression(increasing=True, out_of_bounds="clip").fit(
                dist[rows], right[rows])
        return cls(fits)

    def accuracy(self, outcomes: Sequence[str], dist: np.ndarray) -> np.ndarray:
        """Estimated accuracy per decision: 0 for needs_review and for outcomes never seen when fitting."""
        out = np.zeros(len(outcomes))
        column = np.array(outcomes, dtype=object)
        for outcome, iso in self.fits.items():
            rows = column == outcome
            if rows.any():
                out[rows] = iso.predict(dist[rows])
        return out


def ranked_keep(outcomes: Sequence[str], accuracy: np.ndarray, dist: np.ndarray, keep: int) -> list[str]:
    """``outcomes`` with only the ``keep`` most confident automatic decisions kept (others needs_review)."""
    auto = np.flatnonzero(np.array([o != NEEDS_REVIEW for o in outcomes], dtype=bool))
    # lexsort: last key first; highest accuracy, then largest distance, then event order
    order = auto[np.lexsort((auto, -dist[auto], -accuracy[auto]))]
    kept = set(order[:keep].tolist())
    return [o if i in kept else NEEDS_REVIEW for i, o in enumerate(outcomes)]
