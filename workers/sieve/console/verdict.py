"""A moderator's verdict on a hand-off: the final decision, its label, and what gets published.

The verdict is built exactly as the LLM reviewer builds its own
(:func:`sieve.review.steps.reviewed_decision`, multi-mode rules included) from a reply made
of the moderator's choice, so it goes to the same topics in the same form. Its id is a
UUIDv5 of the hand-off it settles (a repeat has the same id); a lead's override gets a UUIDv5
of the verdict it replaces. ``review.moderator`` names the person; the LLM's own answer on
the hand-off, if any, stays in ``review.verdict``/``route``/``rationale``.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from sieve.contracts import Decision, Label
from sieve.flow.publish import plan_decisions
from sieve.kafka.records import Outbound
from sieve.review.catalogue import MultiReviewReply, ReplyError, ReviewCatalogue, ReviewReply
from sieve.review.multi import check_reply
from sieve.review.steps import reviewed_decision
from sieve.topology import OutputSpec

_CONSOLE_NAMESPACE = uuid.UUID("5d1f3c0e-8a7b-4c2d-9e61-2f4b8a0c7d13")
MAX_NOTE_CHARS = 2000


class InvalidChoice(ValueError):
    """The moderator's choice is not a verdict of this route set: unknown, or at odds."""


@dataclass(frozen=True)
class Choice:
    """What the moderator picked: an outcome, the routes that apply, an optional note."""

    outcome: str
    routes: tuple[str, ...] = ()
    note: str | None = None


def verdict_id(settles: str, overrides: str | None = None) -> str:
    """A verdict's id: from the hand-off it settles, or (an override) from the verdict it replaces."""
    seed = settles if overrides is None else f"{overrides}\x00override"
    return str(uuid.uuid5(_CONSOLE_NAMESPACE, seed))


def _reply(choice: Choice, catalogue: ReviewCatalogue) -> ReviewReply:
    outcomes = catalogue.route_outcome
    for name in choice.routes:
        if name not in outcomes:
            raise InvalidChoice(f"{name!r} is not a route of {catalogue.name!r}")
    if choice.outcome not in catalogue.outcomes:
        raise InvalidChoice(f"{choice.outcome!r} is not an outcome of {catalogue.name!r}")
    note = (choice.note or "")[:MAX_NOTE_CHARS]
    if catalogue.multi:
        reply = MultiReviewReply(verdict=choice.outcome, route=None, confidence=1.0, rationale=note,
                                 routes=list(choice.routes))
        try:
            return check_reply(reply, catalogue)
        except ReplyError as exc:
            raise InvalidChoice(str(exc)) from exc
    route = next((r for r in choice.routes if outcomes[r] == choice.outcome), None)
    if choice.routes and route is None:
        raise InvalidChoice(f"none of the routes {list(choice.routes)} has outcome {choice.outcome!r}")
    return ReviewReply(verdict=choice.outcome, route=route, confidence=1.0, rationale=note)


def human_verdict(handoff: Decision, choice: Choice, moderator: str, catalogue: ReviewCatalogue,
                  now: datetime, overrides: str | None = None) -> Decision:
    """The final decision on ``handoff`` as ``moderator`` chose it; raises :class:`InvalidChoice`."""
    reply = _reply(choice, catalogue)
    if handoff.review is None:
        raise InvalidChoice("the item is not a reviewer's hand-off (it has no review)")
    note = (choice.note or "").strip()[:MAX_NOTE_CHARS] or None
    review = handoff.review.model_copy(update={"moderator": moderator, "moderator_note": note,
                                               "overrides": overrides})
    made = reviewed_decision(handoff, reply, review, now, catalogue if catalogue.multi else None)
    return made.model_copy(update={"id": verdict_id(handoff.id, overrides)})


def plan_verdict(verdict: Decision, handoff: Decision, output: OutputSpec,
                 labels_topic: str | None) -> list[Outbound]:
    """The verdict to its outcome's (and routes') topics, and its label to the labels topic."""
    messages = plan_decisions([verdict], output)
    if labels_topic is not None:
        label = Label.of_verdict(verdict, handoff)
        messages.append(Outbound(labels_topic, verdict.event_id.encode(), label.model_dump_json().encode(),
                                 (("sieve-label-id", label.id.encode()),)))
    return messages
