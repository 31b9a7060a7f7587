"""The Faust router agent: a thin shell that takes a batch, runs the pipeline, publishes, acks.

Delivery: at-least-once. A batch's events are acknowledged to Faust (which then
commits their offsets) only after every message the batch produced was
acknowledged by the broker; a batch that did not finish is never acknowledged,
and its events are consumed again after a restart or rebalance. Batches are
read from the agent's stream a batch at a time (see ``BatchWorker._batches``)
and published as record batches (``sieve.kafka.client.send_batched``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import faust
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import EventT
from mode.services import WaitResults

from sieve.flow.dead_letter import make_dead_letter
from sieve.flow.publish import plan_dead_letters
from sieve.kafka.client import send_batched, ssl_context
from sieve.kafka.records import Outbound, RawRecord, new_tuple
from sieve.settings import Settings
from sieve.store.qdrant import RouteStore
from sieve.topology import BatchingSpec, Topology
from sieve.worker import metrics
from sieve.worker.compute import Compute, Computed

log = logging.getLogger(__name__)

_MAX_PROCESS_ATTEMPTS = 3
# Batches being computed or published at once (see BatchWorker._consume).
_MAX_IN_FLIGHT = 3
# While a batch fills and the queue is empty: how long to let the consumer deliver before looking again.
_FILL_POLL_S = 0.002
_IDLE_CLOSE_S = 0.01


def _credentials(settings: Settings) -> Any:
    kafka = settings.kafka
    context = ssl_context(kafka)
    if kafka.sasl_mechanism is not None:
        return faust.SASLCredentials(
            username=kafka.sasl_username,
            password=kafka.sasl_password.get_secret_value() if kafka.sasl_password else None,
            mechanism=kafka.sasl_mechanism,
            ssl_context=context,
        )
    if context is not None:
        return faust.SSLCredentials(context)
    return None


class _ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    """Faust's aiokafka consumer thread, with the app's fetch wait instead of Faust's fixed 1,500 ms."""

    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        # Read by AIOKafkaConsumer.start() when it builds its fetcher (start runs after this).
        consumer._fetch_max_wait_ms = self.app.fetch_max_wait_ms  # type: ignore[attr-defined]
        return consumer


async def _resume(coro: Coroutine[Any, Any, Any], yielded: Any) -> Any:
    """Drive ``coro``, stepped once by hand and suspended on ``yielded``, to its end as its Task would.

    ``yielded`` is what the coroutine handed to the event loop: ``None`` (a bare
    yield, as ``asyncio.sleep(0)``) or the future it awaits. When this is cancelled,
    the future is cancelled and the cancellation thrown into ``coro`` at its await.
    """
    while True:
        try:
            if yielded is None:
                await asyncio.sleep(0)
            else:
                yielded._asyncio_future_blocking = False
                await asyncio.wait([yielded])
        except asyncio.CancelledError as exc:
            if yielded is not None:
                yielded.cancel()
            try:
                yielded = coro.throw(exc)
            except StopIteration as stop:
                return stop.value
            continue
        try:
            yielded = coro.send(None)
        except StopIteration as stop:
            return stop.value


def run_eagerly(coro: Coroutine[Any, Any, Any]) -> tuple[bool, Any, Coroutine[Any, Any, Any] | None]:
    """Run ``coro`` up to its first suspension.

    ``(True, result, None)`` if it finished there, else ``(False, None, rest)``
    where awaiting (or scheduling) ``rest`` finishes it.
    """
    try:
        yielded = coro.send(None)
    except StopIteration as stop:
        return True, stop.value, None
    return False, None, _resume(coro, yielded)


_EVENT_WAIT = asyncio.Event.wait.__code__


def _waits_on(coro: Any, event: asyncio.Event) -> bool:
    """Whether ``coro`` is ``event.wait()``, not yet started."""
    frame = getattr(coro, "cr_frame", None)
    return getattr(coro, "cr_code", None) is _EVENT_WAIT and frame is not None \
        and frame.f_locals.get("self") is event


class _Consumer(faust_aiokafka.Consumer):
    """Faust's aiokafka consumer with a cheaper delivery of each fetched message.

    Faust's fetch loop (``Consumer._drain_messages``) hands every message to the
    conductor through ``wait_first(callback(message), suspend_flow.wait())``: four
    tasks and an ``asyncio.wait`` per message, so that a delivery blocked on a full
    stream buffer is abandoned when a rebalance suspends the flow. In a profile of the
    worker that machinery was the largest per-event cost left. Here the callback is
    first run inline; almost always it finishes without suspending (the buffer has
    room) and no task is made. If it suspends, the rest of it goes through Faust's
    own ``wait_first`` exactly as before, so a suspended flow still abandons it.
    """

    def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    # Faust takes a partition out of the fetch while the stream buffer is under
    # pressure (over 80 % full) and puts it back once the buffer is drained below 40 %.
    # While every partition is out, its fetch loop sleeps a whole second before it looks
    # again: in a profile of a worker on a backlog, the worker drained the buffer and then
    # waited for input for 0.8-1 s, twice per 100,000 events. Here that wait ends as soon as
    # a partition is put back.

    _resumed: asyncio.Event | None = None

    def on_buffer_drop(self, tp: Any) -> None:
        """Faust's: a partition's buffer drained, fetch from it again; and wake the fetch loop."""
        super().on_buffer_drop(tp)
        if self._resumed is not None:
            self._resumed.set()

    async def _wait_next_records(self, timeout: float) -> Any:
        """Faust's, except that with every partition paused it waits for one to resume, not 1 s."""
        if self.flow_active and not self.app.client_only and not self._get_active_partitions():
            if self._resumed is None:
                self._resumed = asyncio.Event()
            self._resumed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._resumed.wait(), timeout=1.0)
        return await super()._wait_next_records(timeout)

    async def wait_first(self, *coros: Any, timeout: Any = None) -> Any:
        """Faust's ``wait_first``, with the delivery of a message run inline while the flow is on."""
        if (len(coros) == 2 and timeout is None and asyncio.iscoroutine(coros[0])
                and _waits_on(coros[1], self.suspend_flow)
                and not (self.suspend_flow.is_set() or self.should_stop or self._crashed.is_set())):
            delivery, suspended = coros
            try:
                done, result, rest = run_eagerly(delivery)
            except BaseException:
                suspended.close()
                raise
            if done:
                suspended.close()
                return WaitResults([delivery], [result], False)
            assert rest is not None
            return await super().wait_first(rest, suspended)
        return await super().wait_first(*coros, timeout=timeout)


class _Transport(faust_aiokafka.Transport):
    Consumer = _Consumer


class SieveApp(faust.App):
    """A Faust app whose consumer fetches waiting at most ``fetch_max_wait_ms`` (settings ``kafka``)."""

    _event_type: Any  # conf.Event, set on first use

    def __init__(self, *args: Any, fetch_max_wait_ms: int, **options: Any) -> None:
        self.fetch_max_wait_ms = fetch_max_wait_ms
        super().__init__(*args, **options)

    def _new_transport(self) -> Any:
        return _Transport(self.conf.broker_consumer, self)

    def create_event(self, key: Any, value: Any, headers: Any, message: Any) -> EventT:
        """Faust's ``create_event`` with the event class looked up once, not per message.

        ``self.conf.Event`` goes through Faust's settings registry on every call:
        2 % of the worker per event in a profile.
        """
        try:
            event_type = self._event_type
        except AttributeError:
            event_type = self._event_type = self.conf.Event
        return event_type(self, key, value, headers, message)


def build_app(topology: Topology, settings: Settings) -> faust.App:
    """A Faust app for one topology: stateless, at-least-once, no web server of its own."""
    kafka = settings.kafka
    return SieveApp(
        topology.consumer_group,
        broker=[f"kafka://{server.strip()}" for server in kafka.bootstrap_servers.split(",")],
        broker_credentials=_credentials(settings),
        broker_client_id=kafka.client_id,
        store="memory://",
        autodiscover=False,
        web_enabled=False,
        topic_disable_leader=True,
        topic_partitions=topology.input.partitions,
        topic_replication_factor=topology.input.replication_factor,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        producer_linger_ms=5,
        # whole record batches per topic-partition (send_batched): fewer, larger produce requests
        producer_max_batch_size=512 * 1024,
        broker_session_timeout=kafka.session_timeout_s,
        broker_heartbeat_interval=kafka.heartbeat_interval_s,
        broker_rebalance_timeout=kafka.rebalance_timeout_s,
        broker_commit_interval=kafka.commit_interval_s,
        stream_buffer_maxsize=max(4096, 2 * topology.batching.max_events),
        processing_guarantee="at_least_once",
        fetch_max_wait_ms=kafka.fetch_max_wait_ms,
    )


def _waited(timestamp: float | None) -> float:
    """Seconds since a record's timestamp, clamped to ``[0, inf)`` (0 when it has none)."""
    if not timestamp:
        return 0.0
    return max(0.0, time.time() - timestamp)




def raw_record(event: EventT) -> RawRecord:
    """The raw record behind a Faust event.

    Made with ``tuple.__new__`` (as ``RawRecord._make`` does), not the named tuple's
    generated ``__new__``, whose Python frame cost 2 % of the worker per event.
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
        an ack per event (``take_events`` adds a buffer callback per event on top):
        in a profile of the trivial-encoder worker that machinery cost more than
        the pipeline. What the stream does per event that matters is kept: events
        of a previous consumer generation (a rebalance happened since they were
        fetched) or arriving while flow control is paused are acknowledged and
        dropped, exactly as the stream skips them (the partition's new owner reads
        them again); every other message is tracked as pending until acknowledged,
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
        batch N+2 while the broker acknowledges batches N and N+1 (with two, a publish
        slower than an encode, 100-220 ms against 120-200 for 4,096 events on the dev
        broker, left the compute child idle for a fifth of a backlog run; with three it
        was busy 88-93 % of the run instead of 77-79 %). Batches are published in the
        order they were computed. The next batch is gathered only
        once the encoder is free (``compute_done``), not while it works: events
        that arrive meanwhile wait in the queue and form the next batch then, so an
        event waits at most the longer of ``max_wait_s`` and the batch being encoded,
        then its own batch's encoding (gathering early would queue a whole batch
        behind the running one and add a third encode time). A batch's events are acked only
        after its every output was acknowledged; a batch that failed is never
        acked (its events come again after a restart or rebalance). Faust commits
        the highest contiguously acknowledged offset per partition, so a batch
        finishing before the one ahead of it never commits past a gap.
        """
        in_flight: set[asyncio.Task[None]] = self._in_flight
        async for events in self._batches(stream):
            while len(in_flight) >= _MAX_IN_FLIGHT:
                await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
            if self._failure is not None:  # a batch that raised stops the agent; nothing after it is taken
                self._release_unacked(events)
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

    async def _publish(self, outbound: list[Outbound]) -> None:
        """Send the batch's messages as record batches and await every acknowledgement; retry until they land.

        A retry re-sends the whole batch: consumers may see a message twice and
        deduplicate by decision id. Nothing is skipped.
        """
        delay = 0.2
        while True:
            try:
                await self.send_batch(outbound)
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("publishing %d messages failed; retrying in %.1fs", len(outbound), delay)
                metrics.BATCH_RETRIES.labels(self.name, "publish").inc()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def drain(self) -> None:
        """Finish the batch in flight (within the grace period), take no new one, commit."""
        self.draining = True
        deadline = time.monotonic() + self.settings.shutdown_grace_s
        while self._busy and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        try:
            await self.app.consumer.commit()
        except Exception:
            log.exception("final commit failed; uncommitted events will be handled again")


class RouterWorker(BatchWorker):
    """One topology's router: the Faust agent, route refresh and graceful drain.

    ``compute`` runs the batches (:mod:`sieve.worker.compute`: on a thread, or in a child process).
    """

    def __init__(
        self,
        topology: Topology,
        settings: Settings,
        compute: Compute,
        store: RouteStore | None = None,
        app: faust.App | None = None,
    ) -> None:
        super().__init__(topology.name, settings, app or build_app(topology, settings), topology.batching)
        self.topology = topology
        self.compute = compute
        self.store = store
        self._add_agent(topology.input.topics, topology.input.partitions, f"sieve.{topology.name}.router")
        if store is not None:
            self.app.timer(settings.route_refresh_s)(self._refresh_route_set)
        self._io = ThreadPoolExecutor(1, thread_name_prefix="sieve-store")

    async def handle(self, records: list[RawRecord]) -> Computed:
        """Process one batch to the end: it returns only once every output is acknowledged."""
        metrics.IN_FLIGHT.labels(self.topology.name).set(1)
        try:
            try:
                result = await self._process(records)
            finally:
                self.compute_done()  # the next batch may be gathered while this one is published
            started = time.perf_counter()
            await self._publish(result.outbound)
            publish_seconds = time.perf_counter() - started
            metrics.record_batch(self.topology.name, records, result, publish_seconds)
            return result
        finally:
            metrics.IN_FLIGHT.labels(self.topology.name).set(0)

    async def _process(self, records: list[RawRecord]) -> Computed:
        """Compute the batch; retry; isolate a record that keeps failing."""
        for attempt in range(1, _MAX_PROCESS_ATTEMPTS + 1):
            try:
                return await self.compute.run(records)
            except Exception:
                log.exception("batch of %d failed (attempt %d)", len(records), attempt)
                metrics.BATCH_RETRIES.labels(self.topology.name, "process").inc()
                await asyncio.sleep(0.1 * 2**attempt)
        # The batch keeps failing: process record by record; dead-letter what fails alone.
        merged = Computed([], [], {}, {}, [])
        for record in records:
            try:
                one = await self.compute.run([record])
            except Exception as exc:
                letter = make_dead_letter(
                    record,
                    stage="decide",
                    reason="pipeline_error",
                    error=f"{type(exc).__name__}: {exc}",
                    worker=self.settings.worker_name,
                    topology=self.topology.name,
                    max_payload_bytes=self.topology.limits.max_dead_letter_payload_bytes,
                )
                one = Computed(plan_dead_letters([letter], self.topology.output), [letter], {}, {}, [])
            merged.outbound += one.outbound
            merged.dead_letters += one.dead_letters
            merged.event_times += one.event_times
            for key, count in one.outcomes.items():
                merged.outcomes[key] = merged.outcomes.get(key, 0) + count
        return merged

    # -- route-set refresh -------------------------------------------------------------------

    async def _refresh_route_set(self) -> None:
        """Pick up a newly synced route-set version without a restart."""
        assert self.store is not None
        loop = asyncio.get_running_loop()
        name = self.topology.route_set.name
        for space, current in self.compute.indexes.items():
            encoder_id = current.encoder_id
            try:
                version = await loop.run_in_executor(
                    self._io, self.store.current_version, name, encoder_id
                )
                if version is None or version == current.version:
                    continue
                index = await loop.run_in_executor(self._io, self.store.load, name, encoder_id)
                await self.compute.swap_index(index)
                metrics.ROUTE_SET_RELOADS.labels(self.topology.name).inc()
                metrics.ROUTE_SET.info({"route_set": name, "version": index.version, "encoder": encoder_id})
                log.info("route set %s (%s space): now at version %s", name, space, index.version)
            except Exception:
                log.exception("route-set refresh failed; keeping version %s", current.version)

class DrainingWorker(faust.Worker):
    """A Faust worker whose SIGTERM/SIGINT first lets its batch worker finish the batch and commit."""

    def __init__(self, batch_worker: BatchWorker, *args: Any, **kwargs: Any) -> None:
        super().__init__(batch_worker.app, *args, **kwargs)
        self.batch_worker = batch_worker

    def _on_sigterm(self) -> None:
        asyncio.ensure_future(self._drain_then_stop(signal.SIGTERM), loop=self.loop)

    def _on_sigint(self) -> None:
        asyncio.ensure_future(self._drain_then_stop(signal.SIGINT), loop=self.loop)

    async def _drain_then_stop(self, signum: signal.Signals) -> None:
        if self.batch_worker.draining:
            return
        log.info("signal %s: draining the batch in flight", signum.name)
        await self.batch_worker.drain()
        self._schedule_shutdown(signum)
