"""Audits: a sample of the router's automatic decisions labelled by the reviewer, published as labels only."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from sieve.contracts import NEEDS_REVIEW, Label
from sieve.flow.publish import audited, plan_audits
from sieve.review.metrics import count_audits
from sieve.review.steps import (
    MALFORMED_REPLY,
    ReviewCatalogue,
    handoff_decision,
    parse_reply,
    plan_review,
    reviewed_decision,
)
from sieve.review.worker import review_topics
from sieve.routeset import load_route_set
from sieve.topology import OutputSpec, load_topology

from .review_helpers import ROUTE_SET, make_decision
from .test_review import _review

CATALOGUE = ReviewCatalogue.from_route_set(ROUTE_SET)
OUTPUT = OutputSpec(outcome_topics={"clean": "t.clean", "violating": "t.violating",
                                    "needs_review": "t.needs-review"}, route_topic_prefix="t.route.")
REPO = Path(__file__).resolve().parent.parent


def test_the_sample_is_the_share_asked_and_the_same_for_the_same_decision() -> None:
    ids = [str(uuid.UUID(int=i * 7919 + 1)) for i in range(20_000)]
    for share in (0.05, 0.3):
        picked = [audited(i, share) for i in ids]
        assert sum(picked) / len(ids) == pytest.approx(share, abs=0.01)
        assert picked == [audited(i, share) for i in ids]  # a redelivered decision: the same answer
    assert not any(audited(i, 0.0) for i in ids[:500]) and all(audited(i, 1.0) for i in ids[:500])


def test_plan_audits_copies_sampled_automatic_decisions_only() -> None:
    rows = [make_decision(f"e{i}", outcome="clean" if i % 2 else NEEDS_REVIEW).model_dump(mode="json")
            for i in range(10)]
    messages = plan_audits(rows, "t.audit", 1.0)
    assert [m.key for m in messages] == [f"e{i}".encode() for i in range(1, 10, 2)]
    assert {m.topic for m in messages} == {"t.audit"}
    assert all(("sieve-audit", b"true") in m.headers and ("sieve-outcome", b"clean") in m.headers
               for m in messages)
    assert json.loads(messages[0].value)["id"] == rows[1]["id"]
    assert plan_audits(rows, "t.audit", 0.0) == []


def test_an_audit_verdict_is_a_label_only_and_an_unanswered_audit_nothing() -> None:
    automatic = make_decision("a", outcome="clean")
    reply = parse_reply('{"verdict": "violating", "route": "insult", "confidence": 0.9, "rationale": "r"}',
                        CATALOGUE)
    now = automatic.decided_at + timedelta(seconds=1)
    verdict = reviewed_decision(automatic, reply, _review(verdict="violating", route="insult"), now)
    [message] = plan_review([verdict], OUTPUT, "t.human", "t.labels", [automatic])
    label = Label.model_validate_json(message.value)
    assert message.topic == "t.labels"  # the router's decision stands: no verdict on any topic
    assert (label.outcome, label.router_outcome, label.router_decision_id) == ("violating", "clean",
                                                                               automatic.id)
    handed = handoff_decision(automatic, _review(handoff_reason=MALFORMED_REPLY, error="x"), now)
    assert plan_review([handed], OUTPUT, "t.human", "t.labels", [automatic]) == []
    # a needs-review decision reviewed beside it is published as ever
    pending = make_decision("b")
    final = reviewed_decision(pending, reply, _review(verdict="violating", route="insult"), now)
    topics = [m.topic for m in plan_review([verdict, final], OUTPUT, "t.human", "t.labels",
                                           [automatic, pending])]
    assert topics == ["t.labels", "t.violating", "t.route.insult", "t.labels"]


def test_audits_are_counted_by_whether_the_llm_agrees() -> None:
    def value(result: str) -> float:
        return REGISTRY.get_sample_value("sieve_review_audits_total",
                                         {"topology": "audit-t", "result": result}) or 0.0

    automatic, pending = make_decision("a", outcome="clean"), make_decision("b")
    agree = parse_reply('{"verdict": "clean", "route": null, "confidence": 0.9, "rationale": ""}', CATALOGUE)
    now = automatic.decided_at
    finals = [reviewed_decision(automatic, agree, _review(verdict="clean"), now),
              reviewed_decision(pending, agree, _review(verdict="clean"), now)]
    count_audits("audit-t", [automatic, pending], finals)
    handed = handoff_decision(automatic, _review(handoff_reason=MALFORMED_REPLY, error="x"), now)
    count_audits("audit-t", [automatic], [handed])
    assert (value("agrees"), value("differs"), value("none")) == (1.0, 0.0, 1.0)


def test_the_audit_topic_is_created_and_read_only_when_audits_are_on() -> None:
    route_set = load_route_set(REPO / "routes" / "moderation.yaml")
    base = load_topology(REPO / "topologies" / "moderation.yaml")
    on = base.model_copy(update={"review": base.review.model_copy(update={"audit_share": 0.02})})
    assert "sieve.audit" in on.output_topics(route_set)
    assert "sieve.audit" not in base.output_topics(route_set)
    outcomes, names = route_set.outcomes, [r.name for r in route_set.routes]
    assert "sieve.audit" in review_topics(on, outcomes, names)
    assert "sieve.audit" not in review_topics(base, outcomes, names)
