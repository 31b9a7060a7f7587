"""The Faust shell a router and a reviewer share: take a batch, handle it, ack it.

Delivery: at-least-once. A batch's events are acknowledged to Faust (which then
commits their offsets) only after every message the batch produced was
acknowledged by the broker; a batch that did not finish is never acknowledged,
and its events are consumed again after a restart or rebalance. Batches are
read from the agent's stream a batch at a time (see ``BatchWorker._batches``)
and published as record batches (``sieve.kafka.client.send_batched``).

What the broker refuses is sorted by kind (:mod:`sieve.worker.publishing`): retried
with back-off, replaced by dead letters (too large), sent again once its topics are
created (unknown topic), or a worker failure (not authorised). A fault that hits
every event is the worker's (:mod:`sieve.worker.faults`): it exits non-zero.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import faust
from aiokafka.errors import UnknownTopicOrPartitionError
from faust.types import EventT

from sieve.kafka.client import ensure_topics, send_batched
from sieve.kafka.records import Outbound, RawRecord, new_tuple
from sieve.settings import Settings
from sieve.topology import BatchingSpec, Topology
from sieve.worker import metrics
from sieve.worker.faults import FaultWatch, WorkerFailure, exit_worker
from sieve.worker.publishing import NOT_AUTHORISED, send_isolating, too_large_letters

log = logging.getLogger(__name__)

# Batches being computed or published at once (see BatchWorker._consume).
_MAX_IN_FLIGHT = 3
# While a batch fills and the queue is empty: how long to let the consumer deliver before looking again.
_FILL_POLL_S = 0.002
_IDLE_CLOSE_S = 0.01


def _waited(timestamp: float | None) -> float:
    """Seconds since a record's timestamp, clamped to ``[0, inf)`` (0 when it has none)."""
    if not timestamp:
        return 0.0
    return max(0.0, time.time() - timestamp)


def _topics(messages: Sequence[Outbound]) -> list[str]:
    return sorted({message.topic for message in messages})


def raw_record(event: EventT) -> RawRecord:
    """The raw record behind a Faust event.

    Made with ``tuple.__new__`` (as ``RawRecord._make`` does), not the named tuple's
    generated ``__new__`` and its Python frame: one is made per consumed event.
    """
    message = event.message
    key, value = message.key, message.value
    return new_tuple(RawRecord, (
        message.topic,
        message.partition,
        message.offset,
        key if key is None or isinstance(key, bytes) else None,
        value if isinstance(value, bytes) else None,
        message.timestamp,
    ))


class BatchWorker:
    """The Faust shell the router and the reviewer share.

    One agent takes batches of raw records from its topics and hands each to
    :meth:`handle`, which returns only when every output of the batch was
    acknowledged by the broker; only then may Faust ack (and later commit) the
    batch. A batch that did not finish is kept unacked. SIGTERM drains.
    """

    topology: Topology  # set by the router and the reviewer

    def __init__(self, name: str, settings: Settings, app: faust.App, batching: BatchingSpec) -> None:
        self.name = name
        self.settings = settings
        self.app = app
        self.batching = batching
        self._in_flight: set[asyncio.Task[None]] = set()
        self._compute_free = asyncio.Event()
        self._failure: BaseException | None = None
        self._compute_free.set()
        self.draining = False
        # Publishes one batch's messages; returns once the broker acknowledged every one.
        # Tests replace it (with a capture, or a fault injector).
        self.send_batch: Callable[[list[Outbound]], Awaitable[None]] = self._send_via_producer
        # Creates missing output topics as the worker's start does; tests replace it.
        self.create_topics: Callable[[list[str]], Awaitable[object]] = self._create_output_topics
        # Ends the process when the worker cannot go on; tests replace it with a recorder.
        self.exit_worker: Callable[[WorkerFailure], None] = lambda failure: exit_worker(
            self.app, failure, settings.shutdown_grace_s)
        self.faults = FaultWatch(name, settings.worker_fault_exit_s, self.fail_worker)
        self.failed: WorkerFailure | None = None
        # When publishing started failing without a success since (monotonic), or None.
        self.publish_failing_since: float | None = None

    def _add_agent(self, topics: Sequence[str], partitions: int, agent_name: str) -> None:
        self.source = self.app.topic(
            *topics,
            key_type=bytes,
            value_type=bytes,
            key_serializer="raw",
            value_serializer="raw",
            partitions=partitions,
        )
        self.agent = self.app.agent(self.source, name=agent_name)(self._consume)

    async def handle(self, records: list[RawRecord]) -> Any:
        """Process one batch to the end (every output acknowledged)."""
        raise NotImplementedError

    async def _batches(self, stream: faust.StreamT) -> AsyncIterator[list[EventT]]:
        """Batches of events from the agent's stream: up to ``max_events``, or what came in ``max_wait_s``.

        ``max_wait_s`` counts from the first event's timestamp: an event that waited
        behind the batch being encoded does not wait ``max_wait_s`` more; its batch
        closes once the queue has stayed empty for ``_IDLE_CLOSE_S`` (a backlog, whose
        events are all old, still fills batches: its queue does not run dry).

        Reads the stream's channel queue, where Faust's conductor delivers the
        agent's events, a batch at a time instead of through ``Stream.__aiter__``,
        which costs an event-loop round trip, a processor chain, sensor calls and
        an ack per event (``take_events`` adds a buffer callback per event on top).
        What the stream does per event that matters is kept: events
        of a previous consumer generation (a rebalance happened since they were
        fetched) or arriving while flow control is paused are acknowledged and
        dropped, exactly as the stream skips them (the consumer records nothing for
        an event it was never handed, and the partition's new owner reads them
        again); every other message is tracked as pending until acknowledged,
        so Faust's graceful rebalance and shutdown wait for it.
        """
        app = self.app
        queue = stream.channel.queue  # type: ignore[attr-defined]
        consumer = app.consumer
        acking_topics = app.topics.acking_topics
        loop = asyncio.get_running_loop()
        max_events, max_wait = self.batching.max_events, self.batching.max_wait_s
        while True:
            await self._compute_free.wait()  # gather the next batch only once the encoder can take it
            try:
                events = [await queue.get()]
            except StopAsyncIteration:  # the channel was closed: the agent is stopping
                return
            deadline = loop.time() + max_wait
            # The first event's own deadline: once past it, the batch closes as soon as
            # nothing has arrived for _IDLE_CLOSE_S (a backlog still fills the batch).
            due = deadline - _waited(events[0].message.timestamp)
            idle_since: float | None = None
            while len(events) < max_events:
                if not queue.empty():
                    events.append(queue.get_nowait())
                    idle_since = None
                    continue
                now = loop.time()
                if now >= deadline:
                    break
                if now >= due:
                    if idle_since is None:
                        idle_since = now
                    elif now - idle_since >= _IDLE_CLOSE_S:
                        break
                # Let the consumer deliver for a moment, then take what came: a timed wait
                # per event (a task each) cost more than the events when the queue ran dry.
                await asyncio.sleep(min(deadline - now, _FILL_POLL_S))
            fresh: list[EventT] = []
            active, generation = app.flow_control.is_active(), app.consumer_generation_id
            for event in events:
                message = event.message
                if not active or message.generation_id != generation:
                    event.ack()  # as Stream does with a skipped event
                    continue
                if message.topic in acking_topics and not message.tracked:
                    message.tracked = True
                    consumer.track_message(message)
                fresh.append(event)
            if fresh:
                yield fresh

    async def _consume(self, stream: faust.StreamT) -> None:
        """Take batches; process one while the one before it is being published; ack each when done.

        At most ``_MAX_IN_FLIGHT`` (3) batches are in flight: the encoder works on
        batch N+2 while the broker acknowledges batches N and N+1 (a publish can take
        longer than an encode; with two in flight the encoder would wait for the
        publish before last). Batches are published in the
        order they were computed. The next batch is gathered only
        once the encoder is free (``compute_done``), not while it works: events
        that arrive meanwhile wait in the queue and form the next batch then, so an
        event waits at most the longer of ``max_wait_s`` and the batch being encoded,
        then its own batch's encoding (gathering early would queue a whole batch
        behind the running one and add a third encode time). A batch's events are acked only
        after its every output was acknowledged; a batch that failed is never
        acked (its events come again after a restart or rebalance). The worker's
        consumer (:mod:`sieve.worker.consumer`) commits a partition only below its
        lowest event still pending, so a batch finishing before the one ahead of it,
        or after one that failed, never commits past it.
        """
        in_flight: set[asyncio.Task[None]] = self._in_flight
        async for events in self._batches(stream):
            while len(in_flight) >= _MAX_IN_FLIGHT:
                await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
            if self._failure is not None:  # a batch that raised stops the agent; nothing after it is taken
                self._release_unacked(events)
                if isinstance(self._failure, WorkerFailure):  # the worker is exiting: take nothing more
                    await asyncio.Event().wait()
                raise self._failure
            if self.draining:
                self._release_unacked(events)
                await asyncio.Event().wait()  # hold them unacked until the worker stops and cancels us
            self._compute_free.clear()
            task = asyncio.ensure_future(self._settle(events))
            in_flight.add(task)
            task.add_done_callback(self._batch_done)

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._failure = task.exception()

    async def _settle(self, events: list[EventT]) -> None:
        try:
            await self.handle([raw_record(event) for event in events])
        except BaseException:
            self._release_unacked(events)
            raise
        finally:
            self.compute_done()
        for event in events:
            event.ack()

    def compute_done(self) -> None:
        """The batch being handled no longer needs the encoder (``handle`` may call it early)."""
        self._compute_free.set()

    def _release_unacked(self, events: Sequence[EventT]) -> None:
        """Give up events whose batch will not finish.

        They are never acked (no commit covers them) and no longer pending, so
        Faust's shutdown and rebalance do not wait for them.
        """
        unacked = self.app.consumer.unacked
        for event in events:
            event.message.acked = True  # Consumer.ack now skips it: its offset is never recorded
            unacked.discard(event.message)

    @property
    def _busy(self) -> bool:
        return bool(self._in_flight)

    async def _send_via_producer(self, messages: list[Outbound]) -> None:
        # Faust's own producer (its connection and settings), fed whole record batches.
        await send_batched(self.app.producer._ensure_producer(), messages)  # type: ignore[attr-defined]

    async def _create_output_topics(self, topics: list[str]) -> list[str]:
        output = self.topology.output
        return await ensure_topics(self.settings.kafka, dict.fromkeys(topics, output.partitions),
                                   output.replication_factor)

    def fail_worker(self, failure: WorkerFailure) -> None:
        """The worker cannot go on: not ready from now on, and the process exits non-zero (once)."""
        if self.failed is None:
            self.failed = failure
            self.faults.failed = True
            self.exit_worker(failure)

    def publishing_readiness(self) -> tuple[bool, str]:
        """``/readyz`` check: not ready once publishing has failed continuously for ``publish_unready_s``."""
        since = self.publish_failing_since
        if since is None:
            return True, "publishing"
        failing = time.monotonic() - since
        if failing > self.settings.publish_unready_s:
            return False, f"publishing has failed for {failing:.0f}s (retrying)"
        return True, f"publishing failing for {failing:.0f}s (retrying)"

    def _publish_failed(self, action: str) -> None:
        metrics.PUBLISH_FAILURES.labels(self.name, action).inc()
        if self.publish_failing_since is None:
            self.publish_failing_since = time.monotonic()

    def _not_authorised(self, doing: str, topics: Sequence[str], exc: BaseException) -> WorkerFailure:
        metrics.PUBLISH_FAILURES.labels(self.name, "fatal").inc()
        failure = WorkerFailure(
            f"not authorised to {doing} {', '.join(topics)} ({type(exc).__name__}: {exc}); grant the "
            "worker's Kafka principal the ACLs it needs (Write and Describe on the output topics, "
            "Create for route topics made by a route-set reload): retrying cannot help")
        self.fail_worker(failure)
        return failure

    async def _publish(self, outbound: list[Outbound], records: Sequence[RawRecord] = ()) -> None:
        """Send the batch's messages as record batches and await every acknowledgement.

        What the broker refuses is handled by kind (:mod:`sieve.worker.publishing`):
        retriable errors are retried with back-off until the messages land (a retry
        re-sends the whole batch: consumers may see a message twice and deduplicate
        by id); messages too large are replaced by their event's dead letter (the
        event found among ``records``); an unknown topic is created, then the batch
        sent again; not being authorised fails the worker (:class:`WorkerFailure`).
        """
        delay = 0.2
        replaced = 0
        while True:
            try:
                refused = await send_isolating(self.send_batch, outbound)
            except asyncio.CancelledError:
                raise
            except NOT_AUTHORISED as exc:
                raise self._not_authorised("publish to", _topics(outbound), exc) from exc
            except UnknownTopicOrPartitionError:
                self._publish_failed("create_topic")
                topics = _topics(outbound)
                try:
                    created = await self.create_topics(topics)
                    log.warning("publishing found a topic missing; created %s", created or "none (retrying)")
                except NOT_AUTHORISED as exc:
                    raise self._not_authorised("create the topics", topics, exc) from exc
                except Exception:
                    log.exception("creating the topics %s failed; retrying in %.1fs", topics, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            except Exception:
                log.exception("publishing %d messages failed; retrying in %.1fs", len(outbound), delay)
                metrics.BATCH_RETRIES.labels(self.name, "publish").inc()
                self._publish_failed("retry")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            if not refused:
                self.publish_failing_since = None
                return
            replaced += 1
            if replaced > 2:  # even a dead letter without payload is refused
                failure = WorkerFailure(
                    f"the broker refuses even a payload-less dead letter ({len(refused[0].value)} bytes) "
                    f"as too large for {refused[0].topic}: raise its max.message.bytes")
                self.fail_worker(failure)
                raise failure
            outbound, letters = too_large_letters(refused, records, self.topology, self.settings.worker_name)
            metrics.PUBLISH_FAILURES.labels(self.name, "dead_letter").inc()
            metrics.DEAD_LETTERS.labels(self.name, "publish", "message_too_large").inc(len(letters))
            log.warning("the broker refused %d messages as too large; sending %d dead letters instead",
                        len(refused), len(letters))

    async def drain(self) -> None:
        """Finish the batches in flight within ``shutdown_grace_s``, take no new one, commit.

        Batches still in flight then are given up uncommitted, so the shutdown does not wait for them.
        """
        self.draining = True
        deadline = time.monotonic() + self.settings.shutdown_grace_s
        while self._busy and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self._busy:
            # Given up uncommitted: their events leave Faust's pending set (its shutdown would wait
            # for them in wait_empty) and are handled again after the restart (at-least-once).
            log.warning("%d batch(es) still in flight after shutdown_grace_s (%.0fs); giving them up "
                        "uncommitted", len(self._in_flight), self.settings.shutdown_grace_s)
            tasks = list(self._in_flight)
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks, timeout=5.0)
        try:
            await self.app.consumer.commit()
        except Exception:
            log.exception("final commit failed; uncommitted events will be handled again")

