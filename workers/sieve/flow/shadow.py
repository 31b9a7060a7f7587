"""Shadowing: a candidate version of the topology's route set decided beside the active one.

A topology's ``route_set.shadow`` names a stored version of its own route set. The
pipeline (:class:`~sieve.flow.pipeline.RouterPipeline`) decides every text event of the
topology's own policy that it encoded in a batch twice: for real with the active
version, and, from the same vectors (one encode serves both), with the shadow: its
match, its learned head (:func:`~sieve.flow.head.decision_scores`), the topology's
thresholds and the event's list hits (:func:`~sieve.flow.list_policy.decide_with_lists`).
The shadow's verdicts are never published as decisions. What comes of them:

- :class:`ShadowStats` per batch: events shadowed, agreed (same outcome and route as
  the active decision), automatic (not ``needs_review``) and novel, and the active
  decisions of the same events that were automatic, and of the events both decided
  automatically, how many they decided alike and how many equivalently (the same
  outcome, and the same route unless that outcome is the route set's default: clean is
  clean whether a benign route or no route gave it); the worker counts them as
  ``sieve_shadow_*_total`` metrics.
- Up to ``max_messages`` disagreements per batch as JSON messages to
  ``output.shadow_topic`` (none without one), keyed by event id.
- The ids of the active decisions it would overturn (both automatic, not equivalent), of
  which the pipeline audits ``review.shadow_audit_share``.

Not shadowed: repeats answered from the cache and events a list decided before the
encoder (they were not encoded in the batch), tenants' events decided with another
policy, and image events.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic_core import to_json

from sieve.contracts import NEEDS_REVIEW
from sieve.encoders.base import TextEncoder
from sieve.flow.decide import novelty_scores
from sieve.flow.head import decision_scores
from sieve.flow.list_policy import decide_with_lists
from sieve.flow.lists import ListHit
from sieve.flow.match import RouteIndex, match_batch
from sieve.flow.tenant_groups import Active, activate
from sieve.kafka.records import Outbound
from sieve.topology import Topology


def equivalent(outcome: str, route: str | None, other_outcome: str, other_route: str | None,
               default: str) -> bool:
    """Whether two decisions are the same decision.

    The same outcome, and the same route unless the outcome is the route set's ``default``
    (clean through a benign route or through none).
    """
    return outcome == other_outcome and (outcome == default or route == other_route)


@dataclass
class ShadowStats:
    """Shadow counts of one batch (or a sum of batches) for one shadow ``version``."""

    version: str
    events: int = 0  # events the shadow decided
    agreed: int = 0  # of them, with the active decision's outcome and route
    automatic: int = 0  # of them, the shadow's outcome not needs_review
    novel: int = 0  # of them, novel by the shadow version's novelty threshold
    active_automatic: int = 0  # of them, the active decision's outcome not needs_review
    both_automatic: int = 0  # of them, decided automatically by both versions
    both_automatic_agreed: int = 0  # of those, with the same outcome and route
    both_automatic_equivalent: int = 0  # of those, the same outcome; the same route unless it is the default

    def add(self, other: ShadowStats) -> None:
        """Add ``other``'s counts (the same version's) to these."""
        if other.version != self.version:
            raise ValueError(f"shadow counts of version {other.version} cannot add to {self.version}'s")
        self.events += other.events
        self.agreed += other.agreed
        self.automatic += other.automatic
        self.novel += other.novel
        self.active_automatic += other.active_automatic
        self.both_automatic += other.both_automatic
        self.both_automatic_agreed += other.both_automatic_agreed
        self.both_automatic_equivalent += other.both_automatic_equivalent


@dataclass
class ShadowBatch:
    """What shadowing one batch produced: its counts and its disagreement messages."""

    stats: ShadowStats
    messages: list[Outbound] = field(default_factory=list)
    disputed: set[str] = field(default_factory=set)  # ids of the active decisions it would overturn


class Shadow:
    """A shadow version of the topology's own route set, decided with the topology's own thresholds.

    Refused (ValueError) at construction: an index of another route set, of another space
    or encoded with another encoder than the worker's text encoder, one whose outcomes have
    no output topic, or one whose head does not fit it.
    """

    def __init__(self, topology: Topology, index: RouteIndex, encoder: TextEncoder,
                 max_messages: int = 20) -> None:
        own = topology.route_set.name
        if index.route_set.name != own:
            raise ValueError(f"shadow: route index of {index.route_set.name!r} is not a version of the "
                             f"topology's route set {own!r}")
        self.topology = topology
        self.active: Active = activate(topology, None, index, "text", encoder)
        self.max_messages = max_messages

    @property
    def index(self) -> RouteIndex:
        """The shadow version's route index."""
        return self.active.index

    def start(self) -> ShadowBatch:
        """Empty counts for a new batch."""
        return ShadowBatch(ShadowStats(self.index.version))

    def decide(self, batch: ShadowBatch, vectors: np.ndarray, rows: Sequence[dict[str, Any]],
               hits: Sequence[list[ListHit]] | None, texts: Sequence[str] | None = None) -> None:
        """Decide the events of ``rows`` (the active decisions) from their ``vectors``; count into ``batch``.

        ``hits``: the events' list hits, as the active decisions were given them; ``texts``: their
        texts, which a head with words needs.
        """
        if not rows:
            return
        index, policy, head = self.active.index, self.active.policy, self.active.head
        match = match_batch(vectors, index, index.aggregation)
        scores = decision_scores(match.route_scores, vectors, index, head, texts)
        _, verdicts = decide_with_lists(scores, policy, novelty_scores(match.nearest_score), hits, index)
        names = index.route_names
        default = policy.default_outcome
        topic = self.topology.output.shadow_topic
        stats = batch.stats
        for row, verdict, score in zip(rows, verdicts, scores.tolist(), strict=True):
            route = names[verdict.route] if verdict.route is not None else None
            agreed = verdict.outcome == row["outcome"] and route == row["route"]
            stats.events += 1
            stats.agreed += agreed
            stats.automatic += verdict.outcome != NEEDS_REVIEW
            stats.novel += bool(verdict.novel)
            stats.active_automatic += row["outcome"] != NEEDS_REVIEW
            both = verdict.outcome != NEEDS_REVIEW and row["outcome"] != NEEDS_REVIEW
            stats.both_automatic += both
            stats.both_automatic_agreed += both and agreed
            same = equivalent(verdict.outcome, route, row["outcome"], row["route"], default)
            stats.both_automatic_equivalent += both and same
            if both and not same:
                batch.disputed.add(row["id"])
            if agreed or topic is None or len(batch.messages) >= self.max_messages:
                continue
            message = {
                "event_id": row["event_id"],
                "decision_id": row["id"],
                "topology": self.topology.name,
                "route_set": index.route_set.name,
                "active": {"version": row["route_set_version"], "outcome": row["outcome"],
                           "route": row["route"], "reason": row["reason"], "score": row["score"]},
                "shadow": {"version": index.version, "outcome": verdict.outcome, "route": route,
                           "reason": verdict.reason,
                           "score": score[verdict.route] if verdict.route is not None else max(score),
                           "novel": verdict.novel},
                "decided_at": row["decided_at"],
            }
            batch.messages.append(Outbound(topic, row["event_id"].encode(), to_json(message),
                                           (("sieve-decision-id", row["id"].encode()),)))
