"""The three-way policy decided fast over one fixed score matrix, for the threshold search.

:class:`FastDecider` is :func:`~sieve.flow.decide.decide_scores` vectorised over a
calibration split's ``(events, routes)`` scores, giving outcome codes for one
parameter choice (:class:`Params`) in a few array operations; :class:`GroupDecider`
decides a whole row of accept thresholds at once where thresholds are shared by
group. Novel events (a fixed mask: the novelty threshold is fitted first) never get
the default outcome. The fit checks on its result that the fast decider and the
worker's :func:`~sieve.flow.decide.decide_scores` agree on every event.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sieve.contracts import NEEDS_REVIEW
from sieve.flow.decide import Policy, decide_scores

REVIEW = -1  # the outcome code of needs_review


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

    def policy(
        self, outcomes: tuple[str, ...], default_outcome: str, novelty_threshold: float | None = None
    ) -> Policy:
        """These thresholds as the worker's decide Policy (novel events to review)."""
        return Policy(
            accept=as_float32(self.accept),
            review=as_float32(self.review),
            margin=as_float32(self.margin),
            outcomes=outcomes,
            default_outcome=default_outcome,
            no_match_review=self.no_match_review,
            novelty_threshold=novelty_threshold,
        )


def as_float32(values: np.ndarray) -> np.ndarray:
    """As the worker's Policy holds thresholds: float32."""
    return np.asarray(values, dtype=np.float32)


class FastDecider:
    """:func:`~sieve.flow.decide.decide_scores` over one fixed score matrix, vectorised; outcome codes out."""

    def __init__(
        self,
        route_scores: np.ndarray,
        outcomes: tuple[str, ...],
        default_outcome: str,
        novel: np.ndarray | None = None,
    ) -> None:
        self.scores = np.asarray(route_scores, dtype=np.float32)
        n, routes = self.scores.shape
        # per event: novel (never the default outcome automatically); None: no novelty threshold
        self.novel = None if novel is None else np.asarray(novel, dtype=bool)
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
        accept = as_float32(params.accept)
        review = as_float32(params.review)
        margin = as_float32(params.margin)
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
        return self.novel_to_review(codes)

    def novel_to_review(self, codes: np.ndarray) -> np.ndarray:
        """Outcome codes (events on the first axis) with novel events' default outcomes sent to review."""
        if self.novel is None:
            return codes
        novel = self.novel.reshape((-1,) + (1,) * (codes.ndim - 1))
        return np.where(novel & (codes == self.default_code), REVIEW, codes)


class GroupDecider:
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
        a_nd = as_float32(accept_nd)[None, :]
        a_d = np.float32(accept_d)
        r_nd = as_float32(np.maximum(-1.0, np.round(accept_nd - width, 3)))[None, :]
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
        return d.novel_to_review(codes)


def check_agrees_with_worker(
    decider: FastDecider, params: Params, policy: Policy, novelty: np.ndarray | None = None,
    held: np.ndarray | None = None,
) -> None:
    """The vectorised decider must agree with decide_scores on every calibration event.

    ``held``: events a review-list hit holds, whose default outcome becomes ``needs_review``
    (:func:`sieve.flow.list_policy.decide_with_lists`).
    """
    fast = decider.decide(params)
    names = decider.outcome_names
    worker = [v.outcome for v in decide_scores(decider.scores, policy, novelty)]
    if held is not None:
        worker = [NEEDS_REVIEW if hold and outcome == policy.default_outcome else outcome
                  for outcome, hold in zip(worker, held.tolist(), strict=True)]
    expected = [REVIEW if o == NEEDS_REVIEW else decider.code[o] for o in worker]
    mismatched = int((fast != np.array(expected)).sum())
    if mismatched:
        raise AssertionError(f"fit's decider disagrees with decide_scores on {mismatched} events ({names})")
