"""Fit the three-way policy: thresholds that meet precision targets with the least review.

Given a calibration split's route scores and gold outcomes, choose for every route
an accept threshold, a review band (``review = accept - width``) and a margin, and
for the set what an event far from every example gets (``no_match``: the default
outcome or ``needs_review``), so that

- the precision of each automatic outcome named in the targets (e.g. ``violating``
  0.9, ``clean`` 0.97) and/or the accuracy of all automatic decisions reach their
  targets — by default the Wilson lower bound at ``z`` must reach them, which
  leaves room for the difference between the calibration split and new traffic —
- while sending the fewest events to review.

The search: a grid over one accept threshold, band width and margin shared by all
routes and over the no-match choice; then coordinate descent, first moving the
routes of one outcome together, then single routes that are the top route of at
least ``min_support`` calibration events, each move kept only if the targets still
hold and the review share falls (or stays and accuracy rises). Every candidate is
scored with a vectorised copy of :func:`~sieve.flow.decide.decide_scores`, checked equal
to it on the result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from sieve.contracts import NEEDS_REVIEW
from sieve.flow.decide import Policy, decide_scores
from sieve.routeset import Route, RouteDefaults, RouteSet, ThresholdOverrides

REVIEW = -1
NEVER = -2  # a gold outcome no route has: never decided correctly

ACCEPT_GRID = tuple(round(0.10 + 0.01 * i, 3) for i in range(86)) + (1.0,)  # 0.10 .. 0.95, and 1.0
WIDTH_GRID = (0.0, 0.02, 0.04, 0.06, 0.08, 0.10, 0.15, 0.20, 0.30, 0.50, 2.0)
MARGIN_GRID = (0.0, 0.01, 0.02, 0.04, 0.06, 0.10, 0.15, 0.20, 0.30)
ACCEPT_STEPS = (-0.08, -0.04, -0.02, -0.01, -0.005, 0.005, 0.01, 0.02, 0.04, 0.08)
WIDTH_STEPS = WIDTH_GRID
MARGIN_STEPS = MARGIN_GRID


def _lower_bound(successes: int, total: int, z: float) -> float:
    """Wilson lower bound (``z`` = 0: the plain proportion)."""
    if total == 0:
        return 1.0
    p = successes / total
    if z <= 0:
        return p
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    return max(0.0, centre - half)


def _lower_bounds(successes: np.ndarray, totals: np.ndarray, z: float) -> np.ndarray:
    """:func:`_lower_bound` over arrays (a total of 0 gives 1: nothing decided, nothing wrong)."""
    successes = np.asarray(successes, dtype=np.float64)
    totals = np.asarray(totals, dtype=np.float64)
    safe = np.maximum(totals, 1.0)
    p = successes / safe
    if z <= 0:
        bound = p
    else:
        denominator = 1 + z * z / safe
        centre = (p + z * z / (2 * safe)) / denominator
        half = z * np.sqrt(p * (1 - p) / safe + z * z / (4 * safe * safe)) / denominator
        bound = np.maximum(0.0, centre - half)
    return np.where(totals > 0, bound, 1.0)


@dataclass(frozen=True)
class Targets:
    """What automatic decisions must reach on the calibration split."""

    precision: dict[str, float] = field(default_factory=dict)  # per automatic outcome
    accuracy: float | None = None  # of all automatic decisions together
    z: float = 1.0  # the Wilson lower bound at this z must reach the target (0: the point estimate)

    def __post_init__(self) -> None:
        for name, value in [*self.precision.items(), ("accuracy", self.accuracy)]:
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"target {name} must be within [0, 1], got {value}")
        if not self.precision and self.accuracy is None:
            raise ValueError("give at least one target: a precision per outcome or an accuracy")

    def as_dict(self) -> dict[str, object]:
        """JSON-ready."""
        return {"precision": self.precision, "accuracy": self.accuracy, "z": self.z}

    def describe(self) -> str:
        """One line, e.g. ``precision violating >= 0.9, accuracy >= 0.95 (Wilson lower bound, z=1)``."""
        parts = [f"precision {o} >= {p:g}" for o, p in sorted(self.precision.items())]
        if self.accuracy is not None:
            parts.append(f"accuracy >= {self.accuracy:g}")
        how = f"Wilson lower bound, z={self.z:g}" if self.z > 0 else "point estimate"
        return f"{', '.join(parts)} ({how}, on the calibration split)"


@dataclass(frozen=True)
class Params:
    """The searched parameters, aligned with the index's routes."""

    accept: np.ndarray  # float64, values rounded to 0.001
    width: np.ndarray
    margin: np.ndarray
    no_match_review: bool

    @property
    def review(self) -> np.ndarray:
        """Review thresholds (never below -1)."""
        return np.maximum(-1.0, np.round(self.accept - self.width, 3))

    def replace(self, **changes: object) -> Params:
        """A copy with some fields changed."""
        values = {
            "accept": self.accept,
            "width": self.width,
            "margin": self.margin,
            "no_match_review": self.no_match_review,
        } | changes
        return Params(**values)  # type: ignore[arg-type]


def _f32(values: np.ndarray) -> np.ndarray:
    """As the worker's Policy holds thresholds: float32."""
    return np.asarray(values, dtype=np.float32)


class FastDecider:
    """:func:`~sieve.flow.decide.decide_scores` over one fixed score matrix, vectorised; outcome codes out."""

    def __init__(self, route_scores: np.ndarray, outcomes: tuple[str, ...], default_outcome: str) -> None:
        self.scores = np.asarray(route_scores, dtype=np.float32)
        n, routes = self.scores.shape
        self.outcome_names: list[str] = sorted(set(outcomes) | {default_outcome})
        code = {name: i for i, name in enumerate(self.outcome_names)}
        self.code = code
        self.route_code = np.array([code[o] for o in outcomes], dtype=np.int64)
        self.default_code = code[default_outcome]
        self.non_default = self.route_code != self.default_code
        order = np.argsort(-self.scores, axis=1)  # as decide_scores: argsort(-scores) row by row
        rows = np.arange(n)
        self.first = order[:, 0]
        self.s1 = self.scores[rows, self.first]
        self.has_second = routes > 1
        self.second = order[:, 1] if routes > 1 else self.first
        self.s2 = self.scores[rows, self.second]
        # decide_scores takes s1 - s2 in Python floats and compares with a float32 margin,
        # which NumPy does in float32: so does this.
        self.lead = (self.s1.astype(np.float64) - self.s2.astype(np.float64)).astype(np.float32)
        self.different = self.route_code[self.second] != self.route_code[self.first]

    def decide(self, params: Params) -> np.ndarray:
        """Outcome code per event (``REVIEW`` for needs_review)."""
        accept = _f32(params.accept)
        review = _f32(params.review)
        margin = _f32(params.margin)
        accepted = self.s1 >= accept[self.first]
        if self.has_second:
            ambiguous = (
                accepted
                & self.different
                & (self.lead < margin[self.first])
                & (self.s2 >= review[self.second])
            )
        else:
            ambiguous = np.zeros_like(accepted)
        if self.non_default.any():
            in_band = ~accepted & (self.scores[:, self.non_default] >= review[self.non_default]).any(axis=1)
        else:
            in_band = np.zeros_like(accepted)
        codes = np.where(accepted & ~ambiguous, self.route_code[self.first], REVIEW)
        no_match = ~accepted & ~in_band
        codes[no_match] = REVIEW if params.no_match_review else self.default_code
        return codes


@dataclass(frozen=True)
class Assessment:
    """How a parameter choice does on the calibration split."""

    events: int
    review: int
    auto: int
    correct: int
    per_outcome: dict[str, tuple[int, int]]  # outcome -> (decided, correct)
    feasible: bool

    @property
    def review_share(self) -> float:
        """Share sent to review."""
        return self.review / self.events if self.events else 0.0

    def key(self) -> tuple[int, int]:
        """Smaller is better: fewer reviews, then more correct automatic decisions."""
        return (self.review, -self.correct)

    def as_dict(self) -> dict[str, object]:
        """JSON-ready."""
        return {
            "events": self.events,
            "review": self.review,
            "review_share": self.review_share,
            "auto": self.auto,
            "auto_share": self.auto / self.events if self.events else 0.0,
            "auto_accuracy": self.correct / self.auto if self.auto else None,
            "per_outcome": {
                o: {"decided": d, "correct": c, "precision": c / d if d else None}
                for o, (d, c) in sorted(self.per_outcome.items())
            },
            "feasible": self.feasible,
        }


class Objective:
    """Targets checked on one calibration split."""

    def __init__(self, decider: FastDecider, gold: list[str], targets: Targets) -> None:
        self.decider = decider
        self.targets = targets
        self.gold = np.array([decider.code.get(g, NEVER) for g in gold], dtype=np.int64)
        unknown = [o for o in targets.precision if o not in decider.code]
        if unknown:
            raise ValueError(
                f"no route has the target outcome(s) {unknown}; outcomes: {decider.outcome_names}"
            )
        self.evaluations = 0

    def assess(self, params: Params) -> Assessment:
        """Decide the calibration split with ``params`` and check the targets."""
        self.evaluations += 1
        codes = self.decider.decide(params)
        auto = codes != REVIEW
        correct = auto & (codes == self.gold)
        n_auto, n_correct = int(auto.sum()), int(correct.sum())
        feasible = True
        if self.targets.accuracy is not None:
            feasible = _lower_bound(n_correct, n_auto, self.targets.z) >= self.targets.accuracy
        per_outcome: dict[str, tuple[int, int]] = {}
        decided_counts = np.bincount(codes[auto], minlength=len(self.decider.outcome_names))
        correct_counts = np.bincount(codes[correct], minlength=len(self.decider.outcome_names))
        for name, code in self.decider.code.items():
            per_outcome[name] = (int(decided_counts[code]), int(correct_counts[code]))
        for outcome, target in self.targets.precision.items():
            decided, right = per_outcome[outcome]
            if _lower_bound(right, decided, self.targets.z) < target:
                feasible = False
        return Assessment(len(codes), len(codes) - n_auto, n_auto, n_correct, per_outcome, feasible)


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

    def policy(self, base: Policy) -> Policy:
        """The fitted thresholds as a decide Policy (outcomes from ``base``)."""
        return Policy(
            accept=_f32(self.params.accept),
            review=_f32(self.params.review),
            margin=_f32(self.params.margin),
            outcomes=base.outcomes,
            default_outcome=base.default_outcome,
            no_match_review=self.params.no_match_review,
        )

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
        }


def _better(candidate: Assessment, best: Assessment | None) -> bool:
    if not candidate.feasible:
        return False
    return best is None or not best.feasible or candidate.key() < best.key()


class _GroupScalars:
    """Per event, what decide_scores looks at when thresholds are shared within two groups.

    The groups: routes whose outcome is the set's default (``D``, no review band) and
    all others (``N``). With one accept threshold per group and one width and margin,
    the policy depends on a handful of numbers per event, so a whole grid row of
    accept thresholds is decided in one array operation.
    """

    def __init__(self, decider: FastDecider) -> None:
        self.decider = decider
        non_default = decider.non_default
        self.first_nd = non_default[decider.first]
        self.second_nd = non_default[decider.second]
        self.first_code = decider.route_code[decider.first]
        scores = decider.scores
        self.max_nd = (
            scores[:, non_default].max(axis=1)
            if non_default.any()
            else np.full(len(scores), -np.inf, np.float32)
        )

    def decide(
        self, accept_nd: np.ndarray, accept_d: float, width: float, margin: float, no_match_review: bool
    ) -> np.ndarray:
        """Outcome codes, ``(events, len(accept_nd))``: one column per non-default accept threshold."""
        d = self.decider
        a_nd = _f32(accept_nd)[None, :]
        a_d = np.float32(accept_d)
        r_nd = _f32(np.maximum(-1.0, np.round(accept_nd - width, 3)))[None, :]
        r_d = np.float32(max(-1.0, round(accept_d - width, 3)))
        s1 = d.s1[:, None]
        accept_first = np.where(self.first_nd[:, None], a_nd, a_d)
        accepted = s1 >= accept_first
        if d.has_second:
            review_second = np.where(self.second_nd[:, None], r_nd, r_d)
            ambiguous = (
                accepted
                & d.different[:, None]
                & (d.lead[:, None] < np.float32(margin))
                & (d.s2[:, None] >= review_second)
            )
        else:
            ambiguous = np.zeros_like(accepted)
        in_band = ~accepted & (self.max_nd[:, None] >= r_nd)
        codes = np.where(accepted & ~ambiguous, self.first_code[:, None], REVIEW)
        codes[~accepted & ~in_band] = REVIEW if no_match_review else d.default_code
        return codes


def _global_search(objective: Objective, routes: int) -> tuple[Params, Assessment, dict[str, float | bool]]:
    decider = objective.decider
    scalars = _GroupScalars(decider)
    grid = np.array(ACCEPT_GRID)
    default_grid = sorted(set(ACCEPT_GRID[::2]) | {1.0})
    gold = objective.gold[:, None]
    targets = objective.targets
    best: tuple[tuple[int, int], dict[str, float | bool]] | None = None
    # when nothing meets the targets (events equal to an example are accepted even at 1.0):
    # the smallest shortfall, then the least review
    fallback: tuple[tuple[float, int, int], dict[str, float | bool]] | None = None
    for no_match_review in (False, True):
        for margin in MARGIN_GRID:
            for width in WIDTH_GRID:
                for accept_d in default_grid:
                    codes = scalars.decide(grid, accept_d, width, margin, no_match_review)
                    objective.evaluations += len(grid)
                    auto = codes != REVIEW
                    correct = auto & (codes == gold)
                    n_auto, n_correct = auto.sum(axis=0), correct.sum(axis=0)
                    shortfall = np.zeros(len(grid))
                    if targets.accuracy is not None:
                        shortfall = np.maximum(
                            shortfall, targets.accuracy - _lower_bounds(n_correct, n_auto, targets.z)
                        )
                    for outcome, target in targets.precision.items():
                        code = decider.code[outcome]
                        decided = (codes == code).sum(axis=0)
                        right = (correct & (codes == code)).sum(axis=0)
                        shortfall = np.maximum(shortfall, target - _lower_bounds(right, decided, targets.z))
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
                            len(decider.s1) - int(n_auto[column]),
                            -int(n_correct[column]),
                        )
                        if best is None and (fallback is None or key3 < fallback[0]):
                            fallback = (key3, {"accept": float(grid[column]), **params_here})
                    for col in np.nonzero(feasible)[0]:
                        key = (len(decider.s1) - int(n_auto[col]), -int(n_correct[col]))
                        if best is None or key < best[0]:
                            best = (key, {"accept": float(grid[col]), **params_here})
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
    objective: Objective, params: Params, current: Assessment, groups: list[np.ndarray], sweeps: int
) -> tuple[Params, Assessment]:
    for _ in range(sweeps):
        improved = False
        for members in groups:
            for name, steps in (("accept", ACCEPT_STEPS), ("width", WIDTH_STEPS), ("margin", MARGIN_STEPS)):
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
        flipped = params.replace(no_match_review=not params.no_match_review)
        assessment = objective.assess(flipped)
        if _better(assessment, current):
            params, current, improved = flipped, assessment, True
        if not improved:
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
) -> FitResult:
    """Fit on a calibration split's ``(n, routes)`` scores (``routes``: the index's routes, in order).

    ``min_support``: a route gets thresholds of its own only when it is the top route
    of at least this many calibration events (``None``: only the outcome groups move).
    """
    outcomes = tuple(route.outcome for route in routes)
    decider = FastDecider(route_scores, outcomes, route_set.default_outcome)
    objective = Objective(decider, gold, targets)
    params, current, global_params = _global_search(objective, len(routes))
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
    params, current = _coordinate_descent(objective, params, current, groups + singles, sweeps)
    fitted = apply_thresholds(route_set, routes, params, global_params)
    base = Policy(
        _f32(params.accept),
        _f32(params.review),
        _f32(params.margin),
        outcomes,
        route_set.default_outcome,
        params.no_match_review,
    )
    _check_same_as_worker(decider, params, base)
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
    )


def _check_same_as_worker(decider: FastDecider, params: Params, policy: Policy) -> None:
    """The vectorised decider must agree with decide_scores on every calibration event."""
    fast = decider.decide(params)
    names = decider.outcome_names
    worker = [v.outcome for v in decide_scores(decider.scores, policy)]
    expected = [REVIEW if o == NEEDS_REVIEW else decider.code[o] for o in worker]
    mismatched = int((fast != np.array(expected)).sum())
    if mismatched:
        raise AssertionError(f"fit's decider disagrees with decide_scores on {mismatched} events ({names})")


def apply_thresholds(
    route_set: RouteSet, routes: tuple[Route, ...], params: Params, global_params: dict[str, float | bool]
) -> RouteSet:
    """The route set with fitted defaults and per-route overrides where a route differs."""
    accept = float(global_params["accept"])
    review = max(-1.0, round(accept - float(global_params["width"]), 3))
    margin = float(global_params["margin"])
    defaults = RouteDefaults(
        aggregation=route_set.defaults.aggregation,
        accept=accept,
        review=review,
        margin=margin,
        no_match="needs_review" if params.no_match_review else "default",
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
