"""The worker's /healthz, /readyz and consumer-lag gauge: the endpoints Kubernetes probes and
the dashboard read. Unit tests of the probe logic, then a real `sieve worker` on the dev broker.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from aiokafka import AIOKafkaConsumer, TopicPartition

from sieve.kafka.client import produce
from sieve.routeset import load_route_set
from sieve.settings import HealthSettings, KafkaSettings, QdrantSettings
from sieve.store.qdrant import RouteStore
from sieve.worker.health import Probes, serve

from .conftest import REPO, free_port, worker_env


class SteppedClock:
    """A clock the test advances by hand (time is an input of the probe logic)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_liveness_follows_the_heartbeat_and_the_startup_allowance() -> None:
    clock = SteppedClock()
    probes = Probes(HealthSettings(stall_s=10, startup_s=60), clock=clock)
    assert probes.liveness()[0] and probes.liveness()[1]["status"] == "starting"
    clock.now += 61
    alive, body = probes.liveness()
    assert not alive and body["status"] == "never started"
    probes.beat()
    assert probes.liveness()[0]
    clock.now += 9.5
    assert probes.liveness()[0]
    clock.now += 1
    alive, body = probes.liveness()
    assert not alive and body["status"] == "event loop stalled" and body["heartbeat_age_s"] == 10.5


def test_readiness_needs_every_check_and_a_failing_check_is_not_ready() -> None:
    probes = Probes(HealthSettings())
    assert probes.readiness()[0], "no checks: ready"
    state = {"joined": False}
    probes.add_check("index", lambda: (True, "v1"))
    probes.add_check("group", lambda: (state["joined"], "waiting"))
    ready, body = probes.readiness()
    assert not ready and body["checks"]["group"] == {"ok": False, "detail": "waiting"}
    state["joined"] = True
    assert probes.readiness()[0]

    def broken() -> tuple[bool, str]:
        raise RuntimeError("boom")

    probes.add_check("broken", broken)
    ready, body = probes.readiness()
    assert not ready and body["checks"]["broken"]["detail"] == "RuntimeError: boom"


def test_one_server_answers_metrics_healthz_readyz_and_404() -> None:
    clock = SteppedClock()
    probes = Probes(HealthSettings(stall_s=5), clock=clock)
    port = free_port()
    server = serve("127.0.0.1", port, HealthSettings(stall_s=5), probes=probes)
    assert server is not None
    try:
        probes.beat()
        status, body = get(port, "/healthz")
        assert status == 200 and json.loads(body)["status"] == "alive"
        probes.add_check("group", lambda: (False, "waiting"))
        status, body = get(port, "/readyz")
        assert status == 503 and json.loads(body)["checks"]["group"]["ok"] is False
        clock.now += 6
        assert get(port, "/healthz")[0] == 503
        status, body = get(port, "/metrics")
        assert status == 200 and "sieve_consumer_lag" in body and "sieve_events_in_total" in body
        assert get(port, "/nope")[0] == 404
    finally:
        server.shutdown()
        server.server_close()
    assert serve("127.0.0.1", 0, probes=probes) is None, "port 0 turns the endpoint off"


def test_the_server_binds_the_address_the_settings_name(monkeypatch: pytest.MonkeyPatch) -> None:
    from sieve.settings import Settings

    monkeypatch.setenv("SIEVE_METRICS_HOST", "127.0.0.1")
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.metrics_host == "127.0.0.1" and Settings.model_fields["metrics_host"].default == "0.0.0.0"
    port = free_port()
    server = serve(settings.metrics_host, port, probes=Probes())
    assert server is not None
    try:
        assert server.server_address[0] == "127.0.0.1"
    finally:
        server.shutdown()
        server.server_close()


# -- a real worker -------------------------------------------------------------------------------


def lag_by_partition(port: int, topic: str) -> dict[int, float]:
    status, text = get(port, "/metrics")
    assert status == 200
    lags = {}
    for line in text.splitlines():
        if line.startswith("sieve_consumer_lag{") and f'topic="{topic}"' in line:
            partition = int(line.split('partition="', 1)[1].split('"', 1)[0])
            lags[partition] = float(line.rsplit(" ", 1)[1])
    return lags


def metric(port: int, name: str) -> float:
    text = get(port, "/metrics")[1]
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


async def committed_offsets(kafka: KafkaSettings, group: str, topic: str, partitions: int) -> dict:
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka.bootstrap_servers, group_id=group,
                                enable_auto_commit=False)
    await consumer.start()
    try:
        return {p: await consumer.committed(TopicPartition(topic, p)) for p in range(partitions)}
    finally:
        await consumer.stop()


@pytest.mark.integration
def test_worker_probes_and_lag_per_partition(dev_broker: str, tmp_path: Path, trivial_encoder) -> None:
    # The trivial encoder: this test is about the endpoints, not meaning. One event per batch
    # (each batch waits for its acks) keeps the worker slow enough for a backlog to be seen.
    prefix = "health"
    route_file = REPO / "routes" / "moderation.yaml"
    qdrant = tmp_path / "qdrant"
    RouteStore(QdrantSettings(path=qdrant)).sync(load_route_set(route_file), trivial_encoder)
    topology = {
        "name": "health", "group_id": f"{prefix}-group",
        "input": {"topics": [f"{prefix}.in"], "partitions": 4},
        "route_set": {"name": "moderation", "file": str(route_file)},
        "encoder": {"kind": "trivial"},
        "batching": {"max_events": 1, "max_wait_s": 0.05},
        "output": {"outcome_topics": {o: f"{prefix}.{o}" for o in ("clean", "violating", "needs_review")},
                   "route_topic_prefix": f"{prefix}.route.", "dead_letter_topic": f"{prefix}.dead-letter"},
    }
    topology_path = tmp_path / "topology.yaml"
    topology_path.write_text(yaml.safe_dump(topology))
    port = free_port()
    log = tmp_path / "worker.log"
    worker = subprocess.Popen(
        [sys.executable, "-m", "sieve", "worker", str(topology_path)],
        env=worker_env(dev_broker, qdrant, SIEVE_METRICS_PORT=str(port), SIEVE_HEALTH__HEARTBEAT_S="0.3"),
        stdout=open(log, "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115
    )
    kafka = KafkaSettings(bootstrap_servers=dev_broker)
    try:
        # Readiness: 503 until the consumer joined the group, then 200; alive all along.
        statuses: list[int] = []
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert worker.poll() is None, log.read_text()[-3000:]
            try:
                status, body = get(port, "/readyz")
            except OSError:
                time.sleep(0.1)
                continue
            statuses.append(status)
            assert get(port, "/healthz")[0] == 200
            if status == 200:
                checks = json.loads(body)["checks"]
                assert checks["consumer_group"]["detail"] == "4 input partition(s) assigned"
                assert checks["route_index"]["ok"] and checks["not_draining"]["ok"]
                break
            assert json.loads(body)["checks"]["consumer_group"]["ok"] is False
            time.sleep(0.1)
        assert statuses and statuses[-1] == 200, log.read_text()[-3000:]
        assert 503 in statuses, "never saw the worker unready before it joined"
        assert metric(port, "sieve_assigned_partitions") == 4

        events = [(f"h-{i}".encode(), json.dumps({"id": f"h-{i}", "text": f"message number {i}"}).encode())
                  for i in range(1500)]
        asyncio.run(produce(kafka, f"{prefix}.in", events))
        # A backlog shows as lag on the partitions, then drains to 0 on every one of them.
        seen_backlog = 0.0
        deadline = time.monotonic() + 120
        lags: dict[int, float] = {}
        while time.monotonic() < deadline:
            lags = lag_by_partition(port, f"{prefix}.in")
            seen_backlog = max(seen_backlog, sum(lags.values()))
            if metric(port, "sieve_events_in_total") >= 1500 and len(lags) == 4 and not any(lags.values()):
                break
            time.sleep(0.2)
        assert 0 < seen_backlog <= 1500, seen_backlog
        assert lags == {0: 0, 1: 0, 2: 0, 3: 0}, (lags, log.read_text()[-3000:])
        # Lag 0 means the committed offsets reached each partition's end: they add up to what was sent.
        committed = asyncio.run(committed_offsets(kafka, f"{prefix}-group", f"{prefix}.in", 4))
        assert sum(committed.values()) == 1500, committed
        heartbeat = metric(port, "sieve_heartbeat_timestamp_seconds")
        assert time.time() - heartbeat < 5
    finally:
        worker.terminate()
        worker.wait(60)
