"""A labelled data set written as reviewers' labels: the gold labels stand in for the reviewers.

For measuring ``sieve routes learn`` offline: every event of a data set (``data/``; the
names ``sieve eval`` takes) is written as one labelled row, as ``sieve labels export``
writes them, with the gold outcome as the verdict (and its route when the data names one):

    .venv/bin/python load-tests/labels_from_data.py davidson /tmp/learn/davidson-labels.jsonl
    .venv/bin/sieve routes learn ROUTES --labels /tmp/learn/davidson-labels.jsonl --out /tmp/learn/dav.yaml

``--wrong 0.05`` flips that share of the outcomes (seeded) to another outcome of the data,
a reviewer that is wrong 5% of the time.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from sieve.quality.datasets import load_data
from sieve.settings import Settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", help="a data set name (openai-moderation, clinc150, davidson) or JSONL path")
    parser.add_argument("out", type=Path)
    parser.add_argument("--wrong", type=float, default=0.0, help="share of outcomes flipped (seeded)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    data = load_data(args.data, Settings().datasets_dir)
    default = data.default_outcome or "unrouted"
    outcomes = sorted({ex.gold(default) for ex in data.examples})
    rng = random.Random(args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    flipped = 0
    with args.out.open("w", encoding="utf-8") as out:
        for ex in data.examples:
            outcome = ex.gold(default)
            if args.wrong and len(outcomes) > 1 and rng.random() < args.wrong:
                outcome = rng.choice([o for o in outcomes if o != outcome])
                flipped += 1
            out.write(json.dumps({"id": ex.id, "text": ex.text, "outcome": outcome}) + "\n")
    print(f"wrote {len(data.examples)} labels to {args.out} ({flipped} flipped)")


if __name__ == "__main__":
    main()
