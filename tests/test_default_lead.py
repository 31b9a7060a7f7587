"""defaults.default_lead: the default outcome only for events nearer a default-outcome route."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from typer.testing import CliRunner

from sieve.cli import app
from sieve.contracts import NEEDS_REVIEW
from sieve.flow.decide import Policy, decide_scores, lead_short
from sieve.flow.match import RouteIndex
from sieve.quality.fit import LEADS, FitResult, fit_lead, fit_thresholds
from sieve.quality.targets import Targets
from sieve.routeset import RouteSet, load_route_set, parse_route_set
from sieve.routeset_dump import dump_route_set

from .conftest import REPO
from .test_fit import SYNTH, support_jsonl, synthetic
from .test_match_decide import CHAT, POLICY, POLICY_SET, SPAM, policy_index
from .test_multi import BASE, multi_set

LEAD = replace(POLICY, default_lead=0.1)


def decided(scores: list[list[float]], policy: Policy) -> list[tuple[str, str, int | None]]:
    return [(v.outcome, v.reason, v.route) for v in decide_scores(np.array(scores, np.float32), policy)]


def test_the_default_outcome_needs_the_lead_over_every_other_outcome():
    scores = [[0.1, 0.1, 0.3, 0.0],  # no match, chat (clean) leads spam by 0.2
              [0.25, 0.1, 0.3, 0.0],  # no match, chat leads by 0.05 only
              [0.3, 0.1, 0.2, 0.0],  # no match, spam nearer than chat
              [0.1, 0.1, 0.9, 0.0],  # chat accepts and leads by 0.8
              [0.55, 0.1, 0.62, 0.0],  # chat accepts, spam in its band 0.07 behind (outside margin)
              [0.9, 0.1, 0.2, 0.0]]  # spam accepts: the lead never touches another outcome
    assert decided(scores, POLICY) == [("clean", "no_match", None), ("clean", "no_match", None),
                                       ("clean", "no_match", None), ("clean", "accept", CHAT),
                                       ("clean", "accept", CHAT), ("bad", "accept", SPAM)]
    assert decided(scores, LEAD) == [("clean", "no_match", None), (NEEDS_REVIEW, "no_match", None),
                                     (NEEDS_REVIEW, "no_match", None), ("clean", "accept", CHAT),
                                     (NEEDS_REVIEW, "accept", CHAT), ("bad", "accept", SPAM)]
    short = lead_short(np.array([[0.25, 0.1, 0.5, 0.0], [0.25, 0.1, 0.49, 0.0]], np.float32),
                       POLICY.outcomes, "clean", 0.25)
    assert short.tolist() == [False, True]  # a lead of exactly the threshold is enough


def test_a_set_without_routes_of_the_default_outcome_never_gets_it_under_a_lead():
    outcomes = ("bad", "bad")
    scores = np.array([[0.1, 0.2]], np.float32)
    assert lead_short(scores, outcomes, "clean", 0.0).tolist() == [True]
    assert lead_short(scores, ("clean", "clean"), "clean", 0.5).tolist() == [False]


def test_the_lead_applies_in_multi_mode_too():
    policy = Policy.for_index(policy_index(multi_set(defaults={**BASE["defaults"], "default_lead": 0.3})))
    assert policy.multi and policy.default_lead == 0.3
    off = replace(policy, default_lead=None)
    far = [0.1, 0.1, 0.1, 0.45, 0.1]  # nothing fires; news (clean) leads by 0.35
    near = [0.1, 0.2, 0.1, 0.45, 0.1]  # violence within 0.3 of news
    accepted = [0.1, 0.35, 0.1, 0.6, 0.1]  # news accepts, violence (under its band) 0.25 behind
    got = [(v.outcome, v.reason) for v in decide_scores(np.array([far, near, accepted], np.float32), policy)]
    assert got == [("clean", "no_match"), (NEEDS_REVIEW, "no_match"), (NEEDS_REVIEW, "accept")]
    both = decide_scores(np.array([far, near, accepted], np.float32), off)
    assert [v.outcome for v in both] == ["clean", "clean", "clean"]


def test_an_unset_lead_leaves_the_dump_and_version_as_before():
    assert "default_lead" not in POLICY_SET.defaults.model_dump()
    assert "default_lead" not in dump_route_set(POLICY_SET)
    defaults = {**POLICY_SET.defaults.model_dump(mode="json"), "default_lead": 0.05}
    led = parse_route_set(dict(POLICY_SET.model_dump(mode="json"), defaults=defaults))
    assert led.defaults.default_lead == 0.05 and "default_lead: 0.05" in dump_route_set(led)
    assert led.version != POLICY_SET.version


def test_fit_keeps_the_sets_lead_and_searches_with_it_applied():
    scores, gold = synthetic(600, 1)
    led = SYNTH.model_copy(update={"defaults": SYNTH.defaults.model_copy(update={"default_lead": 0.15})})
    routes = tuple(led.routes)
    plain = fit_thresholds(scores, gold, SYNTH, routes, Targets(accuracy=0.9, z=0.0))
    fit = fit_thresholds(scores, gold, led, routes, Targets(accuracy=0.9, z=0.0))
    assert fit.route_set.defaults.default_lead == 0.15
    # fit's own check that its decider agrees with decide_scores ran with the lead; and the
    # fitted policy, as the worker builds it, never gives clean to an event short of the lead
    index = RouteIndex.from_examples(fit.route_set, "v", "e", {"bad": [("1", "b", np.ones(2))],
                                                             "good": [("2", "g", np.ones(2))]})
    worker = Policy.for_index(index)
    assert worker.default_lead == 0.15 and fit.policy(worker).default_lead == 0.15
    outcomes = [v.outcome for v in decide_scores(scores, worker)]
    short = lead_short(scores, worker.outcomes, "clean", 0.15)
    assert not any(o == "clean" for o, s in zip(outcomes, short.tolist(), strict=True) if s)
    assert short.any() and fit.calibration.auto <= plain.calibration.auto


def with_lead(route_set: RouteSet, lead: float | None) -> RouteSet:
    defaults = route_set.defaults.model_copy(update={"default_lead": lead})
    return route_set.model_copy(update={"defaults": defaults})


def test_fit_lead_takes_the_largest_lead_within_the_cost():
    scores, gold = synthetic(200, 2)
    fits: dict[float | None, FitResult] = {}

    def fit(route_set: RouteSet) -> FitResult:  # one real fit per lead, remembered
        lead = route_set.defaults.default_lead
        if lead not in fits:
            fits[lead] = fit_thresholds(scores, gold, route_set, tuple(route_set.routes),
                                        Targets(accuracy=0.9, z=0.0), min_support=None, sweeps=1)
        return fits[lead]

    base = fit(SYNTH)
    chosen = []
    for cost in (0.0, 0.05, 0.3):
        got = fit_lead(fit, SYNTH, cost)
        lead = got.route_set.defaults.default_lead
        assert got is fits[lead]
        floor = base.calibration.auto - cost * base.calibration.events
        assert got.calibration.auto >= floor
        # every larger lead was over the cost, or lost the targets the fit without one met
        assert all(fits[larger].calibration.auto < floor or not fits[larger].calibration.feasible
                   for larger in LEADS if lead is None or larger > lead)
        chosen.append(lead or 0.0)
    assert chosen == sorted(chosen) and chosen[-1] > 0  # a dearer budget never buys a smaller lead


def test_fit_cli_fits_a_lead_when_asked(tmp_path):
    data = support_jsonl(tmp_path)
    out = tmp_path / "fit"
    result = CliRunner().invoke(app, [
        "fit", str(data), "--routes", str(REPO / "routes" / "support.yaml"), "--out", str(out),
        "--min-accuracy", "0.8", "--lead-cost", "1", "--encoder", "trivial", "--no-cache", "--no-plots", "-q",
    ])
    assert result.exit_code == 0, result.output
    lead = load_route_set(out / "support.fitted.yaml").defaults.default_lead
    assert lead in LEADS and f"default lead {lead:g}" in result.output
    # a multi-mode set's categories are fitted to precision alone: asking for a lead is refused
    moderation = str(REPO / "routes" / "moderation.yaml")
    multi = CliRunner().invoke(app, ["fit", "openai-moderation", "--routes", moderation,
                                     "--lead-cost", "0.02", "--encoder", "trivial", "--no-cache", "-q"])
    assert multi.exit_code != 0 and "--lead-cost" in multi.output
