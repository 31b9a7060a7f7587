"""The worker's Kafka consumer: Faust's aiokafka consumer with a cheaper fetch loop and safe commits.

Three changes to Faust's fetch loop: a fetch waits at most the app's
``fetch_max_wait_ms``; each fetched message is delivered to the conductor inline
instead of through four tasks (``_Consumer.wait_first``, :func:`run_eagerly`); and
with every partition paused, the fetch loop wakes as soon as one resumes instead of
after a fixed second. One change to its commits: a partition's committed offset
never passes an event still being decided (``_Consumer._new_offset``).
:class:`SieveTransport` hands this consumer to the app (:mod:`sieve.worker.app`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any

from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP, Message
from faust.types.tuples import ack_lock
from mode.services import WaitResults


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
    stream buffer is abandoned when a rebalance suspends the flow. Here the callback is
    first run inline; almost always it finishes without suspending (the buffer has
    room) and no task is made. If it suspends, the rest of it goes through Faust's
    own ``wait_first`` exactly as before, so a suspended flow still abandons it.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Per partition: offsets handed to processing and not yet acknowledged -> how many times.
        self._pending: dict[TP, dict[int, int]] = {}

    def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    # Commits. Faust commits, per partition, the end of the first run of consecutive
    # acknowledged offsets. Its guard against a hole below that run
    # (``min(acked) - committed > 1``) is off while the committed offset is None or 0
    # (a new group; a partition whose offset a rebalance dropped) and lets a hole of one
    # offset through, so a batch finishing before the one ahead of it, or a batch that
    # failed, could be committed past. Here a commit is bounded by what is still being
    # decided, whatever the committed offset:
    # - a message handed to processing (``track_message``, which the batch worker calls
    #   for every event of a batch it takes) is pending until it is acknowledged; one
    #   given up without an acknowledgement (a failed batch, a drain) stays pending, and
    #   its partition is not committed past it until another owner or a restart decides it;
    # - a partition's commit stops at its lowest pending offset;
    # - acknowledging a message that was never handed to processing (skipped: a
    #   rebalance began while it waited, or it was fetched in a previous generation)
    #   records nothing: it was not decided, and the partition's owner reads it again.

    def track_message(self, message: Message) -> None:
        """Faust's: the message is being processed; and its offset is pending until it is acknowledged."""
        super().track_message(message)
        with ack_lock:
            pending = self._pending.setdefault(message.tp, {})
            pending[message.offset] = pending.get(message.offset, 0) + 1

    def ack(self, message: Message) -> bool:
        """Faust's, except that a message never handed to processing is not recorded as done."""
        with ack_lock:
            if message.acked:
                return False
            if not message.tracked and self.app.topics.acks_enabled_for(message.topic):
                message.acked = True  # skipped, not decided: no commit covers it
                return False
            pending = self._pending.get(message.tp)
            if pending is not None and message.offset in pending:
                count = pending.pop(message.offset) - 1
                if count:
                    pending[message.offset] = count
            return bool(super().ack(message))

    def _lowest_pending(self, tp: TP) -> int | None:
        """The partition's lowest offset still being decided (offsets below its committed one are settled)."""
        pending = self._pending.get(tp)
        if not pending:
            return None
        committed = self._committed_offset[tp]
        if committed:
            for offset in [offset for offset in pending if offset < committed]:
                del pending[offset]  # committed by the partition's owner, who decided it
            if not pending:
                return None
        return min(pending)

    def _new_offset(self, tp: TP) -> int | None:
        """Faust's offset to commit, from the acknowledged offsets below the lowest pending one only."""
        lowest = self._lowest_pending(tp)
        if lowest is None:
            return super()._new_offset(tp)
        acked = self._acked[tp]
        above = [offset for offset in acked if offset >= lowest]
        if above:
            acked[:] = [offset for offset in acked if offset < lowest]
        try:
            offset = super()._new_offset(tp)
        finally:
            acked.extend(above)  # kept for a later commit; Faust sorts before it looks
        # Faust's gap intervals (offsets its fetch skipped) may reach the pending offset itself.
        return offset if offset is None else min(offset, lowest)

    # Faust takes a partition out of the fetch while the stream buffer is under
    # pressure (over 80 % full) and puts it back once the buffer is drained below 40 %.
    # While every partition is out, its fetch loop sleeps a whole second before it looks
    # again, so a worker that drained its buffer would wait for input with nothing to do.
    # Here that wait ends as soon as a partition is put back.

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


class SieveTransport(faust_aiokafka.Transport):
    """Faust's aiokafka transport with the worker's consumer."""

    Consumer = _Consumer
