"""The Faust side of a worker: the app it runs in and the Faust worker that runs it.

:func:`build_app` makes the app a router or a reviewer consumes with: stateless,
at-least-once, no web server of its own, and the consumer of
:mod:`sieve.worker.consumer`. :class:`DrainingWorker` runs it until SIGTERM or SIGINT,
which first let the batch in flight finish and commit.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import TYPE_CHECKING, Any

import faust
from faust.types import EventT

from sieve.kafka.client import ssl_context
from sieve.settings import Settings
from sieve.topology import Topology
from sieve.worker.consumer import SieveTransport

if TYPE_CHECKING:
    from sieve.worker.batch_worker import BatchWorker

log = logging.getLogger(__name__)


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


class SieveApp(faust.App):
    """A Faust app whose consumer fetches waiting at most ``fetch_max_wait_ms`` (settings ``kafka``)."""

    _event_type: Any  # conf.Event, set on first use

    def __init__(self, *args: Any, fetch_max_wait_ms: int, **options: Any) -> None:
        self.fetch_max_wait_ms = fetch_max_wait_ms
        super().__init__(*args, **options)

    def _new_transport(self) -> Any:
        return SieveTransport(self.conf.broker_consumer, self)

    def create_event(self, key: Any, value: Any, headers: Any, message: Any) -> EventT:
        """Faust's ``create_event`` with the event class looked up once, not per message.

        ``self.conf.Event`` goes through Faust's settings registry on every call,
        and this is called once per consumed message.
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
