"""The fuzz run's checker and memory sampler (load-tests/fuzz.py).

:func:`account` reads the decision topics and the dead-letter topic from the beginning and
finds, for every produced fuzz event, its outputs: a decision is matched by the event's
``metadata.fuzz_id`` (else its ``event_id``); a dead letter by the source partition and offset
it carries (else its record key). :class:`RssSampler` samples the resident memory of the
worker and its child processes (the compute child) while the run goes on.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from bench_spine import _descendants
from fuzz_events import FuzzEvent
from loadgen import due

from sieve.kafka.client import client_kwargs
from sieve.settings import KafkaSettings


async def produce_fuzz(
    kafka: KafkaSettings, topic: str, events: list[FuzzEvent], rate: float = 0.0
) -> dict[tuple[int, int], str]:
    """Send the events' raw bytes (acks=all; flat out or ``rate`` events/s); ``(partition, offset)`` -> id."""
    producer = AIOKafkaProducer(
        **client_kwargs(kafka),
        acks="all",
        linger_ms=5,
        max_batch_size=256 * 1024,
        max_request_size=4 * 1024 * 1024,
    )
    await producer.start()
    started = time.monotonic()
    where: dict[tuple[int, int], str] = {}
    try:
        pending: list[tuple[str, asyncio.Future]] = []
        sent = 0
        while sent < len(events):
            now_due = due(time.monotonic() - started, rate, len(events))
            for event in events[sent:now_due]:
                pending.append((event.id, await producer.send(topic, value=event.value, key=event.key)))
            sent = now_due
            if len(pending) >= 2000 or sent == len(events):
                for fid, future in pending:
                    meta = await future
                    where[(meta.partition, meta.offset)] = fid
                pending.clear()
            await asyncio.sleep(0.005 if rate > 0 else 0)
        return where
    finally:
        await producer.stop()


@dataclass
class Accounting:
    """What came out for each produced fuzz event."""

    decided: Counter = field(default_factory=Counter)  # fuzz id -> decision records
    dead: dict[str, list[str]] = field(default_factory=dict)  # fuzz id -> reasons of its letters
    stages: Counter = field(default_factory=Counter)  # (reason, stage) -> letters
    reasonless: list[str] = field(default_factory=list)
    unmatched: int = 0  # outputs that match no produced event (warm-up ones excluded)
    truncated_letters: int = 0
    last_output_at: float = 0.0

    def accounted(self, fid: str) -> bool:
        """Decided, or dead-lettered with a reason."""
        return self.decided[fid] > 0 or any(self.dead.get(fid, ()))


def _letter_id(
    letter: dict, input_topic: str, where: dict[tuple[int, int], str], ids: set[str]
) -> str | None:
    if letter.get("source_topic") == input_topic:
        fid = where.get((letter.get("partition"), letter.get("offset")))  # type: ignore[arg-type]
        if fid is not None:
            return fid
    key = letter.get("key_b64")
    if key:
        fid = base64.b64decode(key).decode(errors="replace")
        if fid in ids:
            return fid
    return None


def _decision_id(decision: dict, ids: set[str]) -> str | None:
    metadata = (decision.get("event") or {}).get("metadata") or {}
    for candidate in (metadata.get("fuzz_id"), decision.get("event_id")):
        if isinstance(candidate, str) and candidate in ids:
            return candidate
    return None


async def account(
    kafka: KafkaSettings,
    *,
    input_topic: str,
    outcome_topics: list[str],
    dead_letter_topic: str,
    events: list[FuzzEvent],
    where: dict[tuple[int, int], str],
    ignore_prefix: str,
    idle_s: float,
    timeout_s: float,
    alive: Callable[[], bool],
) -> Accounting:
    """Read the outputs until every event is accounted for, ``idle_s`` pass with no new output, or
    ``timeout_s``; ``alive()`` false (the worker died) stops the wait after one more idle read."""
    ids = {e.id for e in events}
    result = Accounting()
    consumer = AIOKafkaConsumer(
        *outcome_topics,
        dead_letter_topic,
        **client_kwargs(kafka),
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
        max_partition_fetch_bytes=8 * 1024 * 1024,
        fetch_max_bytes=64 * 1024 * 1024,
    )
    await consumer.start()
    pending = set(ids)
    deadline = time.monotonic() + timeout_s
    last = time.monotonic()
    try:
        while pending and time.monotonic() < deadline and time.monotonic() - last < idle_s:
            if not alive() and time.monotonic() - last > 2.0:
                break
            for batch in (await consumer.getmany(timeout_ms=500, max_records=2000)).values():
                for record in batch:
                    try:
                        body = json.loads(record.value or b"")
                    except ValueError:
                        result.unmatched += 1
                        continue
                    if record.topic == dead_letter_topic:
                        fid = _letter_id(body, input_topic, where, ids)
                        if fid is None:
                            result.unmatched += int(
                                not str(body.get("event_id", "")).startswith(ignore_prefix)
                            )
                            continue
                        reason = str(body.get("reason") or "")
                        result.dead.setdefault(fid, []).append(reason)
                        result.stages[(reason, str(body.get("stage")))] += 1
                        result.truncated_letters += bool(body.get("truncated"))
                        if not reason:
                            result.reasonless.append(fid)
                    else:
                        fid = _decision_id(body, ids)
                        if fid is None:
                            result.unmatched += int(
                                not str(body.get("event_id", "")).startswith(ignore_prefix)
                            )
                            continue
                        result.decided[fid] += 1
                    if result.accounted(fid):
                        pending.discard(fid)
                    last = result.last_output_at = time.monotonic()
    finally:
        await consumer.stop()
    return result


def rss_mib(pid: int) -> tuple[float, float]:
    """Resident memory now (MiB) of ``pid`` alone and of it with its descendants (psutil, else /proc)."""
    try:
        import psutil

        process = psutil.Process(pid)
        own = process.memory_info().rss / 2**20
        return own, own + sum(c.memory_info().rss for c in process.children(recursive=True)) / 2**20
    except ImportError:
        pass
    except Exception:  # noqa: BLE001  (the process went away)
        return float("nan"), float("nan")
    values = []
    for process in (pid, *_descendants(pid)):
        try:
            status = Path(f"/proc/{process}/status").read_text()
        except OSError:
            continue
        values.append(
            next(
                (int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("VmRSS:")),
                0.0,
            )
        )
    return (values[0], sum(values)) if values else (float("nan"), float("nan"))


class RssSampler:
    """Samples a process tree's resident memory every ``interval_s`` on a thread."""

    def __init__(self, pid: int, interval_s: float = 0.25) -> None:
        self.pid, self.interval_s = pid, interval_s
        self.samples: list[tuple[float, float, float]] = []  # (monotonic s, own MiB, tree MiB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            own, tree = rss_mib(self.pid)
            if tree == tree:  # not NaN
                self.samples.append((time.monotonic(), own, tree))
            self._stop.wait(self.interval_s)

    def start(self) -> RssSampler:
        """Start sampling."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop sampling (waits for the thread)."""
        self._stop.set()
        self._thread.join(5)

    def summary(self, start_at: float, end_at: float) -> dict[str, float]:
        """Start (first sample from ``start_at``), peak and end of the tree's memory over the window,
        and the least-squares slope (MiB per minute) over its second half."""
        window = [s for s in self.samples if start_at <= s[0] <= end_at] or self.samples[-1:]
        if not window:
            return {}
        trees = [s[2] for s in window]
        mid = start_at + (end_at - start_at) / 2
        half = [(t, m) for t, _, m in window if t >= mid]
        slope = float("nan")
        if len(half) >= 3:
            mean_t = sum(t for t, _ in half) / len(half)
            mean_m = sum(m for _, m in half) / len(half)
            var = sum((t - mean_t) ** 2 for t, _ in half)
            slope = sum((t - mean_t) * (m - mean_m) for t, m in half) / var * 60 if var > 0 else 0.0
        return {
            "start_mib": trees[0],
            "peak_mib": max(trees),
            "end_mib": trees[-1],
            "peak_over_start_mib": max(trees) - trees[0],
            "worker_process_start_mib": window[0][1],
            "worker_process_peak_mib": max(s[1] for s in window),
            "second_half_slope_mib_per_min": slope,
            "second_half_min_mib": min(m for _, m in half) if half else float("nan"),
            "second_half_max_mib": max(m for _, m in half) if half else float("nan"),
            "samples": len(window),
        }
