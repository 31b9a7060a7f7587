"""Consumer side of a load test: end-to-end latency and throughput from the output topics.

Reads the verdict topics and the dead-letter topic from the beginning (no consumer group,
nothing committed) until every expected event id has an output, or nothing arrives for
``--idle`` seconds. For each event, latency runs from ``metadata.load_sent_ms`` (set by
loadgen.py when it handed the event to its producer) to the Kafka timestamp of the first
decision (or dead letter) for it; both clocks are this machine's. Throughput is the
number of events decided over the span from the first event sent to the last output.

    .venv/bin/python load-tests/measure.py --run load1700000000 --events 5000 \
        --topics sieve.clean sieve.violating sieve.needs-review --dead-letter sieve.dead-letter
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import time
from dataclasses import dataclass, field

import numpy as np
from aiokafka import AIOKafkaConsumer

from sieve.kafka.client import client_kwargs
from sieve.settings import KafkaSettings, get_settings


@dataclass
class Measurement:
    """Outputs seen for one load run."""

    sent_ms: dict[str, int] = field(default_factory=dict)
    first_output_ms: dict[str, int] = field(default_factory=dict)
    outputs: int = 0
    dead_letters: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)

    def add(self, event_id: str, sent_ms: int | None, output_ms: int, outcome: str) -> None:
        """One output record for an event (a repeat after a rebalance counts once)."""
        self.outputs += 1
        if event_id in self.first_output_ms:
            return
        self.first_output_ms[event_id] = output_ms
        if sent_ms is not None:
            self.sent_ms[event_id] = sent_ms
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        if outcome == "dead_letter":
            self.dead_letters += 1

    @property
    def decided(self) -> int:
        """Events with at least one output."""
        return len(self.first_output_ms)

    @property
    def duplicates(self) -> int:
        """Output records beyond the first per event (at-least-once repeats)."""
        return self.outputs - self.decided

    def latencies_s(self) -> np.ndarray:
        """End-to-end seconds per event that has a send time."""
        return np.array([(self.first_output_ms[i] - sent) / 1000.0 for i, sent in self.sent_ms.items()])

    def percentiles_s(self) -> dict[str, float]:
        """p50 / p95 / p99 end-to-end latency in seconds (NaN without data)."""
        latencies = self.latencies_s()
        if not len(latencies):
            return {"p50": float("nan"), "p95": float("nan"), "p99": float("nan")}
        p50, p95, p99 = np.percentile(latencies, [50, 95, 99])
        return {"p50": float(p50), "p95": float(p95), "p99": float(p99)}

    def span_s(self) -> float:
        """From the first event sent to the last first-output."""
        if not self.sent_ms or not self.first_output_ms:
            return float("nan")
        return (max(self.first_output_ms.values()) - min(self.sent_ms.values())) / 1000.0

    def throughput(self) -> float:
        """Events decided per second over ``span_s``."""
        span = self.span_s()
        return self.decided / span if span and span > 0 else float("nan")


def parse_output(
    topic: str, value: bytes, dead_letter_topic: str | None
) -> tuple[str, int | None, str] | None:
    """``(event id, sent ms, outcome)`` of one output record; None if it is not from a load run."""
    try:
        body = json.loads(value)
    except ValueError:
        return None
    if topic == dead_letter_topic:
        try:
            event = json.loads(base64.b64decode(body["payload_b64"]))
        except (KeyError, ValueError):
            return None
        if not isinstance(event, dict) or "id" not in event:
            return None
        return str(event["id"]), (event.get("metadata") or {}).get("load_sent_ms"), "dead_letter"
    event = body.get("event") or {}
    if "event_id" not in body:
        return None
    return str(body["event_id"]), (event.get("metadata") or {}).get("load_sent_ms"), str(body.get("outcome"))


async def collect(
    kafka: KafkaSettings,
    topics: list[str],
    *,
    run: str,
    expected: int,
    dead_letter_topic: str | None = None,
    idle_s: float = 10.0,
    timeout_s: float = 1800.0,
) -> Measurement:
    """Read the outputs of run ``run`` until ``expected`` events are decided (then 1 s more) or idle."""
    wanted = topics + ([dead_letter_topic] if dead_letter_topic else [])
    consumer = AIOKafkaConsumer(
        *wanted, **client_kwargs(kafka), auto_offset_reset="earliest", enable_auto_commit=False, group_id=None
    )
    await consumer.start()
    measurement = Measurement()
    try:
        deadline = time.monotonic() + timeout_s
        last = time.monotonic()
        done_at: float | None = None
        while time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=200, max_records=5000)
            for records in batches.values():
                for record in records:
                    parsed = parse_output(record.topic, record.value or b"", dead_letter_topic)
                    if parsed is None or parsed[0].rsplit("-", 1)[0] != run:
                        continue
                    measurement.add(parsed[0], parsed[1], record.timestamp, parsed[2])
                    last = time.monotonic()
            if done_at is None and measurement.decided >= expected:
                done_at = time.monotonic()
            if done_at is not None and time.monotonic() - done_at > 1.0:
                break
            if time.monotonic() - last > idle_s:
                break
        return measurement
    finally:
        await consumer.stop()


def main() -> None:
    """Measure a run from the command line (Kafka settings from SIEVE_KAFKA__*)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", required=True, help="the event id prefix loadgen.py used")
    parser.add_argument("--events", type=int, required=True, help="how many events the run sent")
    parser.add_argument(
        "--topics", nargs="+", default=["sieve.clean", "sieve.violating", "sieve.needs-review"]
    )
    parser.add_argument("--dead-letter", default="sieve.dead-letter")
    parser.add_argument("--idle", type=float, default=10.0)
    args = parser.parse_args()
    m = asyncio.run(
        collect(
            get_settings().kafka,
            args.topics,
            run=args.run,
            expected=args.events,
            dead_letter_topic=args.dead_letter,
            idle_s=args.idle,
        )
    )
    p = m.percentiles_s()
    print(
        f"decided {m.decided}/{args.events} ({m.dead_letters} dead letters, {m.duplicates} repeats) "
        f"in {m.span_s():.1f} s: {m.throughput():.0f} events/s; end to end p50 {p['p50'] * 1000:.0f} ms, "
        f"p95 {p['p95'] * 1000:.0f} ms, p99 {p['p99'] * 1000:.0f} ms; outcomes {m.outcomes}"
    )


if __name__ == "__main__":
    main()
