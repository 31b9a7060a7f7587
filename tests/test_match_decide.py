"""Match and decide: hand-made vectors with known answers, then the real model on the shipped sets."""

from __future__ import annotations

import math
from dataclasses import replace
from datetime import UTC, datetime

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from pydantic_core import to_json

from sieve.contracts import DECISION_SCHEMA_VERSION, NEEDS_REVIEW, Decision, Event, EventView
from sieve.flow.decide import Policy, decide_scores, novelty_scores
from sieve.flow.match import RouteIndex, aggregate, example_id, match_batch, top_columns
from sieve.flow.rows import decision_rows, validate_decisions
from sieve.routeset import RouteSet, parse_route_set
from sieve.thresholds import Aggregation, ThresholdOverrides

# --------------------------------------------------------------------------- aggregate

SIMS = np.array([[0.1, 0.9, 0.5], [0.3, 0.2, 0.4]], dtype=np.float32)


def test_aggregate_max():
    np.testing.assert_allclose(aggregate(SIMS, Aggregation(method="max")), [0.9, 0.4])


def test_aggregate_top_k_mean():
    np.testing.assert_allclose(
        aggregate(SIMS, Aggregation(method="top_k_mean", k=2)), [0.7, 0.35], rtol=1e-6
    )
    np.testing.assert_allclose(
        aggregate(SIMS, Aggregation(method="top_k_mean", k=1)), [0.9, 0.4], rtol=1e-6
    )


def test_aggregate_k_larger_than_examples_is_the_mean_of_all():
    np.testing.assert_allclose(
        aggregate(SIMS, Aggregation(method="top_k_mean", k=10)), SIMS.mean(axis=1), rtol=1e-6
    )


def test_aggregate_single_example():
    column = np.array([[0.25], [-0.5]], dtype=np.float32)
    for agg in (Aggregation(method="max"), Aggregation(method="top_k_mean", k=3)):
        np.testing.assert_allclose(aggregate(column, agg), [0.25, -0.5])


@settings(deadline=None, max_examples=100)
@given(
    sims=arrays(np.float32, st.tuples(st.integers(1, 4), st.integers(1, 6)),
                elements=st.floats(-1, 1, width=32)),
    k=st.integers(1, 8),
)
def test_aggregate_top_k_mean_between_mean_and_max(sims, k):
    top = aggregate(sims, Aggregation(method="top_k_mean", k=k))
    assert top.shape == (sims.shape[0],)
    assert np.all(top <= sims.max(axis=1) + 1e-6)
    assert np.all(top >= sims.mean(axis=1) - 1e-6)
    expected = np.sort(sims, axis=1)[:, ::-1][:, :min(k, sims.shape[1])].mean(axis=1)
    np.testing.assert_allclose(top, expected, atol=1e-6)


# --------------------------------------------------------------------------- hand-made index

HAND = parse_route_set(
    {
        "name": "hand",
        "default_outcome": "clean",
        "defaults": {"aggregation": {"method": "max"}, "accept": 0.9, "review": 0.5,
                     "margin": 0.05},
        "routes": [
            {"name": "a", "outcome": "bad", "utterances": ["a0", "a1"]},
            {"name": "b", "outcome": "clean", "utterances": ["b0"]},
            {"name": "c", "outcome": "bad", "utterances": ["c0", "c1"]},
        ],
    }
)
HAND_VECTORS = {
    "a0": [1.0, 0.0, 0.0],
    "a1": [0.6, 0.8, 0.0],
    "b0": [0.0, 0.0, 1.0],
    "c0": [-1.0, 0.0, 0.0],
    "c1": [0.0, -1.0, 0.0],
}


def hand_index(route_set: RouteSet = HAND, version: str | None = None) -> RouteIndex:
    examples = {
        route.name: [
            (example_id(route_set.name, route.name, text), text, np.array(HAND_VECTORS[text]))
            for text in route.utterances
        ]
        for route in route_set.routes
    }
    return RouteIndex.from_examples(route_set, version or route_set.version, "hand:3d", examples)


def unit(*values: float) -> np.ndarray:
    vector = np.array(values, dtype=np.float32)
    return vector / np.linalg.norm(vector)


Q_A = unit(0.8, 0.6, 0.0)  # closest to a1, then a0
Q_C = unit(-0.6, -0.8, 0.0)  # closest to c1, then c0
Q_B = unit(0.0, 0.0, 1.0)  # exactly b0
Q_NONE = unit(0.3, -0.3, 0.8)  # b below accept, bad routes below review


def test_route_index_layout():
    index = hand_index()
    assert index.route_names == ["a", "b", "c"]
    assert index.bounds == ((0, 2), (2, 3), (3, 5))
    assert index.example_texts == ("a0", "a1", "b0", "c0", "c1")
    assert index.example_route.tolist() == [0, 0, 1, 2, 2]
    assert index.example_ids[0] == example_id("hand", "a", "a0")
    assert index.vectors.shape == (5, 3) and index.vectors.dtype == np.float32


def test_route_index_leaves_out_routes_without_examples_in_its_space():
    examples = {"a": [("id", "a0", np.array([1.0, 0.0, 0.0]))]}
    index = RouteIndex.from_examples(HAND, HAND.version, "hand:3d", examples)
    assert index.route_names == ["a"] and index.bounds == ((0, 1),)
    with pytest.raises(ValueError, match="no examples in the text space"):
        RouteIndex.from_examples(HAND, HAND.version, "hand:3d", {})


def test_example_id_is_deterministic_and_distinct():
    assert example_id("s", "r", "t") == example_id("s", "r", "t")
    assert len({example_id("s", "r", "t"), example_id("s", "r2", "t"),
                example_id("s2", "r", "t"), example_id("s", "r", "t2")}) == 4


def test_match_batch_max():
    result = match_batch(np.stack([Q_A, Q_C]), hand_index(), Aggregation(method="max"))
    np.testing.assert_allclose(result.route_scores, [[0.96, 0.0, -0.6], [-0.6, 0.0, 0.8]],
                               atol=1e-6)
    texts = np.array(hand_index().example_texts)
    assert texts[result.nearest_index].tolist() == [["a1", "a0", "b0"], ["c1", "c0", "b0"]]
    np.testing.assert_allclose(result.nearest_score, [[0.96, 0.8, 0.0], [0.8, 0.6, 0.0]],
                               atol=1e-6)


def test_match_batch_top_k_mean_with_k_above_example_count():
    result = match_batch(np.stack([Q_A, Q_C]), hand_index(),
                         Aggregation(method="top_k_mean", k=5))
    np.testing.assert_allclose(result.route_scores, [[0.88, 0.0, -0.7], [-0.8, 0.0, 0.7]],
                               atol=1e-6)


def test_match_batch_nearest_k():
    result = match_batch(Q_A[None, :], hand_index(), Aggregation(), nearest_k=1)
    assert result.nearest_index.tolist() == [[1]]
    everything = match_batch(Q_A[None, :], hand_index(), Aggregation(), nearest_k=50)
    assert everything.nearest_index.shape == (1, 5)  # capped at the example count
    assert np.all(np.diff(everything.nearest_score[0]) <= 0)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 40).flatmap(lambda cols: st.tuples(
    arrays(np.float32, st.tuples(st.integers(1, 6), st.just(cols)),
           elements=st.floats(-1, 1, width=32)),
    st.integers(1, min(cols, 8)))))
def test_top_columns_are_the_k_highest_best_first(case):
    scores, k = case
    picked, values = top_columns(scores, k)
    assert picked.shape == values.shape == (scores.shape[0], k)
    np.testing.assert_array_equal(values, np.take_along_axis(scores, picked, axis=1))
    np.testing.assert_array_equal(values, -np.sort(-scores, axis=1)[:, :k])  # the k highest, best first
    assert all(len(set(row)) == k for row in picked.tolist())  # k distinct columns


def test_match_batch_empty():
    result = match_batch(np.zeros((0, 3), np.float32), hand_index(), Aggregation())
    assert result.route_scores.shape == (0, 3)
    assert result.nearest_index.shape[0] == 0


# --------------------------------------------------------------------------- decide_scores

POLICY_SET = parse_route_set(
    {
        "name": "policy",
        "default_outcome": "clean",
        "defaults": {"accept": 0.6, "review": 0.4, "margin": 0.05},
        "routes": [
            {"name": "spam", "outcome": "bad", "utterances": ["s"]},
            {"name": "scam", "outcome": "bad", "utterances": ["c"]},
            {"name": "chat", "outcome": "clean", "utterances": ["h"]},
            # a stricter non-default route: own accept and review
            {"name": "abuse", "outcome": "bad", "thresholds": {"accept": 0.8, "review": 0.7},
             "utterances": ["a"]},
        ],
    }
)
SPAM, SCAM, CHAT, ABUSE = range(4)


def policy_index(route_set: RouteSet = POLICY_SET) -> RouteIndex:
    eye = np.eye(len(route_set.routes), dtype=np.float32)
    examples = {
        route.name: [(example_id(route_set.name, route.name, route.utterances[0]),
                      route.utterances[0], eye[i])]
        for i, route in enumerate(route_set.routes)
    }
    return RouteIndex.from_examples(route_set, route_set.version, "onehot", examples)


POLICY = Policy.for_index(policy_index())


def verdict(scores: list[float], policy: Policy = POLICY):
    [result] = decide_scores(np.array([scores], dtype=np.float32), policy)
    return result.outcome, result.reason, result.route


def test_policy_for_index_merges_thresholds():
    np.testing.assert_allclose(POLICY.accept, [0.6, 0.6, 0.6, 0.8])
    np.testing.assert_allclose(POLICY.review, [0.4, 0.4, 0.4, 0.7])
    np.testing.assert_allclose(POLICY.margin, [0.05] * 4)
    assert POLICY.outcomes == ("bad", "bad", "clean", "bad")
    assert POLICY.default_outcome == "clean"
    overridden = Policy.for_index(policy_index(), ThresholdOverrides(accept=0.65, margin=0.1))
    np.testing.assert_allclose(overridden.accept, [0.65, 0.65, 0.65, 0.8])  # route's own wins
    np.testing.assert_allclose(overridden.margin, [0.1] * 4)


@pytest.mark.parametrize(
    ("scores", "expected"),
    [
        # 1. top route at or above its accept: its outcome
        pytest.param([0.9, 0.1, 0.2, 0.0], ("bad", "accept", SPAM), id="accept"),
        pytest.param([0.6, 0.1, 0.2, 0.0], ("bad", "accept", SPAM), id="accept-at-threshold"),
        pytest.param([0.1, 0.1, 0.9, 0.0], ("clean", "accept", CHAT), id="accept-default-route"),
        # ... unless a runner-up with another outcome, in its review band, is within margin
        pytest.param([0.70, 0.1, 0.67, 0.0], (NEEDS_REVIEW, "ambiguous", SPAM), id="ambiguous"),
        pytest.param([0.1, 0.67, 0.70, 0.0], (NEEDS_REVIEW, "ambiguous", CHAT),
                     id="ambiguous-default-on-top"),
        pytest.param([0.70, 0.68, 0.1, 0.0], ("bad", "accept", SPAM),
                     id="runner-up-same-outcome"),
        pytest.param([0.70, 0.1, 0.60, 0.0], ("bad", "accept", SPAM),
                     id="runner-up-outside-margin"),
        # runner-up abuse trails by 0.03 but is below its own review (0.7)
        pytest.param([0.1, 0.1, 0.72, 0.69], ("clean", "accept", CHAT),
                     id="runner-up-below-its-review"),
        # 2. below accept: the best non-default route in its review band
        pytest.param([0.5, 0.1, 0.2, 0.0], (NEEDS_REVIEW, "review_band", SPAM),
                     id="review-band"),
        pytest.param([0.1, 0.1, 0.2, 0.75], (NEEDS_REVIEW, "review_band", ABUSE),
                     id="review-band-route-thresholds"),
        pytest.param([0.1, 0.1, 0.2, 0.70], (NEEDS_REVIEW, "review_band", ABUSE),
                     id="review-band-at-threshold"),
        pytest.param([0.45, 0.1, 0.58, 0.0], (NEEDS_REVIEW, "review_band", SPAM),
                     id="review-band-under-default-top"),
        # a default-outcome route below its accept has no review band
        pytest.param([0.1, 0.1, 0.55, 0.0], ("clean", "no_match", None),
                     id="default-route-below-accept"),
        # abuse at 0.65 would be accepted under the set's accept (0.6), but its own accept
        # is 0.8 and its own review 0.7
        pytest.param([0.1, 0.1, 0.1, 0.65], ("clean", "no_match", None),
                     id="route-accept-and-review-respected"),
        # 3. nothing: the default outcome, no route
        pytest.param([0.1, 0.2, 0.1, 0.3], ("clean", "no_match", None), id="no-match"),
        pytest.param([-0.5, -0.2, -0.9, -1.0], ("clean", "no_match", None), id="all-negative"),
    ],
)
def test_decide_scores_policy(scores, expected):
    assert verdict(scores) == expected


def test_decide_scores_single_route_cannot_be_ambiguous():
    one = parse_route_set({"name": "one", "default_outcome": "clean",
                           "routes": [{"name": "x", "outcome": "bad", "utterances": ["x"]}]})
    policy = Policy.for_index(policy_index(one))
    assert verdict([0.9], policy) == ("bad", "accept", 0)
    assert verdict([0.45], policy) == (NEEDS_REVIEW, "review_band", 0)
    assert verdict([0.1], policy) == ("clean", "no_match", None)


def test_decide_scores_is_row_by_row():
    rows = np.array([[0.9, 0.1, 0.2, 0.0], [0.1, 0.2, 0.1, 0.3], [0.5, 0.1, 0.2, 0.0]],
                    dtype=np.float32)
    assert [v.reason for v in decide_scores(rows, POLICY)] == ["accept", "no_match",
                                                               "review_band"]
    assert decide_scores(np.zeros((0, 4), np.float32), POLICY) == []


@settings(deadline=None, max_examples=300)
@given(st.lists(st.floats(-1, 1, width=32), min_size=4, max_size=4, unique=True))
def test_decide_scores_invariants(values):
    scores = np.array(values, dtype=np.float32)  # distinct: the top route is well defined
    [result] = decide_scores(scores[None, :], POLICY)
    top = int(np.argmax(scores))
    in_band = [i for i in (SPAM, SCAM, ABUSE) if scores[i] >= POLICY.review[i]]
    if result.reason in ("accept", "ambiguous"):
        assert scores[result.route] == scores[top]
        assert scores[result.route] >= POLICY.accept[result.route]
        expected = POLICY.outcomes[result.route] if result.reason == "accept" else NEEDS_REVIEW
        assert result.outcome == expected
    else:
        assert scores[top] < POLICY.accept[top]
        if result.reason == "review_band":
            # the best of the non-default routes that are inside their own review band
            assert result.outcome == NEEDS_REVIEW
            assert result.route == max(in_band, key=lambda i: scores[i])
        else:
            assert result == type(result)("clean", "no_match", None)
            assert in_band == []


def reference_verdicts(route_scores: np.ndarray, policy: Policy) -> list[tuple]:
    """The module docstring's policy, one event at a time, as plainly as it reads."""
    out = []
    for scores in route_scores:
        order = np.argsort(-scores)
        first = int(order[0])
        s1 = float(scores[first])
        if s1 >= policy.accept[first]:
            if len(order) > 1:
                second = int(order[1])
                s2 = float(scores[second])
                if (policy.outcomes[second] != policy.outcomes[first] and s1 - s2 < policy.margin[first]
                        and s2 >= policy.review[second]):
                    out.append((NEEDS_REVIEW, "ambiguous", first))
                    continue
            out.append((policy.outcomes[first], "accept", first))
            continue
        band = [i for i, o in enumerate(policy.outcomes)
                if o != policy.default_outcome and scores[i] >= policy.review[i]]
        if band:
            out.append((NEEDS_REVIEW, "review_band", max(band, key=lambda i: (scores[i], -i))))
        else:
            out.append((policy.default_outcome, "no_match", None))
    return out


@settings(deadline=None, max_examples=200)
@given(arrays(np.float32, st.tuples(st.integers(1, 40), st.just(4)),
              elements=st.floats(-1, 1, width=32)))
def test_decide_scores_vectorised_equals_row_by_row_reference(matrix):
    """The batch decider (one pass over the score matrix) decides each row as the policy reads."""
    got = [(v.outcome, v.reason, v.route) for v in decide_scores(matrix, POLICY)]
    assert got == reference_verdicts(matrix, POLICY)


# --------------------------------------------------------------------------- rows validated as Decisions

DECIDED_AT = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)


def hand_decisions(index: RouteIndex | None = None, **kwargs) -> list[Decision]:
    index = index or hand_index()
    events = [Event(id=f"e{i}", text=f"text {i}") for i in range(4)]
    queries = np.stack([Q_A, Q_C, Q_B, Q_NONE])
    match = match_batch(queries, index, index.route_set.defaults.aggregation)
    return validate_decisions(decision_rows(events, match, index, Policy.for_index(index),
                                            decided_at=DECIDED_AT, **kwargs))


def test_decide_outcomes_and_routes():
    decisions = hand_decisions()
    summary = [(d.event_id, d.outcome, d.reason, d.route) for d in decisions]
    assert summary == [
        ("e0", "bad", "accept", "a"),
        ("e1", NEEDS_REVIEW, "review_band", "c"),
        ("e2", "clean", "accept", "b"),
        ("e3", "clean", "no_match", None),
    ]


def test_decide_scores_margin_and_nearest():
    d_a, d_c, d_b, d_none = hand_decisions()
    assert d_a.score == pytest.approx(0.96, abs=1e-6)
    assert d_a.margin == pytest.approx(0.96, abs=1e-6)  # runner-up b scores 0
    assert d_c.score == pytest.approx(0.8, abs=1e-6)  # the route behind the outcome
    expected_top = float(Q_NONE @ np.array(HAND_VECTORS["b0"]))
    assert d_none.score == pytest.approx(expected_top, abs=1e-6)  # no route: the top score
    for decision in (d_a, d_c, d_b, d_none):
        values = [s.score for s in decision.scores]
        assert values == sorted(values, reverse=True)
        assert decision.margin == pytest.approx(values[0] - values[1], abs=1e-6)
        assert {s.route: s.outcome for s in decision.scores} == {"a": "bad", "b": "clean",
                                                                 "c": "bad"}
    assert [(n.route, n.text) for n in d_a.nearest] == [("a", "a1"), ("a", "a0"), ("b", "b0")]
    assert [n.id for n in d_a.nearest] == [example_id("hand", r, t) for r, t in
                                           [("a", "a1"), ("a", "a0"), ("b", "b0")]]
    assert [n.score for n in d_a.nearest] == pytest.approx([0.96, 0.8, 0.0], abs=1e-6)
    assert [n.text for n in d_c.nearest] == ["c1", "c0", "b0"]


def test_decide_metadata_and_ids():
    index = hand_index()
    times = [DECIDED_AT.timestamp() - 0.25, None, DECIDED_AT.timestamp() - 2.0, None]
    decisions = hand_decisions(index, event_times=times,
                               source_topics=["in", "in", None, "other"])
    for i, decision in enumerate(decisions):
        assert decision.id == Decision.make_id(f"e{i}", index.version)
        assert decision.route_set == "hand"
        assert decision.route_set_version == index.version == HAND.version
        assert decision.encoder == "hand:3d"
        assert decision.decided_by == "router"
        assert decision.decided_at == DECIDED_AT
        assert decision.modality == "text"
        assert decision.event == EventView.of(Event(id=f"e{i}", text=f"text {i}"))
        assert decision.image is None
    assert decisions[0].latency_ms == pytest.approx(250.0, abs=1e-3)
    assert decisions[1].latency_ms is None
    assert decisions[2].latency_ms == pytest.approx(2000.0, abs=1e-3)
    assert [d.source_topic for d in decisions] == ["in", "in", None, "other"]
    # deterministic ids; another route-set version gives other ids
    assert [d.id for d in hand_decisions(index)] == [d.id for d in decisions]
    other = [d.id for d in hand_decisions(hand_index(version="another-version"))]
    assert not set(other) & {d.id for d in decisions}
    # the decision survives its wire format
    assert Decision.model_validate_json(decisions[0].model_dump_json()) == decisions[0]


def test_decision_rows_serialise_to_exactly_the_models_json():
    """The worker publishes rows (no model built per event): byte for byte the Decision's JSON."""
    index = hand_index()
    events = [Event(id=f"e{i}", text=f"text {i}", tenant="t", metadata={"k": [1, "x"]},
                    created_at=DECIDED_AT) for i in range(4)]
    match = match_batch(np.stack([Q_A, Q_C, Q_B, Q_NONE]), index, index.route_set.defaults.aggregation)
    kwargs = {"decided_at": DECIDED_AT, "event_times": [DECIDED_AT.timestamp() - 1, None, None, None],
              "source_topics": ["in"] * 4}
    rows = decision_rows(events, match, index, Policy.for_index(index), **kwargs)
    models = validate_decisions(rows)
    assert len(rows) == len(models) == 4
    for row, model in zip(rows, models, strict=True):
        assert set(row) == set(Decision.model_fields)  # every field, none extra
        assert to_json(row) == model.model_dump_json().encode()
        assert Decision.model_validate_json(to_json(row)) == model


def test_decide_top_routes_limits_scores():
    decisions = hand_decisions(top_routes=2)
    assert all(len(d.scores) == 2 for d in decisions)
    assert [s.route for s in decisions[0].scores] == ["a", "b"]


def test_decide_without_times_or_topics():
    decisions = hand_decisions()
    assert all(d.latency_ms is None and d.source_topic is None for d in decisions)


# --------------------------------------------------------------------------- real model


def route_texts(texts: list[str], index: RouteIndex, encoder) -> list[Decision]:
    events = [Event(id=f"t{i}", text=text) for i, text in enumerate(texts)]
    match = match_batch(encoder.encode(texts), index, index.route_set.defaults.aggregation)
    return validate_decisions(decision_rows(events, match, index, Policy.for_index(index),
                                            decided_at=DECIDED_AT))


def test_built_index_matches_the_set(moderation_index, moderation_set, minilm):
    assert moderation_index.version == moderation_set.version
    assert moderation_index.encoder_id == minilm.id
    total = sum(len(route.utterances) for route in moderation_set.routes)
    assert moderation_index.vectors.shape == (total, 384)
    np.testing.assert_allclose(np.linalg.norm(moderation_index.vectors, axis=1), 1.0, atol=1e-5)
    # an utterance matched against its own set scores ~1 on its own route
    route = moderation_set.routes[0]
    [decision] = route_texts([route.utterances[0]], moderation_index, minilm)
    assert decision.nearest[0].text == route.utterances[0]
    assert decision.nearest[0].score == pytest.approx(1.0, abs=1e-4)


VIOLATING = [
    "send me nude pictures of yourself right now",
    "you are a worthless ugly idiot and everyone hates you",
    "I'm going to kill you and your family",
    "I want to end my life, I have the pills ready",
    "kill all the immigrants, they are vermin",
]
BENIGN = [
    "what a lovely sunny morning, going for a walk with the dog",
    "can anyone recommend a good recipe for banana bread?",
    "the city council approved the new budget for road repairs yesterday",
    "happy birthday grandma, we love you so much",
]


def test_moderation_flags_clearly_violating_texts(moderation_index, minilm):
    decisions = route_texts(VIOLATING, moderation_index, minilm)
    routes = moderation_index.route_set
    for text, decision in zip(VIOLATING, decisions, strict=True):
        assert decision.outcome in ("violating", NEEDS_REVIEW), (text, decision.scores[:3])
        assert decision.route is not None, text
        assert routes.route(decision.route).outcome == "violating", (text, decision.route)


def test_moderation_passes_clearly_benign_texts(moderation_index, minilm):
    for text, decision in zip(BENIGN, route_texts(BENIGN, moderation_index, minilm), strict=True):
        assert decision.outcome == "clean", (text, decision.reason, decision.scores[:3])


SUPPORT = [
    ("I was charged twice on my credit card for the same invoice", "billing"),
    ("my parcel still hasn't arrived and the tracking number doesn't work", "shipping"),
    ("I can't log into the app, it keeps showing an error message", "technical_support"),
    ("what time do you open on Sundays?", "info"),
]


def test_support_intents(support_index, minilm):
    texts = [text for text, _ in SUPPORT]
    for (text, intent), decision in zip(SUPPORT, route_texts(texts, support_index, minilm),
                                        strict=True):
        assert decision.route == intent, (text, decision.scores[:3])
        assert decision.outcome == intent, (text, decision.reason)
        assert decision.score >= support_index.route_set.defaults.accept
        assert not math.isnan(decision.margin)


# --------------------------------------------------------------------------- novelty


def with_novelty(route_set: RouteSet, **novelty: object) -> RouteSet:
    data = route_set.model_dump(mode="json")
    data["defaults"]["novelty"] = novelty
    return parse_route_set(data)


def test_novelty_is_one_minus_the_best_similarity_to_any_example():
    index = hand_index()
    match = match_batch(np.stack([Q_A, Q_C, Q_B, Q_NONE]), index, index.route_set.defaults.aggregation)
    novelty = novelty_scores(match.nearest_score)
    assert novelty.dtype == np.float32
    # a1 (0.96), c1 (0.8), b0 itself (1.0), b0 (0.8 / |(0.3, -0.3, 0.8)|)
    np.testing.assert_allclose(novelty, [0.04, 0.2, 0.0, 1 - 0.8 / math.sqrt(0.82)], atol=1e-6)
    assert novelty_scores(np.zeros((0, 0), np.float32)).shape == (0,)


def test_novel_event_goes_to_review_keeping_reason_no_match():
    index = hand_index(with_novelty(HAND, threshold=0.1))
    decisions = hand_decisions(index)
    summary = [(d.outcome, d.reason, d.route, d.novel) for d in decisions]
    assert summary == [
        ("bad", "accept", "a", False),  # novelty 0.04
        (NEEDS_REVIEW, "review_band", "c", True),  # in a review band anyway
        ("clean", "accept", "b", False),  # an example itself
        (NEEDS_REVIEW, "no_match", None, True),  # far from all: not the default outcome
    ]
    assert [d.novelty for d in decisions] == pytest.approx([0.04, 0.2, 0.0, 0.1166], abs=1e-4)
    assert all(d.schema_version == DECISION_SCHEMA_VERSION for d in decisions)


def test_on_novel_default_gives_novel_events_the_default_outcome():
    index = hand_index(with_novelty(HAND, threshold=0.1, on_novel="default"))
    decisions = hand_decisions(index)
    assert [(d.outcome, d.reason, d.novel) for d in decisions][3] == ("clean", "no_match", True)


def test_novelty_threshold_sits_above_the_event():
    """Novel means above the threshold: an event whose novelty is under it is decided as before."""
    index = hand_index(with_novelty(HAND, threshold=0.15))
    decisions = hand_decisions(index)
    assert [(d.outcome, d.novel) for d in decisions] == [
        ("bad", False), (NEEDS_REVIEW, True), ("clean", False), ("clean", False)]


def test_no_novelty_threshold_decides_as_before():
    index = hand_index()
    assert index.route_set.defaults.novelty is None
    assert "novelty" not in index.route_set.defaults.model_dump()  # so the version hash is unchanged
    decisions = hand_decisions(index)
    assert [(d.outcome, d.reason, d.route, d.novel, d.novelty) for d in decisions] == [
        ("bad", "accept", "a", None, None),
        (NEEDS_REVIEW, "review_band", "c", None, None),
        ("clean", "accept", "b", None, None),
        ("clean", "no_match", None, None, None),
    ]
    # a novelty array changes nothing without a threshold
    scores = np.array([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.95, 0.0]], dtype=np.float32)
    assert decide_scores(scores, POLICY) == decide_scores(scores, POLICY, np.array([0.9, 0.9]))


def test_novel_decision_rows_serialise_to_exactly_the_models_json():
    index = hand_index(with_novelty(HAND, threshold=0.1, baseline=0.05))
    events = [Event(id=f"e{i}", text=f"text {i}") for i in range(4)]
    match = match_batch(np.stack([Q_A, Q_C, Q_B, Q_NONE]), index, index.route_set.defaults.aggregation)
    rows = decision_rows(events, match, index, Policy.for_index(index), decided_at=DECIDED_AT)
    for row, model in zip(rows, validate_decisions(rows), strict=True):
        assert to_json(row) == model.model_dump_json().encode()
        assert isinstance(row["novel"], bool) and isinstance(row["novelty"], float)


def test_novel_event_never_gets_the_default_outcome_automatically():
    novel = replace(POLICY, novelty_threshold=0.5)
    scores = np.array([[0.0, 0.0, 0.9, 0.0],  # chat (clean, the default) accepts it
                       [0.9, 0.0, 0.0, 0.0],  # spam (bad) accepts it
                       [0.0, 0.0, 0.0, 0.0]], dtype=np.float32)  # nothing: no_match
    far = np.array([0.7, 0.7, 0.7], dtype=np.float32)
    got = [(v.outcome, v.reason, v.route, v.novel) for v in decide_scores(scores, novel, far)]
    assert got == [(NEEDS_REVIEW, "accept", CHAT, True), ("bad", "accept", SPAM, True),
                   (NEEDS_REVIEW, "no_match", None, True)]
    near = np.array([0.5, 0.5, 0.5], dtype=np.float32)  # at the threshold: not novel
    assert [v.outcome for v in decide_scores(scores, novel, near)] == ["clean", "bad", "clean"]
    allowed = replace(novel, novel_review=False)
    assert [v.outcome for v in decide_scores(scores, allowed, far)] == ["clean", "bad", "clean"]
    with pytest.raises(ValueError, match="needs the events' novelty"):
        decide_scores(scores, novel)


def test_policy_reads_the_novelty_threshold():
    policy = Policy.for_index(hand_index(with_novelty(HAND, threshold=0.3, on_novel="default")))
    assert policy.novelty_threshold == pytest.approx(0.3)
    assert policy.novel_review is False
    plain = Policy.for_index(hand_index())
    assert plain.novelty_threshold is None and plain.novel_review is True
    assert plain.novel(np.array([0.9])) is None
