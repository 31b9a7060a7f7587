"""Sieve's decisions on labelled data, with the worker's own batch functions.

A labelled split goes through exactly what a worker runs on a batch: the route set's
term lists (:class:`~sieve.flow.lists.TermMatcher`), the text encoder,
:func:`~sieve.flow.match.match_batch`, then the policy with the list hits
(:func:`~sieve.flow.list_policy.decide_with_lists`), optionally on scores combined with a
learned head. Gold labels then say how good the decisions were (:mod:`sieve.quality.tables`).

The confidence of an event is the smallest change of a route score that would
flip the router's answer without review (see :func:`forced_answers`): how far the
event sits from the policy's decision boundary, in cosine units.
"""

from __future__ import annotations

import numpy as np

from sieve.encoders.base import TextEncoder
from sieve.flow.decide import Policy, novelty_scores
from sieve.flow.head import LearnedHead, decision_scores
from sieve.flow.list_policy import decide_with_lists
from sieve.flow.lists import TermMatcher
from sieve.flow.match import RouteIndex, match_batch
from sieve.lists import TermList
from sieve.quality.datasets import LabelledData
from sieve.quality.semantic_router import SEMANTIC_ROUTER_TOP_K
from sieve.quality.systems import ScoredSplit, SystemRun


def text_of(data: LabelledData) -> list[str]:
    """The texts of a split (image examples need an image encoder, which eval does not run)."""
    images = [ex.id for ex in data.examples if ex.text is None]
    if images:
        raise ValueError(
            f"{data.name}: {len(images)} examples have no text (image references, e.g. {images[0]!r}); "
            "evaluating image routes needs the image encoder, which `sieve eval` does not run yet"
        )
    return [str(ex.text) for ex in data.examples]


def score_split(
    data: LabelledData, index: RouteIndex, encoder: TextEncoder, vectors: np.ndarray | None = None
) -> ScoredSplit:
    """Lists, encode (unless ``vectors`` are given) and match: the worker's stages before the policy.

    The match also keeps the nearest examples semantic-router looks at, for its side of the comparison.
    """
    if vectors is None:
        vectors = encoder.encode(text_of(data))
    if encoder.id != index.encoder_id:
        raise ValueError(f"index encoded with {index.encoder_id!r}, events with {encoder.id!r}")
    match = match_batch(vectors, index, index.aggregation, nearest_k=SEMANTIC_ROUTER_TOP_K)
    default = index.route_set.default_outcome
    term_lists = [item for item in index.route_set.loaded_lists if isinstance(item, TermList)]
    hits = tuple(TermMatcher(term_lists).match_batch(text_of(data))) if term_lists else None
    return ScoredSplit(data, index, vectors, match, tuple(ex.gold(default) for ex in data.examples), hits)


def held_by_lists(scored: ScoredSplit) -> np.ndarray | None:
    """Per event, whether a review-list hit holds it for review (None: the set has no term lists)."""
    if scored.list_hits is None:
        return None
    return np.array([any(hit.action == "review" for hit in hits) for hits in scored.list_hits], dtype=bool)


def forced_answers(route_scores: np.ndarray, policy: Policy) -> tuple[list[str], np.ndarray]:
    """The policy's answer with review switched off, and how sure it is.

    Each route's review band ``[review, accept)`` is collapsed to its midpoint
    ``b``. Answer: the top route's outcome when its score reaches its ``b``, else
    the default. Confidence: the smallest score change that flips that answer —
    for an accepted event, its lead over ``b`` (unless the route's outcome is the
    default anyway) and over the best route of another outcome; for a default
    one, how far every other-outcome route is below its ``b``. Events inside a
    review band or near a route of another outcome are the least confident, so
    the policy's own review set is (close to) a prefix of this ranking.
    """
    outcomes = np.array(policy.outcomes, dtype=object)
    non_default = outcomes != policy.default_outcome
    boundary = (policy.accept.astype(np.float64) + policy.review.astype(np.float64)) / 2.0
    n, routes = route_scores.shape
    answers: list[str] = []
    confidence = np.empty(n, dtype=np.float64)
    firsts = np.argsort(-route_scores, axis=1)[:, 0] if routes else np.zeros(n, dtype=np.int64)
    for i, scores in enumerate(route_scores):
        first = int(firsts[i])  # the same top route as decide_scores picks, ties included
        s1 = float(scores[first])
        if non_default[first] and s1 >= boundary[first]:
            outcome = str(outcomes[first])
            gaps = [s1 - float(boundary[first])]
            others = outcomes != outcome
            if others.any():
                gaps.append(s1 - float(scores[others].max()))
            answers.append(outcome)
            confidence[i] = min(gaps)
        else:
            answers.append(policy.default_outcome)
            if not non_default.any():
                confidence[i] = 2.0
                continue
            # route r takes over when it reaches its b and passes every other route
            top_other = np.full(routes, s1)
            if routes > 1:
                top_other[first] = float(scores[int(np.argsort(-scores)[1])])
            need = np.maximum(boundary - scores, top_other - scores)
            confidence[i] = max(0.0, float(need[non_default].min()))
    return answers, confidence


def three_way_run(
    name: str, scored: ScoredSplit, policy: Policy | None = None, head: LearnedHead | None = None
) -> SystemRun:
    """Sieve's policy (the route set's thresholds unless ``policy`` is given) on a scored split."""
    index = scored.index
    policy = policy or Policy.for_index(index)
    route_scores = decision_scores(scored.match.route_scores, scored.vectors, index, head,
                                   scored.texts)  # as the worker
    novelty = novelty_scores(scored.match.nearest_score)
    route_scores, verdicts = decide_with_lists(route_scores, policy, novelty, scored.list_hits, index)
    forced, confidence = forced_answers(route_scores, policy)
    return SystemRun(
        name=name,
        kind="three-way",
        index=index,
        outcomes=tuple(v.outcome for v in verdicts),
        reasons=tuple(v.reason for v in verdicts),
        routes=tuple(v.route for v in verdicts),
        forced=tuple(forced),
        confidence=confidence,
        gold=scored.gold,
        details={"head_weight": head.weight if head is not None else None},
        novel=policy.novel(novelty),
    )
