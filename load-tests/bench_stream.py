"""The streaming ceiling, in one run: Sieve's Faust worker against a plain aiokafka loop.

Both read the same backlog from the same dev broker (each in its own consumer
group) and send one message per event of the same size to an output topic (the
worker's topology has no per-route topics here, so it too sends one per event):

1. ``aiokafka loop``: ``getmany`` → one ``send`` per record (queued) → one ``gather``
   → ``commit``. No decoding, no deciding: the physical limit of the client and
   broker on this machine.
2. ``aiokafka loop + pipeline``: the same loop running Sieve's own batch pipeline
   (decode, trivial encode, match, decide, plan) and sending what it plans.
3. ``sieve worker``: the real worker process (``sieve worker``, a Faust agent)
   with the trivial encoder, once per compute mode: ``thread`` (the pipeline on a
   thread of the worker) and ``process`` (``SIEVE_COMPUTE=process``: in a child).

The ratio ``sieve worker / aiokafka loop`` is the streaming-ceiling figure. The plain
loop runs first and last and the ratios use the mean of its two rates (this
machine's speed drifts over minutes). Rates come from the output records'
timestamps (first to last). ``--profile`` runs the workers under py-spy and prints
where their time goes. ``--head`` runs everything with a learned head in the route-set
version (a copy of the routes with a head trained on their own examples beside it,
:mod:`sieve.flow.head`, ``load-tests/with_head.py``): compare runs with and without it.
``--shadow`` has the workers shadow a stored candidate version (the routes with one more
example; ``route_set.shadow``, docs/routes.md) with a shadow topic for disagreements.

    .venv/bin/python load-tests/bench_stream.py                   # 50,000 events
    .venv/bin/python load-tests/bench_stream.py --events 2000 --quick
    .venv/bin/python load-tests/bench_stream.py --profile         # + py-spy summary
    .venv/bin/python load-tests/bench_stream.py --head            # with a learned head
    .venv/bin/python load-tests/bench_stream.py --head --head-words   # a head that scores words too
    .venv/bin/python load-tests/bench_stream.py --shadow          # with a shadow version
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from contextlib import aclosing
from datetime import UTC, datetime
from pathlib import Path

import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from sieve.cli.demo import free_port, sample_events
from sieve.encoders.trivial import TrivialEncoder
from sieve.flow.pipeline import RouterPipeline
from sieve.kafka.broker import start_dev_broker
from sieve.kafka.client import ensure_topics, produce, read_topic
from sieve.kafka.records import RawRecord
from sieve.routeset import load_route_set
from sieve.routeset_dump import dump_route_set
from sieve.settings import KafkaSettings, QdrantSettings, Settings, usable_cpus
from sieve.store.qdrant import RouteStore
from sieve.topology import Topology

sys.path.insert(0, str(Path(__file__).resolve().parent))
from with_head import copy_with_head  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ROUTES = REPO / "routes" / "moderation.yaml"
INPUT = "stream.in"
COMPUTE_MODES = ("thread", "process")


def outcome_topics(tag: str) -> dict[str, str]:
    """One run's outcome topics (each worker run reads the backlog in its own group, writes its own)."""
    return {"clean": f"stream.{tag}.clean", "violating": f"stream.{tag}.violating",
            "needs_review": f"stream.{tag}.needs-review"}


def topology_dict(max_events: int, max_wait_s: float, partitions: int, tag: str = "bench",
                  routes: Path = ROUTES, shadow: str | None = None) -> dict:
    shadowing = {"shadow": shadow} if shadow else {}
    shadow_topic = {"shadow_topic": f"stream.{tag}.shadow"} if shadow else {}
    return {
        "name": f"stream-{tag}", "input": {"topics": [INPUT], "partitions": partitions},
        "route_set": {"name": "moderation", "file": str(routes), **shadowing},
        "encoder": {"kind": "trivial"},
        "batching": {"max_events": max_events, "max_wait_s": max_wait_s},
        # one message per event, as the reference loops send (no per-route copy)
        "output": {"outcome_topics": outcome_topics(tag), "dead_letter_topic": f"stream.{tag}.dead-letters",
                   "route_topic_prefix": None, **shadow_topic},
    }


def rate_of(timestamps: list[int]) -> float:
    """Events/s between the first and the last output record (Kafka timestamps, ms)."""
    span = (max(timestamps) - min(timestamps)) / 1000.0
    return (len(timestamps) - 1) / span if span > 0 else float("nan")


async def _read(kafka: KafkaSettings, topics: list[str], want: int, timeout_s: float) -> list:
    """The first ``want`` records of ``topics`` (or what came before ``timeout_s`` of silence)."""
    records: list = []
    async with aclosing(read_topic(kafka, topics, idle_timeout_s=timeout_s)) as stream:
        async for record in stream:
            records.append(record)
            if len(records) >= want:
                break
    return records


async def aiokafka_loop(kafka: KafkaSettings, events: int, out_topic: str, group: str,
                        pipeline: RouterPipeline | None, payload_size: int) -> None:
    """The reference: consume, send one message per record (or what the pipeline plans), commit."""
    consumer = AIOKafkaConsumer(INPUT, bootstrap_servers=kafka.bootstrap_servers, group_id=group,
                                auto_offset_reset="earliest", enable_auto_commit=False,
                                max_poll_records=2000)
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap_servers, acks="all", linger_ms=5,
                                max_batch_size=256 * 1024)
    await consumer.start()
    await producer.start()
    payload = b"x" * payload_size
    done = 0
    try:
        while done < events:
            batches = await consumer.getmany(timeout_ms=200, max_records=2000)
            records = [r for batch in batches.values() for r in batch]
            if not records:
                continue
            pending = []
            if pipeline is None:
                for record in records:
                    pending.append(await producer.send(out_topic, payload, key=record.key))
            else:
                raw = [RawRecord(r.topic, r.partition, r.offset, r.key, r.value, r.timestamp / 1000)
                       for r in records]
                for message in pipeline.process(raw).outbound:
                    pending.append(await producer.send(out_topic, message.value, key=message.key,
                                                       headers=list(message.headers)))
            await asyncio.gather(*pending)
            await consumer.commit()
            done += len(records)
    finally:
        await producer.stop()
        await consumer.stop()


def run_reference(kafka: KafkaSettings, events: int, pipeline: RouterPipeline | None,
                  payload_size: int, name: str) -> dict:
    out = f"stream.{name}"
    asyncio.run(ensure_topics(kafka, {out: 4}))
    started = time.perf_counter()
    asyncio.run(aiokafka_loop(kafka, events, out, f"bench-{name}", pipeline, payload_size))
    wall = time.perf_counter() - started
    records = asyncio.run(_read(kafka, [out], events, 120))
    return {"events": len(records), "rate": rate_of([r.timestamp for r in records]), "wall_s": wall}


_STARTUP = ("_find_and_load", "settle_heap", "RouteStore", "build_text_encoder", "_create_topics")
_IDLE = ("select (selectors.py", "_run_once (asyncio/base_events.py", "wait (threading.py")


def _frame_name(frame: str) -> str:
    """``func (pkg/mod.py:12)`` → ``func (pkg/mod.py)``."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit(':', 1)[0]})"


def hot_frames(raw_profile: Path, top: int = 25) -> dict:
    """From py-spy's collapsed stacks, the steady state only (start-up and idle waits left out):
    shares of busy samples by package (self time) and the hottest functions (self and inclusive)."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    busy = idle = 0
    for line in raw_profile.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        if any(marker in stack for marker in _STARTUP):
            continue
        frames = [_frame_name(f) for f in stack.split(";") if " (" in f]
        if not frames or any(marker in frames[-1] for marker in _IDLE):
            idle += count
            continue
        busy += count
        own[frames[-1]] += count
        where = frames[-1].rsplit("(", 1)[-1]
        packages[where.split("/", 1)[0] if "/" in where else "python"] += count
        for frame in set(frames):
            inclusive[frame] += count
    share = 1.0 / max(busy, 1)
    return {
        "busy_share": busy / max(busy + idle, 1),
        "packages": [(name, c * share) for name, c in packages.most_common(12)],
        "self": [(f, c * share) for f, c in own.most_common(top)],
        "inclusive": [(f, c * share) for f, c in inclusive.most_common(top)],
    }


def decisions_published(port: int) -> float:
    """``sieve_decisions_total`` over all its labels, from the worker's metrics (0 until they are up)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            text = response.read().decode()
    except OSError:
        return 0.0
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("sieve_decisions_total{"))


def wait_for_decisions(port: int, events: int, worker: subprocess.Popen, timeout_s: float) -> None:
    """Until the worker has published ``events`` decisions (or exited, or ``timeout_s`` passed)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and worker.poll() is None:
        if decisions_published(port) >= events:
            return
        time.sleep(0.5)


def run_worker(kafka: KafkaSettings, events: int, tmp: Path, args: argparse.Namespace, compute: str) -> dict:
    topology = topology_dict(args.max_events, args.max_wait, args.partitions, tag=compute, routes=args.routes,
                             shadow=args.shadow_version)
    topology_path = tmp / f"topology-{compute}.yaml"
    topology_path.write_text(yaml.safe_dump(topology))
    env = {**os.environ, "SIEVE_COMPUTE": compute, "SIEVE_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
           "SIEVE_QDRANT__PATH": str(tmp / "qdrant"), "SIEVE_METRICS_PORT": str(free_port()),
           "SIEVE_LOG_LEVEL": "WARNING", "SIEVE_KAFKA__SESSION_TIMEOUT_S": "4",
           "SIEVE_KAFKA__HEARTBEAT_INTERVAL_S": "1"}
    command = [sys.executable, "-m", "sieve", "worker", str(topology_path)]
    profile = tmp / f"worker-{compute}.pyspy.txt"
    if args.profile:
        py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        command = [py_spy, "record", "--rate", "250", "--format", "raw", "--nonblocking", "--subprocesses",
                   "-o", str(profile), "--", *command]
    worker = subprocess.Popen(command, env=env, stdout=open(tmp / f"worker-{compute}.log", "wb"),
                              stderr=subprocess.STDOUT)
    try:
        # Wait on the worker's own decision counter (a scrape every 0.5 s), not by reading its
        # output while it runs: the reference loop has the cores to itself and its output is read
        # afterwards; a reader beside the worker took a third of a core from it.
        wait_for_decisions(int(env["SIEVE_METRICS_PORT"]), events, worker, args.timeout)
    finally:
        worker.send_signal(2 if args.profile else 15)
        worker.wait(60)
    records = asyncio.run(_read(kafka, list(topology["output"]["outcome_topics"].values()), events, 30))
    result: dict = {"events": len({json.loads(r.value)["event_id"] for r in records}),
                    "rate": rate_of([r.timestamp for r in records])}
    if args.profile and profile.exists():
        result["profile"] = hot_frames(profile)
        result["profile_file"] = str(profile)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--max-events", type=int, default=4096, help="the worker's batch size")
    parser.add_argument("--max-wait", type=float, default=0.1, help="the worker's batch wait (s)")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--profile", action="store_true", help="run the worker under py-spy")
    parser.add_argument("--quick", action="store_true", help="CI size: skip the pipeline reference")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--head", action="store_true",
                        help="a learned head (trained on the routes' own examples) in the route-set version")
    parser.add_argument("--head-words", action="store_true", help="with --head: the head scores words too")
    parser.add_argument("--shadow", action="store_true",
                        help="the workers shadow a candidate version (the routes with one more example)")
    args = parser.parse_args()
    args.shadow_version = None

    tmp = Path(tempfile.mkdtemp(prefix="sieve-stream-"))
    port = free_port()
    broker = start_dev_broker(port=port, log_path=tmp / "broker.log")
    kafka = KafkaSettings(bootstrap_servers=f"127.0.0.1:{port}")
    try:
        encoder = TrivialEncoder()
        args.routes = copy_with_head(ROUTES, tmp, encoder, words=args.head_words) if args.head else ROUTES
        route_set = load_route_set(args.routes)
        RouteStore(QdrantSettings(path=tmp / "qdrant")).sync(route_set, encoder)
        if args.shadow:  # a stored candidate, not active: what `routes learn` and `sync --no-activate` make
            data = route_set.model_dump(mode="json")
            data["routes"][0]["utterances"].append("one more example, so that the candidate is a new version")
            candidate_file = tmp / "candidate.yaml"  # beside the routes' own lists, named from here
            candidate_file.write_text(dump_route_set(route_set.model_validate(data).model_copy(
                update={"lists": [str(route_set.list_path(name)) for name in route_set.lists]})))
            candidate = load_route_set(candidate_file)
            RouteStore(QdrantSettings(path=tmp / "qdrant")).sync(candidate, encoder, activate=False)
            args.shadow_version = candidate.version
        topology = Topology.model_validate(topology_dict(args.max_events, args.max_wait, args.partitions,
                                                         routes=args.routes))
        index = RouteStore(QdrantSettings(path=tmp / "qdrant")).load("moderation", encoder.id)
        pipeline = RouterPipeline(topology, encoder, index, "bench")
        events = sample_events(args.events)
        asyncio.run(ensure_topics(kafka, {INPUT: args.partitions}))
        asyncio.run(produce(kafka, INPUT, [(e["id"].encode(), json.dumps(e).encode()) for e in events]))
        # the reference sends messages as large as the worker's decisions
        sample = [RawRecord(INPUT, 0, i, e["id"].encode(), json.dumps(e).encode(), 0)
                  for i, e in enumerate(events[:200])]
        sizes = sorted(len(m.value) for m in pipeline.process(sample).outbound)
        payload_size = sizes[len(sizes) // 2]

        first = run_reference(kafka, args.events, None, payload_size, "plain-first")
        rows = []
        if not args.quick:
            rows.append(("aiokafka loop + Sieve's pipeline (trivial encoder)",
                         run_reference(kafka, args.events, pipeline, payload_size, "pipeline")))
        workers = {compute: run_worker(kafka, args.events, tmp, args, compute) for compute in COMPUTE_MODES}
        for compute, worker in workers.items():
            rows.append((f"sieve worker (Faust agent), trivial encoder, batches of {args.max_events}, "
                         f"compute={compute}", worker))
        last = run_reference(kafka, args.events, None, payload_size, "plain-last")
    finally:
        broker.terminate()
        broker.wait(10)

    default_mode = Settings().compute_mode
    reference = (first["rate"] + last["rate"]) / 2
    rows.insert(0, ("aiokafka loop, one send per event (mean of the runs before and after)",
                    {"events": min(first["events"], last["events"]), "rate": reference}))
    head = ("with words" if args.head_words else "on") if args.head else "off"
    print(f"\nSieve streaming ceiling — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
          f"{os.cpu_count()} CPU cores, dev broker (tansu) on the same cores; {args.events} demo "
          f"events, {args.partitions} partitions, {payload_size}-byte messages; the aiokafka loop "
          f"ran at {first['rate']:,.0f} events/s first and {last['rate']:,.0f} last; a worker's "
          f"default here, compute=auto, is compute={default_mode} ({usable_cpus()} usable CPUs); "
          f"learned head {head}, shadow {args.shadow_version or 'off'}\n")
    print("| loop | events out | events/s | vs. aiokafka loop |")
    print("|---|---:|---:|---:|")
    for label, row in rows:
        print(f"| {label} | {row['events']} | {row['rate']:,.0f} | {row['rate'] / reference:.2f}× |")
    for compute, worker in workers.items():
        if "profile" not in worker:
            continue
        prof = worker["profile"]
        print(f"\nworker profile, compute={compute} (py-spy, {worker['profile_file']}), steady state: "
              f"busy in {prof['busy_share']:.0%} of samples; shares of busy samples\n")
        print("by package (self): " + ", ".join(f"{name} {share:.0%}" for name, share in prof["packages"]))
        print("\n| function (self) | share | function (inclusive) | share |")
        print("|---|---:|---|---:|")
        for (own, own_share), (inc, inc_share) in zip(prof["self"], prof["inclusive"], strict=False):
            print(f"| {own} | {own_share:.1%} | {inc} | {inc_share:.1%} |")
    if args.json:
        args.json.write_text(json.dumps({"payload_bytes": payload_size, "events": args.events,
                                         "default_compute": default_mode, "head": args.head,
                                         "shadow": args.shadow_version,
                                         "reference_runs": [first, last],
                                         "rows": [{"loop": label, **row} for label, row in rows]},
                                        indent=2, default=str))
    short = {compute: w["events"] for compute, w in workers.items() if w["events"] < args.events}
    if short:
        sys.exit(f"the worker decided fewer than {args.events} events: {short}")


if __name__ == "__main__":
    main()
