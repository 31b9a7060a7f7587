"""Fitting for topics the routes lack: calibration events scored as if their own route were gone."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from sieve.cli import app
from sieve.contracts import NEEDS_REVIEW
from sieve.flow.decide import Policy, decide_scores
from sieve.flow.head import LearnedHead
from sieve.flow.match import RouteIndex, match_batch
from sieve.quality.fit import fit_thresholds
from sieve.quality.targets import Targets
from sieve.quality.unseen import REMOVED, Unseen, leave_routes_out
from sieve.routeset import parse_route_set

from .conftest import REPO
from .test_fit import support_jsonl

INTENTS = parse_route_set({
    "name": "intents", "default_outcome": "other",
    "routes": [{"name": n, "outcome": n, "utterances": [n]} for n in ("a", "b", "c")],
})


def unit(*values: float) -> np.ndarray:
    v = np.array(values, np.float32)
    return v / np.linalg.norm(v)


def intent_index() -> RouteIndex:
    """Route a has two examples, b and c one each, in four dimensions."""
    examples = {"a": [("a1", "a1", unit(1, 0, 0, 0)), ("a2", "a2", unit(1, 1, 0, 0))],
                "b": [("b1", "b1", unit(0, 1, 0, 0))], "c": [("c1", "c1", unit(0, 0, 1, 0))]}
    return RouteIndex.from_examples(INTENTS, INTENTS.version, "onehot", examples)


def test_an_event_is_scored_as_if_its_own_routes_were_gone():
    index = intent_index()
    vectors = np.stack([unit(1, 0.2, 0, 0), unit(0, 1, 0.5, 0), unit(0, 0, 0, 1), unit(0.5, 0.5, 1, 0)])
    match = match_batch(vectors, index, INTENTS.aggregation_for("text"))
    labels = [{"a"}, {"b"}, set(), {"a", "b", "c"}]  # unlabelled and every-route events are skipped
    unseen = leave_routes_out(match.route_scores, vectors, labels, ["a", "b", "other", "a"], index)
    assert unseen.gold == ("a", "b")
    assert unseen.scores[0, 0] == REMOVED and unseen.scores[1, 1] == REMOVED
    np.testing.assert_allclose(unseen.scores[0, 1:], match.route_scores[0, 1:])
    np.testing.assert_allclose(unseen.scores[1, [0, 2]], match.route_scores[1, [0, 2]])
    # novelty without the removed route's examples: event 0's nearest left is b1, event 1's is a2
    np.testing.assert_allclose(unseen.novelty, [1 - vectors[0] @ unit(0, 1, 0, 0),
                                                1 - vectors[1] @ unit(1, 1, 0, 0)], rtol=1e-5)
    assert unseen.held is None


def test_a_softmax_head_is_the_same_model_without_the_removed_class():
    index = intent_index()
    head = LearnedHead(("a", "b", "c"), "onehot", "softmax", np.eye(3, 4, dtype=np.float32) * 3,
                       np.zeros(3, np.float32), weight=0.5)
    vectors = np.stack([unit(1, 0.6, 0.3, 0)])
    match = match_batch(vectors, index, INTENTS.aggregation_for("text"))
    unseen = leave_routes_out(match.route_scores, vectors, [{"a"}], ["a"], index, head)
    p = head.probabilities(vectors)[0]
    kept = p[1:] / p[1:].sum()
    np.testing.assert_allclose(unseen.scores[0, 1:], 0.5 * match.route_scores[0, 1:] + 0.5 * kept, rtol=1e-5)
    assert unseen.scores[0, 0] == REMOVED


def intent_scores(n: int, seed: int, unseen: bool) -> tuple[np.ndarray, list[str]]:
    """Three intents: an event scores ~0.8 on its own route and ~0.45 on the others; without
    its own route (``unseen``) its best score is a near neighbour's ~0.6."""
    rng = np.random.default_rng(seed)
    own = rng.integers(0, 3, n)
    scores = rng.normal(0.45, 0.05, (n, 3))
    scores[np.arange(n), own] = rng.normal(0.8, 0.05, n)
    if unseen:
        neighbour = (own + 1) % 3
        scores[np.arange(n), neighbour] = rng.normal(0.6, 0.06, n)
        scores[np.arange(n), own] = REMOVED
    return scores.astype(np.float32), ["abc"[i] for i in own]


def test_fitting_with_unseen_events_keeps_unknown_topics_out_of_automatic_decisions():
    routes = tuple(INTENTS.routes)
    targets = Targets(accuracy=0.95, z=1.0)
    scores, gold = intent_scores(600, 0, unseen=False)
    left_out, left_gold = intent_scores(600, 1, unseen=True)
    unseen = Unseen(left_out, np.zeros(600, np.float32), tuple(left_gold), None).mixed(600, 0.5)
    assert len(unseen.gold) == 600
    plain = fit_thresholds(scores, gold, INTENTS, routes, targets, novel_share=None)
    fitted = fit_thresholds(scores, gold, INTENTS, routes, targets, novel_share=None, unseen=unseen)
    assert fitted.calibration.events == 1200 and fitted.calibration.feasible
    # fresh traffic, half of it from intents the routes lack: only the fit that saw left-out events holds
    known, known_gold = intent_scores(1000, 2, unseen=False)
    new, new_gold = intent_scores(1000, 3, unseen=True)
    base = Policy.for_index(intent_index())
    accuracy = {}
    for name, fit in (("plain", plain), ("unseen", fitted)):
        policy = fit.policy(base)
        out_known = [v.outcome for v in decide_scores(known, policy)]
        out_new = [v.outcome for v in decide_scores(new, policy)]
        decided = [(o, g) for o, g in zip(out_known + out_new, known_gold + new_gold, strict=True)
                   if o != NEEDS_REVIEW]
        accuracy[name] = sum(o == g for o, g in decided) / len(decided)
        if name == "unseen":
            assert sum(o != NEEDS_REVIEW for o in out_new) < 0.05 * len(out_new)
            assert sum(o != NEEDS_REVIEW for o in out_known) > 0.5 * len(out_known)
    assert accuracy["plain"] < 0.9 < 0.95 <= accuracy["unseen"]


def test_the_unseen_share_is_checked():
    unseen = Unseen(np.zeros((2, 3), np.float32), np.zeros(2, np.float32), ("a", "b"), None)
    assert len(unseen.mixed(10, 0.2).gold) == 2  # 0.2 / 0.8 * 10 = 2.5, rounded to even: 2
    for share in (0.0, 0.95, -0.1):
        with pytest.raises(ValueError, match="unseen share"):
            unseen.mixed(10, share)
    with pytest.raises(ValueError, match="no calibration event"):
        Unseen(np.zeros((0, 3), np.float32), np.zeros(0, np.float32), (), None).mixed(10, 0.5)


def test_fit_cli_with_an_unseen_share(tmp_path):
    data = support_jsonl(tmp_path)
    runs = {}
    for name, extra in (("plain", []), ("unseen", ["--unseen-share", "0.5"])):
        out = tmp_path / name
        result = CliRunner().invoke(app, [
            "fit", str(data), "--routes", str(REPO / "routes" / "support.yaml"), "--out", str(out),
            "--min-accuracy", "0.8", "--encoder", "trivial", "--no-cache", "--no-plots", "-q", *extra])
        assert result.exit_code == 0, result.output
        runs[name] = json.loads((out / "support.fitted.thresholds.json").read_text())["nearest"]
    plain, unseen = runs["plain"]["calibration"], runs["unseen"]["calibration"]
    # every labelled calibration row is also left out of its route, as many as the in-domain rows
    assert unseen["events"] == 2 * plain["events"]
    assert unseen["feasible"]
