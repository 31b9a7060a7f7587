"""Decision rows: the worker's verdicts dressed as :class:`~sieve.contracts.Decision` dicts.

:func:`decision_rows` is the hot path's last step: per event, the verdict of
:func:`sieve.flow.list_policy.decide_with_lists` (the policy of :mod:`sieve.flow.decide`
with the event's list hits) with its scores, nearest examples and provenance, as plain
dicts shaped field for field like the contract; :func:`validate_decisions` checks them.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import numpy as np
from pydantic import TypeAdapter

from sieve.contracts import DECISION_SCHEMA_VERSION, NEEDS_REVIEW, Decision, Event, ImageRef
from sieve.flow.decide import Policy, Verdict, novelty_scores
from sieve.flow.list_policy import decide_with_lists
from sieve.flow.lists import ListHit
from sieve.flow.match import MatchResult, RouteIndex

_DECISIONS = TypeAdapter(list[Decision])


def event_view_row(event: Event) -> dict[str, Any]:
    """:class:`EventView` of an event as a plain dict (the event without inline image bytes)."""
    return {"id": event.id, "modality": event.modality, "text": event.text, "image_uri": event.image_uri,
            "tenant": event.tenant, "metadata": event.metadata, "created_at": event.created_at}


def decision_rows(
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
    list_hits: Sequence[list[ListHit]] | None = None,
) -> list[dict[str, Any]]:
    """One decision per event, in order, as plain dicts shaped field for field like :class:`Decision`.

    The worker's hot path: it runs per event at stream rates, so it builds no
    pydantic object (the rows are serialised straight to JSON); :func:`validate_decisions`
    validates them into :class:`Decision` models, and the tests check that every
    row is a valid Decision.
    """
    novelty = novelty_scores(match.nearest_score)
    route_scores, verdicts = decide_with_lists(match.route_scores, policy, novelty, list_hits, index)
    if not verdicts:
        return []
    novelties: list[float | None] = (
        novelty.tolist() if policy.novelty_threshold is not None else [None] * len(verdicts)
    )
    routes = index.routes
    names = [route.name for route in routes]
    route_outcomes = [route.outcome for route in routes]
    example_routes = [names[r] for r in index.example_route.tolist()]
    example_ids, example_texts = index.example_ids, index.example_texts
    decided_ts = decided_at.timestamp()
    k = min(top_routes, len(routes))
    order = np.argsort(-route_scores, axis=1)[:, :k]
    version, set_name, encoder_id = index.version, index.route_set.name, index.encoder_id
    mode = index.route_set.mode
    categories = [j for j, o in enumerate(route_outcomes) if o != policy.default_outcome]
    rows: list[dict[str, Any]] = []
    for i, (event, verdict, top_order, scores, near_rows, near_scores, event_novelty) in enumerate(zip(
        events, verdicts, order.tolist(), route_scores.tolist(), match.nearest_index.tolist(),
        match.nearest_score.tolist(), novelties, strict=True,
    )):
        top = scores[top_order[0]]
        runner_up = scores[top_order[1]] if k > 1 else -1.0
        event_time = event_times[i] if event_times else None
        route = verdict.route
        image = images[i] if images else None
        rows.append({
            "schema_version": DECISION_SCHEMA_VERSION,
            "id": Decision.make_id(event.id, version),
            "event_id": event.id,
            "outcome": verdict.outcome,
            "reason": verdict.reason,
            "route": names[route] if route is not None else None,
            "score": scores[route] if route is not None else top,
            "margin": top - runner_up,
            "scores": [{"route": names[j], "outcome": route_outcomes[j], "score": scores[j]}
                       for j in top_order],
            "nearest": [{"id": example_ids[row], "route": example_routes[row], "text": example_texts[row],
                         "score": score} for row, score in zip(near_rows, near_scores, strict=True)],
            "route_set": set_name,
            "route_set_version": version,
            "encoder": encoder_id,
            "decided_by": "router",
            "latency_ms": (decided_ts - event_time) * 1000.0 if event_time else None,
            "decided_at": decided_at,
            "modality": event.modality,
            "event": event_view_row(event),
            "image": image.model_dump() if image is not None else None,
            "source_topic": source_topics[i] if source_topics else None,
            "review": None,
            "novel": verdict.novel,
            "novelty": event_novelty,
            "list_hits": list_hit_rows(list_hits[i]) if list_hits and list_hits[i] else None,
            "from_cache": None,
            "mode": mode,
            **(multi_fields(verdict, scores, names, route_outcomes, categories) if policy.multi
               else _SINGLE_FIELDS),
            "final": verdict.outcome != NEEDS_REVIEW,
        })
    return rows


def list_hit_rows(hits: list[ListHit]) -> list[dict[str, Any]]:
    """The ``list_hits`` field of a decision."""
    return [{"list": h.list, "entry": h.entry, "route": h.route, "distance": h.distance, "action": h.action}
            for h in hits]


_SINGLE_FIELDS: dict[str, Any] = {"routes": None, "categories": None, "category_scores": None}


def multi_fields(verdict: Verdict, scores: list[float], names: list[str], outcomes: list[str],
                 categories: list[int]) -> dict[str, Any]:
    """A multi-mode decision's ``routes``, ``categories`` and ``category_scores``."""
    accepted = {r for r, band, _ in verdict.fired or () if band == "accept"}
    return {
        "routes": [{"route": names[r], "outcome": outcomes[r], "score": scores[r], "band": band,
                    "ambiguous": ambiguous, "confirmed": None} for r, band, ambiguous in verdict.fired or ()],
        "categories": {names[j]: j in accepted for j in categories},
        "category_scores": {names[j]: scores[j] for j in categories},
    }


def validate_decisions(rows: list[dict[str, Any]]) -> list[Decision]:
    """Decision models from :func:`decision_rows` (pydantic checks every field)."""
    return _DECISIONS.validate_python(rows)

