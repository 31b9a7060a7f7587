"""A few hand-offs for a newcomer's first look at the console (``sieve console --dev --seed N``).

The demo's sample messages go through the router's own pipeline (the topology's encoder
and route set, so the scores and nearest examples are real) and are handed to the
human-review topic as the reviewer hands events off, with the reason ``seeded_example``:
they are marked as seeded, and no LLM answer is made up for them.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

from sieve.contracts import Decision, Review
from sieve.encoders.base import TextEncoder
from sieve.flow.match import RouteIndex
from sieve.flow.pipeline import RouterPipeline
from sieve.kafka.records import Outbound, RawRecord
from sieve.review.steps import handoff_decision, plan_review
from sieve.routeset import RouteSet
from sieve.topology import ReviewSpec, Topology

SEEDED = "seeded_example"


def seed_handoffs(topology: Topology, route_set: RouteSet, encoder: TextEncoder, samples: Path, count: int,
                  model: str) -> list[Outbound]:
    """``count`` hand-offs of the sample messages (JSON lines of events) for the human-review topic."""
    events = [json.loads(line) for line in samples.read_text(encoding="utf-8").splitlines() if line.strip()]
    now = datetime.now(UTC)
    records = [RawRecord("seed", 0, i, str(e["id"]).encode(), json.dumps(e).encode(), now.timestamp())
               for i, e in enumerate(events[:count])]
    pipeline = RouterPipeline(topology=topology, encoder=encoder, index=RouteIndex.build(route_set, encoder),
                              worker="console-seed")
    decisions: list[Decision] = pipeline.process(records).decisions
    why = "seeded by `sieve console --seed` so the queue is not empty"
    handoffs = [handoff_decision(d, Review(model=model, handoff_reason=SEEDED, error=why,
                                           router_decision_id=d.id), now) for d in decisions]
    # published as the reviewer publishes its hand-offs (same key and headers)
    return plan_review(handoffs, topology.output, (topology.review or ReviewSpec()).human_review_topic)
