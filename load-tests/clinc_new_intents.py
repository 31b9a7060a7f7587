"""CLINC150 test queries routed automatically to their own intent, new, known and out-of-scope apart.

After ``load-tests/clinc_half.py``: ``clinc_new_intents.py ROUTES...`` decides CLINC150's
test split with each route file (its own thresholds, lists and head) as the worker would,
and prints per kind of query the share decided automatically, the share decided
automatically and right (its own intent; out-of-scope: ``oos``), and the accuracy of the
automatic decisions; then the same over all of them.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from sieve.cli.workbench import open_bench
from sieve.contracts import NEEDS_REVIEW
from sieve.quality.runner import load_candidate
from sieve.quality.scoring import score_split, three_way_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("routes", nargs="+", type=Path)
    parser.add_argument("--clinc", type=Path, default=Path("/tmp/clinc"), help="clinc_half.py's --out")
    args = parser.parse_args()
    new = set(json.loads((args.clinc / "new.json").read_text()))
    bench = open_bench(str(args.clinc / "all.jsonl"), 0, None, "sentence-transformers", None, True, False)
    part, vectors = bench.part("test"), bench.vectors("test")
    for path in args.routes:
        candidate = load_candidate(path.name, path, bench.encoder)
        run = three_way_run(path.name, score_split(part, candidate.index, bench.encoder, vectors), None,
                            candidate.head)
        names = [route.name for route in candidate.index.routes]
        stats: Counter[tuple[str, str]] = Counter()
        for ex, outcome, route in zip(part.examples, run.outcomes, run.routes, strict=True):
            intent = next(iter(ex.labels)) if ex.labels else None
            kind = "oos" if intent is None else "new" if intent in new else "known"
            automatic = outcome != NEEDS_REVIEW
            right = outcome == "oos" if intent is None else route is not None and names[route] == intent
            stats[kind, "n"] += 1
            stats[kind, "auto"] += automatic
            stats[kind, "right"] += automatic and right
        for key in ("n", "auto", "right"):
            stats["all", key] = sum(stats[kind, key] for kind in ("new", "known", "oos"))
        for kind in ("new", "known", "oos", "all"):
            n, auto, right = stats[kind, "n"], stats[kind, "auto"], stats[kind, "right"]
            print(f"{path.name} {kind}: {n} queries, automatic {auto / n:.1%}, automatic and right "
                  f"{right / n:.1%}, accuracy of automatic {right / max(auto, 1):.3f}")


if __name__ == "__main__":
    main()
