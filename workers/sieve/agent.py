"""The Faust router agent: a thin shell that takes a batch, runs the pipeline, publishes, acks.

Delivery: at-least-once. A batch's events are acknowledged to Faust (which then
commits their offsets) only after every message the batch produced was
acknowledged by the broker. No exception escapes the agent loop: Faust's
``take`` acks a buffered batch in a ``finally`` even when the body raised, so a
batch that did not finish has its events marked so that ``take`` cannot ack
them, and they are consumed again after a restart or rebalance.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import faust
from faust.types import EventT

from sieve import metrics
from sieve.dead_letter import RawRecord, make_dead_letter
from sieve.kafka import ssl_context
from sieve.pipeline import BatchResult, RouterPipeline
from sieve.publish import Outbound, plan_dead_letters
from sieve.settings import Settings
from sieve.store import RouteStore
from sieve.topology import BatchingSpec, Topology

log = logging.getLogger(__name__)

_MAX_PROCESS_ATTEMPTS = 3


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


def build_app(topology: Topology, settings: Settings) -> faust.App:
    """A Faust app for one topology: stateless, at-least-once, no web server of its own."""
    kafka = settings.kafka
    return faust.App(
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
        broker_session_timeout=kafka.session_timeout_s,
        broker_heartbeat_interval=kafka.heartbeat_interval_s,
        broker_rebalance_timeout=kafka.rebalance_timeout_s,
        broker_commit_interval=kafka.commit_interval_s,
        stream_buffer_maxsize=max(4096, 2 * topology.batching.max_events),
        processing_guarantee="at_least_once",
    )


def raw_record(event: EventT) -> RawRecord:
    """The raw record behind a Faust event."""
    message = event.message
    return RawRecord(
        topic=message.topic,
        partition=message.partition,
        offset=message.offset,
        key=message.key if isinstance(message.key, bytes | None) else None,
        value=message.value if isinstance(message.value, bytes) else None,
        timestamp=message.timestamp,
    )


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
        self._busy = False
        self.draining = False
        self.send: Callable[[Outbound], Any] = self._send_via_producer

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

    async def _consume(self, stream: faust.StreamT) -> None:
        batching = self.batching
        # take_events (faust-streaming >= 0.11) yields the events, so offsets and raw bytes are at hand.
        batches = stream.take_events(batching.max_events, within=batching.max_wait_s)  # type: ignore[attr-defined]
        async for events in batches:
            if self.draining:
                self._keep_unacked(events)
                await asyncio.Event().wait()  # until the worker stops and cancels us
            self._busy = True
            try:
                await self.handle([raw_record(event) for event in events])
            except BaseException:
                self._keep_unacked(events)
                raise
            finally:
                self._busy = False

    @staticmethod
    def _keep_unacked(events: Sequence[EventT]) -> None:
        """Stop ``take`` from acking events whose batch did not finish (so no commit covers them)."""
        for event in events:
            event.message.acked = True

    async def _send_via_producer(self, message: Outbound) -> Any:
        return await self.app.producer.send(
            message.topic, message.key, message.value, None, None, list(message.headers)
        )

    async def _publish(self, outbound: list[Outbound]) -> None:
        """Queue every send, then await the acknowledgements together; retry until they land.

        A retry re-sends the whole batch: consumers may see a message twice and
        deduplicate by decision id. Nothing is skipped.
        """
        delay = 0.2
        while True:
            try:
                pending = [await self.send(message) for message in outbound]
                await asyncio.gather(*pending)
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
    """One topology's router: the Faust agent, route refresh and graceful drain."""

    def __init__(
        self,
        topology: Topology,
        settings: Settings,
        pipeline: RouterPipeline,
        store: RouteStore | None = None,
        app: faust.App | None = None,
    ) -> None:
        super().__init__(topology.name, settings, app or build_app(topology, settings), topology.batching)
        self.topology = topology
        self.pipeline = pipeline
        self.store = store
        self._add_agent(topology.input.topics, topology.input.partitions, f"sieve.{topology.name}.router")
        if store is not None:
            self.app.timer(settings.route_refresh_s)(self._refresh_route_set)
        # Encoding runs here, off the event loop, one batch at a time.
        self._compute = ThreadPoolExecutor(1, thread_name_prefix="sieve-encode")
        self._io = ThreadPoolExecutor(1, thread_name_prefix="sieve-store")

    async def handle(self, records: list[RawRecord]) -> BatchResult:
        """Process one batch to the end: it returns only once every output is acknowledged."""
        metrics.IN_FLIGHT.labels(self.topology.name).set(1)
        try:
            result = await self._process(records)
            started = time.perf_counter()
            await self._publish(result.outbound)
            publish_seconds = time.perf_counter() - started
            metrics.record_batch(self.topology.name, records, result, publish_seconds)
            return result
        finally:
            metrics.IN_FLIGHT.labels(self.topology.name).set(0)

    async def _process(self, records: list[RawRecord]) -> BatchResult:
        """Run the pipeline off the loop; retry; isolate a record that keeps failing."""
        loop = asyncio.get_running_loop()
        for attempt in range(1, _MAX_PROCESS_ATTEMPTS + 1):
            try:
                return await loop.run_in_executor(self._compute, self.pipeline.process, records)
            except Exception:
                log.exception("batch of %d failed (attempt %d)", len(records), attempt)
                metrics.BATCH_RETRIES.labels(self.topology.name, "process").inc()
                await asyncio.sleep(0.1 * 2**attempt)
        # The batch keeps failing: process record by record; dead-letter what fails alone.
        merged = BatchResult([], [], [])
        for record in records:
            try:
                one = await loop.run_in_executor(self._compute, self.pipeline.process, [record])
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
                one = BatchResult([], [letter], plan_dead_letters([letter], self.topology.output))
            merged.decisions += one.decisions
            merged.dead_letters += one.dead_letters
            merged.outbound += one.outbound
        return merged

    # -- route-set refresh -------------------------------------------------------------------

    async def _refresh_route_set(self) -> None:
        """Pick up a newly synced route-set version without a restart."""
        assert self.store is not None
        loop = asyncio.get_running_loop()
        name = self.topology.route_set.name
        for space, current in self.pipeline.indexes.items():
            encoder_id = current.encoder_id
            try:
                version = await loop.run_in_executor(
                    self._io, self.store.current_version, name, encoder_id
                )
                if version is None or version == current.version:
                    continue
                index = await loop.run_in_executor(self._io, self.store.load, name, encoder_id)
                self.pipeline.swap_index(index)
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
