"""Publish: decisions and dead letters become Kafka messages for their topics.

Planning is pure (this module); sending is the worker's job
(:mod:`sieve.worker.batch_worker`), which sends a batch's messages as record batches
(:func:`sieve.kafka.client.send_batched`) and awaits their acknowledgements together.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from pydantic_core import to_json

from sieve.contracts import NEEDS_REVIEW, DeadLetter, Decision
from sieve.flow.dedup import review_key
from sieve.kafka.records import Outbound, new_tuple
from sieve.topology import OutputSpec


def route_targets(decision: dict[str, Any]) -> list[str]:
    """The routes whose ``route.<name>`` topics get a decision (a row, or a model dumped to a dict).

    Single mode: the decision's route, when it has one. Multi mode: a router decision goes to
    every route it accepted; a reviewer's verdict goes to every route the router had accepted
    (their consumers get the final word) and every route the verdict confirmed.
    """
    routes = decision.get("routes")
    if decision.get("mode") != "multi" or routes is None:
        route = decision["route"]
        return [route] if route is not None else []
    if decision["decided_by"] == "router":
        return [r["route"] for r in routes if r["band"] == "accept"]
    return [r["route"] for r in routes if r["band"] == "accept" or r.get("confirmed")]


_FINAL = {True: ("sieve-final", b"true"), False: ("sieve-final", b"false")}


def plan_decisions(decisions: Sequence[Decision | dict[str, Any]], output: OutputSpec) -> list[Outbound]:
    """Each decision to its outcome's topic and to the topics of its routes (:func:`route_targets`).

    Messages are keyed by the event id, except on the needs-review topic: there the key is
    the content's (:func:`sieve.flow.dedup.review_key`), so repeats of one text land on one
    partition and meet in one reviewer, which asks the LLM once for them. Every message
    carries the decision id and outcome in headers, and ``sieve-final`` when the decision
    says whether it is final.

    Decisions come as models or as the worker's rows (:func:`sieve.flow.rows.decision_rows`,
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
            row = decision.model_dump(include={"id", "event_id", "outcome", "route", "routes", "mode",
                                               "decided_by", "final"})
            value = decision.model_dump_json().encode()
            if decision.outcome == NEEDS_REVIEW:
                content = review_key(decision.route_set_version, decision.event.text,
                                     decision.image.sha256 if decision.image is not None else None)
        else:
            row = decision
            value = to_json(decision)
            if decision["outcome"] == NEEDS_REVIEW:
                image = decision.get("image")
                content = review_key(decision["route_set_version"], decision["event"]["text"],
                                     image["sha256"] if image else None)
        outcome = row["outcome"]
        try:
            topic, outcome_header = by_outcome[outcome]
        except KeyError:
            topic, outcome_header = by_outcome[outcome] = (
                output.topic_for(outcome), ("sieve-outcome", outcome.encode()))
        key = row["event_id"].encode()
        final = row.get("final")
        headers: tuple[tuple[str, bytes], ...] = (
            (("sieve-decision-id", row["id"].encode()), outcome_header) if final is None
            else (("sieve-decision-id", row["id"].encode()), outcome_header, _FINAL[final]))
        topic_key = content.encode() if outcome == NEEDS_REVIEW and content is not None else key
        append(new_tuple(Outbound, (topic, topic_key, value, headers)))
        if prefix is not None:
            for route in route_targets(row):
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


def audited(decision_id: str, share: float) -> bool:
    """Whether a decision is in the audit sample: a hash of its id below ``share`` (same id, same answer)."""
    if share <= 0.0:
        return False
    digest = hashlib.blake2b(decision_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < share * 2**64


def plan_audits(decisions: Sequence[dict[str, Any]], topic: str, share: float) -> list[Outbound]:
    """The audit sample of the automatic decisions, copied to ``topic`` for the reviewer to label.

    A seeded share of them, by decision id (:func:`audited`), keyed like the decisions; the
    decision itself is published as ever. ``sieve-audit: true`` says why it is there.
    """
    messages = []
    for row in decisions:
        if row["outcome"] != NEEDS_REVIEW and audited(row["id"], share):
            headers = (("sieve-decision-id", row["id"].encode()), ("sieve-outcome", row["outcome"].encode()),
                       ("sieve-audit", b"true"))
            messages.append(Outbound(topic, row["event_id"].encode(), to_json(row), headers))
    return messages
