"""A light learned head: logistic regression over the embeddings, one score per route.

Trained by ``sieve routes build --head`` on the whole training split (not only the
few examples kept in the route file) and stored beside the route file as
``<routes>.head.npz`` (plain arrays, no pickle). Its probability for a route is
combined with the route's nearest-example score::

    score(route) = (1 - weight) * nearest_score(route) + weight * p(route | text)

and the usual three-way policy decides on the combined scores. The head is part of
its route set: :func:`~sieve.routeset.load_route_set` reads its bytes, the set's
version hashes them, and the route store keeps them with the version. The worker
(:class:`~sieve.flow.pipeline.RouterPipeline`) and ``sieve eval`` / ``sieve fit`` get
the scores they decide on from the same function, :func:`decision_scores`. A head is
trained on text vectors: it applies in the text space, to an index encoded with its
encoder. A head trained with words (:mod:`sieve.flow.head_words`) scores the text's word
features beside its vector; it is written as format ``sieve-head/2``, which a worker that
predates word features refuses rather than scoring without them.
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np

from sieve.flow.head_words import WordFeatures
from sieve.flow.match import RouteIndex
from sieve.progress import SILENT, Progress

HeadKind = Literal["softmax", "one_vs_rest"]
HEAD_FORMAT = "sieve-head/1"
HEAD_FORMAT_WORDS = "sieve-head/2"  # with word features


class HeadError(ValueError):
    """A head file that cannot be used with this route set or encoder."""


@dataclass(frozen=True)
class LearnedHead:
    """Linear scores per route: ``softmax`` (one class per example) or ``one_vs_rest`` (multi-label)."""

    route_names: tuple[str, ...]
    encoder_id: str
    kind: HeadKind
    coef: np.ndarray  # (routes, dim)
    intercept: np.ndarray  # (routes,)
    weight: float = 0.5
    meta: dict[str, object] = field(default_factory=dict)
    words: WordFeatures | None = None
    word_coef: np.ndarray | None = None  # (routes, len(words)), exactly when there are words

    def __post_init__(self) -> None:
        if (self.words is None) != (self.word_coef is None):
            raise HeadError("a head's words and their coefficients come together")

    def probabilities(self, vectors: np.ndarray, texts: Sequence[str] | None = None) -> np.ndarray:
        """``(n, routes)`` probabilities in ``route_names`` order (``texts``: needed by a head with words)."""
        logits = vectors.astype(np.float64) @ self.coef.T + self.intercept
        if self.words is not None and self.word_coef is not None:  # both or neither (__post_init__)
            if texts is None or len(texts) != vectors.shape[0]:
                raise HeadError("this head scores words: it needs the texts of the vectors")
            logits = logits + np.asarray(self.words.transform(texts) @ self.word_coef.T.astype(np.float64))
        if self.kind == "softmax":
            logits -= logits.max(axis=1, keepdims=True)
            exp = np.exp(logits)
            return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)
        return (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)

    def route_scores(self, vectors: np.ndarray, index: RouteIndex,
                     texts: Sequence[str] | None = None) -> np.ndarray:
        """Probabilities aligned with ``index``'s routes (a route the head lacks scores 0)."""
        if index.encoder_id != self.encoder_id:
            raise HeadError(f"head trained on {self.encoder_id!r} vectors, index holds {index.encoder_id!r}")
        probs = self.probabilities(vectors, texts)
        column = {name: i for i, name in enumerate(self.route_names)}
        out = np.zeros((vectors.shape[0], len(index.route_names)), dtype=np.float32)
        for position, name in enumerate(index.route_names):
            if name in column:
                out[:, position] = probs[:, column[name]]
        return out

    def combine(self, nearest_scores: np.ndarray, vectors: np.ndarray, index: RouteIndex,
                texts: Sequence[str] | None = None) -> np.ndarray:
        """``(1 - weight) * nearest + weight * p``, the scores the policy then decides on."""
        return self.mix(nearest_scores, self.route_scores(vectors, index, texts))

    def mix(self, nearest_scores: np.ndarray, head_scores: np.ndarray) -> np.ndarray:
        """``(1 - weight) * nearest + weight * p`` for route scores the caller has aligned."""
        return ((1.0 - self.weight) * nearest_scores + self.weight * head_scores).astype(np.float32)

    def to_bytes(self) -> bytes:
        """The ``.npz`` file :meth:`save` writes, as bytes."""
        buffer = io.BytesIO()
        self.save(buffer)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "<bytes>") -> LearnedHead:
        """Read a head from the bytes of its ``.npz`` file."""
        return cls.load(io.BytesIO(data), source)

    def save(self, path: str | Path | IO[bytes]) -> None:
        """Write as ``.npz`` (arrays and a JSON header; loadable without pickle)."""
        header = {
            "format": HEAD_FORMAT if self.words is None else HEAD_FORMAT_WORDS,
            "encoder_id": self.encoder_id,
            "kind": self.kind,
            "weight": self.weight,
            "route_names": list(self.route_names),
            "meta": self.meta,
        }
        if isinstance(path, str | Path):
            with open(path, "wb") as handle:
                return self.save(handle)
        arrays: dict[str, Any] = {"coef": self.coef.astype(np.float32),
                                  "intercept": self.intercept.astype(np.float32),
                                  "header": np.array(json.dumps(header))}
        if self.words is not None and self.word_coef is not None:
            arrays.update(words=np.array(self.words.vocabulary, dtype=str),
                          idf=np.asarray(self.words.idf, dtype=np.float32),
                          word_coef=self.word_coef.astype(np.float32))
            np.savez_compressed(path, **arrays)  # the vocabulary compresses well
            return
        np.savez(path, **arrays)

    @classmethod
    def load(cls, path: str | Path | IO[bytes], source: str | None = None) -> LearnedHead:
        """Read a head written by :meth:`save` (``source`` names it in errors)."""
        source = source or str(path)
        try:
            with np.load(path, allow_pickle=False) as data:
                header = json.loads(str(data["header"]))
                coef, intercept = data["coef"], data["intercept"]
                words = word_coef = None
                if header.get("format") == HEAD_FORMAT_WORDS:
                    words = WordFeatures(tuple(str(w) for w in data["words"]), data["idf"])
                    word_coef = data["word_coef"]
                    if word_coef.shape != (coef.shape[0], len(words)):
                        raise ValueError(f"word_coef has shape {word_coef.shape}")
        except (OSError, ValueError, KeyError) as exc:
            raise HeadError(f"{source}: not a head file: {exc}") from None
        if header.get("format") not in (HEAD_FORMAT, HEAD_FORMAT_WORDS):
            raise HeadError(f"{source}: unknown head format {header.get('format')!r}")
        return cls(
            tuple(header["route_names"]),
            header["encoder_id"],
            header["kind"],
            coef,
            intercept,
            float(header["weight"]),
            header.get("meta", {}),
            words,
            word_coef,
        )


def head_of(index: RouteIndex) -> LearnedHead | None:
    """The learned head the index's route-set version carries, checked against the index; None without one.

    Only the text space has heads. A head whose encoder is not the index's, or
    that scores none of the index's routes, is refused: deciding without it would
    not be what ``sieve eval`` measured for this version.
    """
    data = index.route_set.head_bytes
    if data is None or index.space != "text":
        return None
    where = f"route set {index.route_set.name!r} version {index.version}"
    if index.route_set.version != index.version:
        raise HeadError(
            f"the head of {where} belongs to version {index.route_set.version}: a head never runs "
            "with another version's routes"
        )
    head = LearnedHead.from_bytes(data, f"the head of {where}")
    if head.encoder_id != index.encoder_id:
        raise HeadError(
            f"the head of {where} was trained on {head.encoder_id!r} vectors, but the index is encoded "
            f"with {index.encoder_id!r}: train the head with this encoder (`sieve routes build --head`) "
            "or remove the head file beside the route file, then sync again"
        )
    if not set(head.route_names) & set(index.route_names):
        raise HeadError(f"the head of {where} scores none of its routes ({', '.join(head.route_names)})")
    return head


def decision_scores(
    route_scores: np.ndarray, vectors: np.ndarray, index: RouteIndex, head: LearnedHead | None,
    texts: Sequence[str] | None = None,
) -> np.ndarray:
    """The ``(n, routes)`` scores the policy decides on: the match's route scores, combined with the head.

    The one place the head is applied: the worker's pipeline and ``sieve eval``/``fit`` both call it.
    ``texts``: the events' texts, which a head with words scores too.
    """
    if head is None:
        return route_scores
    return head.combine(route_scores, vectors, index, texts)


def train_head(
    vectors: np.ndarray,
    membership: np.ndarray,
    route_names: list[str],
    encoder_id: str,
    *,
    c: float = 10.0,
    weight: float = 0.5,
    seed: int = 0,
    balanced: bool = False,
    texts: Sequence[str] | None = None,
    progress: Progress = SILENT,
) -> LearnedHead:
    """Logistic regression on ``vectors`` (n, d) with ``membership`` (n, routes) bool.

    One route per row: a multinomial (softmax) model; ``balanced`` weighs every route
    alike whatever its number of rows (sklearn's ``class_weight="balanced"``). Rows in several
    routes (multi-label moderation data): one binary model per route. With ``texts`` (one per
    row) the head also learns word features, fitted on the texts of the rows it trains on.
    """
    from scipy.sparse import csr_matrix, hstack
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    membership = np.asarray(membership, dtype=bool)
    keep = membership.any(axis=1)
    x, m = vectors[keep].astype(np.float64), membership[keep]
    dim = x.shape[1]
    words = None
    if texts is not None:
        kept_texts = [texts[int(i)] for i in np.flatnonzero(keep)]
        words = WordFeatures.fit(kept_texts)
        x = hstack([csr_matrix(x), words.transform(kept_texts).astype(np.float64)]).tocsr()
    single = bool((m.sum(axis=1) == 1).all())
    coef = np.zeros((len(route_names), x.shape[1]))
    intercept = np.full(len(route_names), -1e4)  # a route with no rows gets ~0 probability
    models = 1 if single else len(route_names)
    with warnings.catch_warnings(), progress.task("training the head", total=models) as advance:
        # lbfgs may stop at max_iter on separable routes; the fit is still usable and measured.
        warnings.simplefilter("ignore", ConvergenceWarning)
        if single:
            classes = m.argmax(axis=1)
            present = np.unique(classes)
            model = LogisticRegression(C=c, max_iter=2000, random_state=seed,
                                       class_weight="balanced" if balanced else None)
            model.fit(x, classes)
            if len(present) == 2:  # sklearn folds two classes into one logit
                coef[present[1]], intercept[present[1]] = model.coef_[0], model.intercept_[0]
                coef[present[0]], intercept[present[0]] = 0.0, 0.0
            else:
                coef[present], intercept[present] = model.coef_, model.intercept_
            kind: HeadKind = "softmax"
            advance(1)
        else:
            for r in range(len(route_names)):
                y = m[:, r]
                if y.any() and not y.all():  # a route in no row or in every row: no model
                    model = LogisticRegression(C=c, max_iter=2000, random_state=seed)
                    model.fit(x, y)
                    coef[r], intercept[r] = model.coef_[0], model.intercept_[0]
                advance(1)
            kind = "one_vs_rest"
    meta: dict[str, object] = {"rows": int(keep.sum()), "c": c, "seed": seed}
    if balanced and single:
        meta["balanced"] = True
    if words is not None:
        meta["words"] = len(words)
    return LearnedHead(
        tuple(route_names),
        encoder_id,
        kind,
        coef[:, :dim].astype(np.float32),
        intercept.astype(np.float32),
        weight,
        meta,
        words,
        coef[:, dim:].astype(np.float32) if words is not None else None,
    )
