"""Multi-label route sets: each route judged on its own, every fired route in the decision and its topic."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest

from sieve.contracts import NEEDS_REVIEW, Decision, Event
from sieve.flow.decide import Policy, decide_scores
from sieve.flow.lists import ListHit
from sieve.flow.match import MatchResult, RouteIndex
from sieve.flow.publish import plan_decisions, route_targets
from sieve.flow.rows import decision_rows, validate_decisions
from sieve.routeset import RouteSet, RouteSetError, parse_route_set
from sieve.topology import OutputSpec
from tests.test_contract_compat import assert_valid
from tests.test_match_decide import policy_index

NOW = datetime(2026, 12, 3, 2, 0, tzinfo=UTC)

BASE = {
    "name": "mod",
    "default_outcome": "clean",
    "mode": "multi",
    "defaults": {"accept": 0.6, "review": 0.4, "margin": 0.05},
    "routes": [
        {"name": "hate", "outcome": "violating", "utterances": ["h"]},
        {"name": "violence", "outcome": "violating", "utterances": ["v"]},
        {"name": "spam", "outcome": "queue", "utterances": ["s"]},
        {"name": "news", "outcome": "clean", "utterances": ["n"]},
        # a stricter category: its own accept and review
        {
            "name": "self-harm",
            "outcome": "violating",
            "thresholds": {"accept": 0.8, "review": 0.7},
            "utterances": ["x"],
        },
    ],
}
HATE, VIOLENCE, SPAM, NEWS, SELF_HARM = range(5)


def multi_set(**changes: object) -> RouteSet:
    return parse_route_set({**BASE, **changes})


INDEX = policy_index(multi_set())
POLICY = Policy.for_index(INDEX)


def decide(scores: list[float], policy: Policy = POLICY):
    [verdict] = decide_scores(np.array([scores], dtype=np.float32), policy)
    return verdict


# --------------------------------------------------------------------------- the route set


def test_a_set_is_single_unless_it_says_multi_and_single_sets_hash_as_before():
    single = {k: v for k, v in BASE.items() if k != "mode"}
    assert parse_route_set(single).mode == "single"
    # mode: single and no severity leave the content (and so the version) as before they existed
    assert parse_route_set({**single, "mode": "single"}).version == parse_route_set(single).version
    assert "mode" not in parse_route_set(single).model_dump(mode="json")
    assert multi_set().version != parse_route_set(single).version


def test_severity_defaults_to_route_order_with_the_default_last_and_must_name_every_outcome():
    assert multi_set().severity_order == ("violating", "queue", "clean")
    assert multi_set(severity=["queue", "violating", "clean"]).severity_order == (
        "queue",
        "violating",
        "clean",
    )
    with pytest.raises(RouteSetError, match="severity"):
        multi_set(severity=["violating", "clean"])  # queue missing
    with pytest.raises(RouteSetError, match="severity"):
        multi_set(severity=["violating", "queue", "clean", "violating"])


# --------------------------------------------------------------------------- the verdict


def test_every_accepted_category_fires_and_the_most_severe_outcome_wins():
    v = decide([0.70, 0.75, 0.90, 0.10, 0.0])
    assert (v.outcome, v.reason, v.route) == ("violating", "accept", VIOLENCE)  # spam scores higher
    assert v.fired == ((SPAM, "accept", False), (VIOLENCE, "accept", False), (HATE, "accept", False))


def test_the_severity_order_is_configurable():
    policy = Policy.for_index(policy_index(multi_set(severity=["queue", "violating", "clean"])))
    v = decide([0.70, 0.75, 0.90, 0.10, 0.0], policy)
    assert (v.outcome, v.route) == ("queue", SPAM)


def test_a_more_severe_route_in_its_review_band_sends_the_event_to_review():
    v = decide([0.45, 0.10, 0.90, 0.10, 0.0])  # spam accepted, hate (more severe) in its band
    assert (v.outcome, v.reason, v.route) == (NEEDS_REVIEW, "review_band", HATE)
    assert v.fired == ((SPAM, "accept", False), (HATE, "review", False))


def test_an_accepted_route_of_equal_severity_settles_a_review_band():
    v = decide([0.45, 0.70, 0.10, 0.10, 0.0])  # hate in band, violence (same outcome) accepted
    assert (v.outcome, v.reason, v.route) == ("violating", "accept", VIOLENCE)
    assert v.fired == ((VIOLENCE, "accept", False), (HATE, "review", False))


def test_a_less_severe_review_band_does_not_hold_back_an_accepted_category():
    v = decide([0.70, 0.10, 0.45, 0.10, 0.0])
    assert (v.outcome, v.route) == ("violating", HATE)


def test_each_route_has_its_own_thresholds():
    assert (
        decide([0.1, 0.1, 0.1, 0.1, 0.75]).outcome == NEEDS_REVIEW
    )  # self-harm: review 0.7, accept 0.8
    assert decide([0.1, 0.1, 0.1, 0.1, 0.65]).outcome == "clean"  # under its own review
    assert decide([0.1, 0.1, 0.1, 0.1, 0.85]).outcome == "violating"


def test_the_margin_applies_between_a_category_and_the_best_benign_route():
    v = decide([0.70, 0.10, 0.10, 0.67, 0.0])  # hate accepted, news within the margin
    assert (v.outcome, v.reason, v.route) == (NEEDS_REVIEW, "ambiguous", HATE)
    assert v.fired == ((HATE, "review", True),)
    # a clear lead over the benign route: accepted
    assert decide([0.70, 0.10, 0.10, 0.60, 0.0]).outcome == "violating"
    # a benign route under its own review threshold does not make anything ambiguous
    assert decide([0.62, 0.10, 0.10, 0.39, 0.0]).outcome == "violating"
    # categories of different outcomes close together are not ambiguous: both fire
    v = decide([0.70, 0.10, 0.69, 0.10, 0.0])
    assert (v.outcome, len(v.fired)) == ("violating", 2)


def test_a_benign_route_decides_only_when_no_category_fired():
    v = decide([0.10, 0.10, 0.10, 0.90, 0.0])
    assert (v.outcome, v.reason, v.route, v.fired) == (
        "clean",
        "accept",
        NEWS,
        ((NEWS, "accept", False),),
    )
    v = decide([0.10, 0.10, 0.10, 0.10, 0.0])
    assert (v.outcome, v.reason, v.route, v.fired) == ("clean", "no_match", None, ())
    strict = Policy.for_index(
        policy_index(multi_set(defaults={**BASE["defaults"], "no_match": "needs_review"}))
    )
    assert decide([0.10, 0.10, 0.10, 0.10, 0.0], strict).outcome == NEEDS_REVIEW


def test_a_novel_event_is_never_clean_automatically_in_multi_mode():
    data = {**BASE, "defaults": {**BASE["defaults"], "novelty": {"threshold": 0.5}}}
    policy = Policy.for_index(policy_index(parse_route_set(data)))
    scores = np.array([[0.1, 0.1, 0.1, 0.9, 0.0], [0.9, 0.1, 0.1, 0.1, 0.0]], dtype=np.float32)
    novel, claimed = decide_scores(scores, policy, np.array([0.8, 0.8], dtype=np.float32))
    assert (novel.outcome, novel.novel, novel.route) == (NEEDS_REVIEW, True, NEWS)
    assert (claimed.outcome, claimed.novel) == ("violating", True)  # a category claimed it


# --------------------------------------------------------------------------- the decision


def rows(score_rows: list[list[float]], index: RouteIndex = INDEX, policy: Policy = POLICY):
    events = [Event(id=f"e{i}", text=f"text {i}") for i in range(len(score_rows))]
    scores = np.array(score_rows, dtype=np.float32)
    match = MatchResult(scores, np.zeros((len(events), 1), np.int64), scores.max(axis=1, keepdims=True))
    return decision_rows(events, match, index, policy, decided_at=NOW)


def test_a_multi_decision_carries_every_fired_route_and_the_categories():
    [row] = rows([[0.45, 0.75, 0.90, 0.10, 0.0]])
    decision = validate_decisions([row])[0]
    assert (decision.outcome, decision.route, decision.mode, decision.final) == (
        "violating",
        "violence",
        "multi",
        True,
    )
    assert [(r.route, r.band) for r in decision.routes] == [
        ("spam", "accept"),
        ("violence", "accept"),
        ("hate", "review"),
    ]
    # categories: every route whose outcome is not the default; flagged when it accepted
    assert decision.categories == {"hate": False, "violence": True, "spam": True, "self-harm": False}
    assert decision.category_scores == pytest.approx(
        {"hate": 0.45, "violence": 0.75, "spam": 0.90, "self-harm": 0.0}
    )
    assert decision.id == Decision.make_id("e0", INDEX.version)  # deterministic as before
    assert_valid("decision", decision.model_dump(mode="json"))  # a v1 consumer reads it


def test_a_decision_waiting_for_review_is_not_final():
    [row] = rows([[0.45, 0.10, 0.10, 0.10, 0.0]])
    assert (row["outcome"], row["final"], row["categories"]["hate"]) == (NEEDS_REVIEW, False, False)


def test_single_mode_decisions_carry_no_multi_fields():
    single = parse_route_set({k: v for k, v in BASE.items() if k != "mode"})
    index = policy_index(single)
    [row] = rows([[0.70, 0.75, 0.10, 0.10, 0.0]], index, Policy.for_index(index))
    assert (row["mode"], row["routes"], row["categories"], row["category_scores"]) == (
        "single",
        None,
        None,
        None,
    )
    assert (row["outcome"], row["route"], row["final"]) == ("violating", "violence", True)


# --------------------------------------------------------------------------- route topics

OUTPUT = OutputSpec(
    outcome_topics={
        "clean": "t.clean",
        "violating": "t.violating",
        "queue": "t.queue",
        "needs_review": "t.review",
    }
)


def topics_of(decisions) -> list[tuple[str, str | None]]:
    return [(m.topic, dict(m.headers).get("sieve-final")) for m in plan_decisions(decisions, OUTPUT)]


def test_every_accepted_route_gets_the_event_once_and_review_bands_do_not():
    [row] = rows([[0.45, 0.75, 0.90, 0.10, 0.0]])
    assert topics_of([row]) == [
        ("t.violating", b"true"),
        ("route.spam", b"true"),
        ("route.violence", b"true"),
    ]


def test_an_event_waiting_for_review_reaches_its_accepted_routes_marked_not_final():
    [row] = rows([[0.45, 0.10, 0.90, 0.10, 0.0]])  # spam accepted, hate in its band
    assert topics_of([row]) == [("t.review", b"false"), ("route.spam", b"false")]


def test_a_verdict_confirming_a_review_band_route_reaches_its_topic_as_final():
    [row] = rows([[0.45, 0.10, 0.90, 0.10, 0.0]])
    verdict = {
        **row,
        "decided_by": "llm",
        "outcome": "violating",
        "route": "hate",
        "final": True,
        "routes": [{**r, "confirmed": r["route"] == "hate"} for r in row["routes"]],
    }
    # the router's accepted route gets the final word too (here: not confirmed, in `routes`)
    assert route_targets(verdict) == ["spam", "hate"]
    assert topics_of([verdict]) == [
        ("t.violating", b"true"),
        ("route.spam", b"true"),
        ("route.hate", b"true"),
    ]


def test_models_and_rows_plan_the_same_messages():
    decided = rows([[0.45, 0.75, 0.90, 0.10, 0.0], [0.45, 0.10, 0.10, 0.10, 0.0]])
    assert plan_decisions(decided, OUTPUT) == plan_decisions(validate_decisions(decided), OUTPUT)


def test_a_decision_from_before_schema_4_still_plans_as_before():
    [row] = rows([[0.70, 0.10, 0.10, 0.10, 0.0]])
    old = {
        k: v
        for k, v in row.items()
        if k not in {"mode", "routes", "categories", "category_scores", "final"}
    }
    assert [(m.topic, dict(m.headers).get("sieve-final")) for m in plan_decisions([old], OUTPUT)] == [
        ("t.violating", None),
        ("route.hate", None),
    ]


# --------------------------------------------------------------------------- list hits


def test_a_list_hit_accepts_its_route_and_the_event_is_still_scored():
    hit = ListHit(list="slurs", entry="t1", route="hate")
    [row] = rows_with_hits([[0.10, 0.75, 0.10, 0.10, 0.0]], [[hit]])
    decision = validate_decisions([row])[0]
    assert decision.outcome == "violating"
    # both fired: the list's route (score 1) and the scored one
    assert [(r.route, r.band, r.score) for r in decision.routes] == [
        ("hate", "accept", 1.0),
        ("violence", "accept", pytest.approx(0.75)),
    ]
    assert decision.list_hits[0].entry == "t1"
    assert decision.categories["hate"] and decision.categories["violence"]


def test_a_list_hit_on_a_less_severe_route_leaves_a_severe_review_band_to_review():
    hit = ListHit(list="spam-list", entry="s1", route="spam")
    [row] = rows_with_hits([[0.45, 0.10, 0.10, 0.10, 0.0]], [[hit]])
    assert (row["outcome"], row["reason"], row["route"]) == (NEEDS_REVIEW, "review_band", "hate")
    assert row["categories"]["spam"] is True


def test_in_single_mode_a_block_hit_decides_by_its_route_as_the_prefilter_does():
    # the worker decides these before encoding (sieve.flow.prefilter.list_row); eval scores every
    # event and decides them through the same list policy, so both give the hit's route
    single = parse_route_set({k: v for k, v in BASE.items() if k != "mode"})
    index = policy_index(single)
    hit = ListHit(list="slurs", entry="t1", route="hate")
    [row] = rows_with_hits([[0.10, 0.75, 0.10, 0.10, 0.0]], [[hit]], index, Policy.for_index(index))
    assert (row["outcome"], row["reason"], row["route"]) == ("violating", "accept", "hate")
    [plain] = rows_with_hits([[0.10, 0.75, 0.10, 0.10, 0.0]], [[]], index, Policy.for_index(index))
    assert plain["route"] == "violence"


def rows_with_hits(score_rows, hits, index: RouteIndex = INDEX, policy: Policy = POLICY):
    events = [Event(id=f"e{i}", text=f"text {i}") for i in range(len(score_rows))]
    scores = np.array(score_rows, dtype=np.float32)
    match = MatchResult(scores, np.zeros((len(events), 1), np.int64), scores.max(axis=1, keepdims=True))
    return decision_rows(events, match, index, policy, decided_at=NOW, list_hits=hits)
