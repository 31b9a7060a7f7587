"""The ranking behind "at the common share": distances under each verdict rule, calibrated per outcome."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from sieve.contracts import NEEDS_REVIEW
from sieve.flow.decide import Policy, decide_scores
from sieve.quality import categories_rank as rank
from sieve.quality.categories_run import decide_ranked

HATE, VIOLENCE, NEWS = range(3)
POSITIONS = [HATE, VIOLENCE]
POLICY = Policy(
    accept=np.array([0.75, 0.50, 0.60], np.float32), review=np.array([0.55, 0.30, 0.40], np.float32),
    margin=np.array([0.0, 0.0, 0.0], np.float32), outcomes=("violating", "violating", "clean"),
    default_outcome="clean", rank=np.array([0, 0, 1]),
)


def test_multi_distance_is_the_largest_lead_of_an_accepted_category():
    # hate scores highest but only just clears 0.75; violence clears its 0.50 by 0.20:
    # the decision stays violating until both drop, so it is 0.20 from changing, not 0.05
    scores = np.array([[0.80, 0.70, 0.10]], np.float32)
    verdicts = decide_scores(scores, replace(POLICY, multi=True))
    assert verdicts[0].outcome == "violating" and verdicts[0].route == HATE
    assert rank.distance(verdicts, scores, POLICY, POSITIONS, multi=True)[0] == pytest.approx(0.20, abs=1e-6)
    # top-1 stays violating only while hate, the top route, stays accepted
    single = decide_scores(scores, POLICY)
    assert rank.distance(single, scores, POLICY, POSITIONS, multi=False)[0] == pytest.approx(0.05, abs=1e-6)


def test_distance_counts_the_way_to_ambiguity_with_benign_content():
    # hate clears 0.60 by 0.20 but leads news, inside its review band, by 0.10 with a 0.04
    # margin: 0.06 more for news and the decision is ambiguous, in both modes
    policy = replace(POLICY, accept=np.array([0.60, 0.50, 0.60], np.float32),
                     margin=np.array([0.04, 0.04, 0.04], np.float32))
    scores = np.array([[0.80, 0.10, 0.70]], np.float32)
    for multi in (True, False):
        verdicts = decide_scores(scores, replace(policy, multi=multi))
        assert verdicts[0].outcome == "violating"
        dist = rank.distance(verdicts, scores, policy, POSITIONS, multi=multi)
        assert dist[0] == pytest.approx(0.06, abs=1e-6)
        # news 0.065 higher: now ambiguous, review
        nearer = scores + np.array([[0.0, 0.0, 0.065]], np.float32)
        assert decide_scores(nearer, replace(policy, multi=multi))[0].outcome == NEEDS_REVIEW


def test_default_outcome_distance_is_the_closest_category_below_its_review():
    scores = np.array([[0.40, 0.25, 0.20], [0.50, 0.45, 0.10]], np.float32)
    verdicts = decide_scores(scores, replace(POLICY, multi=True))
    assert [v.outcome for v in verdicts] == ["clean", NEEDS_REVIEW]
    # hate 0.15 below 0.55, violence 0.05 below 0.30: the closer one counts; review has none
    dist = rank.distance(verdicts, scores, POLICY, POSITIONS, multi=True)
    assert dist == pytest.approx([0.05, 0.0], abs=1e-6)


def test_calibrated_ranking_keeps_accurate_defaults_before_weak_category_decisions():
    # fitted on: clean decisions close to the review threshold are always right, category
    # decisions far above accept are right half the time
    outcomes = ["clean"] * 4 + ["violating"] * 4
    gold = ["clean"] * 4 + ["violating", "clean", "violating", "clean"]
    dist = np.array([0.01, 0.02, 0.03, 0.04, 0.10, 0.15, 0.20, 0.25])
    calibrator = rank.Calibrator.fit(outcomes, gold, dist)
    # ranked: a clean decision 0.02 below review, a violating one 0.12 above accept
    held, held_dist = ["clean", "violating", NEEDS_REVIEW], np.array([0.02, 0.12, 0.0])
    accuracy = calibrator.accuracy(held, held_dist)
    assert accuracy[0] == pytest.approx(1.0) and accuracy[1] == pytest.approx(0.5) and accuracy[2] == 0.0
    assert rank.ranked_keep(held, accuracy, held_dist, 1) == ["clean", NEEDS_REVIEW, NEEDS_REVIEW]
    # raw distances alone would have kept the violating decision instead
    assert rank.ranked_keep(held, np.zeros(3), held_dist, 1) == [NEEDS_REVIEW, "violating", NEEDS_REVIEW]


def test_ranked_keep_keeps_everything_automatic_when_keep_is_the_automatic_count():
    held = ["clean", NEEDS_REVIEW, "violating"]
    assert rank.ranked_keep(held, np.array([0.2, 0.0, 0.9]), np.zeros(3), 2) == held


def test_an_outcome_never_seen_when_fitting_ranks_last():
    calibrator = rank.Calibrator.fit(["clean", "clean"], ["clean", "violating"], np.array([0.1, 0.2]))
    assert calibrator.accuracy(["violating", "clean"], np.array([0.5, 0.15])).tolist()[0] == 0.0


def test_the_ranking_is_fitted_on_other_events_than_it_ranks():
    rng = np.random.default_rng(0)
    scores = rng.uniform(0.0, 1.0, size=(40, 3)).astype(np.float32)
    novelty = np.zeros(40, np.float32)
    gold = ["violating" if s[:2].max() > 0.6 else "clean" for s in scores]
    fitted_on, ranked = np.arange(30), np.arange(30, 40)
    m, s = decide_ranked(scores, novelty, gold, POLICY, POSITIONS, fitted_on, ranked)
    flipped = gold[:30] + ["clean" if g == "violating" else "violating" for g in gold[30:]]
    m2, s2 = decide_ranked(scores, novelty, flipped, POLICY, POSITIONS, fitted_on, ranked)
    # the ranked events' own labels change nothing in their estimated accuracy
    assert np.array_equal(m.accuracy, m2.accuracy) and np.array_equal(s.accuracy, s2.accuracy)
    assert len(m.verdicts) == len(s.verdicts) == 10
    # and the fitted-on events' labels do
    other = ["clean" if g == "violating" else "violating" for g in gold[:30]] + gold[30:]
    m3, _ = decide_ranked(scores, novelty, other, POLICY, POSITIONS, fitted_on, ranked)
    assert not np.array_equal(m.accuracy, m3.accuracy)
