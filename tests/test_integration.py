"""Integration: real `sieve worker` processes against the dev broker (tansu) and embedded Qdrant.

Every test gets its own topics and consumer group on the session's broker.
Nothing here is mocked; the trivial (hashing) encoder is used where a test is
about delivery rather than meaning, and says so.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from sieve.encoders.base import TextEncoder
from sieve.kafka.client import produce
from sieve.routeset import load_route_set
from sieve.routeset_dump import dump_route_set
from sieve.settings import KafkaSettings, QdrantSettings
from sieve.store.qdrant import RouteStore

from .conftest import REPO, copy_shipped_routes, free_port, worker_env

pytestmark = pytest.mark.integration

SAMPLES = [
    json.loads(line)
    for line in (REPO / "routes" / "samples" / "demo-messages.jsonl").read_text().splitlines()
    if line.strip()
]


@dataclass
class Stack:
    """One test's topology, route store and worker processes."""

    bootstrap: str
    tmp: Path
    prefix: str
    encoder: str = "sentence-transformers"
    partitions: int = 4
    compute: str = "thread"  # SIEVE_COMPUTE of the workers it starts
    workers: list[subprocess.Popen] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    @property
    def kafka(self) -> KafkaSettings:
        return KafkaSettings(bootstrap_servers=self.bootstrap)

    @property
    def input_topic(self) -> str:
        return f"{self.prefix}.in"

    @property
    def verdict_topics(self) -> list[str]:
        return [f"{self.prefix}.{o}" for o in ("clean", "violating", "needs-review")]

    @property
    def dead_letter_topic(self) -> str:
        return f"{self.prefix}.dead-letter"

    @property
    def qdrant_path(self) -> Path:
        return self.tmp / "qdrant"

    def write_topology(self, route_file: Path, max_text_chars: int = 2000) -> Path:
        topology = {
            "name": "it",
            "group_id": f"{self.prefix}-group",
            "input": {"topics": [self.input_topic], "partitions": self.partitions},
            "route_set": {"name": "moderation", "file": str(route_file)},
            "encoder": {"kind": self.encoder, "batch_size": 32},
            "batching": {"max_events": 128, "max_wait_s": 0.1},
            "limits": {"max_text_chars": max_text_chars},
            "output": {
                "outcome_topics": {
                    "clean": f"{self.prefix}.clean",
                    "violating": f"{self.prefix}.violating",
                    "needs_review": f"{self.prefix}.needs-review",
                },
                "route_topic_prefix": f"{self.prefix}.route.",
                "dead_letter_topic": self.dead_letter_topic,
                "partitions": 2,
            },
        }
        path = self.tmp / "topology.yaml"
        path.write_text(yaml.safe_dump(topology))
        return path

    def start_worker(self, topology: Path, metrics_port: int = 0) -> subprocess.Popen:
        log = self.tmp / f"worker-{len(self.workers)}.log"
        process = subprocess.Popen(
            [sys.executable, "-m", "sieve", "worker", str(topology)],
            env=worker_env(self.bootstrap, self.qdrant_path, SIEVE_METRICS_PORT=str(metrics_port),
                           SIEVE_WORKER_NAME=f"{self.prefix}-w{len(self.workers)}",
                           SIEVE_COMPUTE=self.compute),
            stdout=open(log, "wb"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
        )
        self.workers.append(process)
        self.logs.append(log)
        return process

    def logs_text(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-4000:]}" for p in self.logs if p.exists())

    def stop(self) -> None:
        for process in self.workers:
            if process.poll() is None:
                process.kill()
                process.wait(10)


@pytest.fixture
def stack(dev_broker: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Stack]:
    prefix = f"it{abs(hash(request.node.name)) % 10**8}"
    created = Stack(dev_broker, tmp_path, prefix)
    yield created
    created.stop()


def sync_routes(stack: Stack, encoder: TextEncoder, route_file: Path) -> str:
    report = RouteStore(QdrantSettings(path=stack.qdrant_path)).sync(load_route_set(route_file), encoder)
    return report.version


def text_events(count: int, tag: str, *, start: int = 0) -> list[tuple[bytes, bytes]]:
    events = []
    for i in range(start, start + count):
        sample = SAMPLES[i % len(SAMPLES)]
        event = {"id": f"{tag}-{i}", "text": sample["text"], "tenant": sample.get("tenant"),
                 "metadata": {"n": i}}
        events.append((event["id"].encode(), json.dumps(event).encode()))
    return events


async def read_all(kafka: KafkaSettings, topics: list[str], *, until: set[str] | None = None,
                   key: str = "event_id", timeout_s: float = 120.0, idle_s: float = 1.5) -> list[dict]:
    """Read topics from the beginning until every id in ``until`` was seen (then idle), or timeout."""
    consumer = AIOKafkaConsumer(*topics, bootstrap_servers=kafka.bootstrap_servers,
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    out: list[dict] = []
    seen: set[str] = set()
    try:
        deadline = time.monotonic() + timeout_s
        last = time.monotonic()
        while time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=200)
            for records in batches.values():
                for record in records:
                    value = json.loads(record.value)
                    value["_topic"] = record.topic
                    out.append(value)
                    seen.add(value.get(key))
                    last = time.monotonic()
            done = until is None or until <= seen
            if done and time.monotonic() - last > idle_s:
                break
        return out
    finally:
        await consumer.stop()


def scrape(port: int) -> dict[str, float]:
    """Sum the samples of each metric family (labels folded) from a /metrics endpoint."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    totals: Counter[str] = Counter()
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name_labels, value = line.rsplit(" ", 1)
            totals[name_labels.split("{", 1)[0]] += float(value)
            totals[name_labels] += float(value)
    return dict(totals)


def wait_for_metrics(port: int, process: subprocess.Popen, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, "worker exited during start-up"
        try:
            scrape(port)
            return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError("metrics endpoint never came up")


def test_two_thousand_events_each_decided_once_with_dead_letters_and_metrics(stack: Stack, minilm) -> None:
    route_file = REPO / "routes" / "moderation.yaml"
    version = sync_routes(stack, minilm, route_file)
    topology = stack.write_topology(route_file, max_text_chars=2000)
    port = free_port()
    worker = stack.start_worker(topology, metrics_port=port)
    good = text_events(2000, "ok")
    bad = [
        (b"bad-1", b"this is not json"),
        (b"bad-2", json.dumps({"text": "no id here"}).encode()),
        (b"bad-3", json.dumps({"id": "bad-3", "text": "   "}).encode()),
        (b"bad-4", json.dumps({"id": "bad-4", "text": "x" * 2001}).encode()),
        (b"bad-5", b'{"id": "bad-5", "text": "caf\xe9 latte"}'),
        (b"bad-6", json.dumps({"id": "bad-6", "text": "hi", "colour": "red"}).encode()),
    ]
    messages = good[:1000] + bad + good[1000:]
    asyncio.run(produce(stack.kafka, stack.input_topic, messages))
    wanted = {f"ok-{i}" for i in range(2000)}
    decisions = asyncio.run(read_all(stack.kafka, stack.verdict_topics, until=wanted, timeout_s=240))
    assert worker.poll() is None, stack.logs_text()
    counts = Counter(d["event_id"] for d in decisions)
    assert set(counts) == wanted, stack.logs_text()
    assert max(counts.values()) == 1, "a duplicate decision without any failure"
    assert all(d["route_set_version"] == version for d in decisions)
    assert {d["outcome"] for d in decisions} <= {"clean", "violating", "needs_review"}
    assert all(d["_topic"] == f"{stack.prefix}.{d['outcome'].replace('_', '-')}" for d in decisions)

    # the moderation set is multi-label: each decision reaches the topic of every route it accepted
    routed = {(d["id"], f"{stack.prefix}.route.{r['route']}") for d in decisions for r in d["routes"] or []
              if r["band"] == "accept"}
    assert routed, "no decision accepted any route"
    route_topics = [f"{stack.prefix}.route.{r.name}" for r in load_route_set(route_file).routes]
    on_routes = asyncio.run(read_all(stack.kafka, route_topics, until={i for i, _ in routed}, key="id",
                                     timeout_s=60))
    assert {(d["id"], d["_topic"]) for d in on_routes} == routed

    letters = asyncio.run(read_all(stack.kafka, [stack.dead_letter_topic], until=set(), key="id",
                                   idle_s=2.0, timeout_s=30))
    by_key = {letter["offset"]: letter for letter in letters}
    assert sorted(letter["reason"] for letter in letters) == sorted(
        ["not_json", "schema", "empty_text", "text_too_long", "invalid_utf8", "schema"]
    ), letters
    assert len(by_key) == 6
    import base64

    originals = {value for _, value in bad}
    assert {base64.b64decode(letter["payload_b64"]) for letter in letters} == originals

    # The worker went on: it is alive and its counters match what was produced.
    time.sleep(1.5)
    metrics = scrape(port)
    assert metrics["sieve_events_in_total"] == 2006
    assert metrics["sieve_decisions_total"] == 2000
    assert metrics["sieve_dead_letters_total"] == 6
    assert metrics["sieve_end_to_end_seconds_count"] == 2000
    assert metrics["sieve_stage_seconds_count"] > 0


def test_two_workers_split_partitions_and_decide_everything(stack: Stack, trivial_encoder) -> None:
    # Delivery test: the trivial encoder keeps it about the consumer group, not the model.
    stack.encoder = "trivial"
    route_file = REPO / "routes" / "moderation.yaml"
    sync_routes(stack, trivial_encoder, route_file)
    topology = stack.write_topology(route_file)
    ports = [free_port(), free_port()]
    workers = [stack.start_worker(topology, metrics_port=p) for p in ports]
    for port, process in zip(ports, workers, strict=True):
        wait_for_metrics(port, process)
    events = text_events(3000, "two")
    for start in range(0, len(events), 300):  # spread over the rebalance
        asyncio.run(produce(stack.kafka, stack.input_topic, events[start:start + 300]))
        time.sleep(0.5)
    wanted = {f"two-{i}" for i in range(3000)}
    decisions = asyncio.run(read_all(stack.kafka, stack.verdict_topics, until=wanted, timeout_s=120))
    assert {d["event_id"] for d in decisions} == wanted, stack.logs_text()
    by_event: dict[str, set[str]] = {}
    for d in decisions:
        by_event.setdefault(d["event_id"], set()).add(d["id"])
    assert all(len(ids) == 1 for ids in by_event.values()), "duplicates must share the decision id"
    per_worker = [scrape(p).get("sieve_events_in_total", 0) for p in ports]
    assert all(n > 0 for n in per_worker), f"one worker got no partition: {per_worker}"
    assert sum(per_worker) >= 3000


def child_pids(pid: int) -> set[int]:
    """Processes whose parent is ``pid`` (from /proc)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.add(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class PacedProducer(threading.Thread):
    """Keeps producing ``tag-N`` events (``chunk`` every ``pause_s``) until stopped or ``limit`` is reached.

    A worker killed while this runs is killed mid-stream however fast it is: a fixed backlog
    can be drained entirely before the test sees the first decisions.
    """

    def __init__(self, kafka: KafkaSettings, topic: str, tag: str, *, chunk: int = 200,
                 pause_s: float = 0.1, limit: int = 100_000) -> None:
        super().__init__(daemon=True)
        self.kafka, self.topic, self.tag = kafka, topic, tag
        self.chunk, self.pause_s, self.limit = chunk, pause_s, limit
        self.produced = 0
        self.stopped = threading.Event()

    def run(self) -> None:
        asyncio.run(self._produce())

    async def _produce(self) -> None:
        producer = AIOKafkaProducer(bootstrap_servers=self.kafka.bootstrap_servers, acks="all", linger_ms=5)
        await producer.start()
        try:
            while not self.stopped.is_set() and self.produced < self.limit:
                sends = []
                for key, value in text_events(self.chunk, self.tag, start=self.produced):
                    sends.append(await producer.send(self.topic, value=value, key=key))
                await asyncio.gather(*sends)
                self.produced += self.chunk
                await asyncio.sleep(self.pause_s)
        finally:
            await producer.stop()

    def stop(self) -> int:
        """Stop producing; returns how many events were produced (all acknowledged)."""
        self.stopped.set()
        self.join(60)
        assert not self.is_alive(), "the paced producer did not stop"
        return self.produced


@pytest.mark.parametrize("compute", ["thread", "process"])
def test_sigkill_mid_stream_then_restart_loses_nothing(stack: Stack, trivial_encoder, compute: str) -> None:
    stack.encoder = "trivial"
    stack.compute = compute
    route_file = REPO / "routes" / "moderation.yaml"
    sync_routes(stack, trivial_encoder, route_file)
    topology = stack.write_topology(route_file)
    asyncio.run(produce(stack.kafka, stack.input_topic, text_events(2000, "backlog")))
    first = stack.start_worker(topology)
    live = PacedProducer(stack.kafka, stack.input_topic, "kill")
    live.start()
    deadline = time.monotonic() + 90
    partial: list[dict] = []
    while time.monotonic() < deadline and len(partial) < 500:
        partial = asyncio.run(read_all(stack.kafka, stack.verdict_topics, timeout_s=2, idle_s=0.5))
    assert len(partial) >= 500, stack.logs_text()
    # Mid-stream: events are still arriving when the worker dies.
    assert live.is_alive(), "the paced producer finished before the kill"
    children = child_pids(first.pid)
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    produced = live.stop()
    # compute=process: the worker's compute child does not outlive it
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(alive(pid) for pid in children):
        time.sleep(0.2)
    assert not [pid for pid in children if alive(pid)], "a child of the killed worker is still running"
    stack.start_worker(topology)
    wanted = {f"backlog-{i}" for i in range(2000)} | {f"kill-{i}" for i in range(produced)}
    decisions = asyncio.run(read_all(stack.kafka, stack.verdict_topics, until=wanted, timeout_s=180))
    assert {d["event_id"] for d in decisions} == wanted, stack.logs_text()
    ids = {}
    for d in decisions:
        assert ids.setdefault(d["event_id"], d["id"]) == d["id"]


def test_sigterm_finishes_the_batch_commits_and_exits(stack: Stack, trivial_encoder) -> None:
    stack.encoder = "trivial"
    route_file = REPO / "routes" / "moderation.yaml"
    sync_routes(stack, trivial_encoder, route_file)
    topology = stack.write_topology(route_file)
    asyncio.run(produce(stack.kafka, stack.input_topic, text_events(6000, "term")))
    first = stack.start_worker(topology)
    partial: list[dict] = []
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and len(partial) < 300:
        partial = asyncio.run(read_all(stack.kafka, stack.verdict_topics, timeout_s=2, idle_s=0.5))
    first.send_signal(signal.SIGTERM)
    assert first.wait(60) == 0, stack.logs_text()
    stack.start_worker(topology)
    wanted = {f"term-{i}" for i in range(6000)}
    decisions = asyncio.run(read_all(stack.kafka, stack.verdict_topics, until=wanted, timeout_s=120))
    assert {d["event_id"] for d in decisions} == wanted, stack.logs_text()
    duplicates = len(decisions) - len(wanted)
    # What the first worker acknowledged was committed on the way out: the second
    # worker does not start over (at most a batch or two per partition repeats).
    assert duplicates <= 4 * 2 * 128, duplicates


@pytest.mark.parametrize("compute", ["thread", "process"])
def test_route_set_synced_mid_stream_is_picked_up_without_restart(stack: Stack, trivial_encoder,
                                                                  compute: str) -> None:
    stack.encoder = "trivial"
    stack.compute = compute
    route_file = copy_shipped_routes("moderation.yaml", stack.tmp)
    v1 = sync_routes(stack, trivial_encoder, route_file)
    topology = stack.write_topology(route_file)
    worker = stack.start_worker(topology)
    asyncio.run(produce(stack.kafka, stack.input_topic, text_events(200, "before")))
    first = asyncio.run(read_all(stack.kafka, stack.verdict_topics,
                                 until={f"before-{i}" for i in range(200)}, timeout_s=90))
    assert {d["route_set_version"] for d in first} == {v1}, stack.logs_text()

    route_set = load_route_set(route_file)
    changed = route_set.model_copy(update={"routes": [
        route_set.routes[0].model_copy(update={"utterances": [*route_set.routes[0].utterances,
                                                              "a brand new example"]}),
        *route_set.routes[1:],
    ]})
    route_file.write_text(dump_route_set(changed))
    v2 = sync_routes(stack, trivial_encoder, route_file)  # waits while the worker peeks at the lock
    assert v2 != v1
    time.sleep(3)  # the worker checks every second (SIEVE_ROUTE_REFRESH_S=1 in tests)
    asyncio.run(produce(stack.kafka, stack.input_topic, text_events(200, "after")))
    later = asyncio.run(read_all(stack.kafka, stack.verdict_topics,
                                 until={f"after-{i}" for i in range(200)}, timeout_s=90))
    assert worker.poll() is None
    assert {d["route_set_version"] for d in later if d["event_id"].startswith("after-")} == {v2}


def test_cli_produce_tail_and_dead_letter_replay(stack: Stack, trivial_encoder) -> None:
    stack.encoder = "trivial"
    route_file = REPO / "routes" / "moderation.yaml"
    sync_routes(stack, trivial_encoder, route_file)
    topology = stack.write_topology(route_file, max_text_chars=50)
    stack.start_worker(topology)
    lines = [json.dumps({"id": f"cli-{i}", "text": "short and fine"}) for i in range(5)]
    lines += [json.dumps({"id": "cli-long", "text": "far too long for this topology " * 3}), "{oops"]
    jsonl = stack.tmp / "events.jsonl"
    jsonl.write_text("\n".join(lines) + "\n")
    env = worker_env(stack.bootstrap, stack.qdrant_path)
    cli = [sys.executable, "-m", "sieve"]
    subprocess.run([*cli, "produce", str(jsonl), "--topic", stack.input_topic], env=env, check=True)
    asyncio.run(read_all(stack.kafka, stack.verdict_topics, until={f"cli-{i}" for i in range(5)}))
    tailed = subprocess.run([*cli, "tail", stack.dead_letter_topic, "--idle", "3"], env=env,
                            check=True, capture_output=True, text=True).stdout.splitlines()
    reasons = sorted(json.loads(line)["value"]["reason"] for line in tailed)
    assert reasons == ["not_json", "text_too_long"]

    replay_topic = f"{stack.prefix}.replayed"
    args = [*cli, "dead-letters", "replay", "--topic", stack.dead_letter_topic, "--to", replay_topic,
            "--reason", "text_too_long", "--idle", "2"]
    out = subprocess.run(args, env=env, check=True, capture_output=True, text=True)
    assert "replayed 1" in out.stderr, out.stderr
    replayed = asyncio.run(read_all(stack.kafka, [replay_topic], until={"cli-long"}, key="id", timeout_s=30))
    assert [r["id"] for r in replayed] == ["cli-long"]
    again = subprocess.run(args, env=env, check=True, capture_output=True, text=True)
    assert "replayed 0" in again.stderr, "the replay group remembers what it already sent"
