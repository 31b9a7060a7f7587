"""The console's Kafka side: reads the hand-offs, keeps claims and decisions durable, publishes verdicts.

One :class:`ConsoleService` per console process (one replica per topology: its queue is
in this process; a second replica would offer the same items). At start it reads the
state topic to its end (every item's latest claim or decision), then the human-review
topic from the console group's committed offsets, and goes on reading new hand-offs.

Every change is durable before it counts: a claim or a decision is written to the state
topic (and a verdict to the verdict topics and its label to the labels topic) and
acknowledged by the broker, then applied to the queue; only then is a partition committed,
below its lowest undecided item. A crash between publishing a verdict and recording the
decision offers the item again; deciding it again publishes a verdict with the same id
(derived from the hand-off), so nothing is decided twice under two ids. Changes are
serialised by one lock, so two moderators racing for one item get one claim and a conflict.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from pydantic import ValidationError

from sieve.console import metrics
from sieve.console.queue import ConsoleQueue, Item, ItemState, VerdictRef
from sieve.console.verdict import Choice, human_verdict, plan_verdict
from sieve.contracts import Decision
from sieve.flow.dead_letter import make_dead_letter
from sieve.flow.publish import plan_dead_letters
from sieve.kafka.client import client_kwargs, commit_offsets, ensure_topics, read_topic, send_batched
from sieve.kafka.records import Outbound, RawRecord
from sieve.review.catalogue import ReviewCatalogue
from sieve.routeset import RouteSet
from sieve.settings import Settings
from sieve.topology import ReviewSpec, Topology

log = logging.getLogger(__name__)
PROBE_EVERY_S = 2.0  # how often the broker is asked for metadata (the banner, /readyz)
PROBE_TIMEOUT_S = 5.0
STOP_TIMEOUT_S = 5.0
SEND_TIMEOUT_S = 15.0  # a change not acknowledged by then is reported as not saved


def console_topics(topology: Topology) -> dict[str, str]:
    """The console's topics and group: hand-offs in, its state and audit topics beside them."""
    handoffs = (topology.review or ReviewSpec()).human_review_topic
    return {"handoffs": handoffs, "state": f"{handoffs}.console-state", "audit": f"{handoffs}.console-audit",
            "group": f"{topology.consumer_group}-console"}


class ConsoleService:
    """The queue of one topology's hand-offs, kept durable in Kafka; see the module."""

    def __init__(self, topology: Topology, route_set: RouteSet, settings: Settings,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.topology = topology
        self.route_set = route_set
        self.settings = settings
        self.catalogue = ReviewCatalogue.from_route_set(route_set)
        self.policies = {r.name: (r.outcome, r.policy) for r in route_set.routes}
        self.topics = console_topics(topology)
        self.labels_topic = (topology.review or ReviewSpec()).labels_topic
        self.queue = ConsoleQueue(settings.console.lease_s)
        self.clock = clock
        self._read_error: str | None = None
        self.caught_up = False
        self.agreement = {"agree": 0, "disagree": 0}
        self.recent: deque[tuple[datetime, str]] = deque(maxlen=100_000)  # (decided at, moderator)
        self._lock = asyncio.Lock()
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._watch_error: str | None = None

    # --- life ------------------------------------------------------------------------------
    async def start(self) -> None:
        """Create the topics, read the state topic, and start reading hand-offs in the background."""
        kafka = self.settings.kafka
        partitions = self.topology.output.partitions
        names = [self.topics["handoffs"], self.topics["state"], self.topics["audit"],
                 self.topology.output.dead_letter_topic]
        await ensure_topics(kafka, dict.fromkeys(names, partitions), self.topology.output.replication_factor,
                            configs={self.topics["state"]: {"cleanup.policy": "compact"}})
        async for record in read_topic(kafka, [self.topics["state"]], idle_timeout_s=1.5):
            self._apply_state_record(record.key, record.value)
        self._producer = AIOKafkaProducer(**client_kwargs(kafka), acks="all", linger_ms=2,
                                          request_timeout_ms=int(SEND_TIMEOUT_S * 1000))
        await self._producer.start()
        self._consumer = AIOKafkaConsumer(**client_kwargs(kafka), group_id=self.topics["group"],
                                          auto_offset_reset="earliest", enable_auto_commit=False)
        await self._consumer.start()
        await self._consumer.topics()
        found = sorted(self._consumer.partitions_for_topic(self.topics["handoffs"]) or ())
        self._consumer.assign([TopicPartition(self.topics["handoffs"], p) for p in found])
        self._tasks = [asyncio.create_task(self._consume(), name="sieve-console-consume"),
                       asyncio.create_task(self._watch(), name="sieve-console-watch")]

    async def stop(self) -> None:
        """Stop reading and close the clients (nothing is left unwritten: changes are awaited)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for client in (self._consumer, self._producer):
            if client is not None:
                try:  # a broker that is gone must not hold the shutdown
                    await asyncio.wait_for(client.stop(), STOP_TIMEOUT_S)
                except (Exception, asyncio.CancelledError) as exc:
                    log.warning("console: closing a Kafka client: %s", type(exc).__name__)

    @property
    def ready(self) -> bool:
        """Caught up with the hand-offs and the broker answering."""
        return self.caught_up and self.broker_error is None

    @property
    def broker_error(self) -> str | None:
        """Why the broker is not answering (reading hand-offs, or the periodic probe); None while it is."""
        return self._read_error or self._watch_error

    async def _watch(self) -> None:
        """Ask the cluster for its metadata every few seconds: a consumer alone retries silently."""
        assert self._producer is not None
        while True:
            try:
                await asyncio.wait_for(self._producer.client.fetch_all_metadata(), PROBE_TIMEOUT_S)
                self._watch_error = None
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._watch_error = f"{type(exc).__name__}: {exc}"[:300] if str(exc) else type(exc).__name__
            await asyncio.sleep(PROBE_EVERY_S)

    # --- reading ---------------------------------------------------------------------------
    def _apply_state_record(self, key: bytes | None, value: bytes | None) -> None:
        if key is None or value is None:
            return
        try:
            self.queue.apply(key.decode(), ItemState.from_json(json.loads(value)))
        except (ValueError, KeyError, TypeError) as exc:  # not ours: skip it, say so
            log.warning("console: skipping a state record that is not one (%s)", exc)

    async def _consume(self) -> None:
        assert self._consumer is not None
        backoff = 0.5
        while True:
            try:
                batches = await self._consumer.getmany(timeout_ms=500, max_records=500)
                records = [r for rs in batches.values() for r in rs]
                await self._take(records)
                self._read_error, backoff = None, 0.5
                if not records:
                    self.caught_up = True
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the broker is away: show it, keep trying
                self._read_error = f"{type(exc).__name__}: {exc}"[:300]
                log.warning("console: reading hand-offs failed: %s", self._read_error)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)

    async def _take(self, records: list[Any]) -> None:
        letters = []
        settle: list[tuple[str, ItemState]] = []
        for record in records:
            at = datetime.fromtimestamp(record.timestamp / 1000, UTC) if record.timestamp else self.clock()
            try:
                decision = Decision.model_validate_json(record.value or b"")
                if decision.review is None:
                    raise ValueError("a hand-off carries the reviewer's review; this decision has none")
            except (ValidationError, ValueError) as exc:
                raw = RawRecord(record.topic, record.partition, record.offset, record.key, record.value,
                                record.timestamp / 1000 if record.timestamp else None)
                letter = make_dead_letter(
                    raw, stage="validate", reason="not_a_handoff",
                    error=f"the console's input is not a hand-off decision: {str(exc)[:500]}",
                    worker=self.settings.worker_name, topology=self.topology.name,
                    max_payload_bytes=self.topology.limits.max_dead_letter_payload_bytes)
                letters.append(letter)
                item_id = f"dead-letter:{letter.id}"
                self.queue.add(Item(item_id, record.partition, record.offset, None, at, broken=letter.reason))
                settle.append((item_id, ItemState(status="decided", user="dead-letter")))
                continue
            self.queue.add(Item(decision.id, record.partition, record.offset, decision, at))
        if letters:  # dead-lettered, then recorded as settled: the prefix can move past them
            await self._send(plan_dead_letters(letters, self.topology.output)
                             + [self._state_message(i, s) for i, s in settle])
            for item_id, state in settle:
                self.queue.apply(item_id, state)
            await self._commit()

    # --- writing ---------------------------------------------------------------------------
    async def _send(self, messages: list[Outbound]) -> None:
        """Send and await the acknowledgements, within SEND_TIMEOUT_S (a moderator is waiting)."""
        assert self._producer is not None
        await asyncio.wait_for(send_batched(self._producer, messages), SEND_TIMEOUT_S)

    def _state_message(self, item_id: str, state: ItemState) -> Outbound:
        return Outbound(self.topics["state"], item_id.encode(), json.dumps(state.to_json()).encode(), ())

    def _audit(self, user: str, action: str, item_id: str | None, **detail: Any) -> Outbound:
        record = {"at": self.clock().isoformat(), "user": user, "action": action, "item": item_id, **detail}
        log.info("console audit: %s", json.dumps(record))
        return Outbound(self.topics["audit"], (item_id or user).encode(), json.dumps(record).encode(), ())

    async def _commit(self) -> None:
        offsets = self.queue.committable()
        if offsets:
            await commit_offsets(self.settings.kafka, self.topics["handoffs"], self.topics["group"], offsets)
            self.queue.forget_decided(offsets)

    async def _change(self, item_id: str, state: ItemState, extra: list[Outbound]) -> ItemState:
        await self._send([*extra, self._state_message(item_id, state)])
        self.queue.apply(item_id, state)
        return state

    # --- what moderators and leads do (each raises queue.Conflict or verdict.InvalidChoice) ---
    async def claim(self, item_id: str, user: str) -> ItemState:
        """Claim an item (or renew one's own claim)."""
        async with self._lock:
            state = self.queue.claim(item_id, user, self.clock())
            return await self._change(item_id, state, [self._audit(user, "claim", item_id)])

    async def claim_next(self, user: str, tenant: str | None = None, route: str | None = None) -> Item | None:
        """The user's open claim, or a claim on the oldest waiting item; None when the queue is empty."""
        async with self._lock:
            item = self.queue.next_for(user, self.clock(), tenant, route)
            if item is None:
                return None
            state = self.queue.claim(item.id, user, self.clock())
            await self._change(item.id, state, [self._audit(user, "claim", item.id)])
            return item

    async def release(self, item_id: str, user: str, lead: bool = False) -> ItemState:
        """Hand a claim back to the queue."""
        async with self._lock:
            state = self.queue.release(item_id, user, self.clock(), lead)
            return await self._change(item_id, state, [self._audit(user, "release", item_id)])

    async def reassign(self, item_id: str, lead: str, to_user: str) -> ItemState:
        """A lead gives an item to another moderator."""
        async with self._lock:
            state = self.queue.reassign(item_id, to_user, self.clock())
            return await self._change(item_id, state, [self._audit(lead, "reassign", item_id, to=to_user)])

    async def decide(self, item_id: str, user: str, choice: Choice, override: bool = False) -> Decision:
        """Publish the moderator's verdict (and label), record the item decided, commit what may be.

        With ``override`` (a lead, on a decided item) the verdict replaces the latest one; both stay.
        """
        async with self._lock:
            now = self.clock()
            item = self.queue.require(item_id)
            if item.decision is None:
                raise KeyError(item_id)
            previous = item.state.verdicts[-1].id if override and item.state.verdicts else None
            verdict = human_verdict(item.decision, choice, user, self.catalogue, now, overrides=previous)
            routes = tuple(verdict.review.routes or ([verdict.route] if verdict.route else [])) \
                if verdict.review else ()
            ref = VerdictRef(id=verdict.id, outcome=verdict.outcome, routes=routes, by=user, at=now,
                             note=choice.note)
            state = (self.queue.override(item_id, ref) if override
                     else self.queue.decide(item_id, user, ref, now))
            audit = self._audit(user, "override" if override else "decide", item_id, verdict=verdict.id,
                                outcome=verdict.outcome, routes=list(routes), note=choice.note)
            planned = plan_verdict(verdict, item.decision, self.topology.output, self.labels_topic)
            await self._change(item_id, state, [*planned, audit])
            self._count(item.decision, verdict, user, now)
            await self._commit()
            return verdict

    def _count(self, handoff: Decision, verdict: Decision, user: str, now: datetime) -> None:
        metrics.DECISIONS.labels(self.topology.name, user, verdict.outcome).inc()
        self.recent.append((now, user))
        llm = handoff.review.verdict if handoff.review is not None else None
        if llm is not None:
            agree = llm == verdict.outcome
            self.agreement["agree" if agree else "disagree"] += 1
            metrics.AGREEMENT.labels(self.topology.name, str(agree).lower()).inc()

    async def audit_login(self, user: str, ok: bool, address: str | None) -> None:
        """Record a login (or a failed one) on the audit topic; a broker fault is logged, not raised."""
        try:
            await self._send([self._audit(user, "login" if ok else "login_failed", None, address=address)])
        except Exception as exc:  # the page must still answer; the log has the audit line
            log.warning("console: audit record not written: %s", exc)

    # --- numbers -----------------------------------------------------------------------------
    def per_hour(self, now: datetime | None = None) -> dict[str, int]:
        """Decisions per moderator in the last hour."""
        since = (now or self.clock()) - timedelta(hours=1)
        counts: dict[str, int] = {}
        for at, user in self.recent:
            if at >= since:
                counts[user] = counts.get(user, 0) + 1
        return counts

    def update_gauges(self) -> None:
        """Set the queue gauges from the queue (called before each scrape and page)."""
        numbers = self.queue.numbers(self.clock())
        name = self.topology.name
        metrics.WAITING.labels(name).set(numbers.waiting)
        metrics.CLAIMED.labels(name).set(numbers.claimed)
        metrics.OLDEST.labels(name).set(numbers.oldest_age_s)
        metrics.BROKER_UP.labels(name).set(0 if self.broker_error else 1)
