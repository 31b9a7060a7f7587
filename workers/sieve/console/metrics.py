"""Prometheus metrics of the review console (served on the console's own port, at ``/metrics``)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

WAITING = Gauge("sieve_console_items_waiting", "Hand-offs not decided and not claimed.", ["topology"])
CLAIMED = Gauge("sieve_console_items_claimed", "Hand-offs under an unexpired claim.", ["topology"])
OLDEST = Gauge("sieve_console_oldest_item_age_seconds",
               "Age of the oldest undecided hand-off (from its Kafka timestamp); 0 when none.", ["topology"])
DECISIONS = Counter("sieve_console_decisions_total", "Moderators' verdicts (overrides included).",
                    ["topology", "moderator", "outcome"])
AGREEMENT = Counter("sieve_console_llm_agreement_total",
                    "Moderators' verdicts on hand-offs the LLM had answered: whether its outcome agreed.",
                    ["topology", "agree"])
LOGIN_FAILURES = Counter("sieve_console_login_failures_total", "Refused logins (wrong, unknown, limited).",
                         ["topology"])
BROKER_UP = Gauge("sieve_console_broker_up", "1 while the console reads the hand-offs without error.",
                  ["topology"])
