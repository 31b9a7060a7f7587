"""Multi-label bands: each route judged on its own thresholds (route sets with ``mode: multi``).

Per event and route ``r`` with score ``s``, for the routes whose outcome is not the set's
default (the *categories*; moderation's violating routes):

- ``s >= accept(r)``: the route fires in its **accept** band, unless it is *ambiguous*;
- ``review(r) <= s < accept(r)``, or ambiguous: it fires in its **review** band;
- ambiguous: the best default-outcome route ``b`` (the best *benign* route) is itself at
  least at ``review(b)`` and ``s - s_b < margin(r)``: too close to benign content to call.

The verdict (:func:`sieve.flow.decide.decide_scores`) is the most severe outcome among the
accepted routes; ``needs_review`` when some route sits in its review band and no accepted
route has an outcome of equal or higher severity. With no category fired, a benign route
that accepts gives the default outcome (``reason: accept``), and otherwise it is ``no_match``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class Bands:
    """Per ``(event, route)``: which band each category fired in (benign routes never fire here)."""

    accept: np.ndarray  # (n, routes) bool: fired in its accept band
    review: np.ndarray  # (n, routes) bool: fired in its review band (ambiguous ones included)
    ambiguous: np.ndarray  # (n, routes) bool: accepted on its own, too close to the best benign route


def bands(scores: np.ndarray, accept: np.ndarray, review: np.ndarray, margin: np.ndarray,
          benign: np.ndarray) -> Bands:
    """The bands of a ``(n, routes)`` score matrix; ``benign``: per route, its outcome is the default."""
    scores = np.asarray(scores, dtype=np.float32)
    n, routes = scores.shape
    category = ~benign
    over_accept = (scores >= accept[None, :]) & category[None, :]
    over_review = (scores >= review[None, :]) & category[None, :]
    if benign.any():
        benign_scores = np.where(benign[None, :], scores, -np.inf)
        best_benign = benign_scores.argmax(axis=1)
        best_benign_score = scores[np.arange(n), best_benign]
        benign_in_band = best_benign_score >= review[best_benign]
        # the lead in double precision, compared with the float32 margin in float32 (as single mode)
        lead = (scores.astype(np.float64) - best_benign_score.astype(np.float64)[:, None]).astype(np.float32)
        ambiguous = over_accept & benign_in_band[:, None] & (lead < margin[None, :])
    else:
        ambiguous = np.zeros((n, routes), dtype=bool)
    return Bands(accept=over_accept & ~ambiguous, review=over_review & ~(over_accept & ~ambiguous),
                 ambiguous=ambiguous)


def best_of_rank(scores: np.ndarray, fired: np.ndarray, rank: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per event, the most severe rank among the fired routes, and the best fired route of that rank.

    No route fired: a rank past every real one, and route -1.
    """
    n, routes = fired.shape
    none = np.int64(routes + len(rank))
    ranks = np.where(fired, rank[None, :].astype(np.int64), none)
    top_rank = ranks.min(axis=1) if routes else np.full(n, none)
    of_top = fired & (ranks == top_rank[:, None])
    best = np.where(of_top, scores, -np.inf).argmax(axis=1) if routes else np.zeros(n, np.int64)
    best = np.where(of_top.any(axis=1), best, -1)
    return top_rank, best
