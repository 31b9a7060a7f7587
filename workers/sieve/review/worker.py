"""The LLM reviewer worker: needs-review decisions in, final decisions (or hand-offs) out.

:class:`ReviewEngine` reviews decisions with the LLM under the guard rails
(rate limiter, per-review and daily token budgets, circuit breaker); it never
raises for a review: each decision ends as a verdict (``decided_by: llm``) or a
hand-off to the human-review topic with its reason. An endpoint that is down
is not a reason: the review waits (the breaker opens, no new events are taken,
they stay in the topic) and goes on when the endpoint answers again.

:class:`ReviewerWorker` is the thin Faust shell, like the router's
(:mod:`sieve.worker.batch`): take a batch, review it with bounded concurrency, queue
every send and await the acknowledgements together, and only then let Faust
commit the batch's offsets. No exception escapes the agent loop.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from typing import Any

import faust
from prometheus_client import Counter, Gauge, Histogram

from sieve.contracts import NEEDS_REVIEW, Decision, Review, utcnow
from sieve.kafka.records import RawRecord
from sieve.review.llm import (
    AttemptResult,
    ChatClient,
    CircuitBreaker,
    EndpointUnavailable,
    MalformedCompletion,
    RateLimiter,
    RequestRejected,
    TokenBudget,
)
from sieve.review.steps import (
    CHARS_PER_TOKEN,
    IMAGE_NOT_ACCEPTED,
    IMAGE_NOT_AVAILABLE,
    LOW_CONFIDENCE,
    MALFORMED_REPLY,
    OVER_DAILY_TOKEN_BUDGET,
    OVER_REVIEW_TOKEN_LIMIT,
    REQUEST_REJECTED,
    REVIEW_ERROR,
    ROUTE_SET_MISMATCH,
    ReplyError,
    ReviewCatalogue,
    ReviewReply,
    build_messages,
    decode_decisions,
    estimate_tokens,
    handoff_decision,
    parse_reply,
    plan_review,
    reviewed_decision,
)
from sieve.routeset import RouteSet
from sieve.settings import LLMSettings, Settings
from sieve.topology import ReviewSpec, Topology
from sieve.worker.batch import BatchWorker, DrainingWorker, build_app
from sieve.worker.health import WorkerHealth

log = logging.getLogger(__name__)

_REVIEW_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300, 900)

# Share of all events that reached review, in PromQL (the router counts its input):
#   sum(rate(sieve_reviews_total[5m])) / sum(rate(sieve_events_in_total[5m]))
REVIEWS = Counter(
    "sieve_reviews_total",
    "Needs-review decisions finished by the reviewer, by final outcome ('human_review' for hand-offs).",
    ["topology", "outcome"],
)
HANDOFFS = Counter(
    "sieve_review_handoffs_total", "Events handed to the human-review topic, by reason.",
    ["topology", "reason"],
)
REVIEW_SECONDS = Histogram(
    "sieve_review_seconds",
    "Seconds from the start of a review to its verdict or hand-off (waits and retries included).",
    ["topology"],
    buckets=_REVIEW_BUCKETS,
)
ATTEMPTS = Counter(
    "sieve_review_requests_total", "HTTP requests to the LLM endpoint, by result.", ["topology", "result"]
)
TOKENS = Counter(
    "sieve_review_tokens_total", "Tokens spent on reviews (endpoint-reported usage).",
    ["topology", "direction"],
)
COST = Counter(
    "sieve_review_cost_total",
    "Estimated cost of reviews, from the price-per-1k-token settings (your currency).",
    ["topology"],
)
AGREEMENT = Counter(
    "sieve_review_agreement_total",
    "LLM verdicts compared with the outcome of the router's top route.",
    ["topology", "agrees"],
)
BREAKER_OPEN = Gauge(
    "sieve_review_breaker_open", "1 while the reviewer's circuit breaker is open.", ["topology"]
)
BUDGET_USED = Gauge(
    "sieve_review_daily_tokens_used", "Tokens counted against today's budget (this process).", ["topology"]
)
DECISIONS_IN = Counter(
    "sieve_review_decisions_in_total", "Records consumed from the needs-review topic.", ["topology"]
)


class ReviewEngine:
    """Reviews decisions with the LLM; every decision ends as a verdict or a hand-off."""

    def __init__(
        self,
        topology: str,
        spec: ReviewSpec,
        catalogue: ReviewCatalogue,
        llm: LLMSettings,
        *,
        client: ChatClient | None = None,
        breaker: CircuitBreaker | None = None,
        limiter: RateLimiter | None = None,
        budget: TokenBudget | None = None,
        nonce: Callable[[], str] = lambda: secrets.token_hex(8),
    ) -> None:
        self.topology = topology
        self.spec = spec
        self.catalogue = catalogue
        self.llm = llm
        self.client = client or ChatClient(llm, on_attempt=self._count_attempt)
        self.breaker = breaker or CircuitBreaker(llm.breaker_failures, llm.breaker_open_s)
        self.limiter = limiter or RateLimiter(spec.max_reviews_per_s)
        self.budget = budget or TokenBudget(spec.daily_token_budget)
        self._nonce = nonce
        self._schema = catalogue.reply_schema()
        self._concurrency = asyncio.Semaphore(spec.max_concurrency)

    def _count_attempt(self, result: AttemptResult) -> None:
        ATTEMPTS.labels(self.topology, result).inc()

    async def aclose(self) -> None:
        """Close the HTTP client."""
        await self.client.aclose()

    async def review_many(self, decisions: Sequence[Decision]) -> list[Decision]:
        """Review a batch, at most ``max_concurrency`` at a time; results in input order."""

        async def bounded(decision: Decision) -> Decision:
            async with self._concurrency:
                return await self.review(decision)

        return list(await asyncio.gather(*(bounded(d) for d in decisions)))

    async def review(self, decision: Decision) -> Decision:
        """One decision's review. Returns the final decision; raises only when cancelled."""
        started = time.perf_counter()
        state = _ReviewState(decision, self.llm.model, started)
        try:
            final = await self._review(decision, state)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug must not lose the event: hand it to a human
            log.exception("review of %s failed unexpectedly", decision.event_id)
            final = state.handoff(REVIEW_ERROR, f"{type(exc).__name__}: {exc}")
        self._account(decision, final, time.perf_counter() - started)
        return final

    async def _review(self, decision: Decision, state: _ReviewState) -> Decision:
        if decision.route_set != self.catalogue.name:
            return state.handoff(
                ROUTE_SET_MISMATCH,
                f"decided with route set {decision.route_set!r}; this reviewer knows {self.catalogue.name!r}",
            )
        image_url = None
        if decision.modality == "image":
            if not self.spec.accepts_images:
                return state.handoff(IMAGE_NOT_ACCEPTED, "the topology's review.accepts_images is false")
            image_url = decision.event.image_uri
            if image_url is None:
                return state.handoff(IMAGE_NOT_AVAILABLE, "an inline image: the decision carries no URI")
        messages = build_messages(
            decision, self.catalogue, nonce=self._nonce(), max_examples=self.spec.max_examples,
            image_url=image_url,
        )
        prompt_estimate = estimate_tokens(messages, self._schema)
        estimate = prompt_estimate + self.spec.max_output_tokens
        if estimate > self.spec.max_tokens_per_review:
            return state.handoff(
                OVER_REVIEW_TOKEN_LIMIT,
                f"estimated {estimate} tokens > max_tokens_per_review {self.spec.max_tokens_per_review}",
            )
        body = self.client.request_body(
            messages, max_tokens=self.spec.max_output_tokens, json_schema=self._schema,
            schema_name="sieve_review",
        )
        malformed = 0
        while True:
            await self.breaker.wait()
            if not self.budget.reserve(estimate):
                self.breaker.release_probe()
                return state.handoff(
                    OVER_DAILY_TOKEN_BUDGET,
                    f"{self.budget.used_today} of {self.spec.daily_token_budget} tokens used today "
                    "(per reviewer process)",
                )
            try:
                await self.limiter.acquire()
                completion = await self.client.complete(body)
            except EndpointUnavailable as exc:
                state.attempts += exc.attempts
                self.budget.release(estimate)
                self.breaker.record_failure()
                self._breaker_gauge()
                log.warning("review of %s waits: %s", decision.event_id, exc)
                continue  # the event waits for the endpoint; never diverted for this
            except RequestRejected as exc:
                state.attempts += exc.attempts
                self.budget.release(estimate)
                self.breaker.record_success()
                self._breaker_gauge()
                return state.handoff(REQUEST_REJECTED, str(exc))
            except MalformedCompletion as exc:
                state.attempts += exc.attempts
                self.budget.settle(estimate, estimate)
                self.breaker.record_success()
                self._breaker_gauge()
                malformed += 1
                if malformed > 1:
                    return state.handoff(MALFORMED_REPLY, str(exc))
                continue
            except BaseException:
                self.budget.release(estimate)
                self.breaker.release_probe()
                raise
            self.breaker.record_success()
            self._breaker_gauge()
            state.attempts += completion.attempts
            tokens_in = completion.tokens_in if completion.tokens_in is not None else prompt_estimate
            tokens_out = (
                completion.tokens_out
                if completion.tokens_out is not None
                else int(len(completion.content) / CHARS_PER_TOKEN) + 1
            )
            self.budget.settle(estimate, tokens_in + tokens_out)
            state.tokens_in += tokens_in
            state.tokens_out += tokens_out
            try:
                reply = parse_reply(completion.content, self.catalogue)
            except ReplyError as exc:
                malformed += 1
                log.info("review of %s: malformed reply (%d): %s", decision.event_id, malformed, exc)
                if malformed > 1:
                    return state.handoff(MALFORMED_REPLY, str(exc))
                continue
            if reply.confidence < self.spec.min_confidence:
                return state.handoff(
                    LOW_CONFIDENCE,
                    f"confidence {reply.confidence:.2f} < min_confidence {self.spec.min_confidence:.2f}",
                    reply=reply,
                )
            return state.verdict(reply)

    def _breaker_gauge(self) -> None:
        BREAKER_OPEN.labels(self.topology).set(1 if self.breaker.state == "open" else 0)

    def _account(self, decision: Decision, final: Decision, seconds: float) -> None:
        review = final.review
        assert review is not None
        REVIEW_SECONDS.labels(self.topology).observe(seconds)
        BUDGET_USED.labels(self.topology).set(self.budget.used_today)
        if review.tokens_in or review.tokens_out:
            TOKENS.labels(self.topology, "in").inc(review.tokens_in)
            TOKENS.labels(self.topology, "out").inc(review.tokens_out)
            COST.labels(self.topology).inc(
                review.tokens_in * self.llm.price_in_per_1k / 1000.0
                + review.tokens_out * self.llm.price_out_per_1k / 1000.0
            )
        if review.handoff_reason is not None:
            REVIEWS.labels(self.topology, "human_review").inc()
            HANDOFFS.labels(self.topology, review.handoff_reason).inc()
            return
        REVIEWS.labels(self.topology, final.outcome).inc()
        if decision.scores:
            agrees = final.outcome == decision.scores[0].outcome
            AGREEMENT.labels(self.topology, "true" if agrees else "false").inc()


class _ReviewState:
    """What one review has spent so far, and how to finish it."""

    def __init__(self, decision: Decision, model: str, started: float) -> None:
        self.decision = decision
        self.model = model
        self.started = started
        self.attempts = 0
        self.tokens_in = 0
        self.tokens_out = 0

    def _review(self, **fields: Any) -> Review:
        return Review(
            model=self.model,
            router_decision_id=self.decision.id,
            tokens_in=self.tokens_in,
            tokens_out=self.tokens_out,
            attempts=self.attempts,
            review_ms=(time.perf_counter() - self.started) * 1000.0,
            **fields,
        )

    def verdict(self, reply: ReviewReply) -> Decision:
        review = self._review(verdict=reply.verdict, route=reply.route, confidence=reply.confidence,
                              rationale=reply.rationale)
        return reviewed_decision(self.decision, reply, review, utcnow())

    def handoff(self, reason: str, error: str, reply: ReviewReply | None = None) -> Decision:
        answer: dict[str, Any] = {}
        if reply is not None:
            answer = {"verdict": reply.verdict, "route": reply.route, "confidence": reply.confidence,
                      "rationale": reply.rationale}
        review = self._review(handoff_reason=reason, error=error[:2000], **answer)
        return handoff_decision(self.decision, review, utcnow())


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
        self._add_agent([self.input_topic], topology.output.partitions, f"sieve.{topology.name}.reviewer")

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
        outbound += plan_review(finals, self.topology.output, self.spec.human_review_topic)
        await self._publish(outbound)
        return finals


def review_topics(topology: Topology, outcomes: set[str], route_names: list[str]) -> dict[str, int]:
    """Every topic the reviewer reads or writes, with partition counts, for creating them up front."""
    spec = review_spec(topology)
    output = topology.output
    topics = {review_input_topic(topology): output.partitions, spec.human_review_topic: output.partitions,
              output.dead_letter_topic: output.partitions}
    for outcome in outcomes:
        topics[output.topic_for(outcome)] = output.partitions
    if output.route_topic_prefix is not None:
        for name in route_names:
            topics[output.route_topic_prefix + name] = output.partitions
    return topics


def run_reviewer(
    topology: Topology, route_set: RouteSet, settings: Settings, say: Callable[[str], Any] = print
) -> None:
    """Create the topics, serve metrics and probes, and run the reviewer worker until it is stopped."""
    from sieve.kafka.client import ensure_topics
    from sieve.worker.health import serve

    spec = review_spec(topology)
    catalogue = ReviewCatalogue.from_route_set(route_set)
    topics = review_topics(topology, route_set.outcomes, [r.name for r in route_set.routes])
    asyncio.run(ensure_topics(settings.kafka, topics, topology.output.replication_factor))
    engine = ReviewEngine(topology.name, spec, catalogue, settings.llm)
    reviewer = ReviewerWorker(topology, settings, engine)
    # /healthz heartbeat, /readyz checks and the needs-review lag (what reviewers autoscale on)
    WorkerHealth(reviewer, [reviewer.input_topic])
    serve(settings.metrics_host, settings.metrics_port, settings.health)
    say(
        f"reviewer {settings.worker_name}: topology {topology.name}, {reviewer.input_topic} -> "
        f"verdicts / {spec.human_review_topic}, model {settings.llm.model} at {settings.llm.base_url}, "
        f"group {review_group(topology)}, metrics and probes :{settings.metrics_port}"
    )
    DrainingWorker(reviewer, loglevel=settings.log_level, quiet=True).execute_from_commandline()
