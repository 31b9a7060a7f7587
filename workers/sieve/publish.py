"""Publish: decisions and dead letters become Kafka messages for their topics.

Planning is pure (this module); sending is the agent's job, which queues every
message of a batch and awaits their acknowledgements together.
"""

from __future__ import annotations

from dataclasses import dataclass

from sieve.contracts import DeadLetter, Decision
from sieve.topology import OutputSpec


@dataclass(frozen=True, slots=True)
class Outbound:
    """One message to send."""

    topic: str
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = ()


def plan_decisions(decisions: list[Decision], output: OutputSpec) -> list[Outbound]:
    """Each decision to its outcome's topic and, when it has a route, to the route's topic."""
    messages: list[Outbound] = []
    for decision in decisions:
        value = decision.model_dump_json().encode()
        key = decision.event_id.encode()
        headers = (
            ("sieve-decision-id", decision.id.encode()),
            ("sieve-outcome", decision.outcome.encode()),
        )
        messages.append(Outbound(output.topic_for(decision.outcome), key, value, headers))
        if decision.route is not None and output.route_topic_prefix is not None:
            messages.append(Outbound(output.route_topic_prefix + decision.route, key, value, headers))
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
