"""Per-category runs: ``sieve eval --folds K`` (k-fold over all events) and ``sieve fit`` of a multi set.

Both decide the same score matrix twice with the same thresholds: in multi mode (every
category route judged on its own) and in single mode (top-1), and measure each category
(:mod:`sieve.quality.categories`). The route examples are the route file's, not the
data's, so folds matter only for the thresholds: per fold they are fitted on the other
folds, and the held-out decisions of all folds are pooled before measuring.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from sieve.contracts import NEEDS_REVIEW
from sieve.flow.decide import Policy, Verdict, decide_scores, novelty_scores
from sieve.progress import SILENT, Progress
from sieve.quality import categories as cat
from sieve.quality.runner import load_candidate
from sieve.quality.scoring import score_split
from sieve.quality.targets import Targets
from sieve.quality.workbench import Workbench
from sieve.routeset import Route, RouteSet, load_route_set
from sieve.routeset_dump import dump_route_set
from sieve.thresholds import ThresholdOverrides


@dataclass(frozen=True)
class SystemCategories:
    """One way of deciding, measured per category and on the binary outcome."""

    label: str
    measures: list[cat.CategoryMeasure]
    binary: cat.BinaryMeasure
    # accuracy of the most confident automatic decisions, as many as the system with fewest has
    matched: cat.BinaryMeasure | None = None


@dataclass
class CategoryReport:
    """What a per-category run reports (:mod:`sieve.quality.categories_report` renders it)."""

    title: str
    command: str
    data: str
    source: str
    encoder_id: str
    route_file: str
    method: str  # how the events were split and thresholds fitted
    events: int
    z_target: float
    targets: dict[str, float]
    systems: list[SystemCategories]
    thresholds: dict[str, list[float]] = field(default_factory=dict)  # category -> accept per fold
    notes: list[str] = field(default_factory=list)


def decide_both(
    scores: np.ndarray, novelty: np.ndarray, policy: Policy
) -> tuple[list[Verdict], list[Verdict]]:
    """The same thresholds decided in multi mode and in single (top-1) mode."""
    return (decide_scores(scores, replace(policy, multi=True), novelty),
            decide_scores(scores, replace(policy, multi=False), novelty))


def confidence(
    verdicts: list[Verdict], scores: np.ndarray, policy: Policy, positions: list[int]
) -> np.ndarray:
    """How far each decision is from changing (the most confident automatic decisions are kept first).

    An accepted route's lead over its accept threshold; for the default outcome, how far
    every category route is below its review threshold.
    """
    pos = np.array(positions, dtype=np.int64)
    below = (policy.review[pos][None, :] - scores[:, pos]).min(axis=1) if positions else np.ones(len(scores))
    out = np.empty(len(verdicts))
    for i, v in enumerate(verdicts):
        if v.outcome != policy.default_outcome and v.route is not None:
            out[i] = float(scores[i, v.route]) - float(policy.accept[v.route])
        else:
            out[i] = float(below[i])
    return out


def matched_binary(outcomes: list[str], gold: list[str], conf: np.ndarray, keep: int) -> cat.BinaryMeasure:
    """Binary measures when only the ``keep`` most confident automatic decisions stay automatic."""
    auto = np.flatnonzero(np.array([o != NEEDS_REVIEW for o in outcomes]))
    kept = set(auto[np.argsort(-conf[auto], kind="stable")][:keep].tolist())
    return cat.binary_measures([o if i in kept else NEEDS_REVIEW for i, o in enumerate(outcomes)], gold)


def _systems(pairs: list[tuple[str, list[Verdict], np.ndarray]], labels: cat.CategoryLabels, gold: list[str],
             positions: list[int]) -> list[SystemCategories]:
    """Measured systems; each with its binary accuracy at the smallest automatic share among them."""
    systems = []
    binaries = [cat.binary_measures([v.outcome for v in verdicts], gold) for _, verdicts, _ in pairs]
    keep = min(b.auto for b in binaries)
    for (label, verdicts, conf), binary in zip(pairs, binaries, strict=True):
        flagger = cat.multi_flags if "multi" in label else cat.top1_flags
        flags = flagger(verdicts, positions)
        outcomes = [v.outcome for v in verdicts]
        systems.append(SystemCategories(label, cat.category_measures(flags, labels), binary,
                                        matched_binary(outcomes, gold, conf, keep)))
    return systems


def run_category_kfold(
    bench: Workbench, route_file: Path, targets: Targets, *, folds: int = 5, seed: int = 0,
    command: str = "", progress: Progress = SILENT,
) -> CategoryReport:
    """Fit per-category thresholds on k-1 folds, decide the held-out fold both ways, pool and measure."""
    data = bench.data
    candidate = load_candidate("routes", route_file, bench.encoder, use_head=False, progress=progress)
    index = candidate.index
    scored = score_split(data, index, bench.encoder, bench.vectors("all", progress=progress))
    scores = scored.match.route_scores
    novelty = novelty_scores(scored.match.nearest_score)
    routes = list(index.routes)
    positions = cat.category_positions(routes, index.route_set.default_outcome, data.label_names)
    if not positions:
        raise ValueError(f"{route_file}: no route is named like a label of {data.name} "
                         f"({', '.join(data.label_names)}): nothing to measure per category")
    names = [routes[p].name for p in positions]
    labels = cat.category_labels(data.examples, names)
    base = Policy.for_index(index)
    goals = cat.category_targets(routes, positions, targets)
    parts = cat.kfold(cat.strata_of(data.examples, names), folds, seed)
    multi: list[Verdict | None] = [None] * len(data)
    single: list[Verdict | None] = [None] * len(data)
    conf_multi, conf_single = np.zeros(len(data)), np.zeros(len(data))
    accepts: dict[str, list[float]] = {name: [] for name in names}
    with progress.task(f"{folds}-fold: fitting and deciding", total=folds) as advance:
        for held in parts:
            train = np.setdiff1d(np.arange(len(data)), held)
            fit = cat.fit_category_thresholds(scores[train], labels.rows(train), positions, base, goals,
                                              z=targets.z)
            cat.check_fit_agrees_with_worker(scores[train], labels.rows(train), positions, base, fit)
            policy = fit.policy(base)
            m, s = decide_both(scores[held], novelty[held], policy)
            cm = confidence(m, scores[held], policy, positions)
            cs = confidence(s, scores[held], policy, positions)
            for k, i in enumerate(held.tolist()):
                multi[i], single[i] = m[k], s[k]
                conf_multi[i], conf_single[i] = cm[k], cs[k]
            for name, p in zip(names, positions, strict=True):
                accepts[name].append(float(fit.accept[p]))
            advance(1)
    own_m, own_s = decide_both(scores, novelty, base)
    gold = list(scored.gold)
    pooled = [v for v in multi if v is not None], [v for v in single if v is not None]
    systems = _systems([("multi-label, fitted per fold", pooled[0], conf_multi),
                        ("top-1, fitted per fold", pooled[1], conf_single)], labels, gold, positions)
    systems += _systems(
        [("multi-label, the file's thresholds", own_m, confidence(own_m, scores, base, positions)),
         ("top-1, the file's thresholds", own_s, confidence(own_s, scores, base, positions))],
        labels, gold, positions)
    sizes = ", ".join(str(len(p)) for p in parts)
    return CategoryReport(
        title=f"Sieve per-category evaluation: {data.name}, {folds}-fold",
        command=command, data=data.name, source=data.source, encoder_id=bench.encoder.id,
        route_file=str(route_file),
        method=(f"{folds} folds over all {len(data)} events (seed {seed}, stratified by rarest category; "
                f"sizes {sizes}); per fold, accept thresholds fitted on the other folds, decisions pooled"),
        events=len(data), z_target=targets.z, targets=dict(zip(names, goals, strict=True)),
        systems=systems, thresholds=accepts,
    )


def apply_category_fit(route_set: RouteSet, routes: list[Route], fit: cat.CategoryFit,
                       positions: list[int]) -> RouteSet:
    """The route set in multi mode, each category route with its fitted accept and review."""
    fitted = {routes[p].name: (float(fit.accept[p]), float(fit.review[p])) for p in positions}
    new_routes = []
    for route in route_set.routes:
        if route.name not in fitted:
            new_routes.append(route)
            continue
        accept, review = fitted[route.name]
        own = (route.thresholds or ThresholdOverrides()).model_copy(
            update={"accept": accept, "review": review})
        new_routes.append(route.model_copy(update={"thresholds": own}))
    result = route_set.model_copy(update={"routes": new_routes, "mode": "multi"})
    RouteSet.model_validate(result.model_dump(mode="json"))  # the same checks as a route file gets
    return result


def run_category_fit(
    bench: Workbench, route_file: Path, targets: Targets, *, fitted_out: Path, command: str = "",
    progress: Progress = SILENT,
) -> tuple[CategoryReport, cat.CategoryFit]:
    """Fit per-category thresholds on calibration, write the fitted multi-mode file, measure on test."""
    candidate = load_candidate("routes", route_file, bench.encoder, use_head=False, progress=progress)
    index = candidate.index
    routes = list(index.routes)
    positions = cat.category_positions(routes, index.route_set.default_outcome, bench.data.label_names)
    if not positions:
        raise ValueError(f"{route_file}: no route is named like a label of {bench.data.name}: "
                         "a multi-mode fit fits each category route on its own labels")
    names = [routes[p].name for p in positions]
    base = Policy.for_index(index)
    goals = cat.category_targets(routes, positions, targets)
    cal = score_split(bench.splits.calibration, index, bench.encoder, bench.vectors("calibration"))
    cal_labels = cat.category_labels(bench.splits.calibration.examples, names)
    fit = cat.fit_category_thresholds(cal.match.route_scores, cal_labels, positions, base, goals, z=targets.z)
    cat.check_fit_agrees_with_worker(cal.match.route_scores, cal_labels, positions, base, fit)
    fitted_set = apply_category_fit(candidate.route_set, routes, fit, positions)
    fitted_out.parent.mkdir(parents=True, exist_ok=True)
    fitted_out.write_text(dump_route_set(fitted_set), encoding="utf-8")
    load_route_set(fitted_out)  # what was written is an ordinary, valid route file
    test = score_split(bench.splits.test, index, bench.encoder, bench.vectors("test"))
    scores = test.match.route_scores
    policy = fit.policy(base)
    m, s = decide_both(scores, novelty_scores(test.match.nearest_score), policy)
    labels = cat.category_labels(bench.splits.test.examples, names)
    systems = _systems([("multi-label, fitted", m, confidence(m, scores, policy, positions)),
                        ("top-1, fitted", s, confidence(s, scores, policy, positions))],
                       labels, list(test.gold), positions)
    report = CategoryReport(
        title=f"Sieve per-category fit: {bench.data.name}, fitted on calibration, measured on test",
        command=command, data=bench.data.name, source=bench.data.source, encoder_id=bench.encoder.id,
        route_file=str(route_file), method=f"accept thresholds fitted on calibration "
        f"({len(bench.splits.calibration)} events), measured on test ({len(bench.splits.test)})",
        events=len(bench.splits.test), z_target=targets.z, targets=dict(zip(names, goals, strict=True)),
        systems=systems,
        thresholds={name: [float(fit.accept[p])] for name, p in zip(names, positions, strict=True)},
        notes=[f"Fitted route file: {fitted_out}"] + [
            f"{name}: no accept threshold below 1.0 meets {goal:g} on calibration; set to 1.0"
            for name, goal, ok in zip(names, goals, fit.met, strict=True) if not ok],
    )
    return report, fit
