"""The LLM reviewer worker: needs-review decisions in, final decisions (or hand-offs) out.

With ``review.audit_share`` or ``shadow_audit_share`` it also reads the audit topic: automatic
decisions the router sampled, which get a label and no verdict (:func:`~sieve.review.steps.plan_review`).

:class:`ReviewerWorker` is the thin Faust shell around a
:class:`~sieve.review.engine.ReviewEngine`, like the router's
(:mod:`sieve.worker.batch_worker`): take a batch, review it with bounded concurrency,
queue every send and await the acknowledgements together, and only then let Faust
commit the batch's offsets. No exception escapes the agent loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import faust

from sieve.contracts import NEEDS_REVIEW, Decision
from sieve.kafka.records import RawRecord
from sieve.review.engine import ReviewEngine
from sieve.review.metrics import DECISIONS_IN, count_audits
from sieve.review.steps import ReviewCatalogue, decode_decisions, plan_review
from sieve.routeset import RouteSet
from sieve.settings import Settings
from sieve.topology import ReviewSpec, Topology
from sieve.worker.app import DrainingWorker, build_app
from sieve.worker.batch_worker import BatchWorker
from sieve.worker.health import WorkerHealth


def review_spec(topology: Topology) -> ReviewSpec:
    """The topology's review section, or the defaults."""
    return topology.review or ReviewSpec()


def review_input_topic(topology: Topology) -> str:
    """The topic the reviewer consumes: review.input_topic, else where needs_review goes."""
    return review_spec(topology).input_topic or topology.output.topic_for(NEEDS_REVIEW)


def review_group(topology: Topology) -> str:
    """The reviewer's consumer group."""
    return review_spec(topology).group_id or f"{topology.consumer_group}-review"


class ReviewerWorker(BatchWorker):
    """One topology's reviewer: the Faust agent around a :class:`ReviewEngine`."""

    def __init__(
        self, topology: Topology, settings: Settings, engine: ReviewEngine, app: faust.App | None = None
    ) -> None:
        spec = review_spec(topology)
        if app is None:
            app = build_app(topology.model_copy(update={"group_id": review_group(topology),
                                                        "batching": spec.batching}), settings)
            # Fetch little ahead: while the endpoint is down, events should wait in the topic.
            app.conf.stream_buffer_maxsize = 2 * spec.batching.max_events
        super().__init__(topology.name, settings, app, spec.batching)
        self.topology = topology
        self.spec = spec
        self.engine = engine
        self.input_topic = review_input_topic(topology)
        self.topics = [self.input_topic] + ([spec.audit_topic] if spec.audits else [])
        self._add_agent(self.topics, topology.output.partitions, f"sieve.{topology.name}.reviewer")

    async def handle(self, records: list[RawRecord]) -> list[Decision]:
        """Review one batch to the end: returns once every output is acknowledged by the broker."""
        DECISIONS_IN.labels(self.topology.name).inc(len(records))
        decisions, outbound = decode_decisions(
            records,
            self.topology.output,
            worker=self.settings.worker_name,
            topology=self.topology.name,
            max_payload_bytes=self.topology.limits.max_dead_letter_payload_bytes,
        )
        finals = await self.engine.review_many(decisions)
        outbound += plan_review(finals, self.topology.output, self.spec.human_review_topic,
                                self.spec.labels_topic, decisions)
        count_audits(self.topology.name, decisions, finals)
        await self._publish(outbound)
        return finals


def review_topics(topology: Topology, outcomes: set[str], route_names: list[str]) -> dict[str, int]:
    """Every topic the reviewer reads or writes, with partition counts, for creating them up front."""
    spec = review_spec(topology)
    output = topology.output
    topics = {review_input_topic(topology): output.partitions, spec.human_review_topic: output.partitions,
              output.dead_letter_topic: output.partitions}
    if spec.labels_topic is not None:
        topics[spec.labels_topic] = output.partitions
    if spec.audits:
        topics[spec.audit_topic] = output.partitions
    for outcome in outcomes:
        topics[output.topic_for(outcome)] = output.partitions
    if output.route_topic_prefix is not None:
        for name in route_names:
            topics[output.route_topic_prefix + name] = output.partitions
    return topics


def run_reviewer(
    topology: Topology, route_set: RouteSet, settings: Settings, say: Callable[[str], Any] = print
) -> None:
    """Create the topics, serve metrics and probes, and run the reviewer worker until it is stopped.

    Waits for the brokers first (``kafka.startup_timeout_s``); raises
    :class:`~sieve.kafka.startup.BrokerUnavailable` when none answered in that time.
    """
    from sieve.kafka.client import ensure_topics
    from sieve.kafka.startup import wait_for_broker
    from sieve.worker.health import serve

    spec = review_spec(topology)
    catalogue = ReviewCatalogue.from_route_set(route_set)
    topics = review_topics(topology, route_set.outcomes, [r.name for r in route_set.routes])

    async def create_topics() -> None:
        await wait_for_broker(settings.kafka)
        await ensure_topics(settings.kafka, topics, topology.output.replication_factor)

    asyncio.run(create_topics())
    engine = ReviewEngine(topology.name, spec, catalogue, settings.llm)
    reviewer = ReviewerWorker(topology, settings, engine)
    # /healthz heartbeat, /readyz checks and the needs-review lag (what reviewers autoscale on)
    WorkerHealth(reviewer, reviewer.topics)
    serve(settings.metrics_host, settings.metrics_port, settings.health)
    say(
        f"reviewer {settings.worker_name}: topology {topology.name}, {reviewer.input_topic} -> "
        f"verdicts / {spec.human_review_topic}, model {settings.llm.model} at {settings.llm.base_url}, "
        f"group {review_group(topology)}, metrics and probes :{settings.metrics_port}"
    )
    DrainingWorker(reviewer, loglevel=settings.log_level, quiet=True).execute_from_commandline()
