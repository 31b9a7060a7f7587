"""Per-category runs: ``sieve eval --folds K`` (k-fold over all events) and ``sieve fit`` of a multi set.

Both decide the same score matrix twice with the same thresholds: in multi mode (every
category route judged on its own) and in single mode (top-1), and measure each category
(:mod:`sieve.quality.categories`). The route examples are the route file's, not the
data's, so folds matter only for the thresholds: per fold they are fitted on the other
folds, and the held-out decisions of all folds are pooled before measuring. Each system's
binary accuracy is also read at the pair's common automatic share, keeping its most
confident decisions (:mod:`sieve.quality.categories_rank`, calibrated on the same events
the thresholds were fitted on).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from sieve.flow.decide import Policy, Verdict, decide_scores, novelty_scores
from sieve.flow.list_policy import decide_with_lists
from sieve.flow.lists import ListHit
from sieve.flow.match import RouteIndex
from sieve.progress import SILENT, Progress
from sieve.quality import categories as cat
from sieve.quality import categories_rank as rank
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
    scores: np.ndarray, novelty: np.ndarray, policy: Policy, hits: Sequence[list[ListHit]] | None = None,
    index: RouteIndex | None = None,
) -> tuple[list[Verdict], list[Verdict]]:
    """The same thresholds decided in multi mode and in single (top-1) mode, with the list hits applied."""
    if hits is None or index is None:
        return (decide_scores(scores, replace(policy, multi=True), novelty),
                decide_scores(scores, replace(policy, multi=False), novelty))
    return (decide_with_lists(scores, replace(policy, multi=True), novelty, hits, index)[1],
            decide_with_lists(scores, replace(policy, multi=False), novelty, hits, index)[1])


@dataclass(frozen=True)
class Decided:
    """One system's decisions of some events and how confident each is (:mod:`categories_rank`)."""

    verdicts: list[Verdict]
    accuracy: np.ndarray  # estimated, by the calibrator fitted on other events
    distance: np.ndarray


def decide_ranked(scores: np.ndarray, novelty: np.ndarray, gold: list[str], policy: Policy,
                  positions: list[int], fitted_on: np.ndarray, ranked: np.ndarray,
                  hits: Sequence[list[ListHit]] | None = None, index: RouteIndex | None = None,
                  ) -> tuple[Decided, Decided]:
    """Decide ``ranked`` events both ways; confidence calibrated on the ``fitted_on`` events' decisions."""
    systems = []
    fit_hits = [hits[i] for i in fitted_on.tolist()] if hits is not None else None
    ranked_hits = [hits[i] for i in ranked.tolist()] if hits is not None else None
    fit_verdicts = decide_both(scores[fitted_on], novelty[fitted_on], policy, fit_hits, index)
    verdicts = decide_both(scores[ranked], novelty[ranked], policy, ranked_hits, index)
    fit_gold = [gold[i] for i in fitted_on.tolist()]
    for multi, fit_v, v in zip((True, False), fit_verdicts, verdicts, strict=True):
        fit_d = rank.distance(fit_v, scores[fitted_on], policy, positions, multi=multi)
        calibrator = rank.Calibrator.fit([x.outcome for x in fit_v], fit_gold, fit_d)
        d = rank.distance(v, scores[ranked], policy, positions, multi=multi)
        systems.append(Decided(v, calibrator.accuracy([x.outcome for x in v], d), d))
    return systems[0], systems[1]


def pooled(parts: list[tuple[np.ndarray, Decided]], n: int) -> Decided:
    """Per-fold decisions put back in event order."""
    verdicts: list[Verdict | None] = [None] * n
    accuracy, dist = np.zeros(n), np.zeros(n)
    for held, decided in parts:
        for k, i in enumerate(held.tolist()):
            verdicts[i] = decided.verdicts[k]
        accuracy[held], dist[held] = decided.accuracy, decided.distance
    return Decided([v for v in verdicts if v is not None], accuracy, dist)


def _systems(pairs: list[tuple[str, Decided]], labels: cat.CategoryLabels, gold: list[str],
             positions: list[int]) -> list[SystemCategories]:
    """Measured systems; each with its binary accuracy at the smallest automatic share among them."""
    systems = []
    binaries = [cat.binary_measures([v.outcome for v in d.verdicts], gold) for _, d in pairs]
    keep = min(b.auto for b in binaries)
    for (label, decided), binary in zip(pairs, binaries, strict=True):
        flagger = cat.multi_flags if "multi" in label else cat.top1_flags
        flags = flagger(decided.verdicts, positions)
        outcomes = [v.outcome for v in decided.verdicts]
        kept = rank.ranked_keep(outcomes, decided.accuracy, decided.distance, keep)
        systems.append(SystemCategories(label, cat.category_measures(flags, labels), binary,
                                        cat.binary_measures(kept, gold)))
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
    gold = list(scored.gold)
    # multi and top-1 with the fitted thresholds, then with the file's
    own: tuple[list[tuple[np.ndarray, Decided]], ...] = ([], [], [], [])
    accepts: dict[str, list[float]] = {name: [] for name in names}
    with progress.task(f"{folds}-fold: fitting and deciding", total=folds) as advance:
        for held in parts:
            train = np.setdiff1d(np.arange(len(data)), held)
            fit = cat.fit_category_thresholds(scores[train], labels.rows(train), positions, base, goals,
                                              z=targets.z)
            cat.check_fit_agrees_with_worker(scores[train], labels.rows(train), positions, base, fit)
            for k, policy in enumerate((fit.policy(base), base)):
                m, s = decide_ranked(scores, novelty, gold, policy, positions, train, held,
                                     scored.list_hits, index)
                own[2 * k].append((held, m))
                own[2 * k + 1].append((held, s))
            for name, p in zip(names, positions, strict=True):
                accepts[name].append(float(fit.accept[p]))
            advance(1)
    n = len(data)
    systems = _systems([("multi-label, fitted per fold", pooled(own[0], n)),
                        ("top-1, fitted per fold", pooled(own[1], n))], labels, gold, positions)
    systems += _systems([("multi-label, the file's thresholds", pooled(own[2], n)),
                         ("top-1, the file's thresholds", pooled(own[3], n))], labels, gold, positions)
    sizes = ", ".join(str(len(p)) for p in parts)
    return CategoryReport(
        title=f"Sieve per-category evaluation: {data.name}, {folds}-fold",
        command=command, data=data.name, source=data.source, encoder_id=bench.encoder.id,
        route_file=str(route_file),
        method=(f"{folds} folds over all {len(data)} events (seed {seed}, stratified by rarest category; "
                f"sizes {sizes}); per fold, accept thresholds and the confidence ranking fitted on the other "
                f"folds, decisions pooled"),
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
    fitted_out.write_text(dump_route_set(fitted_set, fitted_out.parent), encoding="utf-8")
    load_route_set(fitted_out)  # what was written is an ordinary, valid route file
    test = score_split(bench.splits.test, index, bench.encoder, bench.vectors("test"))
    gold = list(cal.gold) + list(test.gold)
    both = np.concatenate([cal.match.route_scores, test.match.route_scores])
    novelty = np.concatenate([novelty_scores(cal.match.nearest_score),
                              novelty_scores(test.match.nearest_score)])
    n_cal = len(cal.gold)
    hits = (list(cal.list_hits) + list(test.list_hits)
            if cal.list_hits is not None and test.list_hits is not None else None)
    m, s = decide_ranked(both, novelty, gold, fit.policy(base), positions, np.arange(n_cal),
                         np.arange(n_cal, len(gold)), hits, index)
    labels = cat.category_labels(bench.splits.test.examples, names)
    systems = _systems([("multi-label, fitted", m), ("top-1, fitted", s)], labels, list(test.gold), positions)
    report = CategoryReport(
        title=f"Sieve per-category fit: {bench.data.name}, fitted on calibration, measured on test",
        command=command, data=bench.data.name, source=bench.data.source, encoder_id=bench.encoder.id,
        route_file=str(route_file),
        method=f"accept thresholds and the confidence ranking fitted on calibration "
        f"({len(bench.splits.calibration)} events), measured on test ({len(bench.splits.test)})",
        events=len(bench.splits.test), z_target=targets.z, targets=dict(zip(names, goals, strict=True)),
        systems=systems,
        thresholds={name: [float(fit.accept[p])] for name, p in zip(names, positions, strict=True)},
        notes=[f"Fitted route file: {fitted_out}"] + [
            f"{name}: no accept threshold below 1.0 meets {goal:g} on calibration; set to 1.0"
            for name, goal, ok in zip(names, goals, fit.met, strict=True) if not ok],
    )
    return report, fit
