"""Compare novelty scores on labelled in- and out-of-domain data (docs/quality.md, Novelty).

    .venv/bin/python load-tests/novelty_compare.py [K] [MODERATION_ROUTES] [CLINC_ROUTES]

Scores compared, for an event against every example of a route set:
  a  1 - the best cosine similarity to any example (what Sieve ships);
  b  the k nearest examples' mean similarity, against those examples' own typical k-NN
     similarity within the set (leave-one-out, precomputed per set): "offset" is
     own - mean, "ratio" is 1 - mean / own.
Each threshold is the 0.95 quantile of the score on the routes' calibration split
(openai-moderation calibration for moderation routes, CLINC150 val for CLINC routes);
AUROC: in-domain test events (negatives) against out-of-domain ones (positives).
"""

from __future__ import annotations

import sys

import numpy as np

from sieve.encoders.cache import CachedEncoder
from sieve.encoders.factory import encoders_for
from sieve.flow.match import RouteIndex
from sieve.quality.workbench import open_workbench
from sieve.routeset import load_route_set
from sieve.settings import get_settings
from sieve.topology import EncoderSpec

CHUNK = 2048


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """Probability that a positive scores above a negative (Mann-Whitney)."""
    ranks = np.concatenate([positive, negative]).argsort().argsort() + 1.0
    return float((ranks[: len(positive)].sum() - len(positive) * (len(positive) + 1) / 2)
                 / (len(positive) * len(negative)))


def own_spread(vectors: np.ndarray, k: int) -> np.ndarray:
    """Per example: the mean similarity of its k nearest other examples."""
    out = np.empty(len(vectors), np.float32)
    for start in range(0, len(vectors), CHUNK):
        sims = vectors[start:start + CHUNK] @ vectors.T
        sims[np.arange(len(sims)), np.arange(start, start + len(sims))] = -np.inf
        out[start:start + CHUNK] = -np.sort(-sims, axis=1)[:, :k].mean(axis=1)
    return out


def scores(queries: np.ndarray, vectors: np.ndarray, spread: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """Every compared score of every query."""
    parts: dict[str, list[np.ndarray]] = {"a: 1 - best": [], f"b: offset, k={k}": [], f"b: ratio, k={k}": []}
    for start in range(0, len(queries), CHUNK):
        sims = queries[start:start + CHUNK] @ vectors.T
        nearest = np.argpartition(-sims, k, axis=1)[:, :k]
        top = np.take_along_axis(sims, nearest, 1)
        mean, own = top.mean(axis=1), spread[nearest].mean(axis=1)
        parts["a: 1 - best"].append(1 - top.max(axis=1))
        parts[f"b: offset, k={k}"].append(own - mean)
        parts[f"b: ratio, k={k}"].append(1 - mean / own)
    return {name: np.concatenate(values) for name, values in parts.items()}


def compare(label, path, encoder, calibration, in_domain, others, k) -> None:  # noqa: ANN001
    """One table row per score for one route file."""
    vectors = RouteIndex.build(load_route_set(path), encoder).vectors
    spread = own_spread(vectors, k)
    cal, ind = scores(calibration, vectors, spread, k), scores(in_domain, vectors, spread, k)
    out = {name: scores(q, vectors, spread, k) for name, q in others.items()}
    for name in cal:
        threshold = np.quantile(cal[name], 0.95)
        cells = [label, name, f"{np.mean(ind[name] > threshold):.1%}"]
        for o in out.values():
            cells += [f"{auroc(o[name], ind[name]):.3f}", f"{np.mean(o[name] > threshold):.1%}"]
        print("| " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    """Print the comparison table."""
    k = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    moderation_routes = sys.argv[2] if len(sys.argv) > 2 else "out/quality/om/moderation-built.yaml"
    clinc_routes = sys.argv[3] if len(sys.argv) > 3 else "out/quality/clinc/clinc150-built.yaml"
    settings = get_settings()
    built, _ = encoders_for(EncoderSpec(kind="sentence-transformers"), None, settings)
    encoder = CachedEncoder(built, settings.embedding_cache_dir)
    om = open_workbench("openai-moderation", encoder, datasets_dir=settings.datasets_dir, seed=0)
    clinc = open_workbench("clinc150", encoder, datasets_dir=settings.datasets_dir, seed=0)
    oos = np.array([ex.gold("oos") == "oos" for ex in clinc.splits.test.examples])
    clinc_test = clinc.vectors("test")
    print("| routes | score | in-domain test flagged | OOS AUROC | OOS flagged | in-scope AUROC | "
          "in-scope flagged |\n|---|---|---|---|---|---|---|")
    sets = (("openai-moderation built", moderation_routes), ("shipped moderation", "routes/moderation.yaml"))
    for label, path in sets:
        compare(label, path, encoder, om.vectors("calibration"), om.vectors("test"),
                {"clinc oos": clinc_test[oos], "clinc in-scope": clinc_test[~oos]}, k)
    compare("clinc150 built", clinc_routes, encoder, clinc.vectors("calibration"), clinc_test[~oos],
            {"clinc oos": clinc_test[oos]}, k)


if __name__ == "__main__":
    main()
