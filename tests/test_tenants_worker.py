"""A real `sieve worker` on the dev broker with tenants: each event decided against its tenant's set.

The trivial encoder keeps it about the wiring (route sets from the store, tenants, metrics),
not the model.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import yaml

from sieve.kafka.client import produce
from sieve.routeset import load_route_set
from sieve.settings import QdrantSettings
from sieve.store.qdrant import RouteStore

from .conftest import REPO, free_port
from .test_integration import SAMPLES, Stack, read_all, scrape, wait_for_metrics

pytestmark = pytest.mark.integration
TENANTS = {"kids": "kids", "none": None, "bogus": "../bogus"}  # id prefix -> the event's tenant


def test_a_worker_decides_each_tenant_with_its_route_set(dev_broker: str, tmp_path: Path,
                                                         trivial_encoder) -> None:
    stack = Stack(dev_broker, tmp_path, "tenants1", encoder="trivial")
    RouteStore(QdrantSettings(path=stack.qdrant_path)).sync(
        load_route_set(REPO / "routes" / "moderation.yaml"), trivial_encoder)
    path = stack.write_topology(REPO / "routes" / "moderation.yaml")
    data = yaml.safe_load(path.read_text())
    data["tenants"] = {"policies": {"kids": {"route_set": {
        "name": "moderation-strict", "file": str(REPO / "routes" / "moderation-strict.yaml")}}}}
    path.write_text(yaml.safe_dump(data))
    try:
        # the tenant's route set is not in the store: the worker does not start, and says why
        failed = stack.start_worker(path)
        assert failed.wait(120) != 0
        assert "tenant(s) kids: route set 'moderation-strict'" in " ".join(stack.logs_text().split())
        RouteStore(QdrantSettings(path=stack.qdrant_path)).sync(
            load_route_set(REPO / "routes" / "moderation-strict.yaml"), trivial_encoder)
        port = free_port()
        worker = stack.start_worker(path, metrics_port=port)
        wait_for_metrics(port, worker)
        events = []
        for i in range(60):
            prefix = list(TENANTS)[i % 3]
            event = {"id": f"{prefix}-{i}", "text": SAMPLES[i]["text"], "tenant": TENANTS[prefix]}
            events.append((event["id"].encode(), json.dumps(event).encode()))
        asyncio.run(produce(stack.kafka, stack.input_topic, events))
        wanted = {key.decode() for key, _ in events}
        decisions = asyncio.run(read_all(stack.kafka, stack.verdict_topics, until=wanted, timeout_s=120))
        assert {d["event_id"] for d in decisions} == wanted, stack.logs_text()
        sets: dict[str, set[str]] = {}
        for decision in decisions:
            sets.setdefault(decision["event_id"].split("-")[0], set()).add(decision["route_set"])
        assert sets == {"kids": {"moderation-strict"}, "none": {"moderation"}, "bogus": {"moderation"}}
        metrics = scrape(port)

        def decided(tenant: str) -> float:
            return sum(value for name, value in metrics.items()
                       if name.startswith("sieve_tenant_decisions_total{") and f'tenant="{tenant}"' in name)

        assert (decided("kids"), decided("_default")) == (20, 40)
        assert worker.poll() is None
    finally:
        stack.stop()
