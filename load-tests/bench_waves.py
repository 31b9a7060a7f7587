"""Duplicate waves, measured: the router's batch pipeline with the repeat cache off and on.

A stream of real texts (CLINC150, openai-moderation, Davidson tweets from data/) in which a
share of the events (30 % and 70 %) repeats 1,000 distinct texts, the rest each seen once, is
decided in batches of 64 by Sieve's pipeline with the topology's default encoder and the
shipped moderation routes: the cache off, then on, alternating, ``--runs`` times each.
Printed: events/s (median), the cache's hit ratio, and the speed-up.

Then the needs-review decisions of one cache-on run go through the real reviewer
(``sieve.review.engine``) against a scripted LLM on loopback (tests/llm_double.py, a test
double: no model is judged here): LLM calls against distinct texts reviewed.

    .venv/bin/python load-tests/bench_waves.py                    # 50,000 events, 3 runs each
    .venv/bin/python load-tests/bench_waves.py --events 2000 --runs 1 --quick   # CI smoke size
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from worker_rig import cpu_model  # noqa: E402

from sieve.contracts import NEEDS_REVIEW, Decision  # noqa: E402
from sieve.encoders.factory import build_text_encoder  # noqa: E402
from sieve.encoders.trivial import TrivialEncoder  # noqa: E402
from sieve.flow.dedup import DecisionCache  # noqa: E402
from sieve.flow.match import RouteIndex  # noqa: E402
from sieve.flow.pipeline import RouterPipeline  # noqa: E402
from sieve.kafka.records import RawRecord  # noqa: E402
from sieve.quality.datasets import load_clinc150, load_davidson, load_openai_moderation  # noqa: E402
from sieve.review.engine import ReviewEngine  # noqa: E402
from sieve.review.steps import ReviewCatalogue  # noqa: E402
from sieve.settings import LLMSettings  # noqa: E402
from sieve.topology import ReviewSpec, load_topology, load_topology_route_set  # noqa: E402
from tests.llm_double import ScriptedLLM  # noqa: E402

DATA = REPO / "data"
BATCH = 64


def real_texts() -> list[str]:
    texts = [e.text for e in load_clinc150(DATA).examples] + [e.text for e in load_davidson(DATA).examples]
    texts += [e.text for e in load_openai_moderation(DATA).examples]
    return list(dict.fromkeys(t for t in texts if t))


def stream(texts: list[str], events: int, repeat_share: float, seed: int = 0) -> list[str]:
    """``events`` texts: ``repeat_share`` of them drawn from 1,000 distinct texts, the rest seen once."""
    rng = random.Random(seed)
    pool = rng.sample(texts, len(texts))
    wave, rest = pool[:1000], pool[1000:]
    repeats = int(events * repeat_share)
    if events - repeats > len(rest):
        raise SystemExit(f"{events - repeats} once-seen texts needed, {len(rest)} available")
    out = [rng.choice(wave) for _ in range(repeats)] + rest[:events - repeats]
    rng.shuffle(out)
    return out


def records(texts: list[str]) -> list[RawRecord]:
    return [RawRecord("sieve.events.text", 0, i, None, json.dumps({"id": f"w{i}", "text": t}).encode(),
                      1_700_000_000.0) for i, t in enumerate(texts)]


def run(pipeline: RouterPipeline, batch: list[RawRecord]) -> tuple[float, list[Decision]]:
    started = time.perf_counter()
    review = []
    for i in range(0, len(batch), BATCH):
        result = pipeline.process(batch[i:i + BATCH])
        review += [row for row in result.rows if row["outcome"] == NEEDS_REVIEW]
    rate = len(batch) / (time.perf_counter() - started)
    return rate, [Decision.model_validate(row) for row in review]


async def review_all(decisions: list[Decision], route_set) -> int:  # noqa: ANN001
    with ScriptedLLM() as llm:
        settings = LLMSettings(base_url=llm.base_url, model="scripted", max_retries=0)
        engine = ReviewEngine("waves", ReviewSpec(max_reviews_per_s=10_000, max_concurrency=16),
                              ReviewCatalogue.from_route_set(route_set), settings)
        try:
            await engine.review_many(decisions)
        finally:
            await engine.aclose()
        return len(llm.requests)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="the trivial encoder (CI smoke size)")
    parser.add_argument("--shares", default="0.3,0.7", help="repeat shares to run, comma-separated")
    args = parser.parse_args()
    shares = [float(share) for share in args.shares.split(",")]
    topology = load_topology(REPO / "topologies" / "moderation.yaml")
    route_set = load_topology_route_set(topology)
    encoder = TrivialEncoder() if args.quick else build_text_encoder(topology.encoder, torch_threads=2)
    index = RouteIndex.build(route_set, encoder)
    texts = real_texts()
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; encoder {encoder.id}; {args.events} events, "
          f"batches of {BATCH}, {args.runs} alternating runs each\n")
    print("| repeats | cache | events/s (median) | runs | hit ratio | speed-up |")
    print("|---|---|---|---|---|---|")
    review_sample: list[Decision] = []
    for share in shares:
        batch = records(stream(texts, args.events, share))
        rates: dict[str, list[float]] = {"off": [], "on": []}
        hit_ratio = 0.0
        for _ in range(args.runs):
            for mode in ("off", "on"):
                cache = DecisionCache(256 << 20, ttl_s=3600) if mode == "on" else None
                pipeline = RouterPipeline(topology, encoder, index, "bench", cache=cache)
                rate, review = run(pipeline, batch)
                rates[mode].append(rate)
                if cache is not None:
                    hit_ratio = cache.stats.hit_ratio
                    if share == 0.7:
                        review_sample = review
        off, on = statistics.median(rates["off"]), statistics.median(rates["on"])
        print(f"| {share:.0%} | off | {off:.0f} | {', '.join(f'{r:.0f}' for r in rates['off'])} | — | |")
        print(f"| {share:.0%} | on | {on:.0f} | {', '.join(f'{r:.0f}' for r in rates['on'])} | "
              f"{hit_ratio:.1%} | {on / off:.2f}x |")
    distinct = len({d.event.text for d in review_sample})
    calls = asyncio.run(review_all(review_sample, route_set))
    print(f"\nneeds-review decisions at 70 % repeats (cache on): {len(review_sample)}, distinct texts "
          f"{distinct}, LLM calls {calls}")
    return 0 if calls <= distinct else 1


if __name__ == "__main__":
    raise SystemExit(main())
