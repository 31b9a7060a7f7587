"""The LLM review of needs-review decisions: every decision ends as a verdict or a hand-off.

:class:`ReviewEngine` reviews decisions with the LLM under the guard rails
(rate limiter, per-review and daily token budgets, circuit breaker); it never
raises for a review: each decision ends as a verdict (``decided_by: llm``) or a
hand-off to the human-review topic with its reason. An endpoint that is down
is not a reason: the review waits (the breaker opens, no new events are taken,
they stay in the topic) and goes on when the endpoint answers again.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from typing import Any

from sieve.contracts import Decision, Review, utcnow
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
from sieve.review.memo import ReviewMemo
from sieve.review.metrics import (
    AGREEMENT,
    ATTEMPTS,
    BREAKER_OPEN,
    BUDGET_USED,
    COST,
    HANDOFFS,
    REUSED,
    REVIEW_SECONDS,
    REVIEWS,
    TOKENS,
)
from sieve.review.multi import is_multi
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
    MultiReviewReply,
    ReplyError,
    ReviewCatalogue,
    ReviewReply,
    build_messages,
    estimate_tokens,
    handoff_decision,
    parse_reply,
    reviewed_decision,
)
from sieve.settings import LLMSettings
from sieve.topology import ReviewSpec

log = logging.getLogger(__name__)


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
        memo: ReviewMemo | None = None,
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
        self.memo = memo or ReviewMemo()

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
        state = _ReviewState(decision, self.llm.model, started, self.catalogue)
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
        if is_multi(decision) != self.catalogue.multi:
            return state.handoff(
                ROUTE_SET_MISMATCH,
                f"decided in {decision.mode or 'single'} mode; this reviewer's route set "
                f"{self.catalogue.name!r} is in {self.catalogue.mode} mode",
            )
        image_url = None
        if decision.modality == "image":
            if not self.spec.accepts_images:
                return state.handoff(IMAGE_NOT_ACCEPTED, "the topology's review.accepts_images is false")
            image_url = decision.event.image_uri
            if image_url is None:
                return state.handoff(IMAGE_NOT_AVAILABLE, "an inline image: the decision carries no URI")
        return await self.memo.once(
            self.memo.key(decision),
            lambda: self._ask(decision, state, image_url),
            lambda reply: state.verdict(reply, reused=True),
        )

    async def _ask(self, decision: Decision, state: _ReviewState,
                   image_url: str | None) -> tuple[Decision, ReviewReply | None]:
        """The LLM's review: the final decision, and the verdict when there is one (for repeats)."""
        messages = build_messages(
            decision, self.catalogue, nonce=self._nonce(), max_examples=self.spec.max_examples,
            image_url=image_url,
        )
        prompt_estimate = estimate_tokens(messages, self._schema)
        estimate = prompt_estimate + self.spec.max_output_tokens
        if estimate > self.spec.max_tokens_per_review:
            return state.handoff_only(
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
                return state.handoff_only(
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
                return state.handoff_only(REQUEST_REJECTED, str(exc))
            except MalformedCompletion as exc:
                state.attempts += exc.attempts
                self.budget.settle(estimate, estimate)
                self.breaker.record_success()
                self._breaker_gauge()
                malformed += 1
                if malformed > 1:
                    return state.handoff_only(MALFORMED_REPLY, str(exc))
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
                    return state.handoff_only(MALFORMED_REPLY, str(exc))
                continue
            if reply.confidence < self.spec.min_confidence:
                return state.handoff_only(
                    LOW_CONFIDENCE,
                    f"confidence {reply.confidence:.2f} < min_confidence {self.spec.min_confidence:.2f}",
                    reply=reply,
                )
            return state.verdict(reply), reply

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
        if review.reused:
            REUSED.labels(self.topology).inc()
        if decision.scores:
            agrees = final.outcome == decision.scores[0].outcome
            AGREEMENT.labels(self.topology, "true" if agrees else "false").inc()


class _ReviewState:
    """What one review has spent so far, and how to finish it."""

    def __init__(self, decision: Decision, model: str, started: float, catalogue: ReviewCatalogue) -> None:
        self.decision = decision
        self.catalogue = catalogue
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

    def verdict(self, reply: ReviewReply, *, reused: bool = False) -> Decision:
        review = self._review(verdict=reply.verdict, route=reply.route, confidence=reply.confidence,
                              rationale=reply.rationale, reused=reused or None)
        return reviewed_decision(self.decision, reply, review, utcnow(), self.catalogue)

    def handoff_only(self, reason: str, error: str, reply: ReviewReply | None = None
                     ) -> tuple[Decision, ReviewReply | None]:
        """A hand-off, with no verdict to share with repeats."""
        return self.handoff(reason, error, reply), None

    def handoff(self, reason: str, error: str, reply: ReviewReply | None = None) -> Decision:
        answer: dict[str, Any] = {}
        if reply is not None:
            answer = {"verdict": reply.verdict, "route": reply.route, "confidence": reply.confidence,
                      "rationale": reply.rationale}
            if isinstance(reply, MultiReviewReply):
                answer["routes"] = reply.routes
        review = self._review(handoff_reason=reason, error=error[:2000], **answer)
        return handoff_decision(self.decision, review, utcnow())
