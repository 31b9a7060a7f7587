"""Replaying dead letters: their original bytes back onto the source topic."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import ValidationError

from sieve.contracts import DeadLetter
from sieve.flow.dead_letter import dead_letter_payload
from sieve.kafka.client import produce, read_topic
from sieve.progress import SILENT, Progress
from sieve.settings import KafkaSettings


@dataclass
class ReplaySummary:
    """What a replay did."""

    replayed: int = 0
    skipped: int = 0
    truncated: int = 0
    unreadable: int = 0


async def replay_dead_letters(
    kafka: KafkaSettings,
    topic: str,
    *,
    to: str | None,
    reasons: set[str],
    group: str,
    idle_s: float,
    dry_run: bool = False,
    progress: Progress = SILENT,
) -> ReplaySummary:
    """Read the dead-letter topic (as ``group``, so a second replay skips what the first sent).

    Reports its steps: the records read (their number is not known up front), then
    the records re-sent (none on a dry run).
    """
    summary = ReplaySummary()
    outgoing: dict[str, list[tuple[bytes | None, bytes]]] = {}
    with progress.task("reading dead letters") as advance:
        async for record in read_topic(
            kafka, [topic], idle_timeout_s=idle_s, group_id=None if dry_run else group
        ):
            advance(1)
            try:
                letter = DeadLetter.model_validate_json(record.value or b"")
            except ValidationError:
                summary.unreadable += 1
                continue
            if reasons and letter.reason not in reasons:
                summary.skipped += 1
                continue
            if letter.truncated:
                summary.truncated += 1
                continue
            target = to or letter.source_topic
            if target is None:
                summary.unreadable += 1
                continue
            key = letter.event_id.encode() if letter.event_id else None
            outgoing.setdefault(target, []).append((key, dead_letter_payload(letter)))
            summary.replayed += 1
    if not dry_run:
        with progress.task("re-sending records", total=summary.replayed) as advance:
            for target, messages in outgoing.items():
                await produce(kafka, target, messages)
                advance(len(messages))
    return summary
