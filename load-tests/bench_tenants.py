"""Tenants, measured: the router's batch pipeline with one route set, and with three tenants on three.

A stream of real texts (CLINC150, openai-moderation, Davidson tweets from data/), tenants
``a``, ``b``, ``c`` in turn, is decided in batches of 64 by Sieve's pipeline with the
topology's default encoder: (a) the shipped moderation routes alone (the tenant field
ignored), (b) a topology whose tenants decide with three route sets written to a temporary
folder: the shipped set, a stricter copy (lower accept and review), and a copy with a subset
of its routes. Alternating, ``--runs`` times each. Printed: events/s per run and mode, and
the median ratio (three tenants over one set). Each batch is still encoded once; what the
tenants add is a match and a decide per route set.

    .venv/bin/python load-tests/bench_tenants.py                          # 20,000 events, 3 runs each
    .venv/bin/python load-tests/bench_tenants.py --events 500 --quick     # smoke size, trivial encoder
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from worker_rig import cpu_model  # noqa: E402

from sieve.encoders.factory import build_text_encoder  # noqa: E402
from sieve.encoders.trivial import TrivialEncoder  # noqa: E402
from sieve.flow.match import RouteIndex  # noqa: E402
from sieve.flow.pipeline import RouterPipeline  # noqa: E402
from sieve.kafka.records import RawRecord  # noqa: E402
from sieve.quality.datasets import load_clinc150, load_davidson, load_openai_moderation  # noqa: E402
from sieve.routeset import RouteSet, load_route_set  # noqa: E402
from sieve.topology import TenantsSpec, Topology, load_topology  # noqa: E402

DATA = REPO / "data"
BATCH = 64
TENANTS = ("a", "b", "c")


def real_texts() -> list[str]:
    texts = [e.text for e in load_clinc150(DATA).examples] + [e.text for e in load_davidson(DATA).examples]
    texts += [e.text for e in load_openai_moderation(DATA).examples]
    return list(dict.fromkeys(t for t in texts if t))


def records(texts: list[str]) -> list[RawRecord]:
    return [RawRecord("sieve.events.text", 0, i, None,
                      json.dumps({"id": f"t{i}", "text": t, "tenant": TENANTS[i % 3]}).encode(),
                      1_700_000_000.0) for i, t in enumerate(texts)]


def tenant_sets(folder: Path) -> list[RouteSet]:
    """The shipped moderation set's copies: stricter thresholds; every other category and lists dropped."""
    data = yaml.safe_load((REPO / "routes" / "moderation.yaml").read_text(encoding="utf-8"))
    data["lists"] = [str(REPO / "routes" / name) for name in data.get("lists") or []]  # found from the copies
    strict = {**data, "name": "moderation-strict",
              "defaults": {**data["defaults"], "accept": 0.5, "review": 0.35}}
    kept = [r for i, r in enumerate(data["routes"]) if r["outcome"] == data["default_outcome"] or i % 2 == 0]
    lite = {**data, "name": "moderation-lite", "routes": kept, "lists": []}  # its list's route is gone
    sets = []
    for copy in (strict, lite):
        path = folder / f"{copy['name']}.yaml"
        path.write_text(yaml.safe_dump(copy, sort_keys=False), encoding="utf-8")
        sets.append(load_route_set(path))
    return sets


def run(pipeline: RouterPipeline, batch: list[RawRecord]) -> float:
    started = time.perf_counter()
    for i in range(0, len(batch), BATCH):
        pipeline.process(batch[i:i + BATCH])
    return len(batch) / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="the trivial encoder (smoke size)")
    args = parser.parse_args()
    topology = load_topology(REPO / "topologies" / "moderation.yaml")
    encoder = TrivialEncoder() if args.quick else build_text_encoder(topology.encoder, torch_threads=2)
    own = RouteIndex.build(load_route_set(REPO / "routes" / "moderation.yaml"), encoder)
    with tempfile.TemporaryDirectory() as folder:
        strict, lite = tenant_sets(Path(folder))
    tenant_indexes = {(s.name, "text"): RouteIndex.build(s, encoder) for s in (strict, lite)}
    tenants = TenantsSpec.model_validate({"default": "a", "policies": {
        "a": {}, "b": {"route_set": {"name": strict.name}}, "c": {"route_set": {"name": lite.name}}}})
    with_tenants = Topology.model_validate({**topology.model_dump(), "tenants": tenants.model_dump()})
    texts = real_texts()
    if args.events > len(texts):
        raise SystemExit(f"{args.events} events asked, {len(texts)} distinct texts available")
    batch = records(texts[:args.events])
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; encoder {encoder.id}; {args.events} events, "
          f"batches of {BATCH}, {args.runs} alternating runs each\n")
    rates: dict[str, list[float]] = {"one set": [], "3 tenants, 3 sets": []}
    for _ in range(args.runs):
        rates["one set"].append(run(RouterPipeline(topology, encoder, own, "bench"), batch))
        rates["3 tenants, 3 sets"].append(run(RouterPipeline(with_tenants, encoder, own, "bench",
                                                             tenant_indexes=tenant_indexes), batch))
    print("| mode | events/s (median) | runs |")
    print("|---|---|---|")
    for mode, values in rates.items():
        print(f"| {mode} | {statistics.median(values):.0f} | {', '.join(f'{r:.0f}' for r in values)} |")
    pairs = zip(rates["3 tenants, 3 sets"], rates["one set"], strict=True)
    ratio = statistics.median(tenants / one for tenants, one in pairs)
    print(f"\nmedian ratio (3 tenants / one set): {ratio:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
