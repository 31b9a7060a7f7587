"""Replaying dead letters (`sieve dead-letters replay`) over a stand-in topic: what goes where, its progress.

The broker round trip is covered by ``tests/test_integration.py``; here ``read_topic`` and
``produce`` are replaced, so the filtering and the reported steps are checked exactly.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

import sieve.worker.replay as replay
from sieve.flow.dead_letter import make_dead_letter
from sieve.kafka.records import RawRecord
from sieve.settings import KafkaSettings
from sieve.worker.replay import ReplaySummary, replay_dead_letters

from .progress_helpers import RecordingProgress


def letter(reason: str, value: bytes, *, topic: str = "events.in", event_id: str | None = None,
           max_payload_bytes: int = 1000) -> bytes:
    record = RawRecord(topic, 0, 7, None, value, None)
    return make_dead_letter(record, stage="decode", reason=reason, error="e", worker="w", topology="t",
                            max_payload_bytes=max_payload_bytes, event_id=event_id).model_dump_json().encode()


DEAD_LETTERS = [
    letter("text_too_long", b'{"id": "a", "text": "long"}', event_id="a"),
    b"{oops",  # not a dead letter: unreadable
    letter("not_json", b"{nope"),
    letter("image_fetch_failed", b'{"id": "c"}'),  # filtered out by reason
    letter("not_json", b"0123456789", max_payload_bytes=4),  # truncated: not replayable
    letter("not_json", b"[1]", topic="other.in"),
]


class FakeKafka:
    """``read_topic`` over :data:`DEAD_LETTERS` and a ``produce`` that records what it sent."""

    def __init__(self) -> None:
        self.read: list[tuple[list[str], str | None]] = []
        self.sent: list[tuple[str, list[tuple[bytes | None, bytes]]]] = []

    async def read_topic(self, settings, topics, *, idle_timeout_s, group_id):
        self.read.append((topics, group_id))
        for value in DEAD_LETTERS:
            await asyncio.sleep(0)
            yield SimpleNamespace(value=value)

    async def produce(self, settings, topic, messages):
        self.sent.append((topic, list(messages)))
        return len(messages)


@pytest.fixture
def kafka(monkeypatch: pytest.MonkeyPatch) -> FakeKafka:
    fake = FakeKafka()
    monkeypatch.setattr(replay, "read_topic", fake.read_topic)
    monkeypatch.setattr(replay, "produce", fake.produce)
    return fake


def run(dry_run: bool, progress: RecordingProgress) -> ReplaySummary:
    return asyncio.run(replay_dead_letters(
        KafkaSettings(), "sieve.dead-letter", to=None, reasons={"text_too_long", "not_json"},
        group="replayers", idle_s=1.0, dry_run=dry_run, progress=progress,
    ))


def test_replay_reports_records_read_and_re_sent(kafka: FakeKafka) -> None:
    progress = RecordingProgress()
    summary = run(False, progress)

    assert summary == ReplaySummary(replayed=3, skipped=1, truncated=1, unreadable=1)
    assert kafka.read == [(["sieve.dead-letter"], "replayers")]
    assert kafka.sent == [
        ("events.in", [(b"a", b'{"id": "a", "text": "long"}'), (None, b"{nope")]),
        ("other.in", [(None, b"[1]")]),
    ]
    assert progress.seen() == [("reading dead letters", None, 6), ("re-sending records", 3, 3)]
    assert progress.steps[0].advances == [1] * 6
    assert progress.steps[1].advances == [2, 1]  # one advance per source topic, once it was sent
    assert all(step.finished for step in progress.steps)


def test_a_dry_run_reports_only_the_records_read(kafka: FakeKafka) -> None:
    progress = RecordingProgress()
    summary = run(True, progress)

    assert summary == ReplaySummary(replayed=3, skipped=1, truncated=1, unreadable=1)
    assert kafka.read == [(["sieve.dead-letter"], None)]  # no group: a dry run commits nothing
    assert kafka.sent == []
    assert progress.seen() == [("reading dead letters", None, 6)]
