"""``sieve demo``: the whole spine on this machine, on the embedded defaults.

Starts the dev broker, syncs the topology's route set into the embedded Qdrant,
starts a worker process, sends the shipped sample messages, waits for every
decision and prints them with the measured throughput.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from sieve.kafka.broker import start_dev_broker
from sieve.settings import KafkaSettings
from sieve.topology import load_topology, load_topology_route_set

SAMPLES = Path(__file__).resolve().parents[3] / "routes" / "samples" / "demo-messages.jsonl"

app = typer.Typer()


@app.command()
def demo(
    events: Annotated[int, typer.Option(help="How many events to send (the samples, repeated).")] = 1000,
    topology_path: Annotated[Path, typer.Option("--topology")] = Path("topologies/moderation.yaml"),
) -> None:
    """Start the dev broker, sync the routes, run a worker, send samples, show decisions and events/s."""
    raise typer.Exit(run_demo(topology_path, events))


def free_port() -> int:
    """A TCP port nobody listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def sample_events(count: int, path: Path = SAMPLES) -> list[dict]:
    """``count`` events: the shipped samples, repeated with fresh ids."""
    samples = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    events = []
    for i in range(count):
        event = dict(samples[i % len(samples)])
        event["id"] = f"{event['id']}-{i // len(samples)}"
        events.append(event)
    return events


async def _collect(kafka: KafkaSettings, topics: list[str], want: int, timeout_s: float) -> list:
    from sieve.kafka.client import read_topic

    records = []
    seen: set[str] = set()
    deadline = time.monotonic() + timeout_s
    while len(seen) < want and time.monotonic() < deadline:
        async for record in read_topic(kafka, topics, idle_timeout_s=3.0):
            records.append(record)
            seen.add(json.loads(record.value)["event_id"])
            if len(seen) >= want:
                break
        records = _dedupe(records)
    return records


def steady_rate(records: list) -> tuple[float, float]:
    """Events/s after the first batch, from decision records (Kafka records of decisions).

    A batch's decisions share one ``decided_at``; the window opens when the first
    batch's last decision reached the broker and closes at the last decision, so
    start-up (model load, group join) and the first batch are not counted.
    Returns ``(events per second, window seconds)``.
    """
    decided_at = [json.loads(r.value)["decided_at"] for r in records]
    first = min(decided_at)
    start = max(r.timestamp for r, d in zip(records, decided_at, strict=True) if d == first)
    end = max(r.timestamp for r in records)
    later = sum(1 for d in decided_at if d != first)
    span = (end - start) / 1000.0
    return (later / span if span > 0 else float("nan")), span


def _dedupe(records: list) -> list:
    unique: dict[str, object] = {}
    for record in records:
        unique.setdefault(json.loads(record.value)["id"], record)
    return list(unique.values())


def run_demo(topology_path: Path, count: int) -> int:
    """Run the demo; returns the process exit code."""
    from sieve.kafka.client import produce

    console = Console(width=max(120, Console().width))
    topology = load_topology(topology_path)
    route_set = load_topology_route_set(topology)
    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="sieve-demo-"))
    env = {
        **os.environ,
        "SIEVE_KAFKA__BOOTSTRAP_SERVERS": f"127.0.0.1:{port}",
        "SIEVE_QDRANT__PATH": str(workdir / "qdrant"),
        "SIEVE_METRICS_PORT": str(free_port()),
        "SIEVE_KAFKA__SESSION_TIMEOUT_S": "6",
        "SIEVE_KAFKA__HEARTBEAT_INTERVAL_S": "1",
        "SIEVE_LOG_LEVEL": "WARNING",
    }
    kafka = KafkaSettings(bootstrap_servers=f"127.0.0.1:{port}")
    console.rule("[bold]Sieve demo")
    console.print(f"dev broker (tansu) on 127.0.0.1:{port}; route store {workdir / 'qdrant'}")
    broker = start_dev_broker(port=port, log_path=workdir / "broker.log")
    worker = None
    try:
        console.print(f"syncing route set [bold]{route_set.name}[/bold] ({len(route_set.routes)} routes)")
        subprocess.run(
            [sys.executable, "-m", "sieve", "routes", "sync", str(topology.route_set.file)],
            env=env, check=True,
        )
        events = sample_events(count)
        asyncio.run(produce(kafka, topology.input.topics[0],
                            [(e["id"].encode(), json.dumps(e).encode()) for e in events]))
        console.print(f"produced {len(events)} events to {topology.input.topics[0]}; starting a worker")
        worker_log = open(workdir / "worker.log", "wb")  # noqa: SIM115
        worker = subprocess.Popen(
            [sys.executable, "-m", "sieve", "worker", str(topology_path)],
            env=env, stdout=worker_log, stderr=subprocess.STDOUT,
        )
        verdict_topics = sorted({topology.output.topic_for(o) for o in route_set.outcomes})
        records = asyncio.run(_collect(kafka, verdict_topics, len(events), timeout_s=600))
        decisions = [json.loads(r.value) for r in records]
        if not decisions:
            console.print(f"[red]no decisions arrived; see {workdir / 'worker.log'}")
            return 1
        _show(console, decisions, records, len(events))
        return 0 if len({d["event_id"] for d in decisions}) == len(events) else 1
    finally:
        if worker is not None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                worker.kill()
        broker.terminate()
        broker.wait(10)


def _show(console: Console, decisions: list[dict], records: list, produced: int) -> None:
    table = Table(title="A sample of decisions", show_lines=False)
    for column in ("event", "text", "outcome", "route", "score", "reason"):
        table.add_column(column)
    shown = sorted(decisions, key=lambda d: d["event_id"])[:: max(1, len(decisions) // 25)][:25]
    for d in shown:
        text = d["event"]["text"].replace("\n", " ")
        table.add_row(d["event_id"], text[:60] + ("…" if len(text) > 60 else ""), d["outcome"],
                      d["route"] or "-", f"{d['score']:.2f}", d["reason"])
    console.print(table)
    counts = Counter(d["outcome"] for d in decisions)
    summary = Table(title="Outcomes")
    summary.add_column("outcome")
    summary.add_column("events", justify="right")
    summary.add_column("share", justify="right")
    for outcome, n in counts.most_common():
        summary.add_row(outcome, str(n), f"{n / len(decisions):.1%}")
    console.print(summary)
    rate, span = steady_rate(records)
    median_latency = sorted(d["latency_ms"] for d in decisions)[len(decisions) // 2]
    console.print(
        f"{len({d['event_id'] for d in decisions})} of {produced} events decided; "
        f"throughput {rate:,.0f} events/s (after the first batch, over {span:.1f}s); "
        f"median latency in the worker {median_latency:.0f} ms "
        "(includes the backlog produced before the worker started)"
    )
