"""What a fit must reach on the calibration split, and how a parameter choice is judged.

:class:`Targets`: the precision of each automatic outcome named (e.g. ``violating``
0.9, ``clean`` 0.97) and/or the accuracy of all automatic decisions. By default the
Wilson lower bound at ``z`` must reach them, which leaves room for the difference
between the calibration split and new traffic. :class:`Objective` decides the
calibration split with one :class:`~sieve.quality.decider.Params` and says whether
the targets hold (:class:`Assessment`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from sieve.quality.decider import REVIEW, FastDecider, Params
from sieve.quality.metrics import wilson_bounds

NEVER = -2  # the code of a gold outcome no route has: never decided correctly


def lower_bounds(successes: object, totals: object, z: float) -> np.ndarray:
    """The Wilson lower bound a target must reach (1 where nothing was decided: nothing wrong)."""
    low, _ = wilson_bounds(successes, totals, z)
    return np.where(np.asarray(totals) > 0, low, 1.0)


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

    def on_labels(self, label_accuracy: float) -> Targets:
        """The same targets read against labels that are right with probability ``label_accuracy``.

        See :func:`agreement_for`; 1 (labels taken as right) gives the targets unchanged.
        """
        q = label_accuracy
        return Targets({o: agreement_for(p, q) for o, p in self.precision.items()},
                       None if self.accuracy is None else agreement_for(self.accuracy, q), self.z)


def _check_label_accuracy(label_accuracy: float) -> None:
    if not 0.5 < label_accuracy <= 1.0:
        raise ValueError(f"label accuracy must be within (0.5, 1], got {label_accuracy}")


def agreement_for(accuracy: float, label_accuracy: float) -> float:
    """How often a decider right ``accuracy`` of the time agrees with labels right ``label_accuracy`` of it.

    Labels from a reviewer (an LLM's verdicts) are wrong now and then, and an accuracy
    measured against them mixes the decider's errors with the reviewer's. With labels right
    with probability q, independent of the decider: agreement = a·q + (1 − a)·e, where e is the
    chance that a wrong decision matches a wrong label. e = 1 − q with two outcomes and less
    with more, so taking e = 1 − q gives the highest agreement a decider of accuracy a can
    need: agreement = a·(2q − 1) + (1 − q). A target on true accuracy is met when this
    agreement is (the cautious direction for any number of outcomes).
    """
    _check_label_accuracy(label_accuracy)
    return accuracy * (2 * label_accuracy - 1) + (1 - label_accuracy)


def accuracy_from_agreement(agreement: float, label_accuracy: float) -> float:
    """The inverse of :func:`agreement_for`, within [0, 1]: the accuracy an agreement with labels shows."""
    _check_label_accuracy(label_accuracy)
    return min(1.0, max(0.0, (agreement - (1 - label_accuracy)) / (2 * label_accuracy - 1)))


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

    def shortfall(self, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """How far outcome codes fall short of the targets (<= 0: all met), with their counts.

        ``codes`` has the events on its first axis; any further axis holds alternatives
        (one column per candidate threshold). Returns ``(shortfall, automatic, correct)``,
        one value per alternative.
        """
        z = self.targets.z
        gold = self.gold.reshape((-1,) + (1,) * (codes.ndim - 1))
        auto = codes != REVIEW
        correct = auto & (codes == gold)
        n_auto, n_correct = auto.sum(axis=0), correct.sum(axis=0)
        short = np.zeros(np.shape(n_auto))
        if self.targets.accuracy is not None:
            short = np.maximum(short, self.targets.accuracy - lower_bounds(n_correct, n_auto, z))
        for outcome, target in self.targets.precision.items():
            mine = codes == self.decider.code[outcome]
            right = (correct & mine).sum(axis=0)
            short = np.maximum(short, target - lower_bounds(right, mine.sum(axis=0), z))
        return short, n_auto, n_correct

    def assess(self, params: Params) -> Assessment:
        """Decide the calibration split with ``params`` and check the targets."""
        self.evaluations += 1
        codes = self.decider.decide(params)
        short, n_auto, n_correct = self.shortfall(codes)
        auto = codes != REVIEW
        correct = auto & (codes == self.gold)
        outcomes = len(self.decider.outcome_names)
        decided_counts = np.bincount(codes[auto], minlength=outcomes)
        correct_counts = np.bincount(codes[correct], minlength=outcomes)
        per_outcome = {
            name: (int(decided_counts[code]), int(correct_counts[code]))
            for name, code in self.decider.code.items()
        }
        return Assessment(
            len(codes), len(codes) - int(n_auto), int(n_auto), int(n_correct), per_outcome, bool(short <= 0)
        )
