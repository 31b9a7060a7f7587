"""The semantic-router way of deciding, measured side by side with Sieve's on the same split.

As aurelio-labs/semantic-router's ``RouteLayer`` decides: the route with the highest
mean over its hits among the nearest examples is chosen when its best hit exceeds
one threshold; otherwise no route (here: the route set's default outcome). There is
no review band. Its ``fit`` chooses that one threshold for the best accuracy.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sieve.quality.systems import ScoredSplit, SystemRun

# semantic-router's defaults, copied from its RouteLayer (0.x releases): the 5 nearest
# examples (top_k), a route's score the mean of its hits among them (aggregation "mean"),
# and score_threshold 0.5 for its HuggingFace (MiniLM) encoder.
SEMANTIC_ROUTER_TOP_K = 5
SEMANTIC_ROUTER_AGGREGATION = "mean"
SEMANTIC_ROUTER_THRESHOLD = 0.5
# The thresholds :func:`semantic_router_fit` tries: every hundredth in [0, 1).
SEMANTIC_ROUTER_FIT_GRID = tuple(float(t) for t in np.round(np.arange(0.0, 1.0, 0.01), 2))
# How reports describe the scoring and the policy.
SEMANTIC_ROUTER_SCORING = (
    f"{SEMANTIC_ROUTER_AGGREGATION} of the route's hits among the {SEMANTIC_ROUTER_TOP_K} nearest"
)


def semantic_router_scores(scored: ScoredSplit) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per event: the semantic-router top route, its mean score and its best hit among the nearest.

    Route ``-1`` where no example is among the nearest (an empty index cannot happen).
    """
    owner = scored.index.example_route
    n = scored.match.nearest_index.shape[0]
    top_route = np.full(n, -1, dtype=np.int64)
    top_mean = np.zeros(n, dtype=np.float64)
    top_best = np.zeros(n, dtype=np.float64)
    for i in range(n):
        hits: dict[int, list[float]] = {}
        for row, score in zip(scored.match.nearest_index[i], scored.match.nearest_score[i], strict=True):
            hits.setdefault(int(owner[row]), []).append(float(score))
        means = {route: sum(values) / len(values) for route, values in hits.items()}
        best_route = max(means, key=lambda route: (means[route], -route))
        top_route[i] = best_route
        top_mean[i] = means[best_route]
        top_best[i] = max(hits[best_route])
    return top_route, top_mean, top_best


def semantic_router_run(
    name: str, scored: ScoredSplit, threshold: float = SEMANTIC_ROUTER_THRESHOLD
) -> SystemRun:
    """The semantic-router way: mean per route over the nearest hits, one threshold on the best hit."""
    route_set = scored.route_set
    routes_in_index = scored.index.routes
    top_route, _top_mean, top_best = semantic_router_scores(scored)
    outcomes: list[str] = []
    routes: list[int | None] = []
    reasons: list[str] = []
    for route, best in zip(top_route, top_best, strict=True):
        if route >= 0 and best > threshold:
            outcomes.append(routes_in_index[int(route)].outcome)
            routes.append(int(route))
            reasons.append("accept")
        else:
            outcomes.append(route_set.default_outcome)
            routes.append(None)
            reasons.append("no_match")
    return SystemRun(
        name=name,
        kind="single-threshold",
        index=scored.index,
        outcomes=tuple(outcomes),
        reasons=tuple(reasons),
        routes=tuple(routes),
        forced=tuple(outcomes),
        confidence=np.abs(top_best - threshold),
        gold=scored.gold,
        details={
            "threshold": threshold,
            "top_k": SEMANTIC_ROUTER_TOP_K,
            "aggregation": SEMANTIC_ROUTER_AGGREGATION,
        },
    )


def semantic_router_fit(scored: ScoredSplit, grid: Sequence[float] | None = None) -> tuple[float, float]:
    """semantic-router's ``fit``: the one threshold with the best accuracy; ``(threshold, accuracy)``."""
    route_set = scored.route_set
    top_route, _mean, top_best = semantic_router_scores(scored)
    gold = np.array(scored.gold, dtype=object)
    route_outcome = np.array(
        [r.outcome for r in scored.index.routes] + [route_set.default_outcome], dtype=object
    )
    outcome_if_pass = route_outcome[np.where(top_route >= 0, top_route, len(scored.index.routes))]
    best = (SEMANTIC_ROUTER_THRESHOLD, -1.0)
    for threshold in grid if grid is not None else SEMANTIC_ROUTER_FIT_GRID:
        decided = np.where(top_best > threshold, outcome_if_pass, route_set.default_outcome)
        accuracy = float((decided == gold).mean()) if len(gold) else 0.0
        if accuracy > best[1] + 1e-12:
            best = (float(threshold), accuracy)
    return best
