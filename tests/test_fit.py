"""sieve fit: the vectorised decider, the search, and held-out precision on both public sets."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from sieve.cli import app
from sieve.contracts import NEEDS_REVIEW
from sieve.flow.decide import Policy, decide_scores, novelty_scores
from sieve.flow.match import RouteIndex
from sieve.quality.datasets import load_clinc150
from sieve.quality.decider import REVIEW, FastDecider, GroupDecider, Params
from sieve.quality.fit import (
    MARGIN_GRID,
    NOVEL_SHARE,
    WIDTH_GRID,
    declare_novel_default,
    fit_novelty,
    fit_thresholds,
    novel_default_holds,
)
from sieve.quality.metrics import wilson
from sieve.quality.report import write_report
from sieve.quality.report_markdown import SECTIONS
from sieve.quality.runner import run_build, run_fit
from sieve.quality.scoring import score_split
from sieve.quality.splits import split_data
from sieve.quality.targets import Targets
from sieve.quality.workbench import Workbench
from sieve.routeset import Route, head_path_for, load_route_set, parse_route_set

from .progress_helpers import RecordingProgress

REPO = Path(__file__).resolve().parents[1]
DATASETS = REPO / "data"

# --------------------------------------------------------------------------- the decider


@settings(deadline=None, max_examples=150)
@given(
    data=st.data(),
    routes=st.integers(1, 5),
    events=st.integers(1, 30),
    no_match_review=st.booleans(),
)
def test_fast_decider_agrees_with_decide_scores(data, routes, events, no_match_review):
    # coarse score values make ties between routes common
    scores = np.array(
        data.draw(st.lists(st.lists(st.sampled_from([0.1, 0.3, 0.45, 0.5, 0.55, 0.7, 0.9]), min_size=routes,
                                    max_size=routes), min_size=events, max_size=events)),
        dtype=np.float32,
    )
    outcomes = tuple(data.draw(st.lists(st.sampled_from(["clean", "bad", "other"]), min_size=routes,
                                        max_size=routes)))
    accept = np.array(data.draw(st.lists(st.sampled_from([0.3, 0.5, 0.55, 0.7, 1.0]), min_size=routes,
                                         max_size=routes)))
    width = np.array(data.draw(st.lists(st.sampled_from([0.0, 0.05, 0.2, 2.0]), min_size=routes,
                                        max_size=routes)))
    margin = np.array(data.draw(st.lists(st.sampled_from([0.0, 0.05, 0.2, 0.3]), min_size=routes,
                                         max_size=routes)))
    params = Params(accept, width, margin, no_match_review)
    decider = FastDecider(scores, outcomes, "clean")
    policy = Policy(params.accept.astype(np.float32), params.review.astype(np.float32),
                    params.margin.astype(np.float32), outcomes, "clean", no_match_review)
    expected = [REVIEW if v.outcome == NEEDS_REVIEW else decider.code[v.outcome]
                for v in decide_scores(scores, policy)]
    assert decider.decide(params).tolist() == expected


def test_no_match_goes_to_review_when_the_set_says_so():
    base = {"name": "s", "default_outcome": "clean",
            "defaults": {"aggregation": {"method": "max"}, "accept": 0.8, "review": 0.6},
            "routes": [{"name": "a", "outcome": "bad", "utterances": ["x"]}]}
    scores = np.array([[0.9], [0.7], [0.1]], np.float32)
    for no_match, last in (("default", "clean"), ("needs_review", NEEDS_REVIEW)):
        route_set = parse_route_set({**base, "defaults": {**base["defaults"], "no_match": no_match}})
        index = RouteIndex.from_examples(route_set, route_set.version, "e", {"a": [("i", "x", np.ones(2))]})
        verdicts = decide_scores(scores, Policy.for_index(index))
        assert [v.outcome for v in verdicts] == ["bad", NEEDS_REVIEW, last]
        assert [v.reason for v in verdicts] == ["accept", "review_band", "no_match"]
    assert parse_route_set(base).defaults.no_match == "default"  # today's behaviour is the default


# --------------------------------------------------------------------------- the search on known scores

SYNTH = parse_route_set({
    "name": "synth", "default_outcome": "clean",
    "routes": [{"name": "bad", "outcome": "bad", "utterances": ["b"]},
               {"name": "good", "outcome": "clean", "utterances": ["g"]}],
})


def synthetic(n: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """Scores of a 'bad' and a 'good' route; bad events score higher on 'bad', with overlap."""
    rng = np.random.default_rng(seed)
    bad = rng.random(n) < 0.3
    s_bad = np.where(bad, rng.normal(0.65, 0.1, n), rng.normal(0.4, 0.1, n))
    s_good = np.where(bad, rng.normal(0.4, 0.1, n), rng.normal(0.6, 0.1, n))
    return np.stack([s_bad, s_good], axis=1).astype(np.float32), ["bad" if b else "clean" for b in bad]


def test_fit_meets_targets_with_the_least_review_it_finds():
    scores, gold = synthetic(600, 0)
    routes = tuple(SYNTH.routes)
    loose = fit_thresholds(scores, gold, SYNTH, routes, Targets(accuracy=0.97, z=0.0))
    strict = fit_thresholds(scores, gold, SYNTH, routes, Targets(accuracy=0.99, z=0.0))
    for fit, target in ((loose, 0.97), (strict, 0.99)):
        assert fit.calibration.feasible
        assert fit.calibration.correct / fit.calibration.auto >= target
    # a stricter target costs review, never the other way round
    assert 0 < loose.calibration.review_share < strict.calibration.review_share < 1
    # per-outcome targets: each automatic outcome at least that precise
    fit = fit_thresholds(scores, gold, SYNTH, routes, Targets(precision={"bad": 0.95, "clean": 0.9}, z=1.0))
    for outcome, target in (("bad", 0.95), ("clean", 0.9)):
        decided, correct = fit.calibration.per_outcome[outcome]
        assert decided > 50 and wilson(correct, decided, z=1.0)[0] >= target
    # the fitted route set carries exactly the fitted policy
    index = RouteIndex.from_examples(fit.route_set, "v", "e", {"bad": [("1", "b", np.ones(2))],
                                                             "good": [("2", "g", np.ones(2))]})
    worker = Policy.for_index(index)
    np.testing.assert_array_equal(worker.accept, fit.params.accept.astype(np.float32))
    np.testing.assert_array_equal(worker.review, fit.params.review.astype(np.float32))
    assert worker.no_match_review == fit.params.no_match_review


def test_fit_when_no_threshold_can_meet_the_target():
    # events identical to an example score 1.0 and are accepted even at accept 1.0: half are wrong
    scores = np.array([[1.0, 0.2]] * 10 + [[0.3, 0.9]] * 10, np.float32)
    gold = ["bad", "clean"] * 5 + ["clean"] * 10
    fit = fit_thresholds(scores, gold, SYNTH, tuple(SYNTH.routes), Targets(accuracy=0.99, z=0.0))
    assert not fit.calibration.feasible  # reported as such, not an exception
    # the closest it can get: decide all (15 of 20 right), not only the unavoidable ones (5 of 10)
    assert (fit.calibration.auto, fit.calibration.correct) == (20, 15)


def test_fit_reports_its_search_steps():
    scores, gold = synthetic(200, 2)
    progress = RecordingProgress()
    fit_thresholds(scores, gold, SYNTH, tuple(SYNTH.routes), Targets(accuracy=0.9, z=0.0), min_support=20,
                   sweeps=3, progress=progress)
    # the two routes have different outcomes: no outcome group, and each tops enough events to move alone
    assert (np.bincount(scores.argmax(axis=1), minlength=2) >= 20).all()
    grid_rows = 2 * len(MARGIN_GRID) * len(WIDTH_GRID)  # no-match choice x margin x width
    assert progress.seen() == [
        ("fitting thresholds: shared grid", grid_rows, grid_rows),
        ("fitting thresholds: per route", 3 * (2 + 1), 3 * (2 + 1)),  # per sweep: 2 routes, the no-match flip
    ]


def test_targets_are_checked():
    with pytest.raises(ValueError, match="at least one target"):
        Targets()
    with pytest.raises(ValueError, match="within"):
        Targets(accuracy=1.5)
    with pytest.raises(ValueError, match="no route has the target outcome"):
        fit_thresholds(*synthetic(50, 1), SYNTH, tuple(SYNTH.routes), Targets(precision={"spam": 0.9}))


# --------------------------------------------------------------------------- held out, real model


def clinc_bench(encoder, seed: int = 0) -> Workbench:
    """20 clinc150 intents (every 7th) with 40 queries each, plus 200 out-of-scope; seeded 50/25/25."""
    data = load_clinc150(DATASETS)
    intents = sorted(data.label_names)[::7][:20]
    rng = random.Random(seed)
    pools: dict[str | None, list] = {}
    for ex in data.examples:
        if ex.outcome is None or ex.outcome in intents:
            pools.setdefault(ex.outcome, []).append(ex)
    keep = []
    for key in sorted(pools, key=str):
        rows = sorted(pools[key], key=lambda ex: ex.id)
        rng.shuffle(rows)
        keep += rows[: 200 if key is None else 40]
    data = data.with_examples(sorted(keep, key=lambda ex: ex.id))
    return Workbench(data, split_data(data, seed=seed, source_splits=False), encoder)


def assert_meets_target_held_out(report, target: float, min_auto: float) -> None:
    """The accuracy measured on the test split (the point estimate) reaches the target.

    The fit made the target hold at the Wilson lower bound on calibration; the test
    split is a second sample, whose own lower bound is too wide at these sizes to judge.
    """
    summary = report.primary.summary
    assert summary.auto_accuracy is not None and summary.auto_accuracy >= target, (
        f"held-out accuracy {summary.auto_accuracy} < {target}"
    )
    assert summary.auto_share >= min_auto, f"decided only {summary.auto_share:.1%} automatically"


def test_clinc_fit_holds_on_the_test_split(cached_minilm, tmp_path):
    bench = clinc_bench(cached_minilm)
    assert bench.splits.record.sizes == {"train": 500, "calibration": 250, "test": 250}
    routes = tmp_path / "clinc.yaml"
    built = run_build(bench, routes, max_examples=20)
    assert len(built.route_set.routes) == 21  # 20 intents + the out-of-scope examples
    targets = Targets(accuracy=0.97, z=1.64)
    report, fit = run_fit(bench, [("clinc", routes)], targets, fitted_out=tmp_path / "fitted.yaml")
    assert fit.calibration.feasible
    assert_meets_target_held_out(report, 0.97, min_auto=0.6)
    fitted = load_route_set(tmp_path / "fitted.yaml")
    assert fitted.defaults.accept == fit.global_params["accept"]
    written = json.loads((tmp_path / "fitted.thresholds.json").read_text())
    assert written["nearest"]["targets"] == {"precision": {}, "accuracy": 0.97, "z": 1.64}


def test_moderation_fit_holds_on_the_test_split(moderation_bench, tmp_path):
    routes = tmp_path / "built.yaml"
    run_build(moderation_bench, routes, max_examples=30, head=True)
    targets = Targets(accuracy=0.85, z=1.64)
    report, fit = run_fit(
        moderation_bench, [("built", routes), ("hand-written", REPO / "routes" / "moderation.yaml")], targets,
        fitted_out=tmp_path / "out" / "built.fitted.yaml",
    )
    assert fit.calibration.feasible
    assert_meets_target_held_out(report, 0.85, min_auto=0.4)
    paths = write_report(report, tmp_path / "out")
    markdown = paths["markdown"].read_text()
    assert all(section in markdown for section in SECTIONS)
    # side by side: fitted three-way, own thresholds, head, semantic-router at 0.5 and fitted, for both sets
    for label in ("built, fitted", "built, its own thresholds", "built + head, fitted",
                  "built, semantic-router way (0.5)", "built, semantic-router fit (",
                  "hand-written, fitted", "hand-written, its own thresholds",
                  "hand-written, semantic-router way (0.5)"):
        assert f"| {label}" in markdown, label
    data = json.loads(paths["json"].read_text())
    assert [f["label"] for f in data["fit"]] == ["built", "hand-written"]
    assert data["fit"][0]["head"]["calibration"]["feasible"] is True
    # with a head, the written file is the head's fit with the head beside it: what a worker decides
    fitted_file = tmp_path / "out" / "built.fitted.yaml"
    assert head_path_for(fitted_file).read_bytes() == head_path_for(routes).read_bytes()
    assert report.primary.label == "built + head, fitted"
    head_routes = data["fit"][0]["head"]["routes"]
    assert fit.thresholds()["routes"] == head_routes != data["fit"][0]["nearest"]["routes"]
    written = load_route_set(fitted_file)
    assert written.version != load_route_set(routes).version
    assert {r.name: written.thresholds_for(r).accept for r in written.routes} == pytest.approx(
        {name: t["accept"] for name, t in head_routes.items()})
    # the novelty threshold: from the calibration split's novelty alone, written into the fitted set
    index = RouteIndex.build(load_route_set(routes), moderation_bench.encoder)
    calibration = score_split(moderation_bench.splits.calibration, index, moderation_bench.encoder)
    expected = fit_novelty(novelty_scores(calibration.match.nearest_score), NOVEL_SHARE)
    assert fit.novelty == expected
    assert load_route_set(tmp_path / "out" / "built.fitted.yaml").defaults.novelty == expected
    assert data["fit"][0]["nearest"]["novelty"] == expected.model_dump()
    assert data["side_by_side"][0]["novel_share"] is not None and "novelty → threshold" in markdown


def test_moderation_precision_targets_per_outcome(moderation_bench, tmp_path):
    routes = tmp_path / "built.yaml"
    run_build(moderation_bench, routes, max_examples=30)
    targets = Targets(precision={"violating": 0.75, "clean": 0.85}, z=1.64)
    # the per-outcome targets on their own: on 150 calibration prompts, reviewing the novel 5%
    # leaves too few clean ones for the lower bound (novelty: test_moderation_fit_holds_on_the_test_split)
    report, fit = run_fit(moderation_bench, [("built", routes)], targets, fitted_out=tmp_path / "f.yaml",
                          novel_share=None)
    assert fit.calibration.feasible and fit.calibration.auto > 0
    for outcome, target in targets.precision.items():
        decided, correct = fit.calibration.per_outcome[outcome]
        assert decided > 0, outcome  # on calibration: the lower bound reaches the target
        assert wilson(correct, decided, z=1.64)[0] >= target
        held_out = report.primary.summary.outcome_precision[outcome]
        assert held_out["decided"] > 0, outcome  # on test: the measured precision reaches it
        assert held_out["precision"] >= target, (outcome, held_out)
    assert report.primary.summary.auto_share >= 0.35


def support_jsonl(tmp_path: Path) -> Path:
    """A small labelled file for routes/support.yaml: billing, shipping and unrouted rows."""
    rows = [{"text": f"refund my order number {i}", "label": "billing"} for i in range(20)]
    rows += [{"text": f"where is parcel {i} now", "label": "shipping"} for i in range(20)]
    rows += [{"text": f"tell me a story about dragons {i}"} for i in range(20)]
    data = tmp_path / "support.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    return data


def test_fit_cli(tmp_path):
    data = support_jsonl(tmp_path)
    out = tmp_path / "fit"
    result = CliRunner().invoke(app, [
        "fit", str(data), "--routes", str(REPO / "routes" / "support.yaml"), "--out", str(out),
        "--min-precision", "billing=0.9", "--min-accuracy", "0.8", "--encoder", "trivial", "--no-cache",
        "--no-plots",
    ])
    assert result.exit_code == 0, result.output
    fitted = load_route_set(out / "support.fitted.yaml")
    shipped = load_route_set(REPO / "routes" / "support.yaml")
    assert [r.name for r in fitted.routes] == [r.name for r in shipped.routes]
    assert all(isinstance(r, Route) for r in fitted.routes)
    thresholds = json.loads((out / "support.fitted.thresholds.json").read_text())
    assert thresholds["nearest"]["targets"]["precision"] == {"billing": 0.9}
    bad = CliRunner().invoke(app, ["fit", str(data), "--routes", "x.yaml", "--min-precision", "billing",
                                   "--encoder", "trivial", "--no-cache"])
    assert bad.exit_code == 2 and "OUTCOME=P" in bad.output


# --------------------------------------------------------------------------- novelty


@settings(deadline=None, max_examples=100)
@given(data=st.data(), events=st.integers(1, 30), no_match_review=st.booleans())
def test_fast_decider_sends_novel_default_outcomes_to_review_as_decide_scores(data, events, no_match_review):
    scores = np.array(data.draw(st.lists(st.lists(st.sampled_from([0.1, 0.45, 0.55, 0.7, 0.9]), min_size=3,
                                                  max_size=3), min_size=events, max_size=events)), np.float32)
    novelty = np.array(data.draw(st.lists(st.sampled_from([0.1, 0.3, 0.5, 0.7]), min_size=events,
                                          max_size=events)), np.float32)
    threshold = data.draw(st.sampled_from([0.2, 0.3, 0.6]))
    outcomes = ("clean", "bad", "other")
    params = Params(np.array([0.5, 0.55, 0.7]), np.array([0.0, 0.2, 0.05]), np.array([0.0, 0.05, 0.2]),
                    no_match_review)
    decider = FastDecider(scores, outcomes, "clean", novelty > np.float32(threshold))
    policy = params.policy(outcomes, "clean", threshold)
    expected = [REVIEW if v.outcome == NEEDS_REVIEW else decider.code[v.outcome]
                for v in decide_scores(scores, policy, novelty)]
    assert decider.decide(params).tolist() == expected
    groups = GroupDecider(decider).decide(np.array([0.55]), 0.5, 0.1, 0.05, no_match_review)[:, 0]
    shared = Params(np.array([0.5, 0.55, 0.55]), np.full(3, 0.1), np.full(3, 0.05), no_match_review)
    assert groups.tolist() == decider.decide(shared).tolist()


def test_fit_novelty_flags_at_most_the_share_asked():
    novelty = np.linspace(0.0, 1.0, 401)
    fitted = fit_novelty(novelty, 0.05)
    assert fitted.on_novel == "needs_review"
    assert 0.94 <= fitted.threshold <= 0.951
    # compared as the worker does: in float32
    flagged = novelty.astype(np.float32) > np.float32(fitted.threshold)
    assert fitted.baseline == pytest.approx(float(flagged.mean()), abs=1e-4)
    assert 0.04 <= fitted.baseline <= 0.05
    with pytest.raises(ValueError, match="between 0 and 1"):
        fit_novelty(novelty, 1.0)


def far_clean(n: int, seed: int) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Synthetic scores plus a tenth of far-away events (low scores, high novelty), all clean."""
    scores, gold = synthetic(n, seed)
    rng = np.random.default_rng(seed + 100)
    far = n // 10
    scores = np.concatenate([scores, rng.uniform(0.0, 0.15, (far, 2)).astype(np.float32)])
    novelty = np.concatenate([rng.uniform(0.2, 0.5, n), rng.uniform(0.8, 0.9, far)]).astype(np.float32)
    return scores, gold + ["clean"] * far, novelty


def test_fit_never_learns_that_far_away_is_clean():
    scores, gold, novelty = far_clean(600, 0)
    routes = tuple(SYNTH.routes)
    fit = fit_thresholds(scores, gold, SYNTH, routes, Targets(accuracy=0.9, z=0.0), novelty=novelty)
    assert fit.novelty is not None and fit.novelty == fit_novelty(novelty, NOVEL_SHARE)
    assert fit.route_set.defaults.novelty == fit.novelty  # written into the fitted set
    index = RouteIndex.from_examples(fit.route_set, fit.route_set.version, "e",
                                     {r.name: [("i" + r.name, "x", np.ones(2))] for r in routes})
    verdicts = decide_scores(scores, Policy.for_index(index), novelty)
    novel = novelty > np.float32(fit.novelty.threshold)
    assert novel.sum() >= 20  # the novel events were all clean on calibration ...
    given = [v for v, n in zip(verdicts, novel, strict=True) if n]
    assert all(v.novel and v.outcome != "clean" for v in given)  # ... yet none is decided clean
    assert any(v.outcome == NEEDS_REVIEW and v.reason == "no_match" for v in given)
    # without novelty, the same data lets far-away events through as clean
    plain = fit_thresholds(scores, gold, SYNTH, routes, Targets(accuracy=0.9, z=0.0))
    assert plain.novelty is None and plain.route_set.defaults.novelty is None
    assert plain.calibration.review < fit.calibration.review


def test_novel_default_only_when_held_out_novel_events_meet_the_target():
    scores, gold, novelty = far_clean(600, 0)
    routes = tuple(SYNTH.routes)
    targets = Targets(accuracy=0.9, z=1.0)
    fit = fit_thresholds(scores, gold, SYNTH, routes, targets, novelty=novelty)
    base = Policy.for_index(RouteIndex.from_examples(
        SYNTH, SYNTH.version, "e", {r.name: [("i" + r.name, "x", np.ones(2))] for r in routes}))
    held_scores, held_gold, held_novelty = far_clean(2000, 1)
    declared = declare_novel_default(fit, base, held_scores, held_novelty, held_gold)
    assert declared.novelty is not None and declared.novelty.on_novel == "default"
    assert declared.route_set.defaults.novelty == declared.novelty
    # held-out novel events that are violating: novel events stay in review
    mixed_gold = ["bad" if nov > 0.55 and i % 3 == 0 else g
                  for i, (nov, g) in enumerate(zip(held_novelty.tolist(), held_gold, strict=True))]
    kept = declare_novel_default(fit, base, held_scores, held_novelty, mixed_gold)
    assert kept is fit and kept.route_set.defaults.novelty.on_novel == "needs_review"
    assert not novel_default_holds(["clean"], np.array([False]), ["clean"], "clean", targets)  # none novel
