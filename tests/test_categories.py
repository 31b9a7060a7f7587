"""Per-category measures (multi-label against top-1), k-fold splits, and per-category threshold fits."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from sieve.cli import app
from sieve.cli.quality import parse_targets
from sieve.contracts import NEEDS_REVIEW
from sieve.flow.decide import Policy, decide_scores
from sieve.quality import categories as cat
from sieve.quality.datasets import LabelledExample
from sieve.quality.fit import ACCEPT_GRID
from sieve.quality.metrics import wilson
from sieve.quality.targets import Targets
from sieve.routeset import load_route_set

HATE, VIOLENCE, NEWS = range(3)
POLICY = Policy(
    accept=np.array([0.6, 0.6, 0.6], np.float32), review=np.array([0.4, 0.4, 0.4], np.float32),
    margin=np.array([0.05, 0.05, 0.05], np.float32), outcomes=("violating", "violating", "clean"),
    default_outcome="clean", rank=np.array([0, 0, 1]),
)
# hate, violence, news
SCORES = np.array([
    [0.80, 0.70, 0.10],  # both categories accept: multi flags both, top-1 only hate
    [0.30, 0.65, 0.20],  # violence
    [0.50, 0.10, 0.30],  # hate in its review band: nothing flagged, review
    [0.10, 0.10, 0.90],  # clean
    [0.70, 0.20, 0.68],  # hate too close to news: ambiguous, review
], dtype=np.float32)


def ex(i: int, labels: set[str], unknown: set[str] = frozenset()) -> LabelledExample:  # type: ignore[assignment]
    return LabelledExample(str(i), f"t{i}", "violating" if labels else "clean", frozenset(labels),
                           frozenset(unknown))


EXAMPLES = [ex(0, {"hate", "violence"}), ex(1, {"violence"}), ex(2, {"hate"}), ex(3, set(), {"hate"}),
            ex(4, {"hate"}, {"violence"})]


def test_per_category_counts_multi_against_top1():
    labels = cat.category_labels(EXAMPLES, ["hate", "violence"])
    multi = decide_scores(SCORES, replace(POLICY, multi=True))
    single = decide_scores(SCORES, POLICY)
    m = {x.name: x for x in cat.category_measures(cat.multi_flags(multi, [HATE, VIOLENCE]), labels)}
    s = {x.name: x for x in cat.category_measures(cat.top1_flags(single, [HATE, VIOLENCE]), labels)}
    # hate: known positives 0, 2, 4; event 3's hate label is unknown and left out
    hate = m["hate"]
    assert (hate.positives, hate.flagged, hate.true_positives, hate.unknown) == (3, 1, 1, 1)
    assert m["hate"].recall == pytest.approx(1 / 3) and m["hate"].precision == 1.0
    assert m["hate"].recall_ci == pytest.approx(wilson(1, 3))
    assert m["hate"].f1 == pytest.approx(2 * (1 / 3) / (1 + 1 / 3))
    # violence: multi flags events 0 and 1; top-1 only event 1 (event 0's top route is hate)
    assert (m["violence"].positives, m["violence"].flagged, m["violence"].true_positives) == (2, 2, 2)
    assert m["violence"].unknown == 1
    assert (s["violence"].flagged, s["violence"].true_positives, s["violence"].recall) == (1, 1, 0.5)
    assert (s["hate"].flagged, s["hate"].true_positives) == (1, 1)
    # binary: 0, 1 violating, 3 clean automatically; 2 and 4 to review, in both modes
    gold = [e.gold("clean") for e in EXAMPLES]
    for verdicts in (multi, single):
        outcomes = [v.outcome for v in verdicts]
        assert outcomes == ["violating", "violating", NEEDS_REVIEW, "clean", NEEDS_REVIEW]
        b = cat.binary_measures(outcomes, gold)
        assert (b.events, b.auto, b.correct, b.accuracy) == (5, 3, 3, 1.0)
        assert b.auto_share == pytest.approx(0.6)


def test_a_category_nothing_flags_has_no_precision():
    labels = cat.category_labels(EXAMPLES, ["hate"])
    [m] = cat.category_measures(np.zeros((5, 1), bool), labels)
    assert (m.flagged, m.precision, m.recall, m.f1) == (0, None, 0.0, None)


def test_kfold_partitions_deterministically_and_stratified():
    strata = ["a"] * 23 + ["b"] * 7 + [""] * 50
    folds = cat.kfold(strata, 5, seed=3)
    assert len(folds) == 5
    joined = np.concatenate(folds)
    assert sorted(joined.tolist()) == list(range(80))  # a partition: every event in exactly one fold
    again = cat.kfold(strata, 5, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(folds, again, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(folds, cat.kfold(strata, 5, seed=4), strict=True))
    for stratum, size in (("a", 23), ("b", 7), ("", 50)):
        per_fold = [sum(strata[i] == stratum for i in fold) for fold in folds]
        assert max(per_fold) - min(per_fold) <= 1 and sum(per_fold) == size
    with pytest.raises(ValueError):
        cat.kfold(strata, 1, seed=0)


def synthetic(n: int, seed: int) -> tuple[np.ndarray, cat.CategoryLabels]:
    """Two categories and a benign route; positives score higher on their route, with overlap."""
    rng = np.random.default_rng(seed)
    pos = rng.random((n, 2)) < np.array([0.3, 0.15])
    s = np.where(pos, rng.normal(0.62, 0.1, (n, 2)), rng.normal(0.42, 0.1, (n, 2)))
    benign = rng.normal(0.45, 0.1, (n, 1))
    known = rng.random((n, 2)) > 0.1
    return np.hstack([s, benign]).astype(np.float32), cat.CategoryLabels(("hate", "violence"), pos, known)


def test_category_fit_meets_each_target_on_what_it_fitted():
    scores, labels = synthetic(800, 0)
    targets = [0.9, 0.8]
    fit = cat.fit_category_thresholds(scores, labels, [HATE, VIOLENCE], POLICY, targets, z=1.0)
    cat.check_fit_agrees_with_worker(scores, labels, [HATE, VIOLENCE], POLICY, fit)
    assert fit.met == (True, True)
    policy = replace(fit.policy(POLICY), multi=True)
    flags = cat.multi_flags(decide_scores(scores, policy), [HATE, VIOLENCE])
    measures = cat.category_measures(flags, labels, z=1.0)
    for j, (m, target) in enumerate(zip(measures, targets, strict=True)):
        assert m.flagged > 20 and m.precision_ci[0] >= target
        # the lowest such threshold: one grid step lower misses the target
        lower = ACCEPT_GRID[ACCEPT_GRID.index(float(fit.accept[j])) - 1]
        looser = replace(policy, accept=policy.accept.copy())
        looser.accept[j] = lower
        m_low = cat.category_measures(cat.multi_flags(decide_scores(scores, looser), [HATE, VIOLENCE]),
                                      labels, z=1.0)[j]
        assert m_low.precision_ci[0] < target
        # review keeps the route's width
        assert fit.review[j] == pytest.approx(fit.accept[j] - 0.2)
    # the benign route is left as it was; a stricter target costs recall
    assert fit.accept[NEWS] == pytest.approx(0.6)
    strict = cat.fit_category_thresholds(scores, labels, [HATE, VIOLENCE], POLICY, [0.97, 0.8], z=1.0)
    assert strict.accept[HATE] > fit.accept[HATE]


def test_category_fit_when_no_threshold_meets_the_target():
    scores, labels = synthetic(300, 1)
    fit = cat.fit_category_thresholds(scores, labels, [HATE, VIOLENCE], POLICY, [1.0, 0.8], z=1.0)
    assert fit.met == (False, True) and fit.accept[HATE] == 1.0


def test_targets_per_route_outcome_accuracy_or_default():
    s = load_route_set(Path(__file__).resolve().parents[1] / "routes" / "moderation.yaml")
    positions = cat.category_positions(s.routes, s.default_outcome, ["hate", "sexual", "news_and_discussion"])
    assert [s.routes[p].name for p in positions] == ["sexual", "hate"]  # a benign route is no category
    targets = parse_targets(["hate=0.95"], None, 1.0)
    assert cat.category_targets(s.routes, positions, targets) == [cat.DEFAULT_PRECISION, 0.95]
    by_outcome = Targets(precision={"violating": 0.85, "hate": 0.97})
    assert cat.category_targets(s.routes, positions, by_outcome) == [0.85, 0.97]
    assert cat.category_targets(s.routes, positions, Targets(accuracy=0.8)) == [0.8, 0.8]


MULTI_SET = {
    "name": "tiny", "default_outcome": "clean", "mode": "multi",
    "defaults": {"accept": 0.5, "review": 0.3, "margin": 0.02},
    "routes": [
        {"name": "hate", "outcome": "violating", "utterances": ["hate those people", "those people vermin"]},
        {"name": "violence", "outcome": "violating", "utterances": ["punch him hard", "beat him up"]},
        {"name": "chat", "outcome": "clean", "utterances": ["nice weather today", "lunch was good"]},
    ],
}


def write_tiny(tmp_path: Path) -> tuple[Path, Path]:
    routes = tmp_path / "tiny.yaml"
    routes.write_text(yaml.safe_dump(MULTI_SET))
    rows = [{"text": f"hate those people {i}", "labels": {"hate": 1, "violence": 0}, "outcome": "violating"}
            for i in range(12)]
    rows += [{"text": f"beat him up {i}", "labels": {"hate": 0, "violence": 1}, "outcome": "violating"}
             for i in range(12)]
    rows += [{"text": f"nice weather {i}", "labels": {"hate": 0, "violence": None}} for i in range(24)]
    data = tmp_path / "tiny.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    return routes, data


def test_fit_cli_of_a_multi_set_writes_per_category_thresholds(tmp_path):
    routes, data = write_tiny(tmp_path)
    out = tmp_path / "fit"
    result = CliRunner().invoke(app, ["fit", str(data), "--routes", str(routes), "--out", str(out),
                                      "--min-precision", "hate=0.8", "--z", "0", "--encoder", "trivial",
                                      "--no-cache", "--no-plots"])
    assert result.exit_code == 0, result.output
    fitted = load_route_set(out / "tiny.fitted.yaml")
    assert fitted.mode == "multi"
    assert {r.name for r in fitted.routes if r.thresholds is not None} == {"hate", "violence"}
    report = json.loads((out / "categories.json").read_text())
    assert report["targets"] == {"hate": 0.8, "violence": cat.DEFAULT_PRECISION}
    assert [s["label"] for s in report["systems"]] == ["multi-label, fitted", "top-1, fitted"]


def test_eval_folds_cli_reports_per_category(tmp_path):
    routes, data = write_tiny(tmp_path)
    out = tmp_path / "eval"
    result = CliRunner().invoke(app, ["eval", str(data), "--routes", str(routes), "--out", str(out),
                                      "--folds", "3", "--encoder", "trivial", "--no-cache", "--no-plots"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "categories.json").read_text())
    hate = report["systems"][0]["categories"][0]
    assert hate["category"] == "hate" and hate["positives"] == 12 and hate["unknown"] == 0
    violence = report["systems"][0]["categories"][1]
    assert violence["positives"] == 12 and violence["unknown"] == 24
    assert all(len(v) == 3 for v in report["thresholds"].values())
    assert "| hate |" in (out / "categories.md").read_text()
