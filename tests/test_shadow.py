"""Shadowing a candidate version beside the active one (``route_set.shadow``, sieve.flow.shadow).

Real pipeline and route sets, the trivial (hashing) encoder: a text equal to an
utterance scores 1 against it, one sharing most of its words scores high. The candidate
version adds an insult route, raises the threat route's accept threshold and has a
novelty threshold, so it changes some outcomes and keeps others.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import REGISTRY

from sieve.encoders.trivial import TrivialEncoder
from sieve.flow.dedup import DecisionCache
from sieve.flow.head import train_head
from sieve.flow.match import RouteIndex
from sieve.flow.pipeline import BatchResult, RouterPipeline
from sieve.flow.shadow import ShadowStats
from sieve.kafka.records import RawRecord
from sieve.routeset import RouteSet, parse_route_set
from sieve.settings import QdrantSettings, Settings
from sieve.store.qdrant import RouteStore, RouteStoreError
from sieve.topology import Topology, load_topology
from sieve.worker import metrics
from sieve.worker.compute import summarise
from sieve.worker.router import build_compute, load_shadow_index

from .conftest import REPO
from .test_tenants import CHAT, GOOSE, PARTIAL, THREAT, CountingEncoder, record, route_set

SHADOW_TOPIC = "m.shadow"
UNRELATED = "completely unrelated words here"
# Event id -> text; the active set decides all of them automatically.
BATCH = {"threat": THREAT[0], "chat": CHAT[0], "goose-1": GOOSE[0], "goose-2": GOOSE[1], "partial": PARTIAL,
         "unrelated": UNRELATED}


def candidate(name: str = "base") -> RouteSet:
    """The active set plus an insult route, threat accept 0.95 and a novelty threshold of 0.9."""
    data = route_set(name, insult=True, threat_accept=0.95).model_dump(mode="json", exclude_none=True)
    data["defaults"] = {**data.get("defaults", {}), "novelty": {"threshold": 0.9}}
    return parse_route_set(data)


def topology(shadow_topic: str | None = SHADOW_TOPIC, **route_set_ref: Any) -> Topology:
    return Topology.model_validate({
        "name": "shadowed", "input": {"topics": ["tenants.in"]},
        "route_set": {"name": "base", **route_set_ref}, "encoder": {"kind": "trivial"},
        "output": {"outcome_topics": {"clean": "m.clean", "violating": "m.violating",
                                      "needs_review": "m.review"},
                   "dead_letter_topic": "m.dead", "shadow_topic": shadow_topic},
    })


def records(texts: dict[str, str] = BATCH, start: int = 0) -> list[RawRecord]:
    return [record(start + i, event_id, text) for i, (event_id, text) in enumerate(texts.items())]


def build(encoder: TrivialEncoder, *, shadow: bool = True, shadow_topic: str | None = SHADOW_TOPIC,
          messages: int = 20, cache: DecisionCache | None = None) -> tuple[RouterPipeline, RouteIndex]:
    active = RouteIndex.build(route_set("base"), encoder)
    shadow_index = RouteIndex.build(candidate(), encoder)
    if isinstance(encoder, CountingEncoder):
        encoder.calls.clear()
    pipeline = RouterPipeline(topology(shadow_topic), encoder, active, "t", cache=cache,
                              shadow_index=shadow_index if shadow else None, shadow_messages=messages)
    return pipeline, shadow_index


def shadow_messages(result: BatchResult) -> list[dict[str, Any]]:
    return [json.loads(m.value) for m in result.outbound if m.topic == SHADOW_TOPIC]


def test_the_shadow_decides_from_the_same_vectors_as_its_own_active_version_would() -> None:
    encoder = CountingEncoder()
    pipeline, shadow_index = build(encoder)
    result = pipeline.process(records())
    assert encoder.calls == [list(BATCH.values())]  # one encode serves both versions
    active = {d.event_id: (d.outcome, d.route) for d in result.decisions}
    assert all(outcome != "needs_review" for outcome, _ in active.values())
    # what the candidate decides when it is the active version
    reference_pipeline = RouterPipeline(topology(), encoder, shadow_index, "t")
    reference = {d.event_id: (d.outcome, d.route, d.novel)
                 for d in reference_pipeline.process(records()).decisions}
    assert reference == {
        "threat": ("violating", "threat", False), "chat": ("clean", "chat", False),
        "goose-1": ("violating", "insult", False), "goose-2": ("violating", "insult", False),
        "partial": ("needs_review", "threat", False), "unrelated": ("needs_review", None, True)}
    assert result.shadow == ShadowStats(shadow_index.version, events=6, agreed=2, automatic=4, novel=1,
                                         active_automatic=6, both_automatic=4,
                                          both_automatic_agreed=2, both_automatic_equivalent=2)
    sent = shadow_messages(result)
    assert [m["event_id"] for m in sent] == ["goose-1", "goose-2", "partial", "unrelated"]
    for message in sent:
        event_id = message["event_id"]
        assert (message["shadow"]["outcome"], message["shadow"]["route"]) == reference[event_id][:2]
        assert (message["active"]["outcome"], message["active"]["route"]) == active[event_id]
        assert message["active"]["version"] == pipeline.index.version
        assert message["shadow"]["version"] == shadow_index.version
        assert message["shadow"]["novel"] is reference[event_id][2]
    decision_ids = {d.event_id: d.id for d in result.decisions}
    assert all(m["decision_id"] == decision_ids[m["event_id"]] for m in sent)
    # the decisions published are the active version's alone
    assert {d.route_set_version for d in result.decisions} == {pipeline.index.version}


def test_a_shadow_whose_head_scores_words_decides_as_it_would_when_active() -> None:
    encoder = TrivialEncoder()
    shadowed = candidate()
    rows = [(position, text) for position, route in enumerate(shadowed.routes) for text in route.utterances]
    texts = [text for _, text in rows]
    head = train_head(encoder.encode(texts), np.eye(len(shadowed.routes), dtype=bool)[[p for p, _ in rows]],
                      [route.name for route in shadowed.routes], encoder.id, c=10.0, texts=texts)
    assert head.words is not None and len(head.words) > 0
    shadowed = shadowed.model_copy()
    shadowed._head_bytes = head.to_bytes()  # as the route store restores a version's head
    shadow_index = RouteIndex.build(shadowed, encoder)
    pipeline = RouterPipeline(topology(), encoder, RouteIndex.build(route_set("base"), encoder), "t",
                              shadow_index=shadow_index, shadow_messages=20)
    result = pipeline.process(records())
    as_active = RouterPipeline(topology(), encoder, shadow_index, "t").process(records()).decisions
    reference = {d.event_id: (d.outcome, d.route) for d in as_active}
    sent = {m["event_id"]: (m["shadow"]["outcome"], m["shadow"]["route"]) for m in shadow_messages(result)}
    assert sent and all(reference[event_id] == verdict for event_id, verdict in sent.items())
    assert result.shadow is not None and result.shadow.events == len(BATCH)


def test_clean_through_another_benign_route_or_none_is_an_equivalent_decision() -> None:
    data = route_set("base", insult=True).model_dump(mode="json", exclude_none=True)
    data["routes"].append({"name": "smalltalk", "outcome": "clean", "utterances": [UNRELATED]})
    encoder = TrivialEncoder()
    pipeline = RouterPipeline(topology(), encoder, RouteIndex.build(route_set("base"), encoder), "t",
                              shadow_index=RouteIndex.build(parse_route_set(data), encoder))
    result = pipeline.process(records())
    active = {d.event_id: (d.outcome, d.route) for d in result.decisions}
    assert active["unrelated"] == ("clean", None) and active["goose-1"] == ("clean", None)
    stats = result.shadow
    assert stats is not None and stats.both_automatic == 6
    # unrelated: clean by no match, and clean through smalltalk; the geese: clean, and violating (insult)
    assert (stats.both_automatic_agreed, stats.both_automatic_equivalent) == (3, 4)
    assert {m["event_id"] for m in shadow_messages(result)} == {"goose-1", "goose-2", "unrelated"}


def test_what_the_shadow_would_overturn_is_audited_at_its_share_and_never_twice() -> None:
    from sieve.topology import ReviewSpec

    def audits(audit_share: float, shadow_audit_share: float) -> list[bytes]:
        review = ReviewSpec(audit_topic="m.audit", audit_share=audit_share,
                            shadow_audit_share=shadow_audit_share)
        shadowed = topology().model_copy(update={"review": review})
        encoder = TrivialEncoder()
        pipeline = RouterPipeline(shadowed, encoder, RouteIndex.build(route_set("base"), encoder), "t",
                                  shadow_index=RouteIndex.build(candidate(), encoder))
        result = pipeline.process(records())
        sent = [m for m in result.outbound if m.topic == "m.audit"]
        assert all(("sieve-audit", b"true") in m.headers for m in sent)
        return sorted(m.key for m in sent)

    # both decided automatically, otherwise: the geese (clean, and violating through insult)
    assert audits(0.0, 1.0) == [b"goose-1", b"goose-2"]
    assert audits(0.0, 0.0) == []
    assert audits(1.0, 1.0) == sorted(e.encode() for e in BATCH)  # every automatic decision, once
    assert "m.audit" in topology().model_copy(update={"review": ReviewSpec(
        audit_topic="m.audit", shadow_audit_share=0.5)}).output_topics(route_set("base"))


def test_disagreements_are_capped_per_batch_and_need_a_topic() -> None:
    capped, _ = build(TrivialEncoder(), messages=1)
    first = capped.process(records())
    assert [m["event_id"] for m in shadow_messages(first)] == ["goose-1"]
    [message] = [m for m in first.outbound if m.topic == SHADOW_TOPIC]
    assert message.key == b"goose-1" and dict(message.headers)["sieve-decision-id"]
    assert first.shadow is not None and first.shadow.events - first.shadow.agreed == 4  # all counted
    assert len(shadow_messages(capped.process(records(start=10)))) == 1  # the cap is per batch
    silent, _ = build(TrivialEncoder(), shadow_topic=None)
    result = silent.process(records())
    assert result.shadow is not None and result.shadow.agreed == 2
    assert {m.topic for m in result.outbound} == {"m.clean", "m.violating", "route.threat", "route.chat"}


def test_without_a_shadow_there_are_no_counts_and_no_messages() -> None:
    pipeline, _ = build(TrivialEncoder(), shadow=False)
    result = pipeline.process(records())
    assert result.shadow is None and pipeline.shadow_index is None
    assert SHADOW_TOPIC not in {m.topic for m in result.outbound}
    pipeline.set_shadow(RouteIndex.build(candidate(), TrivialEncoder()))  # shadowing starts later
    assert pipeline.process(records(start=10)).shadow is not None
    pipeline.set_shadow(None)
    assert pipeline.process(records(start=20)).shadow is None


def test_repeats_from_the_cache_are_not_shadowed() -> None:
    pipeline, _ = build(CountingEncoder(), cache=DecisionCache(1 << 20, ttl_s=60))
    wave = [record(i, f"g{i}", GOOSE[0]) for i in range(3)]
    first = pipeline.process(wave)
    assert [d.from_cache for d in first.decisions] == [None, True, True]
    assert first.shadow is not None and (first.shadow.events, first.shadow.agreed) == (1, 0)
    assert [m["event_id"] for m in shadow_messages(first)] == ["g0"]
    later = pipeline.process([record(9, "g9", GOOSE[0])])
    assert later.decisions[0].from_cache is True
    assert later.shadow is not None and later.shadow.events == 0 and shadow_messages(later) == []


def test_events_a_list_decided_are_not_shadowed(tmp_path: Path) -> None:
    from .test_prefilter import pipeline_for

    listed, encoder = pipeline_for(tmp_path, None)
    pipeline = RouterPipeline(listed.topology, encoder, listed.index, "t", shadow_index=listed.index)
    result = pipeline.process([record(0, "a", "I will K1LL you"), record(1, "b", "hello there friend")])
    assert result.decisions[0].list_hits is not None  # decided by the block list, before the encoder
    assert result.shadow == ShadowStats(listed.index.version, events=1, agreed=1, automatic=1,
                                        active_automatic=1, both_automatic=1, both_automatic_agreed=1,
                                        both_automatic_equivalent=1)


def test_a_shadow_that_does_not_fit_is_refused() -> None:
    encoder = TrivialEncoder()
    active = RouteIndex.build(route_set("base"), encoder)
    with pytest.raises(ValueError, match=r"encoded with 'trivial:crc32-32'.*does not fit"):
        RouterPipeline(topology(), encoder, active, "t",
                       shadow_index=RouteIndex.build(candidate(), TrivialEncoder(32)))
    with pytest.raises(ValueError, match=r"'other' is not a version of the topology's route set 'base'"):
        RouterPipeline(topology(), encoder, active, "t",
                       shadow_index=RouteIndex.build(candidate("other"), encoder))
    pipeline = RouterPipeline(topology(), encoder, active, "t")
    vector = encoder.encode([GOOSE[0]])[0]
    image_space = RouteIndex.from_examples(candidate(), "v", encoder.id, {"insult": [("x", "x", vector)]},
                                           "image")
    with pytest.raises(ValueError, match=r"image space.*does not fit the worker's text encoder"):
        pipeline.set_shadow(image_space)
    assert pipeline.shadow_index is None


def test_the_topology_names_the_shadow_and_its_topic(tmp_path: Path) -> None:
    shadowed = topology(shadow="0123456789abcdef")
    assert shadowed.route_set.shadow == "0123456789abcdef"
    assert SHADOW_TOPIC in shadowed.output_topics(route_set("base"))
    assert SHADOW_TOPIC not in topology(shadow_topic=None).output_topics(route_set("base"))
    assert load_topology(REPO / "topologies" / "moderation.yaml").route_set.shadow is None
    data = topology().model_dump(mode="json", exclude_none=True)
    data["tenants"] = {"policies": {"kids": {"route_set": {"name": "strict", "shadow": "0123"}}}}
    with pytest.raises(ValueError, match="shadow"):  # tenants' sets are not shadowed
        Topology.model_validate(data)


def test_the_worker_loads_the_shadow_version_from_the_store(tmp_path: Path, trivial_encoder) -> None:
    store = RouteStore(QdrantSettings(path=tmp_path / "q", lock_wait_s=5))
    store.sync(route_set("base"), trivial_encoder)
    ids = {"text": trivial_encoder.id}
    assert load_shadow_index(topology(), store, ids) is None
    wanted = candidate()
    with pytest.raises(RouteStoreError, match=rf"route_set.shadow: version {wanted.version} of 'base'"):
        load_shadow_index(topology(shadow=wanted.version), store, ids)
    store.sync(wanted, trivial_encoder)  # now the active version; the shadow loads by its version
    store.set_active("base", trivial_encoder.id, route_set("base").version)
    loaded = load_shadow_index(topology(shadow=wanted.version), store, ids)
    assert loaded is not None and loaded.version == wanted.version
    assert store.current_version("base", trivial_encoder.id) == route_set("base").version


def test_metrics_count_the_shadow_of_a_computed_batch() -> None:
    pipeline, shadow_index = build(TrivialEncoder())
    batch = records()
    computed = summarise(pipeline.process(batch))
    assert computed.shadow == ShadowStats(shadow_index.version, events=6, agreed=2, automatic=4, novel=1,
                                          active_automatic=6, both_automatic=4,
                                          both_automatic_agreed=2, both_automatic_equivalent=2)
    computed.add(summarise(pipeline.process(records(start=10))))  # a batch computed in two parts
    labels = {"topology": "shadow-metrics", "shadow_version": shadow_index.version}
    names = ("events", "agreed", "automatic", "novel", "active_automatic", "both_automatic",
             "both_automatic_agreed", "both_automatic_equivalent")

    def values() -> dict[str, float]:
        return {n: REGISTRY.get_sample_value(f"sieve_shadow_{n}_total", labels) or 0.0 for n in names}

    before = values()
    metrics.record_batch("shadow-metrics", batch, computed, 0.0)
    after = values()
    assert {n: after[n] - before[n] for n in names} == {"events": 12, "agreed": 4, "automatic": 8, "novel": 2,
                                                        "active_automatic": 12, "both_automatic": 8,
                                                        "both_automatic_agreed": 4,
                                                        "both_automatic_equivalent": 4}


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_compute_shadows_in_both_modes(mode: str, trivial_encoder) -> None:
    active = RouteIndex.build(route_set("base"), trivial_encoder)
    shadow_index = RouteIndex.build(candidate(), trivial_encoder)
    settings = Settings(metrics_port=0, worker_name="t", compute=mode, shadow_messages=2, dedup_cache_mb=0)
    compute = build_compute(topology(), settings, {"text": active}, (trivial_encoder, None),
                            shadow_index=shadow_index)
    try:
        assert compute.mode == mode
        computed = asyncio.run(compute.run(records()))
    finally:
        compute.close()
    assert computed.shadow == ShadowStats(shadow_index.version, events=6, agreed=2, automatic=4, novel=1,
                                          active_automatic=6, both_automatic=4,
                                          both_automatic_agreed=2, both_automatic_equivalent=2)
    sent = [json.loads(m.value)["event_id"] for m in computed.outbound if m.topic == SHADOW_TOPIC]
    assert sent == ["goose-1", "goose-2"]  # capped by settings.shadow_messages
