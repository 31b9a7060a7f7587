"""Replaying dead letters: their original bytes back onto the source topic.

What a replay group (``group``) has finished with is kept in committed offsets,
and only what was re-sent and acknowledged is ever committed:

- ``group`` itself commits, per partition, the offset below which every letter is
  finished: replayed, or not replayable (unreadable, truncated, no topic to send to).
  A letter a ``--reason`` filter left out is not finished, so the offset stops at it.
- ``group.reason.<reason>`` commits, per partition, the offset below which every letter
  with that reason is finished. A replay with ``--reason A`` moves A's mark past what it
  re-sent, so a later replay (with another reason, or none) re-reads those letters but
  does not send them again.

Nothing is committed before every record is acknowledged (acks=all): a replay whose
produce fails leaves the group as it was, and the next replay sends the same letters.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import ValidationError

from sieve.contracts import DeadLetter
from sieve.flow.dead_letter import dead_letter_payload
from sieve.kafka.client import commit_offsets, committed_offsets, produce, read_from_group
from sieve.progress import SILENT, Progress
from sieve.settings import KafkaSettings


@dataclass
class ReplaySummary:
    """What a replay did."""

    replayed: int = 0
    skipped: int = 0  # left out by the reason filter: still replayable
    truncated: int = 0
    unreadable: int = 0
    already: int = 0  # replayed by an earlier replay with a reason filter


def reason_group(group: str, reason: str) -> str:
    """The group that keeps how far ``group``'s replays of ``reason`` got."""
    return f"{group}.reason.{reason}"


@dataclass
class _Progress:
    """Per partition: the offset after the last letter read, and the first letter left open."""

    end: dict[int, int] = field(default_factory=dict)
    first_open: dict[int, int] = field(default_factory=dict)

    def read(self, partition: int, offset: int) -> None:
        self.end[partition] = max(self.end.get(partition, 0), offset + 1)

    def leave_open(self, partition: int, offset: int) -> None:
        self.first_open[partition] = min(self.first_open.get(partition, offset), offset)

    def finished(self) -> dict[int, int]:
        """The offset to commit per partition: up to the first open letter, else all that was read."""
        return {p: self.first_open.get(p, end) for p, end in self.end.items()}


class _Marks:
    """Each reason's committed offsets (``reason_group``), fetched once per reason met."""

    def __init__(self, kafka: KafkaSettings, topic: str, group: str) -> None:
        self.kafka, self.topic, self.group = kafka, topic, group
        self.marks: dict[str, dict[int, int]] = {}

    async def of(self, reason: str) -> dict[int, int]:
        """``reason``'s committed offset per partition."""
        if reason not in self.marks:
            group = reason_group(self.group, reason)
            self.marks[reason] = await committed_offsets(self.kafka, self.topic, group)
        return self.marks[reason]

    async def replayed(self, reason: str, partition: int, offset: int) -> bool:
        """Whether an earlier replay of ``reason`` re-sent the letter at ``offset``."""
        return offset < (await self.of(reason)).get(partition, 0)


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
    """Re-send the dead letters of ``topic`` not replayed yet by ``group`` (those of ``reasons``, if any).

    Commits only after every re-sent record is acknowledged, and only what is finished
    (module docstring); a dry run counts the same letters and commits nothing. Reports
    its steps: the records read (their number is not known up front), then the records
    re-sent (none on a dry run).
    """
    summary = ReplaySummary()
    outgoing: dict[str, list[tuple[bytes | None, bytes]]] = {}
    done = _Progress()
    marks = _Marks(kafka, topic, group)
    with progress.task("reading dead letters") as advance:
        async for record in read_from_group(kafka, topic, group, idle_timeout_s=idle_s):
            advance(1)
            done.read(record.partition, record.offset)
            try:
                letter = DeadLetter.model_validate_json(record.value or b"")
            except ValidationError:
                summary.unreadable += 1
                continue
            if await marks.replayed(letter.reason, record.partition, record.offset):
                summary.already += 1
                continue
            if reasons and letter.reason not in reasons:
                summary.skipped += 1
                done.leave_open(record.partition, record.offset)
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
    if dry_run:
        return summary
    with progress.task("re-sending records", total=summary.replayed) as advance:
        for target, messages in outgoing.items():
            await produce(kafka, target, messages)  # returns once every record is acknowledged
            advance(len(messages))
    await _commit(kafka, topic, group, reasons, done, marks)
    return summary


async def _commit(
    kafka: KafkaSettings, topic: str, group: str, reasons: set[str], done: _Progress, marks: _Marks
) -> None:
    """Move each filtered reason's mark past what was read where a letter stays open, then the group."""
    finished = done.finished()
    open_partitions = {p: end for p, end in done.end.items() if finished[p] < end}
    for reason in sorted(reasons) if open_partitions else ():
        before = await marks.of(reason)
        moved = {p: end for p, end in open_partitions.items() if end > before.get(p, 0)}
        await commit_offsets(kafka, topic, reason_group(group, reason), moved)
    await commit_offsets(kafka, topic, group, finished)
