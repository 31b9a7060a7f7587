"""Statistics of decisions: the Wilson interval, precision / recall helpers, the confidence curves.

- :func:`wilson_bounds`: the Wilson score interval, the one used by every report
  and by the threshold fit (its lower bound is what a target must reach).
- :func:`coverage_risk_curve`: events ranked by confidence, the error rate among
  the most confident ``c`` of them.
- :func:`cascade_curve` and :func:`summarise_cascade`: gold labels standing in for
  the reviewer, accuracy against the share deferred to review, and RouteLLM's
  CPT(50%/80%/95%) and APGR.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Shares deferred to review at which a report reads the cascade curve.
DEFERRALS = (0.0, 0.05, 0.1, 0.2, 0.25, 0.3, 0.4, 0.5)
# Shares of performance gap recovered for which a report gives CPT.
CPT_TARGETS = (0.5, 0.8, 0.95)


def wilson_bounds(successes: object, totals: object, z: float = 1.96) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval of ``successes / totals``, element by element.

    Where a total is 0 the interval is ``(0, 1)``; ``z`` <= 0 gives the point estimate.
    """
    hits = np.asarray(successes, dtype=np.float64)
    counts = np.asarray(totals, dtype=np.float64)
    safe = np.maximum(counts, 1.0)
    z = max(z, 0.0)
    p = hits / safe
    denominator = 1 + z * z / safe
    centre = (p + z * z / (2 * safe)) / denominator
    half = z * np.sqrt(p * (1 - p) / safe + z * z / (4 * safe * safe)) / denominator
    empty = counts == 0
    return (
        np.where(empty, 0.0, np.maximum(0.0, centre - half)),
        np.where(empty, 1.0, np.minimum(1.0, centre + half)),
    )


def wilson(successes: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of one proportion (``(0, 1)`` when ``total`` is 0)."""
    low, high = wilson_bounds(successes, total, z)
    return float(low), float(high)


def ratio(num: int | float, den: int | float) -> float | None:
    """``num / den``, or None when ``den`` is 0."""
    return float(num) / float(den) if den else None


def f1(precision: float | None, recall: float | None) -> float | None:
    """Harmonic mean of precision and recall (None when either is unknown)."""
    if precision is None or recall is None:
        return None
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


def cascade_curve(correct: np.ndarray, confidence: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Accuracy when the least confident ``k`` events go to a perfect reviewer, k = 0..n.

    Returns ``(deferred_share, accuracy)``, both of length n + 1.
    """
    n = len(correct)
    if n == 0:
        return np.array([0.0]), np.array([1.0])
    order = np.argsort(confidence, kind="stable")  # least confident first
    wrong_sorted = (~correct[order]).astype(np.int64)
    # deferring the first k fixes the errors among them
    fixed = np.concatenate([[0], np.cumsum(wrong_sorted)])
    errors = int((~correct).sum())
    accuracy = 1.0 - (errors - fixed) / n
    return np.arange(n + 1) / n, accuracy


def coverage_risk_curve(correct: np.ndarray, confidence: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Error rate among the ``k`` most confident events, k = 1..n: ``(coverage, risk)``."""
    n = len(correct)
    if n == 0:
        return np.array([1.0]), np.array([0.0])
    order = np.argsort(-confidence, kind="stable")
    wrong = np.cumsum((~correct[order]).astype(np.int64))
    k = np.arange(1, n + 1)
    return k / n, wrong / k


def cpt_key(target: float) -> str:
    """How a CPT target is named in reports: ``0.8`` -> ``"80%"``."""
    return f"{int(target * 100)}%"


@dataclass(frozen=True)
class CascadeSummary:
    """RouteLLM's cascade measures with a perfect (gold) reviewer as the strong model."""

    router_accuracy: float  # everything decided automatically (the weak model alone)
    cpt: dict[str, float | None]  # share deferred to recover each CPT_TARGETS share of the gap
    apgr: float | None  # area under the performance-gap-recovered curve
    accuracy_at: dict[str, float]  # accuracy with the DEFERRALS shares deferred

    def as_dict(self) -> dict[str, object]:
        """JSON-ready."""
        return {
            "router_accuracy": self.router_accuracy,
            "cpt": self.cpt,
            "apgr": self.apgr,
            "accuracy_at_deferred": self.accuracy_at,
        }


def summarise_cascade(correct: np.ndarray, confidence: np.ndarray) -> CascadeSummary:
    """CPT(x): the least share deferred whose accuracy recovers x of the gap to 1.0; APGR."""
    deferred, accuracy = cascade_curve(correct, confidence)
    weak = float(accuracy[0])
    gap = 1.0 - weak
    cpt: dict[str, float | None] = {}
    apgr: float | None
    if gap <= 0:
        cpt = {cpt_key(target): 0.0 for target in CPT_TARGETS}
        apgr = None
    else:
        pgr = (accuracy - weak) / gap
        for target in CPT_TARGETS:
            reached = np.nonzero(pgr >= target - 1e-12)[0]
            cpt[cpt_key(target)] = float(deferred[reached[0]]) if reached.size else None
        apgr = float(np.trapezoid(pgr, deferred))
    at = {}
    for share in DEFERRALS:
        k = min(len(accuracy) - 1, int(math.floor(share * (len(accuracy) - 1) + 1e-9)))
        at[f"{share:.2f}"] = float(accuracy[k])
    return CascadeSummary(weak, cpt, apgr, at)
