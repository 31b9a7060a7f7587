"""What the decision systems under evaluation share: a scored split in, a run of answers out.

A :class:`ScoredSplit` is a labelled split after the worker's encode and match
stages (:func:`~sieve.quality.scoring.score_split`); each system (Sieve's
three-way policy, with or without a head, and the semantic-router way) turns it
into a :class:`SystemRun`, which the tables and reports measure against gold.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from sieve.flow.lists import ListHit
from sieve.flow.match import MatchResult, RouteIndex
from sieve.quality.datasets import LabelledData
from sieve.routeset import RouteSet

SystemKind = Literal["three-way", "single-threshold"]


@dataclass(frozen=True)
class ScoredSplit:
    """A labelled split run through encode and match_batch against one route index."""

    data: LabelledData
    index: RouteIndex
    vectors: np.ndarray
    match: MatchResult  # with the nearest examples semantic-router looks at
    gold: tuple[str, ...]  # gold outcomes, "matches nothing" resolved to the set's default
    # per event, the route set's term-list hits (None: the set has no term lists), as the worker finds them
    list_hits: tuple[list[ListHit], ...] | None = None

    @property
    def route_set(self) -> RouteSet:
        """The route set scored against."""
        return self.index.route_set

    @property
    def texts(self) -> list[str]:
        """The events' texts, in order (what a learned head with words scores)."""
        return [example.text or "" for example in self.data.examples]


@dataclass(frozen=True)
class SystemRun:
    """One decision system's answers on one split."""

    name: str
    kind: SystemKind
    index: RouteIndex
    outcomes: tuple[str, ...]  # decided outcome, NEEDS_REVIEW included
    reasons: tuple[str, ...]
    routes: tuple[int | None, ...]  # route (index position) behind each decision
    forced: tuple[str, ...]  # the answer with review switched off (for the cascade)
    confidence: np.ndarray  # distance to the decision boundary; higher = surer
    gold: tuple[str, ...]
    details: dict[str, object] = field(default_factory=dict)
    novel: np.ndarray | None = None  # per event, novel; None: the policy has no novelty threshold

    @property
    def route_set(self) -> RouteSet:
        """The route set decided with."""
        return self.index.route_set

    def forced_correct(self) -> np.ndarray:
        """Per event: whether the answer with review switched off is the gold outcome."""
        return np.array(self.forced, dtype=object) == np.array(self.gold, dtype=object)
