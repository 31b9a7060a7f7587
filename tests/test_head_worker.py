"""The learned head in the worker: decided exactly as `sieve eval` measures, part of its route-set version."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import numpy as np
import pytest

from sieve.encoders.base import TextEncoder
from sieve.flow.head import HeadError, LearnedHead, head_of, train_head
from sieve.flow.match import RouteIndex
from sieve.flow.pipeline import RouterPipeline
from sieve.kafka.records import RawRecord
from sieve.quality.runner import run_build, run_eval
from sieve.routeset import RouteSet, head_path_for, load_route_set
from sieve.settings import QdrantSettings, Settings
from sieve.store.qdrant import RouteStore, RouteStoreError
from sieve.topology import Topology
from sieve.worker.compute import ThreadCompute
from sieve.worker.compute_child import ProcessCompute
from sieve.worker.router import RouterWorker

from .conftest import copy_shipped_routes

REPO = Path(__file__).resolve().parents[1]
TEXTS = ["buy cheap pills now", "what a lovely morning", "i will hurt you", "let's get lunch",
         "you people are all vermin", "click this link to win a prize", "see you at the match tonight"]


def example_head(route_set: RouteSet, encoder: TextEncoder, weight: float = 0.5) -> LearnedHead:
    """A head trained on the route set's own utterances (one route per row: softmax)."""
    names = [route.name for route in route_set.routes]
    rows = [(position, text) for position, route in enumerate(route_set.routes) for text in route.utterances]
    vectors = encoder.encode([text for _, text in rows])
    membership = np.eye(len(names), dtype=bool)[[position for position, _ in rows]]
    return train_head(vectors, membership, names, encoder.id, c=10.0, weight=weight)


def with_head_bytes(route_set: RouteSet, head: bytes | None) -> RouteSet:
    """The set with another head (as the route store restores one)."""
    copy = route_set.model_copy()
    copy._head_bytes = head
    return copy


def route_file_with_head(folder: Path, encoder: TextEncoder, weight: float = 0.5) -> Path:
    """A copy of the shipped moderation routes with a head beside it."""
    path = copy_shipped_routes("moderation.yaml", folder)
    example_head(load_route_set(path), encoder, weight).save(head_path_for(path))
    return path


def topology(set_name: str = "moderation", outcomes: tuple[str, ...] = ("clean", "violating")) -> Topology:
    """No threshold overrides: the worker's policy is the route file's own, as `sieve eval` uses."""
    topics = {outcome: f"h.{outcome}" for outcome in (*outcomes, "needs_review")}
    return Topology.model_validate({
        "name": "head", "input": {"topics": ["head.in"]}, "route_set": {"name": set_name},
        "encoder": {"kind": "trivial"},
        "output": {"outcome_topics": topics, "route_topic_prefix": None, "dead_letter_topic": "h.dead"},
    })


def records(texts: list[str], prefix: str = "ev") -> list[RawRecord]:
    return [RawRecord("head.in", 0, i, None, json.dumps({"id": f"{prefix}-{i}", "text": text}).encode(),
                      time.time()) for i, text in enumerate(texts)]


def verdicts(pipeline: RouterPipeline, texts: list[str]) -> list[tuple[str, str, str | None]]:
    return [(row["outcome"], row["reason"], row["route"]) for row in pipeline.process(records(texts)).rows]


# --------------------------------------------------------------------------- the version


def test_the_head_is_part_of_the_version(tmp_path, trivial_encoder):
    path = route_file_with_head(tmp_path, trivial_encoder)
    without = load_route_set(REPO / "routes" / "moderation.yaml")
    with_head = load_route_set(path)
    assert with_head.head_bytes == head_path_for(path).read_bytes()
    assert without.head_bytes is None
    assert with_head.version != without.version and with_head == without  # the same routes
    assert with_head_bytes(with_head, None).version == without.version  # no head: the hash as before heads
    example_head(with_head, trivial_encoder, weight=0.3).save(head_path_for(path))
    assert load_route_set(path).version not in (with_head.version, without.version)
    head_path_for(path).unlink()
    assert load_route_set(path).version == without.version


# --------------------------------------------------------------------------- worker = eval


@pytest.mark.parametrize("words", [False, True], ids=["vectors", "vectors and words"])
def test_the_worker_decides_as_eval_measures_the_head(moderation_bench, tmp_path, words):
    out = tmp_path / "built.yaml"
    run_build(moderation_bench, out, max_examples=10, head=True, head_words=words)
    report = run_eval(moderation_bench, [("built", out)])
    by_label = {entry.label: entry.run for entry in report.systems}
    measured = by_label["built + head, its own thresholds"]
    nearest = by_label["built, its own thresholds"]
    # the worker, from the route store, on the same texts in one batch
    store = RouteStore(QdrantSettings(path=tmp_path / "q", lock_wait_s=5))
    encoder = moderation_bench.encoder
    store.sync(load_route_set(out), encoder)
    index = store.load(measured.index.route_set.name, encoder.id)
    assert index.version == measured.index.version  # eval measured this version, head included
    outcomes = tuple(sorted(index.route_set.outcomes - {"needs_review"}))
    pipeline = RouterPipeline(topology(index.route_set.name, outcomes), encoder, index, "t")
    assert pipeline.head is not None and (pipeline.head.words is not None) == words
    texts = [str(ex.text) for ex in moderation_bench.splits.test.examples]
    names = index.route_names
    expected = [(o, r, names[p] if p is not None else None)
                for o, r, p in zip(measured.outcomes, measured.reasons, measured.routes, strict=True)]
    assert verdicts(pipeline, texts) == expected
    assert list(measured.outcomes) != list(nearest.outcomes)  # the head changes decisions here


# --------------------------------------------------------------------------- refusals


def test_a_head_from_another_encoder_or_version_is_refused(tmp_path, trivial_encoder):
    path = route_file_with_head(tmp_path, trivial_encoder)
    route_set = load_route_set(path)
    index = RouteIndex.build(route_set, trivial_encoder)
    assert head_of(index) is not None
    foreign = LearnedHead(("spam",), "st:other-model", "softmax", np.zeros((1, trivial_encoder.dim)),
                          np.zeros(1))
    other_encoder = RouteIndex.build(with_head_bytes(route_set, foreign.to_bytes()), trivial_encoder)
    with pytest.raises(HeadError, match="trained on 'st:other-model' vectors"):
        RouterPipeline(topology(), trivial_encoder, other_encoder, "t")
    one_each = {r.name: [("i", "t", np.ones(trivial_encoder.dim))] for r in index.routes}
    stale = RouteIndex.from_examples(route_set, "0123456789abcdef", trivial_encoder.id, one_each)
    with pytest.raises(HeadError, match="a head never runs with another version"):
        RouterPipeline(topology(), trivial_encoder, stale, "t")
    with pytest.raises(HeadError, match="trained on 'st:other-model' vectors"):  # before any child starts
        ProcessCompute(topology(), Settings(metrics_port=0, worker_name="t"), {"text": other_encoder})
    pipeline = RouterPipeline(topology(), trivial_encoder, index, "t")
    with pytest.raises(HeadError):
        pipeline.swap_index(other_encoder)
    assert pipeline.index is index and pipeline.head is not None  # the running version stays
    store = RouteStore(QdrantSettings(path=tmp_path / "q", lock_wait_s=5))
    with pytest.raises(RouteStoreError, match="trained on 'st:other-model' vectors"):
        store.sync(other_encoder.route_set, trivial_encoder)


def test_the_store_keeps_the_head_with_its_version_and_refuses_a_swapped_one(tmp_path, trivial_encoder):
    path = route_file_with_head(tmp_path, trivial_encoder)
    store = RouteStore(QdrantSettings(path=tmp_path / "q", lock_wait_s=5))
    route_set = load_route_set(path)
    report = store.sync(route_set, trivial_encoder)
    assert report.version == route_set.version
    loaded = store.load("moderation", trivial_encoder.id)
    assert loaded.version == route_set.version and loaded.route_set.head_bytes == route_set.head_bytes
    # the head alone changes: a new version, nothing to re-encode
    example_head(route_set, trivial_encoder, weight=0.2).save(head_path_for(path))
    reweighted = load_route_set(path)
    again = store.sync(reweighted, trivial_encoder)
    assert (again.previous_version, again.version) == (route_set.version, reweighted.version)
    assert (again.added, again.updated, again.deleted) == (0, 0, 0)
    head = head_of(store.load("moderation", trivial_encoder.id))
    assert head is not None and head.weight == pytest.approx(0.2)
    # without the head file: the head-less version, loaded without a head
    head_path_for(path).unlink()
    plain = store.sync(load_route_set(path), trivial_encoder)
    assert plain.version == load_route_set(REPO / "routes" / "moderation.yaml").version
    assert store.load("moderation", trivial_encoder.id).route_set.head_bytes is None
    # a version record whose head is not the one its version hashed is refused
    store.sync(reweighted, trivial_encoder)
    with store.client() as client:
        meta_id = store._meta_id("moderation", trivial_encoder.id)
        older = base64.b64encode(route_set.head_bytes or b"").decode()
        client.set_payload(store.meta_collection, {"head": older}, points=[meta_id])
    with pytest.raises(RouteStoreError, match="its stored head (and lists )?hashes to version"):
        store.load("moderation", trivial_encoder.id)


# --------------------------------------------------------------------------- hot reload, thread and child


async def test_a_new_version_brings_its_head_to_the_thread_and_the_child(tmp_path, trivial_encoder):
    plain_set = load_route_set(REPO / "routes" / "moderation.yaml")
    store = RouteStore(QdrantSettings(path=tmp_path / "q", lock_wait_s=5))
    store.sync(plain_set, trivial_encoder)
    first = store.load("moderation", trivial_encoder.id)
    settings = Settings(metrics_port=0, worker_name="t")
    thread = ThreadCompute(RouterPipeline(topology(), trivial_encoder, first, "t"))
    child = ProcessCompute(topology(), settings, {"text": first})
    try:
        assert thread.pipeline.head is None
        with_head = load_route_set(route_file_with_head(tmp_path / "v2", trivial_encoder, weight=0.9))
        store.sync(with_head, trivial_encoder)
        for compute in (thread, child):
            await RouterWorker(topology(), settings, compute, store)._refresh_route_set()
            assert compute.indexes["text"].version == with_head.version
        expected = RouterPipeline(topology(), trivial_encoder, RouteIndex.build(with_head, trivial_encoder),
                                  "t")
        plain = RouterPipeline(topology(), trivial_encoder, RouteIndex.build(plain_set, trivial_encoder), "t")
        want = verdicts(expected, TEXTS * 3)
        assert want != verdicts(plain, TEXTS * 3)  # the head (weight 0.9) decides differently
        for compute in (thread, child):
            computed = await compute.run(records(TEXTS * 3))
            got = [(d["outcome"], d["reason"], d["route"], d["route_set_version"])
                   for d in (json.loads(m.value) for m in computed.outbound)]
            assert got == [(*v, with_head.version) for v in want]
        # a version whose head does not fit is refused by the child too; it keeps the running one
        foreign = LearnedHead(("spam",), "st:other-model", "softmax", np.zeros((1, trivial_encoder.dim)),
                              np.zeros(1))
        bad = RouteIndex.build(with_head_bytes(with_head, foreign.to_bytes()), trivial_encoder)
        with pytest.raises(HeadError):
            await child.swap_index(bad)
        assert child.indexes["text"].version == with_head.version
    finally:
        thread.close()
        child.close()
