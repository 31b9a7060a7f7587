"""The router pipeline over a batch of raw records, with the real MiniLM and the moderation set."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from sieve.contracts import NEEDS_REVIEW, DeadLetter, Decision
from sieve.flow.dead_letter import dead_letter_payload
from sieve.flow.dedup import review_key
from sieve.flow.match import RouteIndex, example_id
from sieve.flow.pipeline import RouterPipeline
from sieve.kafka.records import RawRecord
from sieve.routeset import RouteSet, parse_route_set
from sieve.topology import Topology, TopologyError, load_topology

REPO = Path(__file__).resolve().parents[1]
TOPIC = "sieve.events.text"
NOW = 1_700_000_000.0


@pytest.fixture
def topology() -> Topology:
    return load_topology(REPO / "topologies" / "moderation.yaml")


@pytest.fixture
def index(moderation_index) -> RouteIndex:
    return moderation_index


@pytest.fixture
def pipeline(topology, minilm, index) -> RouterPipeline:
    return RouterPipeline(topology=topology, encoder=minilm, index=index, worker="t")


def text_record(offset: int, event_id: str, text: str) -> RawRecord:
    value = json.dumps({"id": event_id, "text": text, "tenant": "acme"}).encode()
    return RawRecord(TOPIC, 0, offset, event_id.encode(), value, NOW + offset)


def raw(offset: int, value: bytes | None) -> RawRecord:
    return RawRecord(TOPIC, 1, offset, None, value, NOW + offset)


GOOD = {
    "g-violent": "I'm going to find you and break every bone in your body, you're dead",
    "g-harass": "you are a worthless ugly idiot and everyone hates you",
    "g-benign": "can anyone recommend a good recipe for banana bread?",
    "g-chat": "what a lovely sunny morning, going for a walk with the dog",
}


def mixed_batch() -> list[RawRecord]:
    ids = list(GOOD)
    return [
        text_record(0, ids[0], GOOD[ids[0]]),
        raw(1, b"\xff\xfe"),
        text_record(2, ids[1], GOOD[ids[1]]),
        raw(3, b'{"id": "b-ws", "text": "   "}'),
        raw(4, b"not json"),
        text_record(5, ids[2], GOOD[ids[2]]),
        raw(6, b'{"id": "b-extra", "text": "hi", "colour": "red"}'),
        text_record(7, ids[3], GOOD[ids[3]]),
        raw(8, b""),
    ]


def test_process_mixed_batch(pipeline, topology, index):
    result = pipeline.process(mixed_batch())

    # one decision per good record, in order; one dead letter per bad one
    assert [d.event_id for d in result.decisions] == list(GOOD)
    assert [(d.offset, d.reason) for d in result.dead_letters] == [
        (1, "invalid_utf8"), (3, "empty_text"), (4, "not_json"), (6, "schema"),
        (8, "empty_payload"),
    ]
    assert {d.event_id for d in result.dead_letters} == {None, "b-ws", "b-extra"}
    assert all(d.worker == "t" and d.topology == "moderation" for d in result.dead_letters)

    for decision in result.decisions:
        assert decision.route_set == "moderation"
        assert decision.route_set_version == index.version
        assert decision.encoder == "st:all-MiniLM-L6-v2"
        assert decision.id == Decision.make_id(decision.event_id, index.version)
        assert decision.source_topic == TOPIC
        assert decision.latency_ms is not None and decision.latency_ms > 0
        assert decision.event.tenant == "acme"
    by_id = {d.event_id: d for d in result.decisions}
    assert by_id["g-benign"].outcome == "clean" and by_id["g-chat"].outcome == "clean"
    for event_id in ("g-violent", "g-harass"):
        assert by_id[event_id].outcome in ("violating", NEEDS_REVIEW)
        assert index.route_set.route(by_id[event_id].route).outcome == "violating"

    # outbound: each decision on its outcome topic, and on route.<name> of each route it accepted
    # (the shipped moderation set is multi-label: docs/routes.md)
    assert index.route_set.mode == "multi"
    output = topology.output
    expected = []
    for decision in result.decisions:
        key = decision.event_id
        if decision.outcome == NEEDS_REVIEW:  # keyed by content, so repeats meet in one reviewer
            key = review_key(decision.route_set_version, decision.event.text, None) or key
        expected.append((output.topic_for(decision.outcome), key))
        accepted = [r.route for r in decision.routes or [] if r.band == "accept"]
        expected += [(f"route.{route}", decision.event_id) for route in accepted]
    expected += [("sieve.dead-letter", (d.event_id or d.id)) for d in result.dead_letters]
    assert [(m.topic, m.key.decode()) for m in result.outbound] == expected

    decisions_out = [m for m in result.outbound if m.topic != "sieve.dead-letter"]
    for message in decisions_out:
        decision = Decision.model_validate_json(message.value)
        assert by_id[decision.event_id] == decision
        headers = dict(message.headers)
        assert headers["sieve-decision-id"] == decision.id.encode()
        assert headers["sieve-outcome"] == decision.outcome.encode()
    letters_out = [m for m in result.outbound if m.topic == "sieve.dead-letter"]
    assert [DeadLetter.model_validate_json(m.value) for m in letters_out] == result.dead_letters
    assert [dict(m.headers)["sieve-dead-letter-reason"] for m in letters_out] == [
        d.reason.encode() for d in result.dead_letters
    ]
    assert set(result.seconds) == {"decode", "lists", "encode", "match", "decide"}  # shipped set: a list


def test_process_only_bad_records(pipeline):
    result = pipeline.process([raw(0, b"nope"), raw(1, None)])
    assert result.decisions == []
    assert len(result.dead_letters) == 2
    assert {m.topic for m in result.outbound} == {"sieve.dead-letter"}
    assert "encode" not in result.seconds


def test_process_empty_batch(pipeline):
    result = pipeline.process([])
    assert (result.decisions, result.dead_letters, result.outbound) == ([], [], [])


def modified_index(index: RouteIndex) -> tuple[RouteSet, RouteIndex]:
    """The same examples under a stricter accept threshold: a new route-set version.

    The utterances are unchanged, so the existing vectors are this set's vectors too
    (no need to encode the whole set again).
    """
    data = index.route_set.model_dump(mode="json")
    data["defaults"]["accept"] = 0.99
    modified = parse_route_set(data)
    return modified, dataclasses.replace(index, route_set=modified, version=modified.version)


def test_swap_index_changes_version_of_later_decisions(pipeline, index):
    records = [text_record(0, "s1", GOOD["g-harass"]), text_record(1, "s2", GOOD["g-benign"])]
    before = pipeline.process(records).decisions
    modified, new_index = modified_index(index)
    assert modified.version != index.version

    pipeline.swap_index(new_index)
    assert pipeline.index is new_index
    after = pipeline.process(records).decisions

    assert {d.route_set_version for d in before} == {index.version}
    assert {d.route_set_version for d in after} == {modified.version}
    assert [d.id for d in after] == [Decision.make_id(d.event_id, modified.version)
                                     for d in after]
    assert not {d.id for d in before} & {d.id for d in after}
    # the new thresholds apply: nothing reaches accept 0.99 now
    assert all(d.reason != "accept" for d in after)


def test_index_from_another_encoder_is_refused(pipeline, topology, minilm, trivial_encoder,
                                               index):
    trivial_index = RouteIndex.build(index.route_set, trivial_encoder)
    with pytest.raises(ValueError, match="trivial:crc32-64.*st:all-MiniLM-L6-v2"):
        RouterPipeline(topology=topology, encoder=minilm, index=trivial_index, worker="t")
    with pytest.raises(ValueError, match="sync the route set with this encoder"):
        pipeline.swap_index(trivial_index)
    assert pipeline.index is index  # the old index stays in use


def test_index_with_an_unmapped_outcome_is_refused(pipeline, index, minilm):
    spam_set = parse_route_set({"name": "moderation", "default_outcome": "clean",
                                "routes": [{"name": "spam", "outcome": "spam",
                                            "utterances": ["buy now"]}]})
    vector = np.zeros(minilm.dim, np.float32)
    vector[0] = 1.0
    spam_index = RouteIndex.from_examples(
        spam_set, spam_set.version, minilm.id,
        {"spam": [(example_id("moderation", "spam", "buy now"), "buy now", vector)]},
    )
    with pytest.raises(TopologyError, match="spam"):
        pipeline.swap_index(spam_index)
    assert pipeline.index is index


class PoisonEncoder:
    """Fault injection: MiniLM, except that encoding one given text raises.

    A test double standing in for a model that fails on one input (a tokenizer bug,
    an out-of-memory on one huge text); everything else is the real encoder.
    """

    def __init__(self, inner, poison: str) -> None:
        self.inner = inner
        self.poison = poison
        self.calls: list[int] = []

    @property
    def id(self) -> str:
        return self.inner.id

    @property
    def dim(self) -> int:
        return self.inner.dim

    def encode(self, texts: list[str]) -> np.ndarray:
        self.calls.append(len(texts))
        if self.poison in texts:
            raise RuntimeError("injected: the model cannot encode this text")
        return self.inner.encode(texts)


def test_encode_failure_dead_letters_only_that_event(topology, minilm, index, caplog):
    poison = "this particular text makes the encoder fail"
    encoder = PoisonEncoder(minilm, poison)
    pipeline = RouterPipeline(topology=topology, encoder=encoder, index=index, worker="t")
    records = [
        text_record(0, "ok-1", GOOD["g-benign"]),
        text_record(1, "poisoned", poison),
        raw(2, b"not json"),
        text_record(3, "ok-2", GOOD["g-harass"]),
    ]
    result = pipeline.process(records)

    assert [d.event_id for d in result.decisions] == ["ok-1", "ok-2"]
    assert encoder.calls[0] == 3  # one batch call failed, then one call per event
    assert sorted(encoder.calls[1:]) == [1, 1, 1]
    stages = [(d.stage, d.reason, d.event_id, d.offset) for d in result.dead_letters]
    assert stages == [("decode", "not_json", None, 2),
                      ("encode", "encode_error", "poisoned", 1)]
    letter = result.dead_letters[1]
    assert "RuntimeError: injected" in letter.error
    assert dead_letter_payload(letter) == records[1].value
    dead_topic = [m for m in result.outbound if m.topic == "sieve.dead-letter"]
    assert [m.key for m in dead_topic] == [result.dead_letters[0].id.encode(), b"poisoned"]
    assert "poisoned" not in {m.key.decode() for m in result.outbound
                              if m.topic != "sieve.dead-letter"}
    assert "batch encode failed" in caplog.text
    # the surviving events are decided exactly as without the fault
    clean = RouterPipeline(topology=topology, encoder=minilm, index=index, worker="t")
    expected = clean.process([records[0], records[3]]).decisions
    assert [(d.outcome, d.route) for d in result.decisions] == [
        (d.outcome, d.route) for d in expected
    ]


def test_encode_failure_of_every_event(topology, minilm, index):
    encoder = PoisonEncoder(minilm, "bad")
    pipeline = RouterPipeline(topology=topology, encoder=encoder, index=index, worker="t")
    result = pipeline.process([text_record(0, "only", "bad")])
    assert result.decisions == []
    assert [d.stage for d in result.dead_letters] == ["encode"]
    assert [m.topic for m in result.outbound] == ["sieve.dead-letter"]
