"""Prometheus metrics of the LLM reviewer (served on ``metrics_port``)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from sieve.contracts import NEEDS_REVIEW, Decision

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
REUSED = Counter(
    "sieve_review_reused_total",
    "Reviews answered with the verdict of an earlier review of the same content (LLM calls saved).",
    ["topology"],
)
# The automatic decisions' accuracy as the LLM sees it, in PromQL:
#   sum(rate(sieve_review_audits_total{result="agrees"}[1h]))
#     / sum(rate(sieve_review_audits_total{result=~"agrees|differs"}[1h]))
AUDITS = Counter(
    "sieve_review_audits_total",
    "Audited automatic decisions: the LLM's verdict agrees with the router's outcome, differs, or none "
    "(handed off: an audit goes to no person).",
    ["topology", "result"],
)


def count_audits(topology: str, decisions: list[Decision], finals: list[Decision]) -> None:
    """Count the audits of a reviewed batch (``finals`` in the order of ``decisions``)."""
    for decision, final in zip(decisions, finals, strict=True):
        if decision.outcome == NEEDS_REVIEW:
            continue
        handed_off = final.review is not None and final.review.handoff_reason is not None
        result = "none" if handed_off else "agrees" if final.outcome == decision.outcome else "differs"
        AUDITS.labels(topology, result).inc()
