"""A shadow run replayed offline: where the active version decides automatically, what candidates decide.

``shadow_replay.py DATA ACTIVE CANDIDATE...`` decides a labelled data set (``--split``,
default all) with the active route file and each candidate as the worker would (their own
thresholds, lists and heads) and prints, per candidate, what ``routes promote
--shadow-metrics`` would read off a shadow run over that data, scored against the gold
outcomes as the live counters cannot be:

- the candidate's automatic share and the accuracy of its automatic decisions;
- of the events both versions decide automatically: the share decided equivalently (the
  same outcome, and the same route unless the outcome is the set's default), the share
  decided alike (route too), and the events decided otherwise, with how many of those each
  version has right.

    .venv/bin/python load-tests/shadow_replay.py davidson ACTIVE.yaml after-window-0.yaml

``--stream 4000:12000`` replays only those events of ``learning_loop.py``'s stream (its
order for ``--seed``): e.g. the windows after the ones a candidate learned from.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
from loop_parts import loop_stream

from sieve.cli.workbench import open_bench
from sieve.contracts import NEEDS_REVIEW
from sieve.flow.shadow import equivalent
from sieve.quality.runner import load_candidate
from sieve.quality.scoring import score_split, three_way_run
from sieve.quality.systems import SystemRun


def stream_part(data: str, span: str, seed: int, folder: Path) -> str:
    """Events ``FROM:TO`` of the learning loop's stream of ``data`` as labelled JSONL in ``folder``."""
    start, end = (int(x) for x in span.split(":"))
    path = folder / "stream.jsonl"
    path.write_text("".join(json.dumps({"id": ex.id, "text": ex.text, "outcome": ex.outcome,
                                        "labels": sorted(ex.labels)}) + "\n"
                            for ex in loop_stream(data, seed)[1][start:end]))
    return str(path)


def decided(bench, path: Path, split: str) -> tuple[SystemRun, np.ndarray, np.ndarray]:
    """The worker's decisions of ``split`` with ``path``: the run, its outcomes and its route names."""
    candidate = load_candidate(path.name, path, bench.encoder)
    part, vectors = bench.part(split), bench.vectors(split)
    run = three_way_run(path.name, score_split(part, candidate.index, bench.encoder, vectors), None,
                        candidate.head)
    names = [route.name for route in candidate.index.routes]
    routes = np.array([None if r is None else names[r] for r in run.routes], dtype=object)
    return run, np.array(run.outcomes, dtype=object), routes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", help="a data set name (davidson, ...) or a labelled JSONL path")
    parser.add_argument("active", type=Path)
    parser.add_argument("candidates", nargs="+", type=Path)
    parser.add_argument("--split", default="all", help="test, calibration, train or all")
    parser.add_argument("--stream", default=None, help="FROM:TO: only these events of the loop's stream")
    parser.add_argument("--seed", type=int, default=0, help="the loop's --seed (its stream order)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        data = stream_part(args.data, args.stream, args.seed, Path(folder)) if args.stream else args.data
        replay(args, open_bench(data, 0, None, "sentence-transformers", None, True, False))


def replay(args: argparse.Namespace, bench) -> None:
    """Decide with the active version and each candidate; print the table."""
    run, active, active_routes = decided(bench, args.active, args.split)
    gold = np.array(run.gold, dtype=object)
    default = run.route_set.default_outcome
    sure = active != NEEDS_REVIEW
    print(f"{args.active.name} (active): {len(gold)} events, automatic {sure.mean():.1%} at "
          f"{(active[sure] == gold[sure]).mean():.3f}")
    print("| candidate | automatic at accuracy | both automatic | equivalent | alike | decided otherwise "
          "| candidate right | active right |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for path in args.candidates:
        _, outcomes, routes = decided(bench, path, args.split)
        auto = outcomes != NEEDS_REVIEW
        both = sure & auto
        alike = both & (outcomes == active) & (routes == active_routes)
        same = both & np.array([equivalent(o, r, a, ar, default)
                                for o, r, a, ar in zip(outcomes, routes, active, active_routes, strict=True)])
        other = both & ~same
        n = max(int(both.sum()), 1)
        print(f"| {path} | {auto.mean():.1%} at {(outcomes[auto] == gold[auto]).mean():.3f} | "
              f"{both.sum()} | {same.sum() / n:.1%} | {alike.sum() / n:.1%} | {other.sum()} | "
              f"{(outcomes[other] == gold[other]).sum()} | {(active[other] == gold[other]).sum()} |")


if __name__ == "__main__":
    main()
