"""A light learned head: logistic regression over the embeddings, one score per route.

Trained by ``sieve routes build --head`` on the whole training split (not only the
few examples kept in the route file) and stored beside the route file as
``<routes>.head.npz`` (plain arrays, no pickle). Its probability for a route is
combined with the route's nearest-example score::

    score(route) = (1 - weight) * nearest_score(route) + weight * p(route | text)

and the usual three-way policy decides on the combined scores. The head is an
evaluation-time option (``sieve eval`` / ``sieve fit`` measure it against nearest
examples alone); the worker does not load it.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from sieve.flow.match import RouteIndex
from sieve.progress import SILENT, Progress

HeadKind = Literal["softmax", "one_vs_rest"]
HEAD_FORMAT = "sieve-head/1"


def head_path_for(route_file: str | Path) -> Path:
    """Where a route file's head lives: ``x.yaml`` -> ``x.head.npz``."""
    route_file = Path(route_file)
    return route_file.with_name(route_file.stem + ".head.npz")


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

    def probabilities(self, vectors: np.ndarray) -> np.ndarray:
        """``(n, routes)`` probabilities in ``route_names`` order."""
        logits = vectors.astype(np.float64) @ self.coef.T + self.intercept
        if self.kind == "softmax":
            logits -= logits.max(axis=1, keepdims=True)
            exp = np.exp(logits)
            return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)
        return (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)

    def route_scores(self, vectors: np.ndarray, index: RouteIndex) -> np.ndarray:
        """Probabilities aligned with ``index``'s routes (a route the head lacks scores 0)."""
        if index.encoder_id != self.encoder_id:
            raise HeadError(f"head trained on {self.encoder_id!r} vectors, index holds {index.encoder_id!r}")
        probs = self.probabilities(vectors)
        column = {name: i for i, name in enumerate(self.route_names)}
        out = np.zeros((vectors.shape[0], len(index.route_names)), dtype=np.float32)
        for position, name in enumerate(index.route_names):
            if name in column:
                out[:, position] = probs[:, column[name]]
        return out

    def combine(self, nearest_scores: np.ndarray, vectors: np.ndarray, index: RouteIndex) -> np.ndarray:
        """``(1 - weight) * nearest + weight * p``, the scores the policy then decides on."""
        head = self.route_scores(vectors, index)
        return ((1.0 - self.weight) * nearest_scores + self.weight * head).astype(np.float32)

    def save(self, path: str | Path) -> None:
        """Write as ``.npz`` (arrays and a JSON header; loadable without pickle)."""
        header = {
            "format": HEAD_FORMAT,
            "encoder_id": self.encoder_id,
            "kind": self.kind,
            "weight": self.weight,
            "route_names": list(self.route_names),
            "meta": self.meta,
        }
        with open(path, "wb") as handle:
            np.savez(
                handle,
                coef=self.coef.astype(np.float32),
                intercept=self.intercept.astype(np.float32),
                header=np.array(json.dumps(header)),
            )

    @classmethod
    def load(cls, path: str | Path) -> LearnedHead:
        """Read a head written by :meth:`save`."""
        try:
            with np.load(path, allow_pickle=False) as data:
                header = json.loads(str(data["header"]))
                coef, intercept = data["coef"], data["intercept"]
        except (OSError, ValueError, KeyError) as exc:
            raise HeadError(f"{path}: not a head file: {exc}") from None
        if header.get("format") != HEAD_FORMAT:
            raise HeadError(f"{path}: unknown head format {header.get('format')!r}")
        return cls(
            tuple(header["route_names"]),
            header["encoder_id"],
            header["kind"],
            coef,
            intercept,
            float(header["weight"]),
            header.get("meta", {}),
        )


def train_head(
    vectors: np.ndarray,
    membership: np.ndarray,
    route_names: list[str],
    encoder_id: str,
    *,
    c: float = 10.0,
    weight: float = 0.5,
    seed: int = 0,
    progress: Progress = SILENT,
) -> LearnedHead:
    """Logistic regression on ``vectors`` (n, d) with ``membership`` (n, routes) bool.

    One route per row: a multinomial (softmax) model. Rows in several routes
    (multi-label moderation data): one binary model per route.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    membership = np.asarray(membership, dtype=bool)
    keep = membership.any(axis=1)
    x, m = vectors[keep].astype(np.float64), membership[keep]
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
            model = LogisticRegression(C=c, max_iter=2000, random_state=seed)
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
    return LearnedHead(
        tuple(route_names),
        encoder_id,
        kind,
        coef.astype(np.float32),
        intercept.astype(np.float32),
        weight,
        meta,
    )
