"""A real `sieve worker` on the dev broker shadowing a candidate version (``route_set.shadow``).

The trivial encoder keeps it about the wiring (the shadow version from the store, its
counters, its disagreements topic), not the model.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import yaml

from sieve.flow.match import RouteIndex
from sieve.flow.pipeline import RouterPipeline
from sieve.kafka.client import produce
from sieve.kafka.records import RawRecord
from sieve.quality.promotion import scrape as promotion_scrape
from sieve.quality.promotion import shadow_counts
from sieve.routeset import load_route_set, parse_route_set
from sieve.settings import QdrantSettings
from sieve.store.qdrant import RouteStore
from sieve.topology import load_topology

from .conftest import REPO, free_port
from .test_integration import SAMPLES, Stack, read_all, scrape, wait_for_metrics

pytestmark = pytest.mark.integration


def test_a_worker_shadows_a_stored_version_and_counts_it(dev_broker: str, tmp_path: Path,
                                                          trivial_encoder) -> None:
    stack = Stack(dev_broker, tmp_path, "shadow1", encoder="trivial")
    active_set = load_route_set(REPO / "routes" / "moderation.yaml")
    data = active_set.model_dump(mode="json")
    # the candidate: without the hate_threatening route (a share of the samples is decided by it)
    data["routes"] = [route for route in data["routes"] if route["name"] != "hate_threatening"]
    candidate = parse_route_set(data)
    candidate._lists = active_set.loaded_lists
    store = RouteStore(QdrantSettings(path=stack.qdrant_path))
    store.sync(active_set, trivial_encoder)
    path = stack.write_topology(REPO / "routes" / "moderation.yaml")
    topology = yaml.safe_load(path.read_text())
    topology["route_set"]["shadow"] = candidate.version
    topology["output"]["shadow_topic"] = "shadow1.shadow"
    path.write_text(yaml.safe_dump(topology))
    try:
        # the shadow version is not in the store: the worker does not start, and says why
        failed = stack.start_worker(path)
        assert failed.wait(120) != 0
        assert f"route_set.shadow: version {candidate.version}" in " ".join(stack.logs_text().split())
        store.sync(candidate, trivial_encoder)
        store.set_active("moderation", trivial_encoder.id, active_set.version)
        port = free_port()
        worker = stack.start_worker(path, metrics_port=port)
        wait_for_metrics(port, worker)
        events = [(f"s-{i}".encode(), json.dumps({"id": f"s-{i}", "text": SAMPLES[i]["text"]}).encode())
                  for i in range(60)]
        asyncio.run(produce(stack.kafka, stack.input_topic, events))
        wanted = {key.decode() for key, _ in events}
        decisions = asyncio.run(read_all(stack.kafka, stack.verdict_topics, until=wanted, timeout_s=120))
        assert {d["event_id"] for d in decisions} == wanted, stack.logs_text()
        assert {d["route_set_version"] for d in decisions} == {active_set.version}
        encoded = {d["event_id"]: d for d in decisions if not d["from_cache"]}
        # what the candidate decides for the same events, as the active version of a pipeline
        reference = RouterPipeline(load_topology(path), trivial_encoder,
                                   RouteIndex.build(candidate, trivial_encoder), "t")
        records = [RawRecord("in", 0, i, key, value, None) for i, (key, value) in enumerate(events)]
        theirs = {d.event_id: (d.outcome, d.route) for d in reference.process(records).decisions}
        agreed = sum((d["outcome"], d["route"]) == theirs[i] for i, d in encoded.items())
        assert agreed < len(encoded), "the candidate must disagree somewhere for this test to mean anything"
        metrics = scrape(port)
        assert metrics["sieve_shadow_events_total"] == len(encoded)
        assert metrics["sieve_shadow_agreed_total"] == agreed
        # what `routes promote --shadow-metrics` reads from this worker: the same counts
        both = sum((d["outcome"] != "needs_review") and (theirs[i][0] != "needs_review")
                   for i, d in encoded.items())
        alike = sum((d["outcome"] != "needs_review") and (d["outcome"], d["route"]) == theirs[i]
                    for i, d in encoded.items())
        counts = shadow_counts(promotion_scrape([f"http://127.0.0.1:{port}/metrics"]), candidate.version)
        assert counts["events"] == len(encoded)
        assert (counts["both_automatic"], counts["both_automatic_agreed"]) == (both, alike)
        sent = asyncio.run(read_all(stack.kafka, ["shadow1.shadow"], timeout_s=20, idle_s=2))
        assert sent and all(m["shadow"]["version"] == candidate.version for m in sent)
        assert all((m["shadow"]["outcome"], m["shadow"]["route"]) == theirs[m["event_id"]] for m in sent)
        assert all(m["active"]["outcome"] == encoded[m["event_id"]]["outcome"] for m in sent)
        assert worker.poll() is None
    finally:
        stack.stop()
