"""Scaling run: 1, 2, 4 router workers on one topic with enough partitions; prints one table
and writes a plot (PNG).

For each worker count: fresh topics (``--partitions``, 8 by default) and a fresh consumer
group; the workers (`sieve worker` processes) are started and waited for until every one
answers /readyz and the group has assigned all partitions; a few warm-up events go through;
then ``--events`` realistic texts (loadgen.py) are sent flat out (or at ``--rate``) and
measure.py reads the decisions: throughput, end-to-end latency p50/p95/p99, and the CPU
seconds each worker and the broker used meanwhile (from /proc).

    .venv/bin/python load-tests/scaling.py                                 # MiniLM, 3,000 events a step
    .venv/bin/python load-tests/scaling.py --encoder trivial --events 300 --workers 1 2   # CI size

By default it starts the dev broker (tansu) and uses an embedded Qdrant; ``--bootstrap``
(e.g. the compose stack's localhost:19094) and ``--qdrant-url`` point it elsewhere.
On a machine with fewer cores than workers, the workers and the broker share the cores:
throughput cannot grow with workers there, and the per-worker CPU column shows why.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loadgen import make_events, produce_events  # noqa: E402
from measure import collect  # noqa: E402

from sieve.cli.demo import free_port  # noqa: E402
from sieve.kafka.broker import start_dev_broker  # noqa: E402
from sieve.kafka.client import ensure_topics  # noqa: E402
from sieve.routeset import load_route_set  # noqa: E402
from sieve.settings import KafkaSettings, QdrantSettings  # noqa: E402
from sieve.store.qdrant import RouteStore  # noqa: E402
from sieve.topology import load_topology, load_topology_route_set  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ROUTES = REPO / "routes" / "moderation.yaml"
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (all its threads), from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def scrape(port: int) -> dict[str, float]:
    """Each metric's samples summed over labels."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name = line.split("{", 1)[0].split(" ", 1)[0]
            totals[name] = totals.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return totals


def ready(port: int) -> bool:
    """Whether the worker's /readyz answers 200."""
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2).status == 200
    except (urllib.error.URLError, OSError):
        return False


def wait_for_group(
    workers: list[subprocess.Popen], ports: list[int], partitions: int, timeout_s: float = 300.0
) -> None:
    """Until every worker is ready and all partitions are assigned, steadily for 2 s."""
    deadline = time.monotonic() + timeout_s
    steady_since: float | None = None
    while time.monotonic() < deadline:
        for worker in workers:
            if worker.poll() is not None:
                raise RuntimeError(f"worker {worker.pid} exited with {worker.returncode}")
        settled = (
            all(ready(p) for p in ports)
            and sum(scrape(p).get("sieve_assigned_partitions", 0) for p in ports) == partitions
        )
        if settled:
            steady_since = steady_since or time.monotonic()
            if time.monotonic() - steady_since >= 2.0:
                return
        else:
            steady_since = None
        time.sleep(0.3)
    raise TimeoutError(f"{len(workers)} workers did not settle on {partitions} partitions")


def write_topology(tmp: Path, prefix: str, args: argparse.Namespace) -> Path:
    topology = {
        "name": "load",
        "group_id": f"{prefix}-group",
        "input": {"topics": [f"{prefix}.in"], "partitions": args.partitions},
        "route_set": {"name": "moderation", "file": str(ROUTES)},
        "encoder": {"kind": args.encoder, "batch_size": args.batch_size},
        "batching": {"max_events": args.max_events, "max_wait_s": 0.1},
        "output": {
            "outcome_topics": {
                o: f"{prefix}.{o.replace('_', '-')}" for o in ("clean", "violating", "needs_review")
            },
            "route_topic_prefix": f"{prefix}.route.",
            "dead_letter_topic": f"{prefix}.dead-letter",
            "partitions": args.partitions,
        },
    }
    path = tmp / f"{prefix}.yaml"
    path.write_text(yaml.safe_dump(topology))
    return path


def step(
    count: int,
    args: argparse.Namespace,
    kafka: KafkaSettings,
    qdrant_env: dict[str, str],
    tmp: Path,
    broker_pid: int | None,
) -> dict:
    """One worker count: start, settle, warm up, send, measure, stop."""
    prefix = f"scale{count}w{int(time.time())}"
    topology_path = write_topology(tmp, prefix, args)
    topology = load_topology(topology_path)
    wanted = {topic: args.partitions for topic in topology.input.topics}
    wanted |= {t: args.partitions for t in topology.output_topics(load_topology_route_set(topology))}
    asyncio.run(ensure_topics(kafka, wanted))
    env = {
        **os.environ,
        **qdrant_env,
        "SIEVE_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
        "SIEVE_TORCH_THREADS": str(args.torch_threads),
        "SIEVE_DEVICE": "cpu",
        "SIEVE_LOG_LEVEL": "WARNING",
        "SIEVE_ROUTE_REFRESH_S": "3600",
        "SIEVE_KAFKA__SESSION_TIMEOUT_S": "6",
        "SIEVE_KAFKA__HEARTBEAT_INTERVAL_S": "1",
        "SIEVE_KAFKA__REBALANCE_TIMEOUT_S": "20",
        "SIEVE_KAFKA__COMMIT_INTERVAL_S": "0.5",
    }
    ports = [free_port() for _ in range(count)]
    workers = []
    for i, port in enumerate(ports):
        log = open(tmp / f"{prefix}-worker{i}.log", "wb")  # noqa: SIM115
        workers.append(
            subprocess.Popen(
                [sys.executable, "-m", "sieve", "worker", str(topology_path)],
                env={**env, "SIEVE_METRICS_PORT": str(port), "SIEVE_WORKER_NAME": f"{prefix}-w{i}"},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
    outputs = [f"{prefix}.{o}" for o in ("clean", "violating", "needs-review")]
    try:
        wait_for_group(workers, ports, args.partitions)
        if args.warmup:
            warm = make_events(args.warmup, f"warm{prefix}", seed=args.seed + 1)
            asyncio.run(produce_events(kafka, f"{prefix}.in", warm))
            asyncio.run(
                collect(
                    kafka,
                    outputs,
                    run=f"warm{prefix}",
                    expected=args.warmup,
                    dead_letter_topic=f"{prefix}.dead-letter",
                    idle_s=60,
                )
            )
        events_in_before = [scrape(p).get("sieve_events_in_total", 0.0) for p in ports]
        cpu_before = [cpu_seconds(w.pid) for w in workers]
        broker_before = cpu_seconds(broker_pid) if broker_pid else None
        started = time.monotonic()
        events = make_events(args.events, prefix, image_share=args.image_share, seed=args.seed)
        sent = asyncio.run(produce_events(kafka, f"{prefix}.in", events, args.rate))
        measurement = asyncio.run(
            collect(
                kafka,
                outputs,
                run=prefix,
                expected=args.events,
                dead_letter_topic=f"{prefix}.dead-letter",
                idle_s=args.idle,
            )
        )
        wall = time.monotonic() - started
        cpu = [cpu_seconds(w.pid) - before for w, before in zip(workers, cpu_before, strict=True)]
        broker_cpu = (
            cpu_seconds(broker_pid) - broker_before if broker_pid and broker_before is not None else None
        )
        per_worker_events = [
            scrape(p).get("sieve_events_in_total", 0.0) - b
            for p, b in zip(ports, events_in_before, strict=True)
        ]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signal.SIGTERM)
        for worker in workers:
            try:
                worker.wait(60)
            except subprocess.TimeoutExpired:
                worker.kill()
    latency = measurement.percentiles_s()
    return {
        "workers": count,
        "partitions": args.partitions,
        "events": args.events,
        "decided": measurement.decided,
        "dead_letters": measurement.dead_letters,
        "repeats": measurement.duplicates,
        "events_per_s": measurement.throughput(),
        "sent_per_s": sent.rate,
        "p50_ms": latency["p50"] * 1000,
        "p95_ms": latency["p95"] * 1000,
        "p99_ms": latency["p99"] * 1000,
        "wall_s": wall,
        "worker_cpu_s": cpu,
        "worker_events": per_worker_events,
        "broker_cpu_s": broker_cpu,
        "events_per_worker_cpu_s": measurement.decided / sum(cpu) if sum(cpu) > 0 else float("nan"),
    }


def table(rows: list[dict], header: str) -> str:
    lines = [
        header,
        "",
        "| workers | partitions | events decided | events/s | p50 ms | p95 ms | p99 ms "
        "| CPU s per worker (events each) | workers' CPU s | broker CPU s | events per worker CPU s |",
        "|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        each = ", ".join(
            f"{c:.1f} ({e:.0f})" for c, e in zip(r["worker_cpu_s"], r["worker_events"], strict=True)
        )
        broker = f"{r['broker_cpu_s']:.1f}" if r["broker_cpu_s"] is not None else "n/a"
        lines.append(
            f"| {r['workers']} | {r['partitions']} | {r['decided']} | {r['events_per_s']:.0f} "
            f"| {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['p99_ms']:.0f} | {each} "
            f"| {sum(r['worker_cpu_s']):.1f} | {broker} "
            f"| {r['events_per_worker_cpu_s']:.0f} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workers = [r["workers"] for r in rows]
    fig, (ax_rate, ax_lat, ax_cpu) = plt.subplots(1, 3, figsize=(15, 4.5))
    ax_rate.plot(workers, [r["events_per_s"] for r in rows], "o-", label="measured here")
    base = rows[0]["events_per_s"] / rows[0]["workers"]
    ax_rate.plot(
        workers,
        [base * w for w in workers],
        "--",
        color="grey",
        label="design: linear, own cores/GPU per worker\n(not measured here)",
    )
    ax_rate.set(xlabel="router workers", ylabel="events/s", title="Throughput", xticks=workers)
    ax_rate.set_ylim(bottom=0)
    ax_rate.legend(fontsize=8)
    for key, style in (("p50_ms", "o-"), ("p95_ms", "s-"), ("p99_ms", "^-")):
        ax_lat.plot(workers, [r[key] for r in rows], style, label=key.replace("_ms", ""))
    ax_lat.set(xlabel="router workers", ylabel="ms", title="End-to-end latency", xticks=workers)
    ax_lat.set_ylim(bottom=0)
    ax_lat.legend(fontsize=8)
    width = 0.8 / max(workers)
    for i in range(max(workers)):
        xs = [r["workers"] + (i - (r["workers"] - 1) / 2) * width for r in rows if i < r["workers"]]
        ys = [r["worker_cpu_s"][i] for r in rows if i < r["workers"]]
        ax_cpu.bar(xs, ys, width=width * 0.9, color=f"C{i}")
    ax_cpu.plot(workers, [r["broker_cpu_s"] or 0 for r in rows], "k^", label="broker")
    ax_cpu.set(
        xlabel="router workers",
        ylabel="CPU seconds during the run",
        title="CPU per worker (bars)",
        xticks=workers,
    )
    ax_cpu.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--events", type=int, default=3000, help="events per step")
    parser.add_argument("--rate", type=float, default=0.0, help="events/s; 0: flat out (a backlog)")
    parser.add_argument(
        "--encoder", choices=["sentence-transformers", "trivial"], default="sentence-transformers"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="encoder batch size")
    parser.add_argument("--max-events", type=int, default=256, help="events per worker batch")
    parser.add_argument("--torch-threads", type=int, default=1, help="per worker")
    parser.add_argument(
        "--image-share",
        type=float,
        default=0.0,
        help="share of image events (dead-lettered by this text topology)",
    )
    parser.add_argument(
        "--warmup", type=int, default=None, help="warm-up events per step (default 16/partition)"
    )
    parser.add_argument("--idle", type=float, default=30.0, help="stop reading after this many idle seconds")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--bootstrap", help="an existing Kafka instead of the dev broker")
    parser.add_argument("--qdrant-url", help="a Qdrant server instead of the embedded store")
    parser.add_argument("--out", type=Path, default=Path("load-tests/out"), help="PNG and JSON go here")
    args = parser.parse_args()
    if args.warmup is None:
        args.warmup = 16 * args.partitions
    if max(args.workers) > args.partitions:
        parser.error("more workers than partitions: the extra workers would idle")
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="sieve-scaling-"))
    broker = None
    if args.bootstrap:
        kafka = KafkaSettings(bootstrap_servers=args.bootstrap)
    else:
        port = free_port()
        broker = start_dev_broker(port=port, log_path=tmp / "broker.log")
        kafka = KafkaSettings(bootstrap_servers=f"127.0.0.1:{port}")
    if args.qdrant_url:
        qdrant = QdrantSettings(url=args.qdrant_url)
        qdrant_env = {"SIEVE_QDRANT__URL": args.qdrant_url}
    else:
        qdrant = QdrantSettings(path=tmp / "qdrant")
        qdrant_env = {"SIEVE_QDRANT__PATH": str(tmp / "qdrant")}
    try:
        from sieve.encoders.sentence_transformers import SentenceTransformerEncoder
        from sieve.encoders.trivial import TrivialEncoder

        encoder = TrivialEncoder() if args.encoder == "trivial" else SentenceTransformerEncoder(device="cpu")
        RouteStore(qdrant).sync(load_route_set(ROUTES), encoder)
        del encoder
        rows = []
        for count in args.workers:
            rows.append(step(count, args, kafka, qdrant_env, tmp, broker.pid if broker else None))
            r = rows[-1]
            print(
                f"  {count} worker(s): {r['decided']}/{r['events']} decided, "
                f"{r['events_per_s']:.0f} events/s, p99 {r['p99_ms']:.0f} ms",
                flush=True,
            )
    finally:
        if broker is not None:
            broker.terminate()
            broker.wait(10)
    header = (
        f"Sieve scaling run — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
        f"{os.cpu_count()} CPU cores, no GPU; {'dev broker (tansu)' if broker else args.bootstrap} on the "
        f"same machine; encoder {args.encoder}, {args.torch_threads} torch thread(s) per worker, "
        f"{args.events} events per step ({'flat out' if not args.rate else f'{args.rate:.0f}/s'}), "
        f"{args.partitions} partitions"
    )
    print()
    print(table(rows, header))
    stem = f"scaling-{args.encoder}" + (f"-rate{args.rate:g}" if args.rate else "")
    plot(rows, args.out / f"{stem}.png", header)
    (args.out / f"{stem}.json").write_text(json.dumps({"header": header, "rows": rows}, indent=2))
    print(f"\nplot: {args.out / (stem + '.png')}; figures: {args.out / (stem + '.json')}")
    if any(r["decided"] < r["events"] for r in rows):
        sys.exit("not every event was decided")


if __name__ == "__main__":
    main()
