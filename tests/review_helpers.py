"""A small route set and needs_review decisions for the reviewer's tests."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sieve.contracts import Decision
from sieve.routeset import RouteSet

ROUTE_SET = RouteSet.model_validate({
    "name": "mod",
    "description": "Moderation of chat messages (a test set).",
    "default_outcome": "clean",
    "routes": [
        {"name": "threat", "outcome": "violating",
         "policy": "Threats of violence against a person or group.",
         "utterances": ["I will hurt you", "you will regret this when I find you"]},
        {"name": "insult", "outcome": "violating",
         "policy": "Targeted insults and degradation of a person.",
         "utterances": ["you are worthless", "nobody likes you, loser"]},
        {"name": "news", "outcome": "clean",
         "policy": "Reporting or discussion of current events.",
         "utterances": ["the council voted on the budget today", "storm warnings for the coast"]},
    ],
})

DECIDED_AT = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)


def make_decision(event_id: str, text: str | None = "is this fine?", *, modality: str = "text",
                  image_uri: str | None = None, route_set: str = "mod", **update: Any) -> Decision:
    """A needs_review decision as the router publishes it."""
    event: dict[str, Any] = {"id": event_id, "modality": modality}
    if modality == "text":
        event["text"] = text
    else:
        event["image_uri"] = image_uri
    data: dict[str, Any] = {
        "id": Decision.make_id(event_id, "v1"),
        "event_id": event_id,
        "outcome": "needs_review",
        "reason": "review_band",
        "route": "threat",
        "score": 0.47,
        "margin": 0.05,
        "scores": [
            {"route": "threat", "outcome": "violating", "score": 0.47},
            {"route": "news", "outcome": "clean", "score": 0.42},
        ],
        "nearest": [
            {"id": "ex1", "route": "threat", "text": "I will hurt you", "score": 0.5},
            {"id": "ex2", "route": "news", "text": "storm warnings for the coast", "score": 0.41},
        ],
        "route_set": route_set,
        "route_set_version": "v1",
        "encoder": "trivial:crc32-64",
        "decided_by": "router",
        "latency_ms": 12.0,
        "decided_at": DECIDED_AT.isoformat(),
        "modality": modality,
        "event": event,
    }
    data.update(update)
    return Decision.model_validate(data)


def later(seconds: float) -> datetime:
    return DECIDED_AT + timedelta(seconds=seconds)
