"""List hits in the policy: what block and review lists do to an encoded event's verdict.

The worker (:func:`sieve.flow.rows.decision_rows`) and ``sieve eval`` both decide through
:func:`decide_with_lists`, so eval measures the lists as the worker runs them.

- **Block** hits (``action: accept``, and image hash lists): in a ``multi`` set the hit's
  route is raised to score 1 (it accepts), and the event is still scored; in a ``single``
  set the first block hit decides the event by its route (``reason: accept``). The worker
  decides those before encoding (:mod:`sieve.flow.prefilter`); eval, which scores every
  event, decides them here.
- **Review** hits (``action: review``): the hit puts its route in its review band, so the
  event never gets the set's default outcome automatically. In a ``multi`` set the route's
  score is raised to at least its review threshold and the severity rule decides (review,
  unless a route of equal or higher severity accepts). In a ``single`` set a verdict that
  would be the default outcome becomes ``needs_review`` (reason ``review_band``, the hit's
  route); a route of another outcome that accepted, or a review already, stands.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sieve.contracts import NEEDS_REVIEW
from sieve.flow.decide import Policy, Verdict, decide_scores
from sieve.flow.lists import ListHit
from sieve.flow.match import RouteIndex


def with_list_hits(route_scores: np.ndarray, hits: Sequence[list[ListHit]], index: RouteIndex,
                   review: np.ndarray | None = None) -> np.ndarray:
    """Multi mode: the scores with each hit's route raised into its band.

    A block hit raises its route to 1 (it accepts); with ``review`` (the policy's review
    thresholds), a review hit raises its route to at least its review threshold. The event
    is still scored: the other routes keep their scores, and the verdict follows the
    severity order over everything that fired.
    """
    wanted = {"accept", "review"} if review is not None else {"accept"}
    if not any(hit.action in wanted for event_hits in hits for hit in event_hits):
        return route_scores
    position = {route.name: j for j, route in enumerate(index.routes)}
    scores = np.array(route_scores, dtype=np.float32, copy=True)
    for i, event_hits in enumerate(hits):
        for hit in event_hits:
            j = position.get(hit.route or "")
            if j is None or hit.action not in wanted:
                continue
            floor = np.float32(1.0) if hit.action == "accept" or review is None else review[j]
            scores[i, j] = max(scores[i, j], floor)
    return scores


def decide_with_lists(
    route_scores: np.ndarray, policy: Policy, novelty: np.ndarray | None,
    hits: Sequence[list[ListHit]] | None, index: RouteIndex,
) -> tuple[np.ndarray, list[Verdict]]:
    """:func:`~sieve.flow.decide.decide_scores` with the events' list hits applied.

    Returns the scores the verdicts were decided on (in multi sets, hits raise their routes'
    scores into their bands) and the verdicts.
    """
    if not hits or not any(hits):
        return route_scores, decide_scores(route_scores, policy, novelty)
    if policy.multi:
        route_scores = with_list_hits(route_scores, hits, index, policy.review)
        return route_scores, decide_scores(route_scores, policy, novelty)
    verdicts = decide_scores(route_scores, policy, novelty)
    position = {route.name: j for j, route in enumerate(index.routes)}
    for i, event_hits in enumerate(hits):
        blocks = [position[h.route] for h in event_hits if h.action == "accept" and h.route in position]
        reviews = [position[h.route] for h in event_hits if h.action == "review" and h.route in position]
        if blocks:
            verdicts[i] = Verdict(policy.outcomes[blocks[0]], "accept", blocks[0], verdicts[i].novel)
        elif reviews and verdicts[i].outcome == policy.default_outcome:
            verdicts[i] = Verdict(NEEDS_REVIEW, "review_band", reviews[0], verdicts[i].novel)
    return route_scores, verdicts
