"""Dead letters: the original bytes of an input Sieve could not decide, and why."""

from __future__ import annotations

import base64
import hashlib

from sieve.contracts import DeadLetter, DeadLetterStage, utcnow
from sieve.kafka.records import RawRecord


def make_dead_letter(
    record: RawRecord,
    *,
    stage: DeadLetterStage,
    reason: str,
    error: str,
    worker: str,
    topology: str,
    max_payload_bytes: int,
    event_id: str | None = None,
) -> DeadLetter:
    """A dead letter for ``record``; payloads over ``max_payload_bytes`` are truncated.

    A truncated dead letter keeps the head of the payload plus the full size and
    SHA-256, so it always fits in a Kafka message and the loss is visible.
    """
    payload = record.value or b""
    digest = hashlib.sha256(payload).hexdigest()
    truncated = len(payload) > max_payload_bytes
    kept = payload[:max_payload_bytes] if truncated else payload
    return DeadLetter(
        id=DeadLetter.make_id(record.topic, record.partition, record.offset, digest),
        stage=stage,
        reason=reason,
        error=error[:2000],
        worker=worker,
        topology=topology,
        source_topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        key_b64=base64.b64encode(record.key).decode() if record.key is not None else None,
        payload_b64=base64.b64encode(kept).decode(),
        payload_size=len(payload),
        payload_sha256=digest,
        truncated=truncated,
        event_id=event_id,
        failed_at=utcnow(),
    )


def dead_letter_payload(letter: DeadLetter) -> bytes:
    """The original bytes a dead letter carries (only the head when truncated)."""
    return base64.b64decode(letter.payload_b64)
