"""A partition's committed offset never passes an event that was not decided and published.

Faust commits, per partition, the end of the first run of consecutive acknowledged
offsets. Its only guard against a hole below that run (``min(acked) - committed > 1``)
is off while the committed offset is unknown (``None`` or ``0``: a new group, or a
partition whose offset a rebalance just dropped) and lets a hole of exactly one offset
through. Two ways Sieve's batch worker makes such holes:

- batches finish out of order: up to three are in flight, and a later one can be
  acknowledged while an earlier one is still being decided or published, or failed;
- a rebalance while a batch is gathering: the gathered events are skipped
  (acknowledged without being decided; the partition's owner reads them again).

These tests run the real ``BatchWorker`` (``_consume``, ``_batches``, ``_settle``) and
the worker's consumer in memory. Test doubles, for fault injection and to stand in
for the broker: the agent's stream is a bare asyncio queue the test fills; ``handle`` waits
until the test lets each batch finish (or fail); the consumer's ``_commit`` (the call
that sends offsets to the broker), ``assignment`` and the producer's ``flush`` are
replaced, and the app's rebalance handler is replaced by what it does to the flow
(suspend it). Everything between ``Consumer.commit`` and the broker is Faust's own.
The last test runs the worker's app against the dev broker: a real rebalance while a
batch gathers, then a restart.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from faust.types import TP
from faust.types.tuples import ConsumerMessage

from sieve.kafka.records import RawRecord
from sieve.settings import Settings
from sieve.topology import load_topology
from sieve.worker.batch_worker import BatchWorker

REPO = Path(__file__).resolve().parents[1]
TOPIC = "sieve.events.text"
TP0, TP1 = TP(TOPIC, 0), TP(TOPIC, 1)


class GatedWorker(BatchWorker):
    """A batch worker whose ``handle`` frees the encoder at once, then waits for the test (fault injection).

    ``finish(first_offset)`` lets the batch that starts at that offset finish;
    ``fail(first_offset)`` makes it raise.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.started: list[list[RawRecord]] = []
        self.decided: list[RawRecord] = []
        self._gates: dict[int, asyncio.Future[None]] = {}

    def _gate(self, first_offset: int) -> asyncio.Future[None]:
        return self._gates.setdefault(first_offset, asyncio.get_running_loop().create_future())

    async def handle(self, records: list[RawRecord]) -> None:
        """Wait for the test's word on this batch; on ``finish`` the batch counts as decided."""
        self.started.append(records)
        self.compute_done()
        first = records[0].offset
        assert first is not None
        await self._gate(first)
        self.decided.extend(records)

    def finish(self, first_offset: int) -> None:
        self._gate(first_offset).set_result(None)

    def fail(self, first_offset: int) -> None:
        self._gate(first_offset).set_exception(RuntimeError("injected: publishing failed for good"))


class Harness:
    """One worker's app, consumer and batch worker, fed by the test instead of a broker."""

    def __init__(self, max_events: int, max_wait_s: float) -> None:
        from sieve.worker.app import build_app

        topology = load_topology(REPO / "topologies" / "moderation.yaml")
        batching = topology.batching.model_copy(update={"max_events": max_events, "max_wait_s": max_wait_s})
        settings = Settings(metrics_port=0)
        self.app = build_app(topology, settings)
        self.worker = GatedWorker("test", settings, self.app, batching)
        self.worker._add_agent(topology.input.topics, topology.input.partitions, "test.agent")
        self.consumer: Any = self.app.consumer  # Faust's private offset bookkeeping is what is tested
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.assigned: set[TP] = {TP0, TP1}
        self.sent: list[dict[TP, int]] = []  # offsets sent to the broker, commit by commit
        self.task: asyncio.Task[None] | None = None

        async def commit_to_broker(offsets: Mapping[TP, int]) -> bool:
            self.sent.append(dict(offsets))
            return True

        async def flush() -> None:
            return None

        async def app_on_revoked(revoked: set[TP]) -> None:
            self.app.flow_control.suspend()
            self.app.flow_control.clear()

        consumer: Any = self.app.consumer
        consumer._commit = commit_to_broker
        consumer.assignment = lambda: set(self.assigned)
        consumer._on_partitions_revoked = app_on_revoked
        self.app.producer.flush = flush  # type: ignore[method-assign]

    async def start(self) -> None:
        """Subscribe the agent's topic (acks on, as a running agent's) and run ``_consume`` on the queue."""
        topics: Any = self.app.topics
        topics.add(self.worker.source)
        await topics._update_indices()
        self.app.flow_control.resume()
        stream: Any = SimpleNamespace(channel=SimpleNamespace(queue=self.queue))
        self.task = asyncio.ensure_future(self.worker._consume(stream))

    async def stop(self) -> None:
        """Cancel ``_consume``; close the event loop the consumer's thread made and, never started, kept."""
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        _close_thread_loop(self.consumer)

    def deliver(self, tp: TP, offsets: Iterable[int]) -> list[ConsumerMessage]:
        """Put events on the agent's queue, as the conductor does with fetched messages."""
        messages = []
        for offset in offsets:
            message = ConsumerMessage(tp.topic, tp.partition, offset, 0.0, 0, [], b"k", b"v", None, tp=tp,
                                      generation_id=self.app.consumer_generation_id)
            self.queue.put_nowait(self.app.create_event(message.key, message.value, message.headers, message))
            messages.append(message)
        return messages

    async def commit(self) -> int | None:
        """Run Faust's commit; the offset it sent for partition 0 (None: none sent)."""
        self.sent.clear()
        await self.consumer.commit()
        sent = [offsets[TP0] for offsets in self.sent if TP0 in offsets]
        return sent[-1] if sent else None

    async def until(self, condition: Any, what: str) -> None:
        for _ in range(1000):
            if condition():
                return
            await asyncio.sleep(0.005)
        raise AssertionError(f"never happened: {what}")

    async def batches_started(self, count: int) -> None:
        await self.until(lambda: len(self.worker.started) >= count, f"{count} batches started")


def _close_thread_loop(consumer: Any) -> None:
    """Close the event loop of a consumer thread that never ran (it closes its own when it stops)."""
    loop = consumer._thread.thread_loop
    if not loop.is_running() and not loop.is_closed():
        loop.close()


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    made = Harness(max_events=5, max_wait_s=0.05)
    yield made
    await made.stop()


# Path 2: batches finishing out of order.


@pytest.mark.parametrize("committed", [None, 0])
async def test_three_batches_in_flight_finishing_last_first_commit_in_order(harness: Harness,
                                                                            committed: int | None) -> None:
    harness.consumer._committed_offset[TP0] = committed  # a new group: nothing committed yet
    harness.deliver(TP0, range(15))
    await harness.start()
    await harness.batches_started(3)
    started = [[r.offset for r in batch] for batch in harness.worker.started]
    assert started == [list(range(i, i + 5)) for i in (0, 5, 10)]

    harness.worker.finish(10)  # the last batch is published first
    await harness.until(lambda: len(harness.worker.decided) == 5, "batch 3 decided")
    assert await harness.commit() is None  # events 0-9 are not decided yet

    harness.worker.finish(0)
    await harness.until(lambda: len(harness.worker.decided) == 10, "batch 1 decided")
    assert await harness.commit() == 5

    harness.worker.finish(5)
    await harness.until(lambda: len(harness.worker.decided) == 15, "batch 2 decided")
    assert await harness.commit() == 15


async def test_a_one_event_hole_is_not_committed_past_when_the_committed_offset_is_known(
        harness: Harness) -> None:
    harness.consumer._committed_offset[TP0] = 100  # as read from the broker at assignment
    harness.deliver(TP0, [100])
    harness.deliver(TP1, range(4))  # batch 1: one event of partition 0, four of partition 1
    harness.deliver(TP0, range(101, 106))  # batch 2: partition 0's next five
    await harness.start()
    await harness.batches_started(2)
    harness.worker.finish(101)
    await harness.until(lambda: len(harness.worker.decided) == 5, "batch 2 decided")
    assert await harness.commit() is None  # offset 100 is still being decided

    harness.worker.finish(100)
    await harness.until(lambda: len(harness.worker.decided) == 10, "batch 1 decided")
    assert await harness.commit() == 106


async def test_a_failed_batch_holds_the_commit_below_it_when_a_later_batch_finished(harness: Harness) -> None:
    harness.deliver(TP0, range(10))
    await harness.start()
    await harness.batches_started(2)
    harness.worker.fail(0)
    harness.worker.finish(5)
    await harness.until(lambda: len(harness.worker.decided) == 5, "batch 2 decided")
    await harness.until(lambda: harness.worker._failure is not None, "batch 1 failed")
    assert await harness.commit() is None  # events 0-4 were never decided: read again after a restart
    harness.sent.clear()
    await harness.worker.drain()  # SIGTERM: the final commit
    assert [offsets for offsets in harness.sent if TP0 in offsets] == []


# Path 1: a rebalance while a batch is gathering.


@pytest.mark.parametrize("committed_after", [None, 100], ids=["before-seek", "broker-offset"])
async def test_events_gathered_across_a_rebalance_are_not_committed_until_decided(
        committed_after: int | None) -> None:
    harness = Harness(max_events=1000, max_wait_s=1.0)  # the batch gathers for a second
    try:
        harness.consumer._committed_offset[TP0] = 100
        gathered = harness.deliver(TP0, range(100, 150))
        await harness.start()
        await harness.until(harness.queue.empty, "the batch is gathering")
        assert harness.worker.started == []

        # A rebalance: Faust drops the partition's acked and committed offsets, the flow stops.
        await harness.consumer.on_partitions_revoked({TP0, TP1})
        # The gathering batch closes during the rebalance: its events are skipped, not decided.
        await harness.until(lambda: all(m.acked for m in gathered), "the gathered events were skipped")
        assert harness.worker.started == []
        if committed_after is None:
            assert await harness.commit() is None  # as wait_empty's commit during the revoke

        # Partition 0 comes back to this worker (a new generation); the committed offset is
        # the broker's, or not known yet (before the seek).
        harness.app.consumer_generation_id += 1
        harness.consumer._committed_offset[TP0] = committed_after
        harness.app.flow_control.resume()
        assert await harness.commit() is None  # events 100-149 are not decided yet

        # The partition is read again from the committed offset: every event is decided, then committed.
        harness.deliver(TP0, range(100, 150))
        await harness.batches_started(1)
        harness.worker.finish(100)
        await harness.until(lambda: len(harness.worker.decided) == 50, "the batch re-read was decided")
        assert [r.offset for r in harness.worker.decided] == list(range(100, 150))
        assert await harness.commit() == 150
    finally:
        await harness.stop()


# Path 1 with the dev broker: a real rebalance while a batch is gathering.


class HeldWorker(BatchWorker):
    """A batch worker whose ``handle`` decides a batch only once the test opens ``gate`` (fault injection).

    A gate set to an exception makes every held batch fail, as a publish that cannot succeed.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.started: list[list[int]] = []
        self.decided: list[int] = []
        self.gate: asyncio.Future[None] | None = None

    async def handle(self, records: list[RawRecord]) -> None:
        """Decide the batch (record its offsets) once the gate, if any, is open."""
        offsets = [record.offset for record in records if record.offset is not None]
        self.started.append(offsets)
        self.compute_done()
        if self.gate is not None:
            await self.gate
        self.decided.extend(offsets)


async def _committed(bootstrap: str, group: str, topic: str) -> int | None:
    """The group's committed offset of partition 0, read from the broker."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    reader = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await reader.start()
    try:
        return await reader.committed(TopicPartition(topic, 0))
    finally:
        await reader.stop()


async def _until_committed(bootstrap: str, group: str, topic: str, offset: int) -> None:
    """Wait until the group's committed offset of partition 0 is ``offset`` (commits come every interval)."""
    for _ in range(300):
        if await _committed(bootstrap, group, topic) == offset:
            return
        await asyncio.sleep(0.1)
    assert await _committed(bootstrap, group, topic) == offset


def _fail_held(worker: HeldWorker) -> None:
    """Make the batches the worker holds fail, as a publish that cannot succeed (fault injection)."""
    if worker.gate is not None and not worker.gate.done():
        worker.gate.set_exception(RuntimeError("injected: publishing failed for good"))


async def _wait_for(condition: Any, what: str | Any, timeout_s: float = 60.0) -> None:
    """Wait until ``condition()``; after ``timeout_s``, fail saying ``what`` (a string or a function)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"never happened: {what if isinstance(what, str) else what()}")
        await asyncio.sleep(0.05)


@pytest.mark.integration
@pytest.mark.timeout(180)
async def test_a_rebalance_while_a_batch_gathers_commits_nothing_undecided_and_a_restart_decides_it(
        dev_broker: str) -> None:
    from sieve.kafka.client import ensure_topics, produce
    from sieve.settings import KafkaSettings
    from sieve.worker.app import build_app

    name = f"gaps{uuid.uuid4().hex[:8]}"
    topic, group = f"{name}.in", f"{name}-group"
    kafka = KafkaSettings(bootstrap_servers=dev_broker, commit_interval_s=0.2, session_timeout_s=4,
                          heartbeat_interval_s=1, rebalance_timeout_s=10)
    settings = Settings(metrics_port=0, kafka=kafka)
    await ensure_topics(kafka, {topic: 1})
    topology = load_topology(REPO / "topologies" / "moderation.yaml").model_copy(update={"group_id": group})
    # A batch closes at 20 events or 10 s after its first event: fewer events gather for 10 s.
    batching = topology.batching.model_copy(update={"max_events": 20, "max_wait_s": 10.0})

    async def start_worker() -> HeldWorker:
        app = build_app(topology, settings)
        worker = HeldWorker("test", settings, app, batching)
        worker._add_agent([topic], 1, f"{name}.agent")
        await app.start()
        return worker

    first = await start_worker()
    try:
        await produce(kafka, topic, [(b"k", b"%d" % i) for i in range(20)])
        await _wait_for(lambda: len(first.decided) == 20, "the first 20 events decided")
        await _until_committed(dev_broker, group, topic, 20)
        first.gate = asyncio.get_running_loop().create_future()
        await produce(kafka, topic, [(b"k", b"%d" % i) for i in range(20, 35)])
        consumer: Any = first.app.consumer
        await _wait_for(lambda: (consumer._read_offset.get(TP(topic, 0)) or 0) >= 34, "events 20-34 fetched")
        assert first.started == [list(range(20))]  # events 20-34 are gathering into a batch
        generation = first.app.consumer_generation_id
        # A rebalance: the worker's group member rejoins (as when another worker joins or leaves);
        # the partition is revoked and assigned back to it.
        consumer._thread._ensure_consumer()._coordinator.request_rejoin()
        await _wait_for(lambda: first.app.consumer_generation_id != generation, "the rebalance")
        await _wait_for(lambda: sum(map(len, first.started)) == 35,
                        lambda: f"events 20-34 read again and held; batches started: {first.started}")
        assert sorted(o for batch in first.started[1:] for o in batch) == list(range(20, 35))
        for _ in range(8):  # several commit intervals: nothing past what was decided is committed
            assert await _committed(dev_broker, group, topic) == 20
            await asyncio.sleep(0.2)
        _fail_held(first)
        await _wait_for(lambda: first._failure is not None, "the held batches failed")
    finally:
        _fail_held(first)  # a worker's stop waits for the batches it holds
        await first.app.stop()
    assert await _committed(dev_broker, group, topic) == 20

    second = await start_worker()  # the restart: events 20-34 are read again and decided
    try:
        await _wait_for(lambda: len(second.decided) == 15, "events 20-34 decided after the restart")
        assert sorted(second.decided) == list(range(20, 35))
        await _until_committed(dev_broker, group, topic, 35)
    finally:
        await second.app.stop()
