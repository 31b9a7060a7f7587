"""CLINC150 with half of its intents known, and reviewers' labels that bring the other half.

Writes to ``OUT`` (default /tmp/clinc): ``half.jsonl`` (the known intents and out-of-scope,
CLINC's own splits), ``all.jsonl`` (every intent), ``labels.jsonl`` (what reviewers would
have labelled: 30 training queries of each new intent, up to 300 out-of-scope, 5 of each known
intent; seeded) and ``new.json`` (the new intents). docs/quality.md ("Learning from the
reviewers' labels") has the commands that build, fit, learn and measure with them.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from sieve.quality.datasets import LabelledExample, load_clinc150

DATA = Path(__file__).resolve().parents[1] / "data"


def row(ex: LabelledExample, *, split: bool = True) -> dict[str, object]:
    """A JSONL row: an intent is its own outcome (as in CLINC150); out-of-scope has none."""
    intent = next(iter(ex.labels)) if ex.labels else None
    out: dict[str, object] = {"id": ex.id, "text": ex.text}
    if split:
        out["split"] = ex.source_split
    if intent is not None:
        out.update(label=intent, outcome=intent)
    return out


def write(path: Path, rows: list[dict[str, object]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/clinc"))
    parser.add_argument("--per-new-intent", type=int, default=30)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    data = load_clinc150(DATA)
    intents = sorted(data.label_names)
    known, new = set(intents[0::2]), set(intents[1::2])
    write(args.out / "half.jsonl", [row(ex) for ex in data.examples if not ex.labels or ex.labels & known])
    write(args.out / "all.jsonl", [row(ex) for ex in data.examples])
    rng = random.Random(0)
    train = [ex for ex in data.examples if ex.source_split == "train"]
    labels: list[LabelledExample] = []
    for intent in sorted(new):
        labels += rng.sample([ex for ex in train if intent in ex.labels], args.per_new_intent)
    out_of_scope = [ex for ex in train if not ex.labels]
    labels += rng.sample(out_of_scope, min(300, len(out_of_scope)))
    for intent in sorted(known):
        labels += rng.sample([ex for ex in train if intent in ex.labels], 5)
    write(args.out / "labels.jsonl", [row(ex, split=False) for ex in labels])
    (args.out / "new.json").write_text(json.dumps(sorted(new)), encoding="utf-8")
    print(f"{len(known)} known intents, {len(new)} new, {len(labels)} labels -> {args.out}")


if __name__ == "__main__":
    main()
