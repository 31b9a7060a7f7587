"""Per-tenant policies: the topology's ``tenants``, one batch for every tenant, the worker's route sets.

Real pipeline and route sets, the trivial (hashing) encoder: a text equal to an
utterance scores 1 against it, one sharing most of its words scores high.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from prometheus_client import REGISTRY
from qdrant_client import models

from sieve.encoders.trivial import TrivialEncoder
from sieve.flow.decide import Policy
from sieve.flow.dedup import DecisionCache
from sieve.flow.match import RouteIndex, example_id
from sieve.flow.pipeline import RouterPipeline
from sieve.kafka.records import RawRecord
from sieve.routeset import RouteSet, parse_route_set
from sieve.settings import QdrantSettings, Settings
from sieve.store.qdrant import RouteStore, RouteStoreError
from sieve.store.versions import point_id
from sieve.topology import (
    TOPOLOGY_SCHEMA_VERSION,
    RouteSetRef,
    Topology,
    TopologyError,
    load_tenant_route_sets,
    load_topology,
    load_topology_route_set,
)
from sieve.worker.compute import ThreadCompute, summarise
from sieve.worker.router import RouterWorker, load_tenant_indexes

TOPIC = "tenants.in"
THREAT = ["i will hurt you badly tonight", "i am going to beat you up"]
CHAT = ["hello how are you today", "what a lovely morning for a walk"]
GOOSE = ["you are a silly goose", "what a silly goose you are"]
PARTIAL = "i will hurt you"  # most of a threat utterance: accepted at 0.5, not at 0.99


class CountingEncoder(TrivialEncoder):
    """The trivial encoder, recording each ``encode`` call's texts (a spy: instrumentation only)."""

    def __init__(self, dim: int = 64) -> None:
        super().__init__(dim)
        self.calls: list[list[str]] = []

    def encode(self, texts: list[str]) -> np.ndarray:
        self.calls.append(list(texts))
        return super().encode(texts)


def route_set(name: str, *, insult: bool = False, threat_accept: float | None = 0.5,
              extra: list[str] | None = None) -> RouteSet:
    routes: list[dict[str, Any]] = [
        {"name": "threat", "outcome": "violating", "utterances": THREAT + (extra or []),
         **({"thresholds": {"accept": threat_accept}} if threat_accept is not None else {})},
        {"name": "chat", "outcome": "clean", "utterances": CHAT},
    ]
    if insult:
        routes.append({"name": "insult", "outcome": "violating", "utterances": GOOSE})
    return parse_route_set({"name": name, "default_outcome": "clean", "routes": routes})


def topology_data(**tenants: Any) -> dict[str, Any]:
    return {
        "name": "multi", "input": {"topics": [TOPIC]}, "route_set": {"name": "base"},
        "encoder": {"kind": "trivial"},
        "output": {"outcome_topics": {"clean": "m.clean", "violating": "m.violating",
                                      "needs_review": "m.review"}, "dead_letter_topic": "m.dead"},
        "tenants": tenants or {
            "default": "forum",
            "policies": {
                "kids": {"route_set": {"name": "strict"}},
                "games": {"route_set": {"name": "lenient"}},
                "forum": {"thresholds": {"threat": {"accept": 0.99}}, "defaults": {"review": 0.45}},
                "plain": {},
            },
        },
    }


def record(offset: int, event_id: str, text: str, tenant: Any = None) -> RawRecord:
    event: dict[str, Any] = {"id": event_id, "text": text}
    if tenant is not None:
        event["tenant"] = tenant
    return RawRecord(TOPIC, 0, offset, event_id.encode(), json.dumps(event).encode(),
                     1_700_000_000.0 + offset)


def build(encoder: TrivialEncoder, cache: DecisionCache | None = None,
          topology: Topology | None = None) -> RouterPipeline:
    indexes = {name: RouteIndex.build(route_set(name, insult=name == "strict",
                                                threat_accept=0.95 if name == "lenient" else 0.5), encoder)
               for name in ("base", "strict", "lenient")}
    if isinstance(encoder, CountingEncoder):
        encoder.calls.clear()
    return RouterPipeline(topology or Topology.model_validate(topology_data()), encoder, indexes["base"], "t",
                          cache=cache, tenant_indexes={("strict", "text"): indexes["strict"],
                                                       ("lenient", "text"): indexes["lenient"]})


# --------------------------------------------------------------------------- the topology


def write(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def file_topology(tmp_path: Path, **tenants: Any) -> Path:
    for name in ("base", "strict"):
        write(tmp_path / "routes" / f"{name}.yaml",
              route_set(name, insult=name == "strict").model_dump(mode="json", exclude_none=True))
    data = topology_data(**tenants)
    data["route_set"] = {"name": "base", "file": "../routes/base.yaml"}
    return write(tmp_path / "topologies" / "t.yaml", data)


def test_tenants_load_with_files_resolved_against_the_topology(tmp_path: Path) -> None:
    strict = {"name": "strict", "file": "../routes/strict.yaml"}
    topology = load_topology(file_topology(tmp_path, default="forum", policies={
        "kids": {"route_set": strict}, "teens": {"route_set": strict},
        "forum": {"defaults": {"accept": 0.6}}}))
    assert TOPOLOGY_SCHEMA_VERSION >= 2 and topology.tenants is not None
    kids = topology.tenants.policies["kids"].route_set
    assert kids is not None and kids.file == (tmp_path / "routes" / "strict.yaml").resolve()
    # the distinct sets, the topology's own first; kids and teens share one
    assert [ref.name for ref in topology.tenant_route_sets()] == ["base", "strict"]
    assert topology.tenant_route_sets()[0] == topology.route_set
    assert topology.tenants_using("strict") == ["kids", "teens"]
    assert topology.tenant_route_set("forum") == topology.route_set
    [strict_set] = load_tenant_route_sets(topology)
    assert strict_set.name == "strict"
    # every set's route topics are output topics
    topics = topology.output_topics(load_topology_route_set(topology), strict_set)
    assert "route.insult" in topics and "route.threat" in topics


def test_a_topology_without_tenants_is_as_before() -> None:
    data = topology_data()
    del data["tenants"]
    topology = Topology.model_validate(data)
    assert topology.tenants is None and topology.tenant_route_sets() == [topology.route_set]
    assert topology.tenant_overrides(None) == (None, {})


@pytest.mark.parametrize(("tenants", "message"), [
    ({"policies": {"Bad Name": {}}}, r"tenants\.policies.*'Bad Name'.*not valid"),
    ({"policies": {"x" * 65: {}}}, r"tenants\.policies.*not valid"),
    ({"default": "nobody", "policies": {"kids": {}}}, r"'tenants'.*'nobody' names no policy"),
    ({"policies": {"kids": {"thresholds": {"threat": {"accept": 2}}}}},
     r"tenants\.policies\.kids\.thresholds"),
    ({"policies": {"kids": {"colour": "red"}}}, r"tenants\.policies\.kids\.colour"),
    ({"policies": {"kids": {"route_set": {"name": "base", "file": "../routes/other.yaml"}}}},
     r"route set 'base' is already read from"),
])
def test_bad_tenants_are_refused_naming_the_field(tmp_path: Path, tenants: dict, message: str) -> None:
    with pytest.raises(TopologyError, match=message):
        load_topology(file_topology(tmp_path, **tenants))


def test_a_per_route_override_of_a_missing_route_is_refused_with_the_route_set(tmp_path: Path) -> None:
    strict = {"name": "strict", "file": "../routes/strict.yaml"}
    topology = load_topology(file_topology(tmp_path, policies={
        "kids": {"route_set": strict, "thresholds": {"spam": {"accept": 0.9}}},
        "forum": {"thresholds": {"insult": {"accept": 0.9}}}}))  # base has no insult
    with pytest.raises(TopologyError, match=r"tenants\.policies\.kids\.thresholds.*spam.*'strict'"):
        load_tenant_route_sets(topology)
    with pytest.raises(TopologyError, match=r"tenants\.policies\.forum\.thresholds.*insult.*'base'"):
        load_topology_route_set(topology)
    with pytest.raises(TopologyError, match="forum"):
        build(TrivialEncoder(), topology=Topology.model_validate(topology_data(policies={
            "forum": {"thresholds": {"insult": {"accept": 0.9}}}})))


def test_a_tenant_set_with_an_unmapped_outcome_is_refused(tmp_path: Path) -> None:
    topology = load_topology(file_topology(tmp_path, policies={
        "kids": {"route_set": {"name": "spammy", "file": "../routes/spammy.yaml"}}}))
    write(tmp_path / "routes" / "spammy.yaml", {"name": "spammy", "default_outcome": "clean", "routes": [
        {"name": "spam", "outcome": "spam", "utterances": ["buy now"]}]})
    with pytest.raises(TopologyError, match="outcome.*spam.*'spammy'"):
        load_tenant_route_sets(topology)


def test_threshold_precedence() -> None:
    """set defaults < topology thresholds < tenant defaults < route's own < tenant per-route."""
    encoder = TrivialEncoder()
    data = topology_data(policies={
        "forum": {"defaults": {"accept": 0.65, "review": 0.45}, "thresholds": {"threat": {"accept": 0.9}}},
        "plain": {}})
    data["thresholds"] = {"accept": 0.6}
    topology = Topology.model_validate(data)
    index = RouteIndex.build(route_set("base", threat_accept=0.5), encoder)
    by_route = {route.name: position for position, route in enumerate(index.routes)}

    def thresholds(policy: str) -> dict[str, tuple[float, float]]:
        overrides, per_route = topology.tenant_overrides(policy)
        made = Policy.for_index(index, overrides, per_route)
        return {name: (round(float(made.accept[i]), 4), round(float(made.review[i]), 4))
                for name, i in by_route.items()}

    assert thresholds("plain") == {"threat": (0.5, 0.4), "chat": (0.6, 0.4)}
    assert thresholds("forum") == {"threat": (0.9, 0.45), "chat": (0.65, 0.45)}
    assert Policy.for_index(index, None, None).accept.tolist() == Policy.for_index(index).accept.tolist()


# --------------------------------------------------------------------------- one batch, every tenant


def test_every_tenant_in_one_batch_one_encode_each_against_its_own_set() -> None:
    encoder = CountingEncoder()
    pipeline = build(encoder)
    batch = [
        record(0, "kids-goose", GOOSE[0], "kids"),
        record(1, "forum-goose", GOOSE[0], "forum"),
        record(2, "games-partial", PARTIAL, "games"),
        record(3, "plain-partial", PARTIAL, "plain"),
        record(4, "forum-partial", PARTIAL, "forum"),
        record(5, "kids-chat", CHAT[0], "kids"),
    ]
    result = pipeline.process(batch)
    assert len(encoder.calls) == 1 and len(encoder.calls[0]) == 6  # one encode for the whole batch
    assert [d.event_id for d in result.decisions] == [f"{r.key.decode()}" for r in batch]  # input order
    by_id = {d.event_id: d for d in result.decisions}
    assert {i: d.route_set for i, d in by_id.items()} == {
        "kids-goose": "strict", "forum-goose": "base", "games-partial": "lenient", "plain-partial": "base",
        "forum-partial": "base", "kids-chat": "strict"}
    assert (by_id["kids-goose"].outcome, by_id["kids-goose"].route) == ("violating", "insult")
    assert by_id["forum-goose"].outcome == "clean"  # base has no insult route
    # forum's per-route override (threat accept 0.99) decides for forum alone
    assert (by_id["plain-partial"].outcome, by_id["plain-partial"].reason) == ("violating", "accept")
    assert (by_id["forum-partial"].outcome, by_id["forum-partial"].route) == ("needs_review", "threat")
    assert by_id["games-partial"].outcome == "needs_review"  # lenient's threat accepts at 0.95
    versions = {name: index.version for (name, _), index in pipeline.tenant_indexes.items()}
    assert all(d.route_set_version == versions[d.route_set] for d in result.decisions)


@pytest.mark.parametrize("tenant", [None, "nobody", "x" * 256, "../x", "ünïcødé", "Forum", "", "kids\n"])
def test_unknown_and_invalid_tenants_get_the_default_policy(tenant: str | None) -> None:
    pipeline = build(TrivialEncoder())
    result = pipeline.process([record(0, "e", PARTIAL, tenant), record(1, "p", PARTIAL, "plain")])
    decision = {d.event_id: d for d in result.decisions}["e"]
    assert decision.event.tenant == tenant
    # forum's policy (the default): threat needs 0.99 to accept
    assert (decision.route_set, decision.outcome) == ("base", "needs_review")
    assert summarise(result, pipeline.topology.tenants).tenants == {
        ("_default", "needs_review"): 1, ("plain", "violating"): 1}


def test_a_tenant_longer_than_the_event_contract_allows_is_a_dead_letter() -> None:
    result = build(TrivialEncoder()).process([record(0, "long", PARTIAL, "x" * 300),
                                              record(1, "ok", PARTIAL)])
    assert [d.event_id for d in result.decisions] == ["ok"]
    assert [(d.event_id, d.reason) for d in result.dead_letters] == [("long", "schema")]


def test_without_a_default_an_unknown_tenant_gets_the_topologys_own_policy() -> None:
    data = topology_data(policies={"forum": {"thresholds": {"threat": {"accept": 0.99}}}})
    pipeline = build(TrivialEncoder(), topology=Topology.model_validate(data))
    result = pipeline.process([record(0, "e", PARTIAL, "nobody"), record(1, "f", PARTIAL, "forum")])
    outcomes = {d.event_id: d.outcome for d in result.decisions}
    assert outcomes == {"e": "violating", "f": "needs_review"}


def test_the_repeat_cache_is_never_shared_between_tenants() -> None:
    encoder = CountingEncoder()
    cache = DecisionCache(1 << 20, ttl_s=60)
    pipeline = build(encoder, cache)
    first = {d.event_id: d for d in pipeline.process([record(0, "p1", PARTIAL, "plain"),
                                                      record(1, "f1", PARTIAL, "forum")]).decisions}
    assert first["p1"].outcome == "violating" and first["f1"].outcome == "needs_review"
    assert first["f1"].from_cache is None and encoder.calls == [[PARTIAL, PARTIAL]]
    second = {d.event_id: d for d in pipeline.process([record(2, "f2", PARTIAL, "forum"),
                                                       record(3, "p2", PARTIAL, "plain"),
                                                       record(4, "u2", PARTIAL, "nobody")]).decisions}
    # each tenant gets its own earlier decision; the unknown tenant is forum's (the default policy)
    assert {i: (d.outcome, d.from_cache) for i, d in second.items()} == {
        "f2": ("needs_review", True), "p2": ("violating", True), "u2": ("needs_review", True)}
    assert len(encoder.calls) == 1


def test_swap_index_replaces_the_sets_of_that_name_only() -> None:
    encoder = TrivialEncoder()
    pipeline = build(encoder)
    before = dict(pipeline.tenant_indexes)
    newer = RouteIndex.build(route_set("strict", insult=True, extra=["i will find you"]), encoder)
    pipeline.swap_index(newer)
    after = pipeline.tenant_indexes
    assert after[("strict", "text")] is newer
    assert after[("base", "text")] is before[("base", "text")] and pipeline.index is before[("base", "text")]
    assert after[("lenient", "text")] is before[("lenient", "text")]
    batch = [record(0, "k", GOOSE[0], "kids"), record(1, "g", GOOSE[0], "games"), record(2, "f", GOOSE[0])]
    versions = {d.event_id: d.route_set_version for d in pipeline.process(batch).decisions}
    assert versions == {"k": newer.version, "g": before[("lenient", "text")].version,
                        "f": before[("base", "text")].version}


def test_tenant_indexes_that_do_not_fit_are_refused_naming_the_tenant() -> None:
    encoder = TrivialEncoder()
    base = RouteIndex.build(route_set("base"), encoder)
    other_space = RouteIndex.build(route_set("strict", insult=True), TrivialEncoder(dim=32))
    topology = Topology.model_validate(topology_data())
    with pytest.raises(ValueError, match="tenant 'kids'.*'trivial:crc32-32'.*sync the route set"):
        RouterPipeline(topology, encoder, base, "t", tenant_indexes={
            ("strict", "text"): other_space,
            ("lenient", "text"): RouteIndex.build(route_set("lenient"), encoder)})
    with pytest.raises(ValueError, match="tenant 'games': no route index for its route set 'lenient'"):
        RouterPipeline(topology, encoder, base, "t", tenant_indexes={
            ("strict", "text"): RouteIndex.build(route_set("strict", insult=True), encoder)})
    pipeline = build(encoder)
    with pytest.raises(ValueError, match="tenant 'kids'"):
        pipeline.swap_index(other_space)
    assert pipeline.tenant_indexes[("strict", "text")].encoder_id == encoder.id  # the old one stays


# --------------------------------------------------------------------------- the worker and the store


def test_the_worker_loads_and_refreshes_every_tenants_set(tmp_path: Path, trivial_encoder) -> None:
    import asyncio

    store = RouteStore(QdrantSettings(path=tmp_path / "q", lock_wait_s=5))
    topology = Topology.model_validate(topology_data())
    ids = {"text": trivial_encoder.id}
    store.sync(route_set("base"), trivial_encoder)
    store.sync(route_set("strict", insult=True), trivial_encoder)
    with pytest.raises(RouteStoreError, match=r"tenant\(s\) games: route set 'lenient'.*not been synced"):
        load_tenant_indexes(topology, store, ids)
    store.sync(route_set("lenient", threat_accept=0.95), trivial_encoder)
    tenant_indexes = load_tenant_indexes(topology, store, ids)
    assert sorted(tenant_indexes) == [("lenient", "text"), ("strict", "text")]
    base = store.load("base", trivial_encoder.id)
    pipeline = RouterPipeline(topology, trivial_encoder, base, "t", tenant_indexes=tenant_indexes)
    compute = ThreadCompute(pipeline)
    try:
        worker = RouterWorker(topology, Settings(metrics_port=0, worker_name="t"), compute, store)
        newer = route_set("strict", insult=True, extra=["i will find you"])
        store.sync(newer, trivial_encoder)
        asyncio.run(worker._refresh_route_set())
        assert compute.tenant_indexes[("strict", "text")].version == newer.version
        assert compute.tenant_indexes[("base", "text")].version == route_set("base").version
        # a refused version of a tenant's set: the running one stays, the refused gauge says so
        newest = route_set("strict", insult=True, extra=["i will find you", "watch your back"])
        store.sync(newest, trivial_encoder)
        lost = point_id(newest.version, example_id("strict", "threat", "watch your back"))
        with store.client() as client:
            client.delete(store.collection(trivial_encoder.id),
                          points_selector=models.PointIdsList(points=[lost]))
        asyncio.run(worker._refresh_route_set())
        assert compute.tenant_indexes[("strict", "text")].version == newer.version
        refused = {"topology": "multi", "space": "text"}
        assert REGISTRY.get_sample_value("sieve_route_set_refused", refused) == 1
    finally:
        compute.close()


def test_the_compute_child_gets_and_swaps_the_tenants_sets(trivial_encoder) -> None:
    import asyncio

    from sieve.worker.compute_child import ProcessCompute

    pipeline = build(trivial_encoder)
    settings = Settings(metrics_port=0, worker_name="t", dedup_cache_mb=0)
    child = ProcessCompute(pipeline.topology, settings, pipeline.indexes, pipeline.tenant_indexes)
    try:
        assert child.tenant_indexes == pipeline.tenant_indexes
        newer = RouteIndex.build(route_set("strict", insult=True, extra=["i will find you"]), trivial_encoder)

        async def run() -> list[dict[str, Any]]:
            await child.swap_index(newer)
            computed = await child.run([record(0, "k", GOOSE[0], "kids"), record(1, "f", GOOSE[0], "forum")])
            assert computed.tenants == {("kids", "violating"): 1, ("forum", "clean"): 1}
            return [json.loads(m.value) for m in computed.outbound]

        decisions = {d["event_id"]: d for d in asyncio.run(run())}
        assert decisions["k"]["route_set_version"] == newer.version
        assert decisions["f"]["route_set_version"] == pipeline.index.version
        assert child.tenant_indexes[("strict", "text")] is newer and child.indexes["text"] is pipeline.index
    finally:
        child.close()


def test_route_set_ref_is_still_importable_from_the_topology() -> None:
    assert RouteSetRef(name="base").file is None


def test_routes_sync_with_a_topology_syncs_every_tenants_set(tmp_path: Path, monkeypatch) -> None:
    from typer.testing import CliRunner

    from sieve.cli import app
    from sieve.settings import get_settings

    strict = {"name": "strict", "file": "../routes/strict.yaml"}
    path = file_topology(tmp_path, default="forum", policies={"kids": {"route_set": strict}, "forum": {}})
    monkeypatch.setenv("SIEVE_QDRANT__PATH", str(tmp_path / "q"))
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(app, ["routes", "sync", "--topology", str(path), "-q"])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    store = RouteStore(QdrantSettings(path=tmp_path / "q", lock_wait_s=5))
    encoder_id = TrivialEncoder().id
    assert store.current_version("base", encoder_id) == route_set("base").version
    assert store.current_version("strict", encoder_id) == route_set("strict", insult=True).version


def test_a_reload_that_loses_a_tenants_overridden_route_keeps_the_running_version(tmp_path: Path,
                                                                                   trivial_encoder) -> None:
    import asyncio

    from sieve.worker import metrics

    store = RouteStore(QdrantSettings(path=tmp_path / "q", lock_wait_s=5))
    topology = Topology.model_validate(topology_data(policies={
        "forum": {"thresholds": {"threat": {"accept": 0.99}}}}))
    store.sync(route_set("base"), trivial_encoder)
    compute = ThreadCompute(RouterPipeline(topology, trivial_encoder, store.load("base", trivial_encoder.id),
                                           "t"))
    try:
        worker = RouterWorker(topology, Settings(metrics_port=0, worker_name="t"), compute, store)
        metrics.ROUTE_SET_REFUSED.labels("multi", "text").set(0)
        no_threat = parse_route_set({"name": "base", "default_outcome": "clean", "routes": [
            {"name": "chat", "outcome": "clean", "utterances": CHAT}]})
        store.sync(no_threat, trivial_encoder)  # forum's per-route thresholds name threat
        asyncio.run(worker._refresh_route_set())
        assert compute.indexes["text"].version == route_set("base").version
        refused = {"topology": "multi", "space": "text"}
        assert REGISTRY.get_sample_value("sieve_route_set_refused", refused) == 1
    finally:
        compute.close()
