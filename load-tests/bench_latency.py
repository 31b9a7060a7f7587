"""Latency at half load: p50/p99 from event time to decision, one worker, on this machine.

1. Max load: the dev broker, a backlog of dataset messages, then one ``sieve worker``;
   events/s from its decisions after the first batch (``sieve.cli.demo.steady_rate``, as
   bench_spine.py measures it).
2. Half of it: the same worker, warm, gets events at half that rate, steadily
   (loadgen.produce_events), for ``--duration`` seconds.
3. Latency per event = the Kafka timestamp of its decision record (the worker's producer
   stamps it when it sends the decision) − the Kafka timestamp of its input record (the load
   generator's producer stamps it when it sends the event). Both are producer create times on
   this machine's clock, so this is the whole path: broker in, wait for a batch, decode,
   encode, match, decide, hand to the producer. The worker's own figure (the decision's
   ``latency_ms``: input timestamp to ``decided_at``, before publishing) is printed beside it.

Target: p99 ≤ max_wait_s + 2 × the mean encode time of a batch during the paced run (from
the worker's /metrics, ``sieve_stage_seconds{stage="encode"}``). Messages are real texts
(data/, as loadgen.py sends them). The broker and the load generator share the
cores with the worker.

    .venv/bin/python load-tests/bench_latency.py                        # MiniLM, 30 s
    .venv/bin/python load-tests/bench_latency.py --encoder trivial --quick   # CI smoke size
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loadgen import dataset_texts, make_events  # noqa: E402
from worker_rig import WorkerRig, cpu_model, encoder_spec, metric_total  # noqa: E402

from sieve.cli.demo import steady_rate  # noqa: E402
from sieve.settings import get_settings  # noqa: E402

MAX_TEXT_CHARS = 8000  # the topology's default limit; longer texts would be dead-lettered


def stage_deltas(before: list, after: list) -> dict[str, float]:
    """Batches, mean encode seconds per batch and mean batch size between two /metrics scrapes."""
    def delta(name: str, **labels: str) -> float:
        return metric_total(after, name, **labels) - metric_total(before, name, **labels)

    def mean(total: float, count: float) -> float:
        return total / count if count else float("nan")

    batches = delta("sieve_batch_size_count")
    return {
        "batches": batches,
        "encode_s_mean": mean(delta("sieve_stage_seconds_sum", stage="encode"),
                              delta("sieve_stage_seconds_count", stage="encode")),
        "all_stages_s_mean": mean(delta("sieve_stage_seconds_sum"), batches),
        "batch_size_mean": mean(delta("sieve_batch_size_sum"), batches),
    }


def percentiles_ms(values: list[float]) -> dict[str, float]:
    """p50, p90, p99 and max of a list of milliseconds."""
    if not values:
        return {k: float("nan") for k in ("p50", "p90", "p99", "max")}
    p50, p90, p99 = np.percentile(np.array(values), [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "max": float(max(values))}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--encoder", choices=["sentence-transformers", "trivial"],
                        default="sentence-transformers")
    parser.add_argument("--backend", default="torch", help="sentence-transformers backend (topology "
                        "encoder.backend: torch, onnx, onnx-int8, openvino or openvino-int8)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in the worker")
    parser.add_argument("--batch-size", type=int, default=64, help="encoder batch (shipped: 64)")
    parser.add_argument("--max-events", type=int, default=256, help="worker batch (shipped: 256)")
    parser.add_argument("--max-wait", type=float, default=0.2, help="batching.max_wait_s (shipped: 0.2)")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of paced load")
    parser.add_argument("--load", type=float, default=0.5, help="paced rate as a share of the maximum")
    parser.add_argument("--backlog", type=int,
                        help="events for the max-load run (default: 2,000 MiniLM, 20,000 trivial)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: backlog of 4 batches, 5 s paced")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if args.quick:
        args.duration = min(args.duration, 5.0)
    backlog = args.backlog or (4 * args.max_events if args.quick
                               else 2000 if args.encoder == "sentence-transformers" else 20000)

    pool = [t for t in dataset_texts() if len(t.text) <= MAX_TEXT_CHARS]
    spec = encoder_spec(args.encoder, args.backend if args.encoder == "sentence-transformers" else None,
                        args.batch_size)
    tmp = Path(tempfile.mkdtemp(prefix="sieve-bench-latency-"))
    with WorkerRig(tmp, "latency", spec, threads=args.threads, max_events=args.max_events,
                   max_wait_s=args.max_wait) as rig:
        # 1. max load: a backlog, then the worker
        rig.produce(make_events(backlog, "max", texts=pool))
        rig.start_worker()
        records, dead = rig.decisions("max", backlog)
        max_rate, window = steady_rate(records)
        if not max_rate > 0:
            sys.exit(f"could not measure the maximum load from {backlog} events (rate {max_rate})")
        # 2. half of it, paced, to the warm worker
        rate = max_rate * args.load
        count = max(1, round(rate * args.duration))
        # the same texts as the backlog (new ids): the cost per event must match the one measured
        same = pool[: min(backlog, len(pool))]
        before = rig.metrics()
        sent = rig.produce(make_events(count, "paced", texts=same),
                           rate=rate)
        paced, paced_dead = rig.decisions("paced", count)
        after = rig.metrics()
        stamps = rig.input_timestamps("paced", count)
        memory = rig.peak_rss_mib()

    end_to_end, in_worker, clock_skew = [], [], []
    for record in paced:
        decision = json.loads(record.value)
        event_id = decision["event_id"]
        if event_id in stamps:
            end_to_end.append(float(record.timestamp - stamps[event_id]))
            sent_ms = (decision["event"].get("metadata") or {}).get("load_sent_ms")
            if sent_ms is not None:
                clock_skew.append(float(stamps[event_id] - sent_ms))
        if decision.get("latency_ms") is not None:
            in_worker.append(float(decision["latency_ms"]))
    e2e, worker_ms = percentiles_ms(end_to_end), percentiles_ms(in_worker)
    stages = stage_deltas(before, after)
    target_ms = (args.max_wait + 2 * stages["encode_s_mean"]) * 1000
    passed = e2e["p99"] <= target_ms
    words = np.array([len(same[i % len(same)].text.split()) for i in range(count)])

    compute = get_settings().compute_mode  # the worker's, from the same environment
    encoder_label = "trivial encoder" if args.encoder == "trivial" else f"MiniLM ({args.backend})"
    print(f"\nSieve latency at {args.load:.0%} load — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, "
          f"{platform.node()}, {os.cpu_count()} CPU cores, {cpu_model()}, no GPU; one worker, "
          f"{encoder_label}, {args.threads} thread(s), batches of ≤ {args.max_events} / "
          f"{args.max_wait:g} s, compute={compute}; dataset messages, {words.mean():.0f} words on "
          f"average\n")
    print("| measurement | value |")
    print("|---|---:|")
    print(f"| max load (backlog of {backlog}, after the first batch, over {window:.1f} s) "
          f"| {max_rate:.1f} events/s |")
    print(f"| paced load ({args.load:.0%} of max, {args.duration:g} s) | {rate:.1f} events/s asked, "
          f"{sent.rate:.1f} sent, {count} events |")
    print(f"| decided | {len(paced)} ({paced_dead} dead letters) |")
    print(f"| end to end (input record → decision record) p50 / p90 / p99 / max | {e2e['p50']:.0f} / "
          f"{e2e['p90']:.0f} / {e2e['p99']:.0f} / {e2e['max']:.0f} ms |")
    print(f"| in the worker (decision latency_ms) p50 / p90 / p99 / max | {worker_ms['p50']:.0f} / "
          f"{worker_ms['p90']:.0f} / {worker_ms['p99']:.0f} / {worker_ms['max']:.0f} ms |")
    print(f"| topology max_wait_s | {args.max_wait * 1000:.0f} ms |")
    print(f"| encode per batch (paced run, mean of {stages['batches']:.0f}) | "
          f"{stages['encode_s_mean'] * 1000:.1f} ms |")
    print(f"| all stages per batch (paced run, mean) | {stages['all_stages_s_mean'] * 1000:.1f} ms |")
    print(f"| batch size (paced run, mean) | {stages['batch_size_mean']:.1f} events |")
    print(f"| target: p99 ≤ max_wait + 2 × encode | {target_ms:.0f} ms: {'PASS' if passed else 'FAIL'} |")
    if clock_skew:
        print(f"\ninput record timestamp − loadgen's load_sent_ms: median {np.median(clock_skew):.1f} ms, "
              f"max {max(clock_skew):.0f} ms; worker peak RSS {memory:.0f} MiB (with its compute child); "
              f"logs in {tmp}")
    if args.json:
        args.json.write_text(json.dumps({
            "date": datetime.now(UTC).isoformat(), "host": platform.node(), "cores": os.cpu_count(),
            "cpu": cpu_model(), "compute": compute, "encoder": args.encoder,
            "backend": args.backend if args.encoder != "trivial" else None, "threads": args.threads,
            "batch_size": args.batch_size, "max_events": args.max_events,
            "max_wait_s": args.max_wait, "backlog": backlog, "max_rate": max_rate, "max_window_s": window,
            "max_dead_letters": dead, "load": args.load, "paced_rate": rate, "sent_rate": sent.rate,
            "duration_s": args.duration, "paced_events": count, "decided": len(paced),
            "dead_letters": paced_dead, "latency_ms": e2e, "in_worker_latency_ms": worker_ms,
            "encode_s_mean": stages["encode_s_mean"], "batch_size_mean": stages["batch_size_mean"],
            "batches": stages["batches"], "target_ms": target_ms, "passed": passed,
            "all_stages_s_mean": stages["all_stages_s_mean"],
            "timestamps": "decision record Kafka timestamp - input record Kafka timestamp "
                          "(producer create times, ms)",
            "memory_mib": memory, "words_mean": float(words.mean()),
        }, indent=2))
    if len(paced) + paced_dead != count or len(records) + dead != backlog:
        sys.exit("not every event was decided")


if __name__ == "__main__":
    main()
