"""Replaying dead letters (`sieve dead-letters replay`): what goes where, its progress, nothing lost.

The first tests run over a stand-in topic (``read_from_group`` and ``produce`` replaced), so the
filtering and the reported steps are checked exactly. The ``*_on_the_broker`` tests run on the dev
broker: only what was re-sent and acknowledged is committed, so a failed send or a replay with
another ``--reason`` loses no letter, and none is sent twice.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from types import SimpleNamespace

import pytest
from aiokafka.errors import KafkaConnectionError

import sieve.worker.replay as replay
from sieve.flow.dead_letter import make_dead_letter
from sieve.kafka.client import ensure_topics, produce, read_topic
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
    """A dead-letter topic of :data:`DEAD_LETTERS` (one partition, no group offsets yet), a ``produce``
    that records what it sent, and commits that are recorded."""

    def __init__(self) -> None:
        self.read: list[tuple[str, str]] = []
        self.sent: list[tuple[str, list[tuple[bytes | None, bytes]]]] = []
        self.commits: list[tuple[str, dict[int, int]]] = []

    async def read_from_group(self, settings, topic, group, *, idle_timeout_s):
        self.read.append((topic, group))
        for offset, value in enumerate(DEAD_LETTERS):
            await asyncio.sleep(0)
            yield SimpleNamespace(value=value, partition=0, offset=offset)

    async def committed_offsets(self, settings, topic, group):
        return {}

    async def commit_offsets(self, settings, topic, group, offsets):
        self.commits.append((group, offsets))

    async def produce(self, settings, topic, messages):
        self.sent.append((topic, list(messages)))
        return len(messages)


@pytest.fixture
def kafka(monkeypatch: pytest.MonkeyPatch) -> FakeKafka:
    fake = FakeKafka()
    for name in ("read_from_group", "committed_offsets", "commit_offsets", "produce"):
        monkeypatch.setattr(replay, name, getattr(fake, name))
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
    assert kafka.read == [("sieve.dead-letter", "replayers")]
    assert kafka.sent == [
        ("events.in", [(b"a", b'{"id": "a", "text": "long"}'), (None, b"{nope")]),
        ("other.in", [(None, b"[1]")]),
    ]
    assert progress.seen() == [("reading dead letters", None, 6), ("re-sending records", 3, 3)]
    assert progress.steps[0].advances == [1] * 6
    assert progress.steps[1].advances == [2, 1]  # one advance per source topic, once it was sent
    assert all(step.finished for step in progress.steps)
    # the image_fetch_failed letter (offset 3) was filtered out: the group stops before it, and
    # the filtered reasons' marks move past everything read
    assert kafka.commits == [("replayers.reason.not_json", {0: 6}),
                             ("replayers.reason.text_too_long", {0: 6}), ("replayers", {0: 3})]


def test_a_dry_run_reports_only_the_records_read(kafka: FakeKafka) -> None:
    progress = RecordingProgress()
    summary = run(True, progress)

    assert summary == ReplaySummary(replayed=3, skipped=1, truncated=1, unreadable=1)
    assert kafka.read == [("sieve.dead-letter", "replayers")]  # from where a real replay would start
    assert kafka.sent == []
    assert kafka.commits == []  # a dry run commits nothing
    assert progress.seen() == [("reading dead letters", None, 6)]


# --- on the dev broker: only what was re-sent and acknowledged is committed ----------------------

class FailingProduce:
    """Fault injection: a produce whose records are never acknowledged (the brokers went away)."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, settings, topic, messages):
        self.calls += 1
        raise KafkaConnectionError("injected: no broker acknowledged the records")


class Broker:
    """A fresh dead-letter topic (two partitions) and replay target on the dev broker."""

    def __init__(self, bootstrap: str, name: str) -> None:
        self.kafka = KafkaSettings(bootstrap_servers=bootstrap)
        self.topic = f"replay.{name}.{uuid.uuid4().hex[:8]}.dead-letter"
        self.target = f"{self.topic}.replayed"
        asyncio.run(ensure_topics(self.kafka, {self.topic: 2, self.target: 1}))

    def add(self, letters: list[tuple[str, str]]) -> None:
        """Dead letters ``(reason, event id)``, each carrying ``{"id": event id}`` as its original bytes."""
        values = [(event_id.encode(), letter(reason, json.dumps({"id": event_id}).encode(),
                                             event_id=event_id)) for reason, event_id in letters]
        asyncio.run(produce(self.kafka, self.topic, values))

    def replay(self, *reasons: str, dry_run: bool = False) -> ReplaySummary:
        return asyncio.run(replay_dead_letters(self.kafka, self.topic, to=self.target, reasons=set(reasons),
                                               group="replayers", idle_s=2.0, dry_run=dry_run))

    def replayed_ids(self) -> list[str]:
        """Every event id on the target topic, in no particular order (duplicates kept)."""
        async def read() -> list[str]:
            return [json.loads(r.value)["id"] async for r in read_topic(self.kafka, [self.target],
                                                                         idle_timeout_s=2.0)]
        return sorted(asyncio.run(read()))


LETTERS = [("not_json", f"nj-{i}") if i % 2 else ("text_too_long", f"long-{i}") for i in range(12)]
NOT_JSON = sorted(event_id for reason, event_id in LETTERS if reason == "not_json")
TOO_LONG = sorted(event_id for reason, event_id in LETTERS if reason == "text_too_long")


@pytest.mark.integration
def test_a_failed_send_commits_nothing_and_the_next_replay_sends_the_letters_on_the_broker(
    dev_broker: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    broker = Broker(dev_broker, "failed-send")
    broker.add(LETTERS)
    failing = FailingProduce()
    monkeypatch.setattr(replay, "produce", failing)
    with pytest.raises(KafkaConnectionError):
        broker.replay()
    assert failing.calls == 1
    monkeypatch.setattr(replay, "produce", produce)

    assert broker.replay() == ReplaySummary(replayed=12)  # nothing was committed: all twelve again
    assert broker.replayed_ids() == sorted(NOT_JSON + TOO_LONG)
    assert broker.replay() == ReplaySummary()


@pytest.mark.integration
def test_replays_with_different_reasons_lose_no_letter_and_send_none_twice_on_the_broker(
    dev_broker: str,
) -> None:
    broker = Broker(dev_broker, "reasons")
    broker.add(LETTERS)

    assert broker.replay("not_json") == ReplaySummary(replayed=6, skipped=6)
    assert broker.replayed_ids() == NOT_JSON
    # the letters left out stay replayable; those already sent are not sent again
    assert broker.replay("text_too_long") == ReplaySummary(replayed=6, already=6)
    assert broker.replayed_ids() == sorted(NOT_JSON + TOO_LONG)
    broker.add([("not_json", "nj-late")])
    assert broker.replay() == ReplaySummary(replayed=1)  # no filter: only the letter not sent yet
    assert broker.replayed_ids() == sorted([*NOT_JSON, *TOO_LONG, "nj-late"])


@pytest.mark.integration
def test_a_replay_sends_each_letter_once_and_a_dry_run_counts_what_it_would_send_on_the_broker(
    dev_broker: str,
) -> None:
    broker = Broker(dev_broker, "happy")
    broker.add(LETTERS)

    assert broker.replay(dry_run=True) == ReplaySummary(replayed=12)
    assert broker.replay() == ReplaySummary(replayed=12)  # the dry run committed nothing
    assert broker.replayed_ids() == sorted(NOT_JSON + TOO_LONG)
    assert broker.replay(dry_run=True) == ReplaySummary()  # counts only what a replay would send
    broker.add([("text_too_long", "long-late")])
    assert broker.replay() == ReplaySummary(replayed=1)
    assert broker.replayed_ids() == sorted([*NOT_JSON, *TOO_LONG, "long-late"])
