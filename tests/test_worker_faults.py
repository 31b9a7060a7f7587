"""Faults a router worker must survive without losing an event, or must fail on clearly.

No broker: batches go through :meth:`RouterWorker.handle` (or the agent under Faust's
``test_context()``, as in tests/test_agent.py), and every fault is injected by a test
double named for what it stands in for: an encoder or a compute that fails, a producer
(``send_batch``) that answers with an ``aiokafka.errors`` error, a topic creator and an
exit that only record. The trivial encoder decides, so no model is loaded.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiokafka.errors import (
    KafkaConnectionError,
    MessageSizeTooLargeError,
    TopicAuthorizationFailedError,
    UnknownTopicOrPartitionError,
)
from faust.types.tuples import Message
from prometheus_client import REGISTRY

from sieve.contracts import DeadLetter
from sieve.flow.dead_letter import dead_letter_payload
from sieve.flow.match import RouteIndex
from sieve.flow.pipeline import RouterPipeline
from sieve.kafka.records import Outbound, RawRecord
from sieve.settings import Settings
from sieve.topology import Topology
from sieve.worker.compute import Compute, Computed, ThreadCompute
from sieve.worker.faults import WorkerFailure
from sieve.worker.health import Probes, WorkerHealth
from sieve.worker.router import RouterWorker

REPO = Path(__file__).resolve().parents[1]
DEAD = "f.dead"
DEADLINE_S = 60  # only a deadline: a test that reaches it has failed (today's code loops forever)


def _topology(name: str) -> Topology:
    return Topology.model_validate({
        "name": name, "input": {"topics": ["faults.in"]},
        "route_set": {"name": "moderation", "file": str(REPO / "routes" / "moderation.yaml")},
        "encoder": {"kind": "trivial"},
        "batching": {"max_events": 4, "max_wait_s": 0.05},
        "output": {"outcome_topics": {"clean": "f.clean", "violating": "f.violating",
                                      "needs_review": "f.review"},
                   "route_topic_prefix": "f.route.", "dead_letter_topic": DEAD},
    })


def _record(offset: int, text: str, **extra: object) -> RawRecord:
    value = json.dumps({"id": f"ev-{offset}", "text": text, **extra}).encode()
    return RawRecord("faults.in", 0, offset, f"ev-{offset}".encode(), value, 1_700_000_000.0)


def _event(message: Outbound) -> bytes:
    """The event id a published decision or dead letter is about (needs-review messages are
    keyed by content, so the key alone does not say)."""
    return str(json.loads(message.value)["event_id"]).encode()


def _batch(start: int, n: int = 4) -> list[RawRecord]:
    return [_record(i, f"what a lovely morning number {i}") for i in range(start, start + n)]


class AlwaysRaisingEncoder:
    """Fault-injection double: a text encoder that raises on every input (a broken model or device)."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.id, self.dim = inner.id, inner.dim
        self.calls = 0
        self.fail = True

    def encode(self, texts: list[str]) -> np.ndarray:
        self.calls += 1
        if self.fail:
            raise RuntimeError("injected: the device is gone")
        return self.inner.encode(texts)


class PoisonEncoder(AlwaysRaisingEncoder):
    """Fault-injection double: the trivial encoder, except that a batch holding one given text raises."""

    def __init__(self, inner, poison: str) -> None:
        super().__init__(inner)
        self.poison = poison

    def encode(self, texts: list[str]) -> np.ndarray:
        if self.poison in texts:
            raise RuntimeError("injected: the model cannot encode this text")
        return self.inner.encode(texts)


class DeadChildCompute(Compute):
    """Fault-injection double: a process compute whose child died and cannot be started again."""

    mode = "process"

    def __init__(self, indexes) -> None:
        self._indexes = indexes

    @property
    def indexes(self):
        return self._indexes

    async def run(self, records: list[RawRecord]) -> Computed:
        raise ValueError("the compute child could not build its pipeline")


class HangingCompute(DeadChildCompute):
    """Fault-injection double: a compute call that never returns (an encoder stuck in native code)."""

    async def run(self, records: list[RawRecord]) -> Computed:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


class Producer:
    """Fault-injection double for the worker's producer (``send_batch``): records what lands.

    ``error(messages)`` returns the exception the broker answers a call with, or None (acknowledged).
    """

    def __init__(self, error=lambda messages: None) -> None:
        self.error = error
        self.sent: list[Outbound] = []
        self.calls = 0

    async def __call__(self, messages: list[Outbound]) -> None:
        self.calls += 1
        exc = self.error(messages)
        if exc is not None:
            raise exc
        self.sent.extend(messages)


class Exits:
    """Fault-injection double for the process exit: records the failure instead of ending the test run."""

    def __init__(self) -> None:
        self.failures: list[WorkerFailure] = []

    def __call__(self, failure: WorkerFailure) -> None:
        self.failures.append(failure)


def _router(name: str, trivial_encoder, moderation_set, *, encoder=None, compute=None,
            **settings: Any) -> tuple[RouterWorker, Producer, Exits]:
    topology = _topology(name)
    index = RouteIndex.build(moderation_set, trivial_encoder)
    if compute is None:
        compute = ThreadCompute(RouterPipeline(topology, encoder or trivial_encoder, index, "test"))
    router = RouterWorker(topology, Settings(metrics_port=0, worker_name="test", **settings), compute)
    router.send_batch = producer = Producer()
    router.exit_worker = exits = Exits()
    return router, producer, exits


class AllTopics:
    """The test channel's topic counts as an acking one, as the worker's Kafka topics do."""

    def __contains__(self, topic: object) -> bool:
        return True


def _track_acks(router: RouterWorker, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Have the test channel's messages tracked as Kafka ones (pending until acked); the acked offsets."""
    acked: list[int] = []
    monkeypatch.setattr(type(router.app.topics), "acking_topics", property(lambda self: AllTopics()))
    monkeypatch.setattr(Message, "use_tracking", True)

    def on_final_ack(message: Message, consumer: object) -> bool:  # what a Kafka message does: commit-safe
        message.acked = True
        acked.append(message.offset)
        return True

    monkeypatch.setattr(Message, "on_final_ack", on_final_ack)
    return acked


async def _until(condition) -> None:
    """Wait for ``condition()``; failing the test past ``DEADLINE_S``."""
    for _ in range(DEADLINE_S * 100):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the condition never came true")


def _sample(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# -- path 6: a fault that hits every event is a worker failure ----------------------------------


async def test_an_encoder_that_always_raises_fails_the_worker_not_every_event(trivial_encoder,
                                                                             moderation_set) -> None:
    encoder = AlwaysRaisingEncoder(trivial_encoder)
    router, producer, exits = _router("fault-encoder", trivial_encoder, moderation_set, encoder=encoder,
                                      worker_fault_exit_s=0.3)
    faults_before = _sample("sieve_worker_faults_total",
                            {"topology": "fault-encoder", "stage": "encode", "error": "RuntimeError"})
    await router.handle(_batch(0))  # alone, a batch of failures may be bad events: dead-lettered
    assert [json.loads(m.value)["reason"] for m in producer.sent] == ["encode_error"] * 4
    with pytest.raises(WorkerFailure, match="every event fails at the encode stage with RuntimeError"):
        await asyncio.wait_for(router.handle(_batch(4)), DEADLINE_S)
    assert len(producer.sent) == 4  # the second batch: nothing published, so nothing committed
    assert encoder.calls > 2 * 5  # the faulty batch was retried (one batch call + 4 single ones a try)
    assert [str(f) for f in exits.failures] == [str(router.failed)]
    assert "worker_fault_exit_s" in str(router.failed)
    ready, detail = router.faults.readiness()
    assert not ready and "encode stage with RuntimeError" in detail
    assert _sample("sieve_worker_fault", {"topology": "fault-encoder"}) == 1
    assert _sample("sieve_worker_faults_total", {"topology": "fault-encoder", "stage": "encode",
                                                "error": "RuntimeError"}) == faults_before + 1


async def test_a_fault_that_clears_lets_the_worker_go_on(trivial_encoder, moderation_set) -> None:
    encoder = AlwaysRaisingEncoder(trivial_encoder)
    router, producer, exits = _router("fault-clears", trivial_encoder, moderation_set, encoder=encoder,
                                      worker_fault_exit_s=DEADLINE_S)
    await router.handle(_batch(0))
    second = asyncio.ensure_future(router.handle(_batch(4)))
    await _until(lambda: router.faults.active is not None)  # the fault is declared, the batch held
    assert not router.faults.readiness()[0] and not second.done()
    encoder.fail = False  # the device is back
    await asyncio.wait_for(second, DEADLINE_S)
    decided = {_event(m) for m in producer.sent if m.topic != DEAD}
    assert decided == {f"ev-{i}".encode() for i in range(4, 8)}  # decided, not dead-lettered
    assert router.faults.readiness()[0] and not exits.failures
    assert _sample("sieve_worker_fault", {"topology": "fault-clears"}) == 0


async def test_a_poison_event_among_good_ones_is_still_a_dead_letter(trivial_encoder, moderation_set) -> None:
    poison = "this text makes the encoder fail"
    router, producer, exits = _router("fault-poison", trivial_encoder, moderation_set,
                                      encoder=PoisonEncoder(trivial_encoder, poison), worker_fault_exit_s=0.1)
    for start in (0, 4, 8):  # the poison event in every batch, among good ones
        batch = _batch(start)
        batch[1] = _record(start + 1, poison)
        await asyncio.wait_for(router.handle(batch), DEADLINE_S)
    letters = [DeadLetter.model_validate_json(m.value) for m in producer.sent if m.topic == DEAD]
    assert [(d.event_id, d.reason) for d in letters] == [(f"ev-{i}", "encode_error") for i in (1, 5, 9)]
    assert len({_event(m) for m in producer.sent if m.topic != DEAD}) == 9
    assert router.faults.readiness()[0] and router.faults.active is None and not exits.failures


async def test_a_compute_child_that_cannot_restart_fails_the_worker(trivial_encoder, moderation_set) -> None:
    index = RouteIndex.build(moderation_set, trivial_encoder)
    router, producer, exits = _router("fault-child", trivial_encoder, moderation_set,
                                      compute=DeadChildCompute({"text": index}), worker_fault_exit_s=0.1)
    await router.handle(_batch(0, 2))
    assert [json.loads(m.value)["reason"] for m in producer.sent] == ["pipeline_error"] * 2
    with pytest.raises(WorkerFailure, match="decide stage with ValueError"):
        await asyncio.wait_for(router.handle(_batch(2, 2)), DEADLINE_S)
    assert len(producer.sent) == 2 and len(exits.failures) == 1
    assert "could not build its pipeline" in str(exits.failures[0])


async def test_a_compute_call_that_hangs_times_out_and_fails_the_worker(trivial_encoder,
                                                                        moderation_set) -> None:
    index = RouteIndex.build(moderation_set, trivial_encoder)
    router, producer, exits = _router("fault-hang", trivial_encoder, moderation_set,
                                      compute=HangingCompute({"text": index}), compute_timeout_s=0.05,
                                      worker_fault_exit_s=0.1)
    with pytest.raises(WorkerFailure, match="compute stage with ComputeTimeout"):
        await asyncio.wait_for(router.handle(_batch(0)), DEADLINE_S)
    assert producer.sent == [] and producer.calls == 0  # no event was dead-lettered for the hang
    assert len(exits.failures) == 1 and "compute_timeout_s" in str(exits.failures[0])
    assert not router.faults.readiness()[0]


async def test_a_worker_fault_stops_the_agent_with_nothing_acked(trivial_encoder, moderation_set,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    router, producer, exits = _router("fault-agent", trivial_encoder, moderation_set,
                                      encoder=AlwaysRaisingEncoder(trivial_encoder), worker_fault_exit_s=0.1)
    acked = _track_acks(router, monkeypatch)
    async with router.agent.test_context() as agent:
        for i in range(12):
            await agent.put(_record(i, "anything").value, key=b"k", wait=False)
        await _until(lambda: exits.failures)
    assert len(exits.failures) == 1
    letters = [DeadLetter.model_validate_json(m.value) for m in producer.sent if m.topic == DEAD]
    assert 0 < len(letters) <= 4  # the first batch only (max_events 4), not a flood of 12
    # only the dead-lettered events were acked: the faulty batch and those after it never were
    assert sorted(acked) == sorted(letter.offset or 0 for letter in letters)


# -- path 5: errors that will never succeed are not retried forever -----------------------------


async def test_a_decision_too_large_for_the_broker_becomes_its_events_dead_letter(trivial_encoder,
                                                                                 moderation_set) -> None:
    router, producer, exits = _router("publish-size", trivial_encoder, moderation_set)
    limit = 20_000
    producer.error = lambda messages: (MessageSizeTooLargeError()
                                       if any(len(m.value) > limit for m in messages) else None)
    # 1e15 is 4 bytes in the event and 18 once re-serialised (1000000000000000.0): the event
    # fits, its decision does not
    numbers = ", ".join(["1e15"] * 1500)
    value = f'{{"id": "ev-1", "text": "a lovely morning", "metadata": {{"n": [{numbers}]}}}}'.encode()
    big = RawRecord("faults.in", 0, 1, b"ev-1", value, 1_700_000_000.0)
    assert len(value) < limit
    batch = [_record(0, "see you at the game"), big, _record(2, "let's get lunch")]
    await asyncio.wait_for(router.handle(batch), DEADLINE_S)
    decided = {_event(m) for m in producer.sent if m.topic != DEAD}
    assert decided == {b"ev-0", b"ev-2"}
    (letter,) = [DeadLetter.model_validate_json(m.value) for m in producer.sent if m.topic == DEAD]
    assert (letter.event_id, letter.stage, letter.reason) == ("ev-1", "publish", "message_too_large")
    assert dead_letter_payload(letter) == big.value and letter.offset == 1
    assert not exits.failures and router.publish_failing_since is None


async def test_an_unknown_route_topic_is_created_then_published(trivial_encoder, moderation_set) -> None:
    router, producer, exits = _router("publish-topic", trivial_encoder, moderation_set)
    existing = {"f.clean", "f.violating", "f.review", DEAD}
    created: list[list[str]] = []

    async def create_topics(topics: list[str]) -> list[str]:
        """Fault-injection double for the worker's topic creation: records; then the topics exist."""
        created.append(topics)
        existing.update(topics)
        return [t for t in topics if t.startswith("f.route.")]

    router.create_topics = create_topics
    producer.error = lambda messages: (UnknownTopicOrPartitionError()
                                       if any(m.topic not in existing for m in messages) else None)
    utterance = moderation_set.routes[0].utterances[0]  # the trivial encoder matches it exactly
    await asyncio.wait_for(router.handle([_record(0, utterance), _record(1, "hello")]), DEADLINE_S)
    route_topic = "f.route." + moderation_set.routes[0].name
    assert created and route_topic in created[0]
    assert [m.key for m in producer.sent if m.topic == route_topic] == [b"ev-0"]
    assert {_event(m) for m in producer.sent if not m.topic.startswith("f.route.")} == {b"ev-0", b"ev-1"}
    assert not exits.failures


async def test_not_authorised_to_publish_fails_the_worker_at_once(trivial_encoder, moderation_set) -> None:
    router, producer, exits = _router("publish-acl", trivial_encoder, moderation_set)
    producer.error = lambda messages: TopicAuthorizationFailedError()
    with pytest.raises(WorkerFailure, match="not authorised to publish to f.review"):
        await asyncio.wait_for(router.handle(_batch(0)), DEADLINE_S)
    assert producer.calls == 1 and producer.sent == []  # no retry loop
    assert len(exits.failures) == 1 and "Write" in str(exits.failures[0])
    assert not router.faults.readiness()[0]


# -- path 7: readiness while publishing fails; a drain that outlives its grace -------------------


async def test_readiness_turns_false_while_publishing_keeps_failing_and_back_once_it_lands(
        trivial_encoder, moderation_set) -> None:
    router, producer, exits = _router("publish-ready", trivial_encoder, moderation_set,
                                      publish_unready_s=0.01)
    probes = Probes()
    WorkerHealth(router, ["faults.in"], probes)
    down = True
    producer.error = lambda messages: KafkaConnectionError("injected: broker unavailable") if down else None
    handling = asyncio.ensure_future(router.handle(_batch(0)))
    await _until(lambda: producer.calls >= 2)  # a retry: the first failure is one back-off (0.2 s) old
    ok, body = probes.readiness()
    publishing = body["checks"]["publishing"]
    assert not ok and not publishing["ok"] and "publishing has failed" in publishing["detail"]
    down = False
    await asyncio.wait_for(handling, DEADLINE_S)
    assert probes.readiness()[1]["checks"]["publishing"]["ok"]
    assert {_event(m) for m in producer.sent} == {f"ev-{i}".encode() for i in range(4)}
    assert not exits.failures  # retriable: retried, never a worker failure


async def test_a_drain_past_its_grace_gives_the_batch_up_uncommitted(trivial_encoder, moderation_set,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    router, producer, exits = _router("drain-grace", trivial_encoder, moderation_set, shutdown_grace_s=0.1)

    async def never_acknowledged(messages: list[Outbound]) -> None:
        """Fault-injection double: a broker that never acknowledges the batch."""
        producer.calls += 1
        await asyncio.Event().wait()

    router.send_batch = never_acknowledged
    acked = _track_acks(router, monkeypatch)
    async with router.agent.test_context() as agent:
        consumer = router.app.consumer
        for i in range(3):
            await agent.put(_record(i, "anything").value, key=b"k", wait=False)
        await _until(lambda: producer.calls > 0)
        pending = set(consumer.unacked)
        assert pending  # Faust's shutdown (wait_empty) would wait for these
        await asyncio.wait_for(router.drain(), DEADLINE_S)
        assert not router._in_flight  # given up, not left running
        assert not (pending & set(consumer.unacked))  # nothing left for wait_empty to wait on
        assert acked == []  # and nothing acked: handled again after the restart
