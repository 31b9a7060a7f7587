"""Calibration events as if their route did not exist: what traffic from an unknown topic looks like.

A fit on in-domain calibration data alone learns how events of the routes' own topics
score, and nothing about events of topics the routes lack: those reach the worker as
confident matches to the nearest known route (CLINC150 with half of its intents known
sends two thirds of the other half's queries automatically to a wrong intent). Leaving
routes out shows it on data the fit already has: each calibration event whose gold
route is in the set is scored again with that route removed (its column below every
threshold, its examples out of the novelty score, its class out of the head), keeping its
gold outcome, which it can then only get through another route of that outcome. The fit
(:func:`~sieve.quality.fit.fit_thresholds`) searches with these events mixed in at a
stated share, so its thresholds hold with that much unknown traffic too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sieve.flow.head import LearnedHead
from sieve.flow.match import RouteIndex
from sieve.quality.scoring import held_by_lists
from sieve.quality.systems import ScoredSplit

REMOVED = np.float32(-2.0)  # a removed route's score: below every review threshold (never below -1)
MAX_SHARE = 0.9


@dataclass(frozen=True)
class Unseen:
    """Calibration events scored without their own routes: scores, novelty, gold outcome, list holds."""

    scores: np.ndarray  # (m, routes), removed routes at REMOVED
    novelty: np.ndarray  # (m,)
    gold: tuple[str, ...]
    held: np.ndarray | None  # (m,) held for review by a list (None: the set has no lists)

    def mixed(self, n: int, share: float, seed: int = 0) -> Unseen:
        """As many of these (drawn with ``seed``) as make ``share`` of ``n`` events and them together."""
        if not 0.0 < share <= MAX_SHARE:
            raise ValueError(f"the unseen share must lie in (0, {MAX_SHARE}], got {share}")
        if not self.gold:
            raise ValueError("no calibration event has a route of the set to leave out")
        want = int(round(share / (1.0 - share) * n))
        rng = np.random.default_rng(seed)
        rows = rng.choice(len(self.gold), size=want, replace=want > len(self.gold))
        return Unseen(self.scores[rows], self.novelty[rows], tuple(self.gold[i] for i in rows),
                      None if self.held is None else self.held[rows])

    def appended(
        self, route_scores: np.ndarray, gold: list[str], novelty: np.ndarray | None, held: np.ndarray | None
    ) -> tuple[np.ndarray, list[str], np.ndarray | None, np.ndarray | None]:
        """The in-domain events' scores, gold, novelty and list holds with these events after them."""
        scores = np.concatenate([np.asarray(route_scores, dtype=np.float32), self.scores])
        if novelty is not None:
            novelty = np.concatenate([np.asarray(novelty, dtype=np.float32), self.novelty])
        if held is not None or self.held is not None:
            held = np.concatenate([np.zeros(len(gold), bool) if held is None else np.asarray(held, bool),
                                   np.zeros(len(self.gold), bool) if self.held is None else self.held])
        return scores, list(gold) + list(self.gold), novelty, held


def leave_routes_out(
    route_scores: np.ndarray,
    vectors: np.ndarray,
    labels: Sequence[frozenset[str] | set[str]],
    gold: Sequence[str],
    index: RouteIndex,
    head: LearnedHead | None = None,
    held: np.ndarray | None = None,
    texts: Sequence[str] | None = None,
) -> Unseen:
    """Each event with a gold route in ``index``, scored as the worker would if that route were gone.

    ``route_scores``: the events' nearest-example route scores (without the head); ``texts``:
    their texts, which a head with words needs;
    ``labels``: each event's gold route names, all removed together. An event keeps its gold
    outcome: where no other route has it, no automatic decision of the event is right. Events
    whose labels name no route of the set (unlabelled default-outcome events) are skipped, as
    are events whose labels name every route.
    """
    names = {name: i for i, name in enumerate(index.route_names)}
    removed_rows = [[names[n] for n in sorted(labels[i]) if n in names] for i in range(len(labels))]
    rows = [i for i, removed in enumerate(removed_rows) if removed and len(removed) < len(names)]
    nearest = np.asarray(route_scores, dtype=np.float32)[rows].copy()
    mask = np.zeros(nearest.shape, dtype=bool)
    for k, i in enumerate(rows):
        mask[k, removed_rows[i]] = True
    novelty = _novelty_without(np.asarray(vectors, dtype=np.float32)[rows], index, mask)
    scores = nearest
    if head is not None:
        p = head.route_scores(np.asarray(vectors)[rows], index,
                              None if texts is None else [texts[i] for i in rows])
        p[mask] = 0.0
        if head.kind == "softmax":  # the same model without the removed classes: renormalised
            p /= np.maximum(p.sum(axis=1, keepdims=True), np.float32(1e-12))
        scores = head.mix(nearest, p)
    scores[mask] = REMOVED
    return Unseen(scores, novelty, tuple(gold[i] for i in rows),
                  None if held is None else np.asarray(held, dtype=bool)[rows])


def _novelty_without(
    vectors: np.ndarray, index: RouteIndex, removed: np.ndarray, chunk: int = 1024
) -> np.ndarray:
    """``1 -`` the best similarity to an example of a route not removed for that event (as novelty_scores)."""
    out = np.ones(vectors.shape[0], dtype=np.float32)
    for start in range(0, vectors.shape[0], chunk):
        sims = vectors[start:start + chunk] @ index.vectors.T  # (c, examples)
        gone = removed[start:start + chunk][:, index.example_route]  # (c, examples)
        sims = np.where(gone, np.float32(-1.0), sims)
        out[start:start + chunk] = np.float32(1.0) - sims.max(axis=1)
    return out


def unseen_of(cal: ScoredSplit, head: LearnedHead | None, share: float | None) -> Unseen | None:
    """A calibration split's events left out of their routes, ``share`` of the mix (None: none)."""
    if share is None:
        return None
    labels = [ex.labels for ex in cal.data.examples]
    out = leave_routes_out(cal.match.route_scores, cal.vectors, labels, cal.gold, cal.index, head,
                           held_by_lists(cal), cal.texts)
    return out.mixed(len(cal.gold), share)
