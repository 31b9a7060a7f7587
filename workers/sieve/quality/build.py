"""Build a route set from labelled data: a few diverse, representative examples per route.

Every label of the training split becomes a route (its outcome: the gold outcome
most of its examples have — ``violating`` for a moderation category, the intent's
own name for an intent); examples with no label become one route with the set's
default outcome (``clean``, ``oos``), so ordinary traffic has examples to be near.

A route keeps at most ``max_examples`` of its examples, chosen on the embeddings:
k-means (k-means++ seeding, seeded) with ``max_examples`` clusters, and from each
cluster the member nearest its centre (an approximate medoid) — diverse like
farthest-point sampling, but representative rather than a collection of outliers.
The kept examples are ordered by the size of the cluster they stand for.

The output is an ordinary route file (``routeset_dump.dump_route_set``) that a person
can read and edit; the provenance (data, split, seed, counts) is in its
description. Optionally a logistic-regression head is trained on the *whole*
training split and stored beside it (:mod:`sieve.flow.head`).
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass

import numpy as np

from sieve.flow.head import LearnedHead, train_head
from sieve.progress import SILENT, Progress
from sieve.quality.datasets import LabelledData
from sieve.routeset import Route, RouteSet
from sieve.thresholds import Aggregation, RouteDefaults


@dataclass(frozen=True)
class RoutePool:
    """The training examples (row positions) behind one route."""

    name: str
    outcome: str
    rows: tuple[int, ...]


@dataclass(frozen=True)
class BuildResult:
    """A built route set, what each route was chosen from, and the optional head."""

    route_set: RouteSet
    pools: tuple[RoutePool, ...]
    kept: dict[str, int]
    head: LearnedHead | None = None

    def as_dict(self) -> dict[str, object]:
        """JSON-ready summary."""
        return {
            "route_set": self.route_set.name,
            "version": self.route_set.version,
            "routes": [
                {
                    "route": pool.name,
                    "outcome": pool.outcome,
                    "pool": len(pool.rows),
                    "kept": self.kept[pool.name],
                }
                for pool in self.pools
            ],
            "head": None
            if self.head is None
            else {"kind": self.head.kind, "weight": self.head.weight, **self.head.meta},
        }


def route_pools(train: LabelledData, default_outcome: str, *, default_route: bool = True) -> list[RoutePool]:
    """One pool per label with examples, plus the unlabelled examples grouped by outcome."""
    pools: list[RoutePool] = []
    for label in train.label_names:
        rows = tuple(i for i, ex in enumerate(train.examples) if label in ex.labels)
        if not rows:
            continue
        outcomes = Counter(train.examples[i].gold(default_outcome) for i in rows)
        outcome = min(outcomes, key=lambda o: (-outcomes[o], o))
        pools.append(RoutePool(label, outcome, rows))
    if default_route:
        taken = {pool.name for pool in pools}
        unlabelled: dict[str, list[int]] = {}
        for i, ex in enumerate(train.examples):
            if not ex.labels:
                unlabelled.setdefault(ex.gold(default_outcome), []).append(i)
        for outcome in sorted(unlabelled):
            name = outcome if outcome not in taken else f"{outcome}_examples"
            pools.append(RoutePool(name, outcome, tuple(unlabelled[outcome])))
    return pools


def select_representatives(vectors: np.ndarray, k: int, seed: int) -> list[int]:
    """Positions of at most ``k`` rows: the member nearest each k-means centre, biggest cluster first."""
    m = vectors.shape[0]
    if m <= k:
        centre = vectors.mean(axis=0)
        return sorted(range(m), key=lambda i: (-float(vectors[i] @ centre), i))
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        # near-identical texts (MiniLM is uncased) can leave fewer distinct points than k
        warnings.simplefilter("ignore", ConvergenceWarning)
        model = KMeans(n_clusters=k, init="k-means++", n_init=3, random_state=seed).fit(vectors)
    chosen: list[tuple[int, int]] = []
    for cluster in range(k):
        members = np.nonzero(model.labels_ == cluster)[0]
        if members.size == 0:
            continue
        similarity = vectors[members] @ model.cluster_centers_[cluster]
        chosen.append((int(members.size), int(members[int(np.argmax(similarity))])))
    chosen.sort(key=lambda item: (-item[0], item[1]))
    return [row for _, row in chosen]


def build_route_set(
    train: LabelledData,
    vectors: np.ndarray,
    *,
    name: str,
    default_outcome: str,
    max_examples: int = 50,
    seed: int = 0,
    aggregation: Aggregation | None = None,
    default_route: bool = True,
    description: str | None = None,
    progress: Progress = SILENT,
) -> BuildResult:
    """Build from a training split and its vectors (row ``i`` is ``train.examples[i]``)."""
    if max_examples < 1:
        raise ValueError("max_examples must be at least 1")
    pools = route_pools(train, default_outcome, default_route=default_route)
    if not pools:
        raise ValueError(f"{train.name}: no labelled examples to build routes from")
    routes: list[Route] = []
    kept: dict[str, int] = {}
    with progress.task("choosing examples per route (k-means)", total=len(pools)) as advance:
        for pool in pools:
            rows = _distinct_text_rows(train, pool.rows)
            picked = select_representatives(vectors[rows], max_examples, seed)
            utterances = [str(train.examples[rows[p]].text) for p in picked]
            kept[pool.name] = len(utterances)
            routes.append(Route(name=pool.name, outcome=pool.outcome, utterances=utterances))
            advance(1)
    defaults = RouteDefaults(aggregation=aggregation or Aggregation(method="top_k_mean", k=3))
    route_set = RouteSet(
        name=name,
        description=description,
        default_outcome=default_outcome,
        defaults=defaults,
        routes=routes,
    )
    return BuildResult(route_set, tuple(pools), kept)


def _distinct_text_rows(train: LabelledData, rows: tuple[int, ...]) -> list[int]:
    """The rows with a non-empty text not seen before among ``rows`` (first occurrence wins)."""
    seen: set[str] = set()
    kept: list[int] = []
    for i in rows:
        text = train.examples[i].text
        if text is None or not text.strip() or text in seen:
            continue
        seen.add(text)
        kept.append(i)
    return kept


def membership_matrix(train: LabelledData, pools: tuple[RoutePool, ...]) -> np.ndarray:
    """``(rows, routes)`` bool: which pools each training row belongs to."""
    matrix = np.zeros((len(train.examples), len(pools)), dtype=bool)
    for r, pool in enumerate(pools):
        matrix[list(pool.rows), r] = True
    return matrix


def with_head(
    result: BuildResult,
    train: LabelledData,
    vectors: np.ndarray,
    encoder_id: str,
    *,
    c: float = 10.0,
    weight: float = 0.5,
    seed: int = 0,
    balanced: bool = False,
    words: bool = False,
    progress: Progress = SILENT,
) -> BuildResult:
    """The build result with a logistic-regression head trained on the whole training split.

    ``words``: the head scores word features of the texts too (:mod:`sieve.flow.head_words`).
    """
    membership = membership_matrix(train, result.pools)
    names = [pool.name for pool in result.pools]
    head = train_head(
        vectors, membership, names, encoder_id, c=c, weight=weight, seed=seed, balanced=balanced,
        texts=[example.text or "" for example in train.examples] if words else None, progress=progress,
    )
    return BuildResult(result.route_set, result.pools, result.kept, head)
