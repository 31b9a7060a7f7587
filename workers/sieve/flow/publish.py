"""Publish: decisions and dead letters become Kafka messages for their topics.

Planning is pure (this module); sending is the worker's job
(:mod:`sieve.worker.batch_worker`), which sends a batch's messages as record batches
(:func:`sieve.kafka.client.send_batched`) and awaits their acknowledgements together.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic_core import to_json

from sieve.contracts import NEEDS_REVIEW, DeadLetter, Decision
from sieve.flow.dedup import review_key
from sieve.kafka.records import Outbound, new_tuple
from sieve.topology import OutputSpec


def plan_decisions(decisions: Sequence[Decision | dict[str, Any]], output: OutputSpec) -> list[Outbound]:
    """Each decision to its outcome's topic and, when it has a route, to the route's topic.

    Messages are keyed by the event id, except on the needs-review topic: there the key is
    the content's (:func:`sieve.flow.dedup.review_key`), so repeats of one text land on one
    partition and meet in one reviewer, which asks the LLM once for them.

    Decisions come as models or as the worker's rows (:func:`sieve.flow.decide.decision_rows`,
    plain dicts shaped like :class:`Decision`, serialised by the same pydantic-core).
    Runs per decision at stream rates: the topic and header of each outcome are looked
    up once per batch, and the messages are made with ``tuple.__new__`` (as
    ``Outbound._make`` does), without the named tuple's Python-level ``__new__``.
    """
    messages: list[Outbound] = []
    append = messages.append
    prefix = output.route_topic_prefix
    by_outcome: dict[str, tuple[str, tuple[str, bytes]]] = {}
    content: str | None = None
    for decision in decisions:
        if isinstance(decision, Decision):
            decision_id, event_id, outcome, route = (
                decision.id, decision.event_id, decision.outcome, decision.route)
            value = decision.model_dump_json().encode()
            if outcome == NEEDS_REVIEW:
                content = review_key(decision.route_set_version, decision.event.text,
                                     decision.image.sha256 if decision.image is not None else None)
        else:
            decision_id, event_id, outcome, route = (
                decision["id"], decision["event_id"], decision["outcome"], decision["route"])
            value = to_json(decision)
            if outcome == NEEDS_REVIEW:
                image = decision.get("image")
                content = review_key(decision["route_set_version"], decision["event"]["text"],
                                     image["sha256"] if image else None)
        try:
            topic, outcome_header = by_outcome[outcome]
        except KeyError:
            topic, outcome_header = by_outcome[outcome] = (
                output.topic_for(outcome), ("sieve-outcome", outcome.encode()))
        key = event_id.encode()
        headers = (("sieve-decision-id", decision_id.encode()), outcome_header)
        topic_key = content.encode() if outcome == NEEDS_REVIEW and content is not None else key
        append(new_tuple(Outbound, (topic, topic_key, value, headers)))
        if route is not None and prefix is not None:
            append(new_tuple(Outbound, (prefix + route, key, value, headers)))
    return messages


def plan_dead_letters(letters: list[DeadLetter], output: OutputSpec) -> list[Outbound]:
    """Each dead letter to the dead-letter topic, keyed by its source event id when known."""
    return [
        Outbound(
            output.dead_letter_topic,
            (letter.event_id or letter.id).encode(),
            letter.model_dump_json().encode(),
            (("sieve-dead-letter-reason", letter.reason.encode()),),
        )
        for letter in letters
    ]
