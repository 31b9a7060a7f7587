"""Agent wiring with Faust's test_context(): no broker; the send function is replaced.

The replaced ``send_batch`` is a capture: it records each batch's outbound messages,
or (fault injection) fails the first attempts.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from sieve.flow.match import RouteIndex
from sieve.flow.pipeline import RouterPipeline
from sieve.kafka.records import Outbound
from sieve.settings import Settings
from sieve.topology import load_topology
from sieve.worker.compute import ThreadCompute
from sieve.worker.router import RouterWorker

REPO = Path(__file__).resolve().parents[1]


class CapturingSend:
    """Records messages; optionally fails the first ``fail_first`` batch sends (fault injection)."""

    def __init__(self, fail_first: int = 0) -> None:
        self.sent: list[Outbound] = []
        self.fail_first = fail_first
        self.calls = 0

    async def __call__(self, messages: list[Outbound]) -> None:
        self.calls += 1
        if self.calls <= self.fail_first:
            raise ConnectionError("injected: broker unreachable")
        self.sent.extend(messages)


@pytest.fixture
def router(minilm, moderation_set) -> RouterWorker:
    topology = load_topology(REPO / "topologies" / "moderation.yaml")
    topology = topology.model_copy(
        update={"batching": topology.batching.model_copy(update={"max_events": 8, "max_wait_s": 0.05})}
    )
    pipeline = RouterPipeline(topology, minilm, RouteIndex.build(moderation_set, minilm), "test")
    return RouterWorker(topology, Settings(metrics_port=0), ThreadCompute(pipeline))


def _event(i: int, text: str) -> bytes:
    return json.dumps({"id": f"ev-{i}", "text": text}).encode()


async def _run(router: RouterWorker, payloads: list[bytes], expect: int) -> None:
    async with router.agent.test_context() as agent:
        for payload in payloads:
            await agent.put(payload, key=b"k", wait=False)
        for _ in range(400):
            if len({m.key for m in getattr(router.send_batch, "sent", [])}) >= expect:
                break
            await asyncio.sleep(0.025)


async def test_agent_decides_and_dead_letters_in_batches(router: RouterWorker, moderation_set) -> None:
    capture = CapturingSend()
    router.send_batch = capture
    # half the events are a route's own examples (accepted by that route), half match nothing in particular
    examples = [u for route in moderation_set.routes for u in route.utterances][:5]
    texts = [*examples, *(f"what a lovely morning for a walk number {i}" for i in range(5))]
    payloads = [_event(i, text) for i, text in enumerate(texts)]
    payloads += [b"{not json", json.dumps({"id": "x", "text": "  "}).encode()]
    await _run(router, payloads, expect=11)
    by_topic: dict[str, list[dict]] = {}
    for message in capture.sent:
        by_topic.setdefault(message.topic, []).append(json.loads(message.value))
    verdicts = [d for t, ds in by_topic.items() if t.startswith("sieve.") and t != "sieve.dead-letter"
                for d in ds]
    assert sorted(d["event_id"] for d in verdicts) == sorted(f"ev-{i}" for i in range(10))
    reasons = sorted(d["reason"] for d in by_topic["sieve.dead-letter"])
    assert reasons == ["empty_text", "not_json"]
    routed = [decision for decision in verdicts if decision["route"]]
    assert routed, "some events match a route"
    for decision in routed:
        assert decision["id"] in {d["id"] for d in by_topic["route." + decision["route"]]}


async def test_agent_retries_publish_until_acknowledged(router: RouterWorker) -> None:
    capture = CapturingSend(fail_first=3)
    router.send_batch = capture
    await _run(router, [_event(i, "see you at the game tonight") for i in range(4)], expect=4)
    keys = {m.key for m in capture.sent if m.topic == "sieve.clean"}
    assert keys == {f"ev-{i}".encode() for i in range(4)}
    assert capture.calls > capture.fail_first  # the failed attempts were retried, not dropped


def test_raw_record_is_the_messages_record() -> None:
    from types import SimpleNamespace

    from sieve.kafka.records import RawRecord
    from sieve.worker.batch_worker import raw_record

    def event(key, value):
        message = SimpleNamespace(topic="in", partition=2, offset=7, key=key, value=value, timestamp=1.5)
        return SimpleNamespace(message=message)

    record = raw_record(event(b"k", b"{}"))
    assert type(record) is RawRecord and record == RawRecord("in", 2, 7, b"k", b"{}", 1.5)
    assert record.key == b"k" and record.timestamp == 1.5
    # a key or value Faust decoded into something else is not bytes: left out, not passed on
    assert raw_record(event("text key", {"a": 1})) == RawRecord("in", 2, 7, None, None, 1.5)
    assert raw_record(event(None, b"x")).key is None


def test_app_creates_events_of_its_configured_type(router: RouterWorker) -> None:
    from types import SimpleNamespace

    app = router.app
    message = SimpleNamespace(topic="in", partition=0, offset=1)
    first = app.create_event(b"k", b"v", [], message)
    second = app.create_event(b"k2", b"v2", [], message)
    assert type(first) is type(second) is app.conf.Event
    assert (first.key, first.value, first.message, first.app) == (b"k", b"v", message, app)
    assert second.key == b"k2"


async def test_fetch_loop_wakes_when_a_paused_partition_resumes(router: RouterWorker,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # Faust pauses every partition while the stream buffer is under pressure; its fetch loop then
    # slept 1 s before looking again. Ours waits for a partition to come back and fetches at once.
    from faust.types import TP

    consumer = router.app.consumer
    tp = TP("sieve.events", 0)
    consumer._active_partitions = set()  # every partition paused by buffer pressure
    consumer._buffered_partitions = {tp}
    fetched: list[set] = []
    slept: list[float] = []

    async def getmany(active_partitions, timeout):
        fetched.append(set(active_partitions))
        return {}

    async def sleep(seconds):
        slept.append(seconds)

    monkeypatch.setattr(consumer, "_getmany", getmany)
    monkeypatch.setattr(consumer, "sleep", sleep)
    waiting = asyncio.ensure_future(consumer._wait_next_records(1.0))
    for _ in range(5):
        await asyncio.sleep(0)
    assert not waiting.done() and not fetched  # nothing to fetch from: it waits
    consumer.on_buffer_drop(tp)  # the buffer drained: Faust puts the partition back
    records, active = await asyncio.wait_for(waiting, timeout=5)
    assert records == {} and active == {tp}
    assert fetched == [{tp}] and slept == []  # it fetched from the resumed partition, no 1 s sleep
