"""Fit the three-way policy: thresholds that meet the targets with the least review.

Given a calibration split's route scores and gold outcomes, choose for every route
an accept threshold, a review band (``review = accept - width``) and a margin, and
for the set what an event far from every example gets (``no_match``: the default
outcome or ``needs_review``), so that the :class:`~sieve.quality.targets.Targets`
hold while the fewest events go to review.

The search: a grid over one accept threshold, band width and margin shared by all
routes and over the no-match choice; then coordinate descent, first moving the
routes of one outcome together, then single routes that are the top route of at
least ``min_support`` calibration events, each move kept only if the targets still
hold and the review share falls (or stays and accuracy rises). Every candidate is
scored with the vectorised :mod:`~sieve.quality.decider`, checked equal to the
worker's :func:`~sieve.flow.decide.decide_scores` on the result.

Before that, the novelty threshold (:func:`fit_novelty`), label-free: the ``1 - novel_share``
quantile of the calibration events' novelty, so that ``novel_share`` of in-domain
traffic is novel (and reviewed when it would get the default outcome). The threshold
search then sees novel events go to review: it never learns "far away is the default"
from novel calibration events. Declaring novel events safe (``on_novel: default``) is
a separate, opt-in step checked on held-out data (:func:`novel_default_holds`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from sieve.flow.decide import Policy, decide_scores, is_novel, lead_short
from sieve.progress import SILENT, Progress
from sieve.quality.decider import FastDecider, GroupDecider, Params, check_agrees_with_worker
from sieve.quality.metrics import wilson
from sieve.quality.targets import Assessment, Objective, Targets
from sieve.quality.unseen import Unseen
from sieve.routeset import Route, RouteSet
from sieve.thresholds import Novelty, RouteDefaults, ThresholdOverrides

NOVEL_SHARE = 0.05  # the share of calibration events a fitted novelty threshold flags novel

ACCEPT_GRID = tuple(round(0.10 + 0.01 * i, 3) for i in range(86)) + (1.0,)  # 0.10 .. 0.95, and 1.0
WIDTH_GRID = (0.0, 0.02, 0.04, 0.06, 0.08, 0.10, 0.15, 0.20, 0.30, 0.50, 2.0)
MARGIN_GRID = (0.0, 0.01, 0.02, 0.04, 0.06, 0.10, 0.15, 0.20, 0.30)
ACCEPT_STEPS = (-0.08, -0.04, -0.02, -0.01, -0.005, 0.005, 0.01, 0.02, 0.04, 0.08)
WIDTH_STEPS = WIDTH_GRID
MARGIN_STEPS = MARGIN_GRID
STEPS = (("accept", ACCEPT_STEPS), ("width", WIDTH_STEPS), ("margin", MARGIN_STEPS))


@dataclass(frozen=True)
class FitResult:
    """The fitted parameters, how they do on calibration, and the route set that carries them."""

    params: Params
    route_names: tuple[str, ...]
    targets: Targets
    calibration: Assessment
    global_params: dict[str, float | bool]
    route_set: RouteSet
    evaluations: int
    refined_routes: tuple[str, ...]
    novelty: Novelty | None = None

    def policy(self, base: Policy) -> Policy:
        """The fitted thresholds as a decide Policy (outcomes from ``base``)."""
        policy = self.params.policy(
            base.outcomes, base.default_outcome, self.novelty.threshold if self.novelty else None
        )
        policy = replace(policy, default_lead=self.route_set.defaults.default_lead)
        if self.novelty is not None and self.novelty.on_novel == "default":
            return replace(policy, novel_review=False)
        return policy

    def thresholds(self) -> dict[str, object]:
        """JSON-ready thresholds file content."""
        return {
            "route_set": self.route_set.name,
            "no_match": "needs_review" if self.params.no_match_review else "default",
            "routes": {
                name: {"accept": float(a), "review": float(r), "margin": float(m)}
                for name, a, r, m in zip(
                    self.route_names, self.params.accept, self.params.review, self.params.margin, strict=True
                )
            },
            "targets": self.targets.as_dict(),
            "calibration": self.calibration.as_dict(),
            "global": self.global_params,
            "refined_routes": list(self.refined_routes),
            "evaluations": self.evaluations,
            "novelty": self.novelty.model_dump() if self.novelty is not None else None,
        }


def _better(candidate: Assessment, best: Assessment | None) -> bool:
    if not candidate.feasible:
        return False
    return best is None or not best.feasible or candidate.key() < best.key()


def _global_search(
    objective: Objective, routes: int, progress: Progress
) -> tuple[Params, Assessment, dict[str, float | bool]]:
    """The best thresholds shared by all routes (one accept for default-outcome routes)."""
    decider = objective.decider
    groups = GroupDecider(decider)
    grid = np.array(ACCEPT_GRID)
    default_grid = sorted(set(ACCEPT_GRID[::2]) | {1.0})
    events = len(decider.s1)
    best: tuple[tuple[int, int], dict[str, float | bool]] | None = None
    # when nothing meets the targets (events equal to an example are accepted even at 1.0):
    # the smallest shortfall, then the least review
    fallback: tuple[tuple[float, int, int], dict[str, float | bool]] | None = None
    rows = 2 * len(MARGIN_GRID) * len(WIDTH_GRID)
    with progress.task("fitting thresholds: shared grid", total=rows) as advance:
        for no_match_review in (False, True):
            for margin in MARGIN_GRID:
                for width in WIDTH_GRID:
                    for accept_d in default_grid:
                        codes = groups.decide(grid, accept_d, width, margin, no_match_review)
                        objective.evaluations += len(grid)
                        shortfall, n_auto, n_correct = objective.shortfall(codes)
                        feasible = shortfall <= 0
                        params_here = {
                            "default_accept": float(accept_d),
                            "width": width,
                            "margin": margin,
                            "no_match_review": no_match_review,
                        }
                        if not feasible.any():
                            column = int(np.argmin(shortfall))
                            key3 = (
                                float(shortfall[column]),
                                events - int(n_auto[column]),
                                -int(n_correct[column]),
                            )
                            if best is None and (fallback is None or key3 < fallback[0]):
                                fallback = (key3, {"accept": float(grid[column]), **params_here})
                        for col in np.nonzero(feasible)[0]:
                            key = (events - int(n_auto[col]), -int(n_correct[col]))
                            if best is None or key < best[0]:
                                best = (key, {"accept": float(grid[col]), **params_here})
                    advance(1)
    if best is not None:
        chosen = best[1]
    else:
        assert fallback is not None
        chosen = fallback[1]
    accept = np.where(decider.non_default, float(chosen["accept"]), float(chosen["default_accept"]))
    params = Params(
        accept,
        np.full(routes, float(chosen["width"])),
        np.full(routes, float(chosen["margin"])),
        bool(chosen["no_match_review"]),
    )
    return params, objective.assess(params), chosen


def _coordinate_descent(
    objective: Objective,
    params: Params,
    current: Assessment,
    groups: list[np.ndarray],
    sweeps: int,
    progress: Progress,
) -> tuple[Params, Assessment]:
    """Move one group's accept, width or margin at a time while that lowers review (targets kept)."""
    with progress.task("fitting thresholds: per route", total=sweeps * (len(groups) + 1)) as advance:
        for sweep in range(sweeps):
            improved = False
            for members in groups:
                for name, steps in STEPS:
                    base = getattr(params, name)
                    best_move: tuple[Params, Assessment] | None = None
                    for step in steps:
                        values = base.copy()
                        if name == "accept":
                            values[members] = np.clip(np.round(base[members] + step, 3), -1.0, 1.0)
                        else:
                            values[members] = step
                        if np.array_equal(values, base):
                            continue
                        candidate = params.replace(**{name: values})
                        assessment = objective.assess(candidate)
                        if _better(assessment, best_move[1] if best_move else current):
                            best_move = (candidate, assessment)
                    if best_move is not None:
                        params, current = best_move
                        improved = True
                advance(1)
            flipped = params.replace(no_match_review=not params.no_match_review)
            assessment = objective.assess(flipped)
            if _better(assessment, current):
                params, current, improved = flipped, assessment, True
            advance(1)
            if not improved:
                advance((sweeps - sweep - 1) * (len(groups) + 1))  # the sweeps left are not needed
                break
    return params, current


def fit_thresholds(
    route_scores: np.ndarray,
    gold: list[str],
    route_set: RouteSet,
    routes: tuple[Route, ...],
    targets: Targets,
    *,
    min_support: int | None = 20,
    sweeps: int = 4,
    novelty: np.ndarray | None = None,
    novel_share: float | None = NOVEL_SHARE,
    held: np.ndarray | None = None,
    unseen: Unseen | None = None,
    progress: Progress = SILENT,
) -> FitResult:
    """Fit on a calibration split's ``(n, routes)`` scores (``routes``: the index's routes, in order).

    ``min_support``: a route gets thresholds of its own only when it is the top route
    of at least this many calibration events (``None``: only the outcome groups move).
    ``novelty``: the calibration events' novelty; with ``novel_share`` (None: no
    threshold) the set gets a novelty threshold, fitted first. ``held``: per event, a list
    hit holds it for review (a block list with ``action: review``): like a novel event, it
    never gets the default outcome automatically, and the search sees it so. ``unseen``:
    events as if their route did not exist (:mod:`~sieve.quality.unseen`), searched with the
    calibration events; the novelty threshold is fitted on the calibration events alone.
    """
    outcomes = tuple(route.outcome for route in routes)
    fitted_novelty = novel = None
    if novelty is not None and novel_share is not None:
        fitted_novelty = fit_novelty(novelty, novel_share)
    if unseen is not None:  # only outcome groups move: a route no left-out event reached is no safer
        route_scores, gold, novelty, held = unseen.appended(route_scores, gold, novelty, held)
        min_support = None
    if novelty is not None and fitted_novelty is not None:
        novel = is_novel(novelty, fitted_novelty.threshold)
    lead = route_set.defaults.default_lead
    if lead is not None:  # the set's own lead: events short of it never get the default either
        short = lead_short(route_scores, outcomes, route_set.default_outcome, lead)
        held = short if held is None else held | short
    never_default = novel if held is None else held if novel is None else novel | held
    decider = FastDecider(route_scores, outcomes, route_set.default_outcome, never_default)
    objective = Objective(decider, gold, targets)
    params, current, global_params = _global_search(objective, len(routes), progress)
    start = params
    route_code = decider.route_code
    groups = [np.nonzero(route_code == code)[0] for code in np.unique(route_code)]
    groups = [g for g in groups if len(g) > 1]
    support = np.bincount(decider.first, minlength=len(routes))
    singles = (
        []
        if min_support is None
        else [np.array([r]) for r in range(len(routes)) if support[r] >= min_support]
    )
    params, current = _coordinate_descent(objective, params, current, groups + singles, sweeps, progress)
    fitted = apply_thresholds(route_set, routes, params, global_params, fitted_novelty)
    threshold = fitted_novelty.threshold if fitted_novelty is not None else None
    check_agrees_with_worker(
        decider, params, params.policy(outcomes, route_set.default_outcome, threshold), novelty, held
    )
    refined = tuple(
        route.name
        for r, route in enumerate(routes)
        if (params.accept[r], params.width[r], params.margin[r])
        != (start.accept[r], start.width[r], start.margin[r])
    )
    return FitResult(
        params,
        tuple(r.name for r in routes),
        targets,
        current,
        global_params,
        fitted,
        objective.evaluations,
        refined,
        fitted_novelty,
    )


LEADS = tuple(round(0.05 * i, 2) for i in range(1, 11))  # the leads fit_lead tries: 0.05 .. 0.5


def fit_lead(fit: Callable[[RouteSet], FitResult], route_set: RouteSet, lead_cost: float) -> FitResult:
    """The fit with the largest lead (``LEADS``) that keeps calibration automation within ``lead_cost``.

    ``fit`` fits a route set on calibration. Without a lead first; then each lead in turn, up
    to the largest whose fit decides at most ``lead_cost`` (a share of the calibration events)
    fewer events automatically and still meets its targets if the fit without one did. The
    lead asks for as much evidence of the default outcome as in-domain traffic gives at that
    cost: what it buys is safety on traffic unlike the calibration data, which calibration
    cannot show (docs/quality.md, Lead).
    """
    def with_lead(lead: float | None) -> FitResult:
        return fit(route_set.model_copy(update={"defaults": route_set.defaults.model_copy(
            update={"default_lead": lead})}))

    best = base = with_lead(None)
    floor = base.calibration.auto - lead_cost * base.calibration.events
    for lead in LEADS:
        tried = with_lead(lead)
        if tried.calibration.auto < floor or (base.calibration.feasible and not tried.calibration.feasible):
            continue
        best = tried
    return best


def fit_novelty(novelty: np.ndarray, novel_share: float) -> Novelty:
    """The threshold above which ``novel_share`` of the calibration events' novelty lies (at most).

    The ``1 - novel_share`` quantile, rounded up to 0.0001; ``baseline`` is the share
    of calibration events above it (the drift alert's reference).
    """
    values = np.asarray(novelty, dtype=np.float64)
    if not 0.0 < novel_share < 1.0:
        raise ValueError(f"the novel share must lie strictly between 0 and 1, got {novel_share}")
    if values.size == 0:
        raise ValueError("no calibration events to fit a novelty threshold on")
    threshold = float(np.ceil(np.quantile(values, 1.0 - novel_share, method="higher") * 10_000) / 10_000)
    baseline = float(is_novel(values, threshold).mean())
    return Novelty(threshold=threshold, baseline=round(baseline, 4))


def declare_novel_default(
    fit: FitResult, base: Policy, route_scores: np.ndarray, novelty: np.ndarray, gold: list[str]
) -> FitResult:
    """``fit`` with ``on_novel: default`` if a held-out split (its scores, novelty, gold) shows it safe.

    Otherwise ``fit`` as it is (novel events to review).
    """
    if fit.novelty is None:
        return fit
    declared = fit.novelty.model_copy(update={"on_novel": "default"})
    candidate = replace(fit, novelty=declared)
    outcomes = [v.outcome for v in decide_scores(route_scores, candidate.policy(base), novelty)]
    novel = is_novel(novelty, declared.threshold)
    if not novel_default_holds(outcomes, novel, gold, base.default_outcome, fit.targets):
        return fit
    defaults = fit.route_set.defaults.model_copy(update={"novelty": declared})
    return replace(candidate, route_set=fit.route_set.model_copy(update={"defaults": defaults}))


def novel_default_holds(
    outcomes: list[str], novel: np.ndarray, gold: list[str], default_outcome: str, targets: Targets
) -> bool:
    """Whether held-out novel events given the default outcome meet its target at the Wilson lower bound.

    ``outcomes``: the held-out split decided with ``on_novel: default``. The target: the
    default outcome's precision target, else the accuracy target; no novel event so
    decided shows nothing, so it does not hold.
    """
    target = targets.precision.get(default_outcome, targets.accuracy)
    given = np.asarray(novel, dtype=bool) & (np.array(outcomes, dtype=object) == default_outcome)
    if target is None or not given.any():
        return False
    right = int((given & (np.array(gold, dtype=object) == default_outcome)).sum())
    low, _ = wilson(right, int(given.sum()), targets.z)
    return low >= target


def apply_thresholds(
    route_set: RouteSet,
    routes: tuple[Route, ...],
    params: Params,
    global_params: dict[str, float | bool],
    novelty: Novelty | None = None,
) -> RouteSet:
    """The route set with fitted defaults (novelty too) and per-route overrides where a route differs."""
    accept = float(global_params["accept"])
    review = max(-1.0, round(accept - float(global_params["width"]), 3))
    margin = float(global_params["margin"])
    defaults = RouteDefaults(
        aggregation=route_set.defaults.aggregation,
        accept=accept,
        review=review,
        margin=margin,
        no_match="needs_review" if params.no_match_review else "default",
        novelty=novelty,
        default_lead=route_set.defaults.default_lead,
    )
    position = {route.name: i for i, route in enumerate(routes)}
    new_routes = []
    for route in route_set.routes:
        i = position.get(route.name)
        if i is None:  # no examples in this space (an image-only route): left as it is
            new_routes.append(route)
            continue
        own = {
            "accept": float(params.accept[i]),
            "review": float(params.review[i]),
            "margin": float(params.margin[i]),
        }
        base = {"accept": accept, "review": review, "margin": margin}
        changed = {k: v for k, v in own.items() if v != base[k]}
        overrides = ThresholdOverrides(**changed) if changed else None
        new_routes.append(route.model_copy(update={"thresholds": overrides}))
    fitted = route_set.model_copy(update={"defaults": defaults, "routes": new_routes})
    RouteSet.model_validate(fitted.model_dump(mode="json"))  # the same checks as a route file gets
    return fitted
