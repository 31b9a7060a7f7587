"""Route-set versions in the route store are immutable and complete (a real Qdrant, local mode on tmp_path).

An interrupted sync leaves the active version as it was; a worker loads only a
complete version and keeps its running one when the store offers anything else;
versions coexist and the active pointer decides which one loads.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from prometheus_client import REGISTRY
from qdrant_client import QdrantClient, models

from sieve.flow.match import RouteIndex, example_id
from sieve.flow.pipeline import RouterPipeline
from sieve.routeset import RouteSet
from sieve.settings import QdrantSettings, Settings
from sieve.store.qdrant import RouteStore, RouteStoreError
from sieve.store.versions import point_id
from sieve.topology import Topology
from sieve.worker.compute import ThreadCompute
from sieve.worker.router import RouterWorker

from .test_store import assert_same_index, small_set, with_route

MORE = ["hello there", "good morning friend", "hi how are you", "hey", "howdy", "yo"]


@pytest.fixture
def store(tmp_path) -> RouteStore:
    return RouteStore(QdrantSettings(path=tmp_path / "q", lock_wait_s=5))


class InjectedFault(RuntimeError):
    """The failure :class:`FailingClient` injects."""


class FailingClient:
    """Test double for fault injection: a real client whose ``upsert`` into one collection fails.

    The ``fail_at``-th upsert into ``collection`` (counted over every client the store
    opens while patched) raises :class:`InjectedFault` instead of writing; everything
    else goes to the real client.
    """

    def __init__(self, client: QdrantClient, collection: str, fail_at: int, count: list[int]) -> None:
        self._client, self._collection, self._fail_at, self._count = client, collection, fail_at, count

    def upsert(self, collection_name: str, *args: Any, **kwargs: Any) -> Any:
        if collection_name == self._collection:
            self._count[0] += 1
            if self._count[0] == self._fail_at:
                raise InjectedFault(f"upsert {self._fail_at} into {collection_name}")
        return self._client.upsert(collection_name, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


def fail_upsert(monkeypatch, store: RouteStore, collection: str, fail_at: int) -> None:
    """Make the store's ``fail_at``-th upsert into ``collection`` fail (fault injection)."""
    real = store.client
    count = [0]

    @contextmanager
    def client() -> Iterator[Any]:
        with real() as opened:
            yield FailingClient(opened, collection, fail_at, count)

    monkeypatch.setattr(store, "client", client)


def pointer_payload(store: RouteStore, encoder_id: str) -> dict:
    with store.client() as client:
        found = client.retrieve(store.meta_collection, [store._meta_id("tiny", encoder_id)])
    return dict(found[0].payload or {})


def topology() -> Topology:
    topics = {outcome: f"t.{outcome}" for outcome in ("ok", "bad", "needs_review")}
    return Topology.model_validate({
        "name": "versions", "input": {"topics": ["t.in"]}, "route_set": {"name": "tiny"},
        "encoder": {"kind": "trivial"},
        "output": {"outcome_topics": topics, "route_topic_prefix": None, "dead_letter_topic": "t.dead"},
    })


# --------------------------------------------------------------------------- interrupted syncs


def test_an_interrupted_sync_leaves_the_active_version_loadable_and_unchanged(store, trivial_encoder,
                                                                              monkeypatch):
    monkeypatch.setattr("sieve.store.qdrant._PAGE", 2)  # several upserts per version
    first = small_set()
    store.sync(first, trivial_encoder)
    second = with_route(first, "greet", utterances=MORE)  # three examples more: eight points
    with monkeypatch.context() as patch:
        fail_upsert(patch, store, store.collection(trivial_encoder.id), fail_at=2)
        with pytest.raises(InjectedFault):
            store.sync(second, trivial_encoder)
    # the first page of the new version was written: none of it reaches the active version
    assert store.current_version("tiny", trivial_encoder.id) == first.version
    assert_same_index(store.load("tiny", trivial_encoder.id), RouteIndex.build(first, trivial_encoder))
    assert [v.version for v in store.list_versions("tiny", trivial_encoder.id)] == [first.version]
    with pytest.raises(RouteStoreError, match=f"version {second.version} is not complete"):
        store.load("tiny", trivial_encoder.id, second.version)
    # syncing again finishes it: only the missing points are written, only new examples encoded
    report = store.sync(second, trivial_encoder)
    assert (report.points, report.written, report.encoded) == (8, 6, 3)
    assert_same_index(store.load("tiny", trivial_encoder.id), RouteIndex.build(second, trivial_encoder))


def test_a_sync_interrupted_before_the_switch_keeps_the_old_version_active(store, trivial_encoder,
                                                                           monkeypatch):
    first = small_set()
    store.sync(first, trivial_encoder)
    stricter = small_set(defaults={"accept": 0.7})
    with monkeypatch.context() as patch:
        fail_upsert(patch, store, store.meta_collection, fail_at=2)  # 1: the version record, 2: the pointer
        with pytest.raises(InjectedFault):
            store.sync(stricter, trivial_encoder)
    assert store.current_version("tiny", trivial_encoder.id) == first.version
    assert store.load("tiny", trivial_encoder.id).route_set.defaults.accept == first.defaults.accept
    versions = store.list_versions("tiny", trivial_encoder.id)
    assert [(v.version, v.points, v.active) for v in versions] == [
        (first.version, 5, True), (stricter.version, 5, False)]
    report = store.sync(stricter, trivial_encoder)  # complete already: only the pointer moves
    assert report.written == 0
    assert store.current_version("tiny", trivial_encoder.id) == stricter.version


# --------------------------------------------------------------------------- refusals


async def test_a_worker_never_loads_an_incomplete_version(store, trivial_encoder, caplog):
    first, second = small_set(), with_route(small_set(), "greet", utterances=MORE)
    store.sync(first, trivial_encoder)
    running = store.load("tiny", trivial_encoder.id)
    store.sync(second, trivial_encoder)
    # one of the active version's points is lost (a partial restore, a hand edit)
    lost = point_id(second.version, example_id("tiny", "greet", "howdy"))
    with store.client() as client:
        client.delete(store.collection(trivial_encoder.id),
                      points_selector=models.PointIdsList(points=[lost]))
    with pytest.raises(RouteStoreError, match=f"version {second.version} is incomplete .*: 7 of 8 points"):
        store.load("tiny", trivial_encoder.id)
    compute = ThreadCompute(RouterPipeline(topology(), trivial_encoder, running, "t"))
    try:
        worker = RouterWorker(topology(), Settings(metrics_port=0, worker_name="t"), compute, store)
        with caplog.at_level(logging.ERROR, logger="sieve.worker.router"):
            await worker._refresh_route_set()
        assert compute.indexes["text"] is running  # the running version stays
        assert f"version {second.version} refused, keeping version {first.version}" in caplog.text
        refused = {"topology": topology().name, "space": "text"}
        assert REGISTRY.get_sample_value("sieve_route_set_refused", refused) == 1  # SieveRouteSetRefused
        # a pointer naming a version that has no record (as a store an older Sieve wrote has)
        unsynced = with_route(first, "complain", utterances=["never synced"])
        pointer = {**pointer_payload(store, trivial_encoder.id), "version": unsynced.version,
                   "definition": unsynced.model_dump_json()}
        with store.client() as client:
            client.set_payload(store.meta_collection, pointer,
                               points=[store._meta_id("tiny", trivial_encoder.id)])
        with pytest.raises(RouteStoreError, match=f"version {unsynced.version} is not complete"):
            store.load("tiny", trivial_encoder.id)
        await worker._refresh_route_set()
        assert compute.indexes["text"] is running
        # syncing the version again repairs it, and the worker takes it
        assert store.sync(second, trivial_encoder).written == 1
        await worker._refresh_route_set()
        loaded = compute.indexes["text"]
        assert loaded.version == second.version
        assert loaded.example_ids == RouteIndex.build(second, trivial_encoder).example_ids
        assert REGISTRY.get_sample_value("sieve_route_set_refused", refused) == 0
    finally:
        compute.close()


def test_a_record_whose_content_is_not_its_version_is_refused(store, trivial_encoder):
    store.sync(small_set(), trivial_encoder)
    other: RouteSet = small_set(defaults={"accept": 0.9})
    with store.client() as client:
        client.set_payload(store.meta_collection, {"definition": other.model_dump_json()},
                           points=[store._meta_id("tiny", trivial_encoder.id)])
    with pytest.raises(RouteStoreError, match="its stored definition hashes to version"):
        store.load("tiny", trivial_encoder.id)


# --------------------------------------------------------------------------- versions side by side


def test_two_versions_coexist_and_the_pointer_decides_which_loads(store, trivial_encoder):
    first, second = small_set(), with_route(small_set(), "complain", utterances=["worst support ever"])
    store.sync(first, trivial_encoder)
    store.sync(second, trivial_encoder)
    encoder_id = trivial_encoder.id
    assert [(v.version, v.active) for v in store.list_versions("tiny", encoder_id)] == [
        (first.version, False), (second.version, True)]
    assert_same_index(store.load("tiny", encoder_id), RouteIndex.build(second, trivial_encoder))
    assert_same_index(store.load("tiny", encoder_id, first.version), RouteIndex.build(first, trivial_encoder))

    store.set_active("tiny", encoder_id, first.version)
    assert store.current_version("tiny", encoder_id) == first.version
    assert_same_index(store.load("tiny", encoder_id), RouteIndex.build(first, trivial_encoder))
    assert [v.active for v in store.list_versions("tiny", encoder_id)] == [True, False]
    with pytest.raises(RouteStoreError, match="has no complete version 0123456789abcdef"):
        store.set_active("tiny", encoder_id, "0123456789abcdef")
    assert store.current_version("tiny", encoder_id) == first.version

    # syncing a stored version makes it active without writing a point; once more is a no-op
    report = store.sync(second, trivial_encoder)
    assert (report.previous_version, report.written, report.encoded) == (first.version, 0, 0)
    assert store.current_version("tiny", encoder_id) == second.version
    pointer = pointer_payload(store, encoder_id)
    assert store.sync(second, trivial_encoder).written == 0
    assert pointer_payload(store, encoder_id) == pointer  # not even the pointer was rewritten


def test_the_old_version_is_still_there_after_a_new_sync(store, trivial_encoder):
    first = small_set()
    store.sync(first, trivial_encoder)
    fewer = with_route(first, "greet", utterances=["hello there"])
    store.sync(fewer, trivial_encoder)
    assert len(store.load("tiny", trivial_encoder.id).example_ids) == 3
    old = store.load("tiny", trivial_encoder.id, first.version)
    assert_same_index(old, RouteIndex.build(first, trivial_encoder))
    versions = store.list_versions("tiny", trivial_encoder.id)
    assert [v.version for v in versions] == [first.version, fewer.version]
