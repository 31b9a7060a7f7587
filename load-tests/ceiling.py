"""How much of openai-moderation any threshold could automate at a target accuracy (docs/quality.md).

    .venv/bin/python load-tests/ceiling.py FITTED_PATTERN [TARGET]

FITTED_PATTERN names each seed's fitted route file with ``{seed}``, e.g.
``/tmp/q18/fit{seed}/built.fitted.yaml`` (written by ``sieve routes build --head`` and
``sieve fit --seed {seed}``). For seeds 0, 1 and 2, on the seed's test split:

- *fitted*: what the fitted file decides (calibration thresholds, novelty, head), as
  ``sieve eval`` reports it;
- *its search on test*: ``sieve fit``'s own threshold search (per-outcome and per-route
  accept, review and margin, novelty at 5%) run on the test split itself, asking TARGET
  of the point estimate;
- binary logistic regressions (violating or not) trained on the seed's training split,
  over MiniLM vectors alone and over MiniLM vectors plus word and character TF-IDF:
  an upper and a lower probability cut, chosen on the test split itself (ideal) or on
  calibration with the Wilson lower bound (z = 1) at TARGET (as ``sieve fit`` asks).

Chosen on the test split, the cuts are not a system anyone can run: they bound what a
better threshold search could reach with these scores.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from sieve.cli.workbench import open_bench
from sieve.flow.decide import novelty_scores
from sieve.flow.head import decision_scores
from sieve.quality.fit import fit_thresholds
from sieve.quality.metrics import wilson
from sieve.quality.runner import load_candidate
from sieve.quality.scoring import score_split, three_way_run
from sieve.quality.targets import Targets

SEEDS = (0, 1, 2)


def searched_on_test(candidate, scored, target: float) -> float:
    """The share the fit's own search automates when it is run on the test split itself."""
    index = candidate.index
    texts = scored.texts if candidate.head is not None and candidate.head.words is not None else None
    scores = decision_scores(scored.match.route_scores, scored.vectors, index, candidate.head, texts)
    fitted = fit_thresholds(scores, list(scored.gold), candidate.route_set, index.routes,
                            Targets(accuracy=target, z=0.0),
                            novelty=novelty_scores(scored.match.nearest_score))
    return 1.0 - fitted.calibration.review_share


def two_cuts(p: np.ndarray, y: np.ndarray, target: float, lower_bound: bool) -> tuple[float, float]:
    """``(low, high)``: clean at or under low, violating at or over high, the most decided at target."""
    grid = np.unique(np.quantile(p, np.linspace(0, 1, 121)))
    best, cuts = -1.0, (0.0, 1.1)
    for low in grid:
        for high in grid[grid > low]:
            decided = (p <= low) | (p >= high)
            n = int(decided.sum())
            if n < 20:
                continue
            k = int(((p[decided] >= high) == y[decided]).sum())
            accurate = wilson(k, n, z=1.0)[0] if lower_bound else k / n
            if accurate >= target and decided.mean() > best:
                best, cuts = float(decided.mean()), (float(low), float(high))
    return cuts


def apply_cuts(p: np.ndarray, y: np.ndarray, cuts: tuple[float, float]) -> tuple[float, float]:
    decided = (p <= cuts[0]) | (p >= cuts[1])
    right = ((p[decided] >= cuts[1]) == y[decided]).mean() if decided.any() else 1.0
    return float(decided.mean()), float(right)


def logistic_rows(bench, target: float) -> dict[str, tuple[float, float, float]]:
    """Per feature set: (ideal share, calibration-cut share, its accuracy) on test."""
    from scipy.sparse import csr_matrix, hstack
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    parts = {s: bench.part(s) for s in ("train", "calibration", "test")}
    vectors = {s: bench.vectors(s) for s in parts}
    gold = {s: np.array([ex.gold("clean") == "violating" for ex in parts[s].examples]) for s in parts}
    texts = {s: [ex.text for ex in parts[s].examples] for s in parts}
    words = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True).fit(texts["train"])
    chars = TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 5), min_df=2, sublinear_tf=True)
    chars.fit(texts["train"])
    features = {
        "MiniLM": {s: vectors[s] for s in parts},
        "MiniLM + word and char TF-IDF": {
            s: hstack([csr_matrix(vectors[s]), words.transform(texts[s]), chars.transform(texts[s])]).tocsr()
            for s in parts},
    }
    rows = {}
    for name, x in features.items():
        model = LogisticRegression(C=1.0, max_iter=4000, class_weight="balanced")
        model.fit(x["train"], gold["train"])
        p_cal, p_test = model.predict_proba(x["calibration"])[:, 1], model.predict_proba(x["test"])[:, 1]
        ideal = apply_cuts(p_test, gold["test"], two_cuts(p_test, gold["test"], target, False))[0]
        share, accuracy = apply_cuts(p_test, gold["test"], two_cuts(p_cal, gold["calibration"], target, True))
        rows[name] = (ideal, share, accuracy)
    return rows


def main() -> None:
    pattern = sys.argv[1]
    target = float(sys.argv[2]) if len(sys.argv) > 2 else 0.95
    table: dict[str, list[tuple[float, float, float]]] = {}
    for seed in SEEDS:
        bench = open_bench("openai-moderation", seed, None, "sentence-transformers", None, True, False)
        path = Path(pattern.format(seed=seed))
        candidate = load_candidate(path.name, path, bench.encoder)
        scored = score_split(bench.part("test"), candidate.index, bench.encoder, bench.vectors("test"))
        run = three_way_run("fitted", scored, None, candidate.head)
        decided = np.array(run.outcomes, dtype=object) != "needs_review"
        right = decided & (np.array(run.outcomes, dtype=object) == np.array(run.gold, dtype=object))
        ideal = searched_on_test(candidate, scored, target)
        table.setdefault("routes + head, three-way", []).append(
            (ideal, float(decided.mean()), float(right.sum() / max(1, decided.sum()))))
        for name, row in logistic_rows(bench, target).items():
            table.setdefault(f"logistic, {name}", []).append(row)
        print(f"seed {seed} done", file=sys.stderr, flush=True)
    print(f"| scores | cut on test: automatic at {target} (seeds 0 / 1 / 2, mean) "
          "| cut on calibration: automatic at accuracy (mean) |")
    print("|---|---|---|")
    for name, rows in table.items():
        ideal = " / ".join(f"{r[0]:.1%}" for r in rows)
        mean_ideal = np.mean([r[0] for r in rows])
        fitted = " / ".join(f"{r[1]:.1%} at {r[2]:.3f}" for r in rows)
        print(f"| {name} | {ideal} ({mean_ideal:.1%}) | {fitted} "
              f"({np.mean([r[1] for r in rows]):.1%} at {np.mean([r[2] for r in rows]):.3f}) |")


if __name__ == "__main__":
    main()
