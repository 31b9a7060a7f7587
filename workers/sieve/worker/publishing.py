"""What a worker does when the broker refuses a batch's messages, by kind of refusal.

:meth:`sieve.worker.batch_worker.BatchWorker._publish` sends a batch and sorts what
the broker answers:

* retriable (broker unavailable, timeouts, leader changes): retried with back-off,
  for as long as it takes (``/readyz`` turns false once it has failed for
  ``publish_unready_s``);
* a message too large (:data:`TOO_LARGE`): the refused messages are found by halving
  the batch (:func:`send_isolating`) and replaced by their event's dead letter with
  reason ``message_too_large`` (:func:`too_large_letters`): a decision whose event
  fits the input limits can still outgrow the broker's limit once serialised;
* an unknown topic (``UnknownTopicOrPartitionError``: a route added by a route-set
  reload has no ``route.<name>`` topic yet): the batch's topics are created as the
  worker's start creates them, then the batch is sent again;
* not authorised (:data:`NOT_AUTHORISED`): no retry can succeed; the worker fails
  with a message naming the topics.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence

from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    RecordTooLargeError,
    SaslAuthenticationFailed,
    TopicAuthorizationFailedError,
    TransactionalIdAuthorizationFailed,
)

from sieve.contracts import DeadLetter
from sieve.flow.dead_letter import make_dead_letter
from sieve.flow.publish import plan_dead_letters
from sieve.kafka.records import Outbound, RawRecord
from sieve.topology import Topology

#: The broker (or the client) refuses a message or record batch as too large.
TOO_LARGE: tuple[type[Exception], ...] = (MessageSizeTooLargeError, RecordListTooLargeError,
                                          RecordTooLargeError)
#: The worker's principal may not write: retrying cannot help.
NOT_AUTHORISED: tuple[type[Exception], ...] = (TopicAuthorizationFailedError, ClusterAuthorizationFailedError,
                                               TransactionalIdAuthorizationFailed, SaslAuthenticationFailed)

Send = Callable[[list[Outbound]], Awaitable[None]]


async def send_isolating(send: Send, messages: list[Outbound]) -> list[Outbound]:
    """Send ``messages``; return those the broker refused as too large (everything else was acknowledged).

    A refusal names a record batch, not a message, so the batch is halved until each
    refused message stands alone. Messages of a refused half may be sent again
    (at-least-once: consumers deduplicate by id). Other errors propagate.
    """
    if not messages:
        return []
    try:
        await send(messages)
        return []
    except TOO_LARGE:
        if len(messages) == 1:
            return messages
    middle = len(messages) // 2
    return await send_isolating(send, messages[:middle]) + await send_isolating(send, messages[middle:])


def _ids_of(record: RawRecord) -> list[bytes]:
    """The ids a message planned from ``record`` is keyed by: its JSON ``id``/``event_id``, else its key."""
    ids = [record.key] if record.key else []
    try:
        value = json.loads(record.value or b"")
    except ValueError:
        return ids
    if isinstance(value, dict):
        ids += [value[name].encode() for name in ("event_id", "id") if isinstance(value.get(name), str)]
    return ids


def _event_key(message: Outbound) -> bytes:
    """The event id a refused message is about: a decision's ``event_id``, else the message key.

    The needs-review topic is keyed by content, not by event, so the key alone does not say.
    """
    try:
        value = json.loads(message.value)
    except ValueError:
        return message.key or b""
    event_id = value.get("event_id") if isinstance(value, dict) else None
    return event_id.encode() if isinstance(event_id, str) else (message.key or b"")


def too_large_letters(
    refused: Sequence[Outbound], records: Sequence[RawRecord], topology: Topology, worker: str,
) -> tuple[list[Outbound], list[DeadLetter]]:
    """One dead letter (reason ``message_too_large``) per event whose message the broker refused as too large.

    The letter replaces the event's decision messages (outcome and route topic alike).
    The event is found among the batch's ``records`` by the message's event id;
    a message whose event is not found is its own letter's payload. A refused message
    that is already a dead letter is replaced by one without payload (size and SHA-256 only).
    """
    by_id: dict[bytes, RawRecord] = {}
    for record in records:
        for ident in _ids_of(record):
            by_id.setdefault(ident, record)
    limit = topology.limits.max_dead_letter_payload_bytes
    letters: dict[tuple[object, ...], DeadLetter] = {}
    for message in refused:
        key = _event_key(message)
        found = by_id.get(key)
        record = found or RawRecord(None, None, None, message.key, message.value, None)
        is_letter = message.topic == topology.output.dead_letter_topic
        letter = make_dead_letter(
            record,
            stage="publish",
            reason="message_too_large",
            error=(f"MessageSizeTooLargeError: the broker refused the {len(message.value)}-byte message "
                   f"for {message.topic} as too large"),
            worker=worker,
            topology=topology.name,
            max_payload_bytes=0 if is_letter else limit,
            event_id=key.decode(errors="replace") or None,
        )
        event = (record.topic, record.partition, record.offset, key)
        if event not in letters or is_letter:  # one letter per event; the payload-less one wins
            letters[event] = letter
    chosen = list(letters.values())
    return plan_dead_letters(chosen, topology.output), chosen
