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
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import numpy as np

from sieve.contracts import (
    NEEDS_REVIEW,
    Decision,
    DecisionReason,
    Event,
    EventView,
    ImageRef,
    NearestExample,
    RouteScore,
)
from sieve.match import MatchResult, RouteIndex
from sieve.routeset import ThresholdOverrides


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

    @classmethod
    def for_index(cls, index: RouteIndex, overrides: ThresholdOverrides | None = None) -> Policy:
        """Thresholds of the index's routes in its space: set defaults < topology overrides < route's own."""
        route_set = index.route_set
        merged = [route_set.thresholds_for(route, overrides, index.space) for route in index.routes]
        return cls(
            accept=np.array([t.accept for t in merged], dtype=np.float32),
            review=np.array([t.review for t in merged], dtype=np.float32),
            margin=np.array([t.margin for t in merged], dtype=np.float32),
            outcomes=tuple(route.outcome for route in index.routes),
            default_outcome=route_set.default_outcome,
            no_match_review=(
                route_set.defaults if index.space == "text" else route_set.image_defaults
            ).no_match == "needs_review",
        )


@dataclass(frozen=True, slots=True)
class Verdict:
    """The policy's answer for one event, before it is dressed as a Decision."""

    outcome: str
    reason: DecisionReason
    route: int | None  # index position of the route behind the outcome


def decide_scores(route_scores: np.ndarray, policy: Policy) -> list[Verdict]:
    """Apply the three-way policy to a ``(n, routes)`` score matrix."""
    verdicts: list[Verdict] = []
    non_default = np.array([o != policy.default_outcome for o in policy.outcomes])
    for scores in route_scores:
        order = np.argsort(-scores)
        first = int(order[0])
        s1 = float(scores[first])
        if s1 >= policy.accept[first]:
            outcome = policy.outcomes[first]
            if len(order) > 1:
                second = int(order[1])
                s2 = float(scores[second])
                if (
                    policy.outcomes[second] != outcome
                    and s1 - s2 < policy.margin[first]
                    and s2 >= policy.review[second]
                ):
                    verdicts.append(Verdict(NEEDS_REVIEW, "ambiguous", first))
                    continue
            verdicts.append(Verdict(outcome, "accept", first))
            continue
        in_band = np.where(non_default & (scores >= policy.review))[0]
        if in_band.size:
            best = int(in_band[np.argmax(scores[in_band])])
            verdicts.append(Verdict(NEEDS_REVIEW, "review_band", best))
            continue
        no_match = NEEDS_REVIEW if policy.no_match_review else policy.default_outcome
        verdicts.append(Verdict(no_match, "no_match", None))
    return verdicts


def decide(
    events: list[Event],
    match: MatchResult,
    index: RouteIndex,
    policy: Policy,
    *,
    decided_at: datetime,
    event_times: list[float | None] | None = None,
    source_topics: list[str | None] | None = None,
    images: list[ImageRef | None] | None = None,
    top_routes: int = 5,
) -> list[Decision]:
    """One Decision per event, in order."""
    verdicts = decide_scores(match.route_scores, policy)
    routes = index.routes
    decided_ts = decided_at.timestamp()
    decisions: list[Decision] = []
    for i, (event, verdict) in enumerate(zip(events, verdicts, strict=True)):
        scores = match.route_scores[i]
        order = np.argsort(-scores)[:top_routes]
        top = float(scores[order[0]])
        runner_up = float(scores[order[1]]) if len(order) > 1 else -1.0
        event_time = event_times[i] if event_times else None
        decisions.append(
            Decision(
                id=Decision.make_id(event.id, index.version),
                event_id=event.id,
                outcome=verdict.outcome,
                reason=verdict.reason,
                route=routes[verdict.route].name if verdict.route is not None else None,
                score=float(scores[verdict.route]) if verdict.route is not None else top,
                margin=top - runner_up,
                scores=[
                    RouteScore(route=routes[j].name, outcome=routes[j].outcome, score=float(scores[j]))
                    for j in order
                ],
                nearest=[
                    NearestExample(
                        id=index.example_ids[row],
                        route=routes[int(index.example_route[row])].name,
                        text=index.example_texts[row],
                        score=float(score),
                    )
                    for row, score in zip(match.nearest_index[i], match.nearest_score[i], strict=True)
                ],
                route_set=index.route_set.name,
                route_set_version=index.version,
                encoder=index.encoder_id,
                latency_ms=(decided_ts - event_time) * 1000.0 if event_time else None,
                decided_at=decided_at,
                modality=event.modality,
                event=EventView.of(event),
                image=images[i] if images else None,
                source_topic=source_topics[i] if source_topics else None,
            )
        )
    return decisions
