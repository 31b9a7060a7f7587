"""Benchmark of the spine, in one run on this machine; prints one table.

1. the text encoder alone: batched sentences/s over batch sizes and torch threads;
2. one worker end to end (dev broker in, decisions out) with the encoder's best settings;
3. the same worker with the trivial encoder: the streaming ceiling;
plus each worker's peak memory (VmHWM).

    .venv/bin/python load-tests/bench_spine.py                # full size
    .venv/bin/python load-tests/bench_spine.py --events 300 --quick   # CI smoke size

Messages are the shipped demo samples (routes/samples/demo-messages.jsonl).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import yaml
from aiokafka import AIOKafkaConsumer

from sieve.cli.demo import free_port, sample_events, steady_rate
from sieve.encoders.sentence_transformers import SentenceTransformerEncoder
from sieve.encoders.trivial import TrivialEncoder
from sieve.kafka.broker import start_dev_broker
from sieve.kafka.client import produce
from sieve.routeset import load_route_set
from sieve.settings import KafkaSettings, QdrantSettings
from sieve.store.qdrant import RouteStore

REPO = Path(__file__).resolve().parents[1]


def encoder_rates(texts: list[str], batch_sizes: list[int], threads: list[int]) -> list[dict]:
    encoder = SentenceTransformerEncoder(device="cpu")
    encoder.encode(texts[:256])  # warm-up
    rows = []
    for n_threads in threads:
        encoder.torch_threads = n_threads
        for batch in batch_sizes:
            encoder.batch_size = batch
            started = time.perf_counter()
            encoder.encode(texts)
            seconds = time.perf_counter() - started
            rows.append({"threads": n_threads, "batch": batch, "rate": len(texts) / seconds})
    return rows


async def _decisions(kafka: KafkaSettings, topics: list[str], want: int, timeout_s: float) -> list:
    consumer = AIOKafkaConsumer(*topics, bootstrap_servers=kafka.bootstrap_servers,
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    records, seen = [], set()
    deadline = time.monotonic() + timeout_s
    try:
        while len(seen) < want and time.monotonic() < deadline:
            for batch in (await consumer.getmany(timeout_ms=500)).values():
                for record in batch:
                    records.append(record)
                    seen.add(json.loads(record.value)["event_id"])
        return records
    finally:
        await consumer.stop()


def _descendants(pid: int) -> list[int]:
    """``pid``'s child processes and theirs (a worker's compute child), from /proc."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
        for child in children:
            found += [child, *_descendants(child)]
    return found


def peak_rss_mib(pid: int) -> float:
    """Peak resident memory (VmHWM) of a worker: its process's plus each of its child processes'
    (compute=process), summed (their peaks need not coincide: an upper bound)."""
    total = 0.0
    for process in (pid, *_descendants(pid)):
        try:
            status = Path(f"/proc/{process}/status").read_text()
        except OSError:
            continue
        total += next((int(line.split()[1]) / 1024 for line in status.splitlines()
                       if line.startswith("VmHWM:")), 0.0)
    return total or float("nan")


def stage_seconds(port: int) -> dict[str, float]:
    """Seconds the worker spent in each stage, summed over its batches (from /metrics)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("sieve_stage_seconds_sum{"):
            stage = line.split('stage="', 1)[1].split('"', 1)[0]
            totals[stage] = totals.get(stage, 0.0) + float(line.rsplit(" ", 1)[1])
    return totals


def worker_run(kind: str, events: list[dict], batch: int, threads: int, tmp: Path,
               max_events: int = 256) -> dict:
    """One worker over a backlog: events/s from its first to its last decision, and peak memory."""
    port = free_port()
    broker = start_dev_broker(port=port, log_path=tmp / f"broker-{kind}.log")
    kafka = KafkaSettings(bootstrap_servers=f"127.0.0.1:{port}")
    qdrant = tmp / f"qdrant-{kind}"
    route_file = REPO / "routes" / "moderation.yaml"
    encoder = TrivialEncoder() if kind == "trivial" else SentenceTransformerEncoder(device="cpu")
    RouteStore(QdrantSettings(path=qdrant)).sync(load_route_set(route_file), encoder)
    topology = {
        "name": "bench", "input": {"topics": ["bench.in"], "partitions": 4},
        "route_set": {"name": "moderation", "file": str(route_file)},
        "encoder": {"kind": kind, "batch_size": batch},
        "batching": {"max_events": max_events, "max_wait_s": 0.1},
        "output": {"outcome_topics": {"clean": "bench.clean", "violating": "bench.violating",
                                      "needs_review": "bench.needs-review"}},
    }
    topology_path = tmp / f"topology-{kind}.yaml"
    topology_path.write_text(yaml.safe_dump(topology))
    metrics_port = free_port()
    env = {**os.environ, "SIEVE_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
           "SIEVE_QDRANT__PATH": str(qdrant), "SIEVE_METRICS_PORT": str(metrics_port),
           "SIEVE_TORCH_THREADS": str(threads), "SIEVE_LOG_LEVEL": "WARNING",
           "SIEVE_KAFKA__SESSION_TIMEOUT_S": "4", "SIEVE_KAFKA__HEARTBEAT_INTERVAL_S": "1"}
    asyncio.run(produce(kafka, "bench.in", [(e["id"].encode(), json.dumps(e).encode()) for e in events]))
    worker = subprocess.Popen([sys.executable, "-m", "sieve", "worker", str(topology_path)], env=env,
                              stdout=open(tmp / f"worker-{kind}.log", "wb"), stderr=subprocess.STDOUT)
    try:
        records = asyncio.run(_decisions(kafka, ["bench.clean", "bench.violating", "bench.needs-review"],
                                         len(events), timeout_s=1800))
        memory = peak_rss_mib(worker.pid)
        stages = stage_seconds(metrics_port)
    finally:
        worker.terminate()
        worker.wait(60)
        broker.terminate()
        broker.wait(10)
    decided = len({json.loads(r.value)["event_id"] for r in records})
    rate, _ = steady_rate(records)
    return {"decided": decided, "rate": rate, "memory_mib": memory, "stage_seconds": stages}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=4000, help="events per worker run")
    parser.add_argument("--quick", action="store_true", help="one batch size and thread count")
    parser.add_argument("--max-events", type=int, default=1024,
                        help="the worker's batch (Faust take) size; larger batches sort more texts "
                             "by length before encoding (less padding) at the cost of latency")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    events = sample_events(args.events)
    texts = [e["text"] for e in events]
    batch_sizes, threads = ([32], [1]) if args.quick else ([16, 32, 64, 128], [1, 2])
    enc_rows = encoder_rates(texts[: min(len(texts), 2000)], batch_sizes, threads)
    best = max(enc_rows, key=lambda r: r["rate"])
    tmp = Path(tempfile.mkdtemp(prefix="sieve-bench-"))
    e2e = worker_run("sentence-transformers", events, best["batch"], best["threads"], tmp, args.max_events)
    ceiling = worker_run("trivial", sample_events(args.events * (1 if args.quick else 5)), 64, 1, tmp)

    words = sum(len(t.split()) for t in texts) / len(texts)
    print(f"\nSieve spine benchmark — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
          f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}, no GPU; "
          f"{len(texts)} demo messages, {words:.0f} words on average\n")
    print("| measurement | setting | events/s (sentences/s) | worker peak RSS (with its compute child) |")
    print("|---|---|---:|---:|")
    for row in enc_rows:
        mark = " (best)" if row is best else ""
        print(f"| MiniLM encode alone | batch {row['batch']}, {row['threads']} thread(s){mark} "
              f"| {row['rate']:.0f} | |")
    print(f"| worker end to end, MiniLM | batch {best['batch']}, {best['threads']} thread(s), "
          f"worker batches of {args.max_events}, {e2e['decided']} events | {e2e['rate']:.0f} "
          f"| {e2e['memory_mib']:.0f} MiB |")
    print(f"| worker end to end, trivial encoder (ceiling) | {ceiling['decided']} events "
          f"| {ceiling['rate']:.0f} | {ceiling['memory_mib']:.0f} MiB |")
    print(f"\nend to end / encoder best: {e2e['rate'] / best['rate']:.0%} (target ≥ 80%)")
    for label, run in (("MiniLM", e2e), ("trivial", ceiling)):
        stages = run["stage_seconds"]
        total = sum(stages.values())
        shares = ", ".join(f"{k} {v / total:.0%}" for k, v in sorted(stages.items(), key=lambda kv: -kv[1]))
        print(f"worker time by stage ({label}, {total:.1f} s in batches): {shares}")
    if args.json:
        args.json.write_text(json.dumps({"encoder": enc_rows, "best": best, "end_to_end": e2e,
                                         "ceiling": ceiling}, indent=2))
    if e2e["decided"] != len(events) or ceiling["decided"] < args.events:
        sys.exit("not every event was decided")


if __name__ == "__main__":
    main()
