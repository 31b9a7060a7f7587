"""Lists and repeats decide before the encoder, through the real pipeline (trivial encoder, real lists)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sieve.contracts import Decision
from sieve.encoders.trivial import TrivialEncoder
from sieve.flow.dedup import DecisionCache
from sieve.flow.match import RouteIndex
from sieve.flow.pipeline import RouterPipeline
from sieve.kafka.records import RawRecord
from sieve.routeset import load_route_set
from sieve.topology import load_topology

from .conftest import REPO
from .test_lists import BLOCK, route_file

TOPIC = "sieve.events.text"


class CountingEncoder(TrivialEncoder):
    """The trivial encoder, counting the texts it is asked to encode (instrumentation only)."""

    def __init__(self) -> None:
        super().__init__()
        self.texts: list[str] = []

    def encode(self, texts: list[str]) -> np.ndarray:
        self.texts += texts
        return super().encode(texts)


def record(offset: int, event_id: str, text: str) -> RawRecord:
    return RawRecord(TOPIC, 0, offset, event_id.encode(), json.dumps({"id": event_id, "text": text}).encode(),
                     1_700_000_000.0 + offset)


def pipeline_for(tmp_path: Path, cache: DecisionCache | None) -> tuple[RouterPipeline, CountingEncoder]:
    topology = load_topology(REPO / "topologies" / "moderation.yaml")
    routes = route_file(tmp_path).read_text().replace("name: chat", "name: moderation")
    path = tmp_path / "chat.yaml"
    path.write_text(routes)
    encoder = CountingEncoder()
    index = RouteIndex.build(load_route_set(path), encoder)
    encoder.texts.clear()
    return RouterPipeline(topology, encoder, index, "t", cache=cache), encoder


def test_a_block_list_hit_decides_and_skips_the_encoder(tmp_path: Path) -> None:
    pipeline, encoder = pipeline_for(tmp_path, None)
    result = pipeline.process([record(0, "a", "I will K1LL you"), record(1, "b", "hello there friend")])
    by_id = {d.event_id: d for d in result.decisions}
    hit = by_id["a"]
    assert (hit.outcome, hit.reason, hit.route, hit.score) == ("violating", "accept", "violence", 1.0)
    assert hit.list_hits is not None and [(h.list, h.entry) for h in hit.list_hits] == [("threats", "kill")]
    assert hit.id == Decision.make_id("a", pipeline.index.version) and hit.nearest == []
    assert by_id["b"].list_hits is None and by_id["b"].from_cache is None
    assert encoder.texts == ["hello there friend"]  # the list-decided event was never encoded
    assert "lists" in result.seconds


def test_repeats_are_encoded_once_and_get_their_own_decisions(tmp_path: Path) -> None:
    cache = DecisionCache(1 << 20, ttl_s=60)
    pipeline, encoder = pipeline_for(tmp_path, cache)
    wave = [record(i, f"e{i}", "win a free cruise now") for i in range(4)] + [record(9, "x", "how are you")]
    first = pipeline.process(wave)
    assert sorted(encoder.texts) == ["how are you", "win a free cruise now"]
    decisions = {d.event_id: d for d in first.decisions}
    assert len(decisions) == 5 and len({d.id for d in first.decisions}) == 5
    assert [decisions[f"e{i}"].from_cache for i in range(4)] == [None, True, True, True]
    assert {decisions[f"e{i}"].outcome for i in range(4)} == {decisions["e0"].outcome}
    assert all(decisions[f"e{i}"].event.id == f"e{i}" for i in range(4))
    second = pipeline.process([record(20, "late", "win a free cruise now")])
    [late] = second.decisions
    assert late.from_cache is True and late.event_id == "late" and late.scores == decisions["e0"].scores
    assert len(encoder.texts) == 2 and cache.stats.hits == 4  # 3 within the first batch, 1 later
    # a new route-set version decides again
    data = pipeline.index.route_set.model_dump(mode="json")
    data["routes"][1]["utterances"].append("one more greeting")
    from sieve.routeset import parse_route_set

    changed = parse_route_set(data)
    changed._lists = pipeline.index.route_set.loaded_lists
    pipeline.swap_index(RouteIndex.build(changed, encoder))
    encoder.texts.clear()
    [again] = pipeline.process([record(30, "new", "win a free cruise now")]).decisions
    assert again.from_cache is None and encoder.texts == ["win a free cruise now"]


def test_without_a_cache_every_event_is_encoded(tmp_path: Path) -> None:
    pipeline, encoder = pipeline_for(tmp_path, None)
    pipeline.process([record(i, f"e{i}", "same text") for i in range(3)])
    assert encoder.texts == ["same text"] * 3


def test_a_list_change_is_a_new_version_for_the_worker(tmp_path: Path) -> None:
    pipeline, _ = pipeline_for(tmp_path, None)
    before = pipeline.index.version
    (tmp_path / "lists" / "threats.yaml").write_text(json.dumps({**BLOCK, "entries": BLOCK["entries"][:1]}))
    assert load_route_set(tmp_path / "chat.yaml").version != before


@pytest.mark.parametrize("text", ["hatred of you", "skills"])
def test_no_hit_means_the_encoder_decides(tmp_path: Path, text: str) -> None:
    pipeline, encoder = pipeline_for(tmp_path, None)
    [decision] = pipeline.process([record(0, "a", text)]).decisions
    assert decision.list_hits is None and encoder.texts == [text]


def test_the_worker_counts_cache_hits_and_list_hits(tmp_path: Path) -> None:
    from prometheus_client import REGISTRY

    from sieve.worker.compute import summarise
    from sieve.worker.metrics import record_batch

    pipeline, _ = pipeline_for(tmp_path, DecisionCache(1 << 20, ttl_s=60))
    batch = [record(0, "a", "I will kill you"), record(1, "b", "hello"), record(2, "c", "hello")]
    computed = summarise(pipeline.process(batch))
    assert computed.from_cache == 1 and computed.list_hits == {("threats", "kill"): 1}
    labels = {"topology": "prefilter-test", "list": "threats", "entry": "kill"}
    before = REGISTRY.get_sample_value("sieve_list_hits_total", labels) or 0
    record_batch("prefilter-test", batch, computed, 0.01)
    assert REGISTRY.get_sample_value("sieve_cache_hits_total", {"topology": "prefilter-test"}) >= 1
    assert REGISTRY.get_sample_value("sieve_list_hits_total", labels) == before + 1


def test_the_settings_size_the_workers_cache(tmp_path: Path) -> None:
    from sieve.settings import Settings
    from sieve.worker.compute import build_pipeline

    pipeline, encoder = pipeline_for(tmp_path, None)
    indexes = {"text": pipeline.index}
    on = build_pipeline(pipeline.topology, Settings(dedup_cache_mb=1), indexes, (encoder, None))
    off = build_pipeline(pipeline.topology, Settings(dedup_cache_mb=0), indexes, (encoder, None))
    assert on.prefilter.cache is not None and on.prefilter.cache.max_bytes == 1 << 20
    assert off.prefilter.cache is None


MULTI_ROUTES = """\
name: moderation
default_outcome: clean
mode: multi
lists: [lists/threats.yaml]
routes:
  - {name: violence, outcome: violating, utterances: ["I will hurt you", "you will pay for this"]}
  - {name: spam, outcome: queue, utterances: ["I will K1LL you with these deals"]}
  - {name: smalltalk, outcome: clean, utterances: ["hello there", "how are you"]}
"""


def test_in_a_multi_set_a_hit_accepts_its_route_and_the_event_is_still_scored(tmp_path: Path) -> None:
    topology = load_topology(REPO / "topologies" / "moderation.yaml")
    topology = topology.model_copy(update={"output": topology.output.model_copy(
        update={"outcome_topic_template": "t.{outcome}"})})
    encoder = CountingEncoder()
    index = RouteIndex.build(load_route_set(route_file(tmp_path, routes=MULTI_ROUTES)), encoder)
    encoder.texts.clear()
    pipeline = RouterPipeline(topology, encoder, index, "t")
    text = "I will K1LL you with these deals"  # a threats-list hit, and spam's own example
    [decision] = pipeline.process([record(0, "a", text)]).decisions
    assert encoder.texts == [text]  # scored, not decided by the list alone
    assert (decision.outcome, decision.route, decision.mode) == ("violating", "violence", "multi")
    assert decision.routes is not None
    assert {(r.route, r.band) for r in decision.routes} == {("violence", "accept"), ("spam", "accept")}
    assert decision.list_hits is not None and decision.list_hits[0].entry == "kill"
    routed = {m.topic for m in pipeline.process([record(1, "b", text)]).outbound}
    assert {"route.violence", "route.spam"} <= routed


def test_repeats_are_answered_before_the_lists_run(tmp_path: Path) -> None:
    pipeline, encoder = pipeline_for(tmp_path, DecisionCache(1 << 20, ttl_s=60))
    matcher = pipeline.prefilter.terms_for(pipeline.index)
    matched: list[str | None] = []
    plain_match = matcher.match_batch

    def counting(texts: list[str | None]) -> list:  # instrumentation: which texts the lists saw
        matched.extend(texts)
        return plain_match(texts)

    matcher.match_batch = counting  # type: ignore[method-assign]
    first = pipeline.process([record(0, "a", "hello there friend"), record(1, "b", "hello there friend"),
                              record(2, "c", "I will kill you"), record(3, "d", "I will kill you")])
    assert matched == ["hello there friend", "I will kill you", "I will kill you"]
    by_id = {d.event_id: d for d in first.decisions}
    assert not first.dead_letters and by_id["b"].from_cache  # the in-batch repeat, not matched again
    # a block hit decides each copy (list decisions are never cached), the repeat its own way
    assert [(by_id[e].reason, by_id[e].route) for e in "cd"] == [("accept", "violence")] * 2
    matched.clear()
    second = pipeline.process([record(4, "e", "hello there friend"), record(5, "f", "I will kill you")])
    assert matched == ["I will kill you"]  # the cached text skipped the lists
    assert [d.from_cache for d in second.decisions] == [True, None]
    assert encoder.texts == ["hello there friend"]
