"""Match: event vectors against a route set's example vectors, in memory.

One matrix product per batch; then each route's score is an aggregation (max,
or the mean of its top k) of the cosine similarities to its own examples.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import numpy as np

from sieve.encoders.base import ImageEncoder, TextEncoder
from sieve.routeset import ExampleKind, Route, RouteSet, Space
from sieve.thresholds import Aggregation

_EXAMPLE_NAMESPACE = uuid.UUID("0b4c7f0e-1f2a-4d8e-8a53-5a0f6c1d2e3b")


def example_id(set_name: str, route: str, text: str) -> str:
    """Deterministic id of one route example (also its Qdrant point id).

    ``text`` is the utterance itself; prompts and images use :func:`example_key`.
    """
    return str(uuid.uuid5(_EXAMPLE_NAMESPACE, f"{set_name}\x00{route}\x00{text}"))


def example_key(route_set: RouteSet, kind: ExampleKind, value: str) -> str:
    """What identifies an example: the utterance, ``prompt:<text>``, or ``image:<sha256>``."""
    if kind == "utterance":
        return value
    if kind == "prompt":
        return f"prompt:{value}"
    return f"image:{route_set.image_digest(value)}"


def encode_examples(
    route_set: RouteSet,
    space: Space,
    encoder: TextEncoder | ImageEncoder,
    items: list[tuple[str, ExampleKind, str]],
) -> np.ndarray:
    """Vectors of ``(route, kind, value)`` examples: utterances and prompts as text, images as pixels."""
    if space == "text":
        assert isinstance(encoder, TextEncoder)
        return encoder.encode([value for _, _, value in items])
    assert isinstance(encoder, ImageEncoder)
    from PIL import Image

    vectors = np.zeros((len(items), encoder.dim), dtype=np.float32)
    prompts = [i for i, (_, kind, _) in enumerate(items) if kind == "prompt"]
    images = [i for i, (_, kind, _) in enumerate(items) if kind == "image"]
    if prompts:
        vectors[prompts] = encoder.encode_prompts([items[i][2] for i in prompts])
    if images:
        pictures = []
        for i in images:
            with Image.open(route_set.image_path(items[i][2])) as picture:
                pictures.append(picture.convert("RGB"))
        vectors[images] = encoder.encode_images(pictures)
    return vectors


@dataclass(frozen=True)
class RouteIndex:
    """A route set's example vectors, grouped by route, ready to match against.

    Examples are stored contiguously per route, in the route set's order:
    route ``r`` owns rows ``bounds[r][0]:bounds[r][1]``.
    """

    route_set: RouteSet
    version: str
    encoder_id: str
    space: Space
    routes: tuple[Route, ...]  # the routes with examples in this space, in set order
    vectors: np.ndarray  # (m, d) float32, rows L2-normalised
    example_ids: tuple[str, ...]
    example_texts: tuple[str, ...]
    example_route: np.ndarray  # (m,) route position of each example
    bounds: tuple[tuple[int, int], ...]

    @property
    def route_names(self) -> list[str]:
        """Route names in index order."""
        return [route.name for route in self.routes]

    @property
    def aggregation(self) -> Aggregation:
        """How route scores are aggregated in this index's space."""
        return self.route_set.aggregation_for(self.space)

    @classmethod
    def from_examples(
        cls,
        route_set: RouteSet,
        version: str,
        encoder_id: str,
        examples: dict[str, list[tuple[str, str, np.ndarray]]],
        space: Space = "text",
    ) -> RouteIndex:
        """Build from ``{route: [(example_id, text, vector), ...]}`` (routes without any are left out)."""
        ids: list[str] = []
        texts: list[str] = []
        rows: list[np.ndarray] = []
        owner: list[int] = []
        bounds: list[tuple[int, int]] = []
        routes = [route for route in route_set.routes if examples.get(route.name)]
        if not routes:
            raise ValueError(f"route set {route_set.name!r} has no examples in the {space} space")
        for position, route in enumerate(routes):
            start = len(ids)
            for ex_id, text, vector in examples.get(route.name, []):
                ids.append(ex_id)
                texts.append(text)
                rows.append(np.asarray(vector, dtype=np.float32))
                owner.append(position)
            bounds.append((start, len(ids)))
        return cls(
            route_set=route_set,
            version=version,
            encoder_id=encoder_id,
            space=space,
            routes=tuple(routes),
            vectors=np.ascontiguousarray(np.stack(rows)),
            example_ids=tuple(ids),
            example_texts=tuple(texts),
            example_route=np.asarray(owner, dtype=np.int32),
            bounds=tuple(bounds),
        )

    @classmethod
    def build(
        cls, route_set: RouteSet, encoder: TextEncoder | ImageEncoder, space: Space = "text"
    ) -> RouteIndex:
        """Encode a route set directly, without a store (eval, tests, benchmarks)."""
        items = [(r.name, kind, value) for r in route_set.routes for kind, value in r.examples(space)]
        vectors = encode_examples(route_set, space, encoder, items)
        examples: dict[str, list[tuple[str, str, np.ndarray]]] = {}
        for (route, kind, value), vector in zip(items, vectors, strict=True):
            key = example_key(route_set, kind, value)
            examples.setdefault(route, []).append((example_id(route_set.name, route, key), value, vector))
        return cls.from_examples(route_set, route_set.version, encoder.id, examples, space)


@dataclass(frozen=True)
class MatchResult:
    """Per event: every route's score, and the nearest examples overall."""

    route_scores: np.ndarray  # (n, routes)
    nearest_index: np.ndarray  # (n, k) example rows, best first
    nearest_score: np.ndarray  # (n, k)


def aggregate(similarities: np.ndarray, aggregation: Aggregation) -> np.ndarray:
    """One route's score per row from its examples' similarities ``(n, examples)``."""
    if aggregation.method == "max" or similarities.shape[1] == 1:
        return similarities.max(axis=1)
    k = min(aggregation.k, similarities.shape[1])
    top = np.partition(similarities, similarities.shape[1] - k, axis=1)[:, -k:]
    return top.mean(axis=1)


def match_batch(
    queries: np.ndarray, index: RouteIndex, aggregation: Aggregation, nearest_k: int = 3
) -> MatchResult:
    """Score a batch of L2-normalised query vectors against every route."""
    n = queries.shape[0]
    if n == 0:
        empty = np.zeros((0, len(index.bounds)), dtype=np.float32)
        return MatchResult(empty, np.zeros((0, 0), np.int64), np.zeros((0, 0), np.float32))
    similarities = queries.astype(np.float32, copy=False) @ index.vectors.T  # (n, m)
    route_scores = np.empty((n, len(index.bounds)), dtype=np.float32)
    for position, (start, end) in enumerate(index.bounds):
        route_scores[:, position] = aggregate(similarities[:, start:end], aggregation)
    nearest_index, nearest_score = top_columns(similarities, min(nearest_k, similarities.shape[1]))
    return MatchResult(route_scores, nearest_index, nearest_score)


def top_columns(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the ``k`` highest columns and their scores, best first.

    For a few columns out of hundreds, ``k`` passes of ``argmax`` (each taken one
    masked out of a copy) are cheaper than ``argpartition`` + ``argsort``; for a
    larger ``k``, the partition.
    """
    rows = np.arange(scores.shape[0])
    if k <= 4:
        work = scores.copy()
        picked = np.empty((scores.shape[0], k), dtype=np.intp)
        for j in range(k):
            best = work.argmax(axis=1)
            picked[:, j] = best
            work[rows, best] = -np.inf
        return picked, np.take_along_axis(scores, picked, axis=1)
    candidates = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    candidate_scores = np.take_along_axis(scores, candidates, axis=1)
    order = np.argsort(-candidate_scores, axis=1, kind="stable")
    return np.take_along_axis(candidates, order, axis=1), np.take_along_axis(candidate_scores, order, axis=1)
