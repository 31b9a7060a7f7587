"""The chaos run's checker: every input event has a decision or a dead letter, and what repeats.

:class:`Ledger` tallies output records (decisions from the outcome topics, dead letters) by
input event id; :meth:`Ledger.verdict` proves each produced id has one or the other and counts
apart the two kinds of repeat:

* a repeat under the **same decision id** (the same event decided again under the same
  route-set version, after a crash or a rebalance): allowed, delivery is at-least-once;
* the same event under **two different decision ids**: a defect, unless the decisions carry
  different route-set versions (the set was synced in between).

:class:`OutputWatch` reads the outcome topics, the dead-letter topic and the input topic on a
thread from the beginning, feeds the ledger and keeps the arrival time of every record, so
the run can show that output stopped while the workers' path to the broker was cut.
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import json
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer

from sieve.kafka.client import client_kwargs
from sieve.settings import KafkaSettings


@dataclass
class Verdict:
    """The checker's figures for one run."""

    produced: int
    decided: int
    dead_lettered_only: int
    decided_and_dead_lettered: int
    lost: list[str]
    repeats: int  # decision records beyond the first under the same decision id
    repeated_events: int
    conflicting: list[str]  # events under two decision ids of one route-set version (defect)
    version_changes: int  # events under two decision ids of different versions (allowed)
    outcome_mismatches: list[str]  # one decision id with two different outcomes (defect)
    dead_letter_reasons: dict[str, int]
    unmatched: int

    @property
    def ok(self) -> bool:
        """Nothing lost, no conflicting decision ids, no outcome mismatch."""
        return not self.lost and not self.conflicting and not self.outcome_mismatches

    def table(self) -> str:
        """The figures as a Markdown table."""
        rows = [
            ("events produced (acknowledged)", self.produced),
            ("decided", self.decided),
            ("dead-lettered (no decision)", self.dead_lettered_only),
            ("decided and dead-lettered", self.decided_and_dead_lettered),
            ("**lost** (neither)", len(self.lost)),
            ("repeats under the same decision id (allowed)", self.repeats),
            ("events repeated", self.repeated_events),
            ("**conflicting decision ids** (same version)", len(self.conflicting)),
            ("two decision ids after a route-set version change (allowed)", self.version_changes),
            ("**one decision id, two outcomes**", len(self.outcome_mismatches)),
            ("outputs of no produced event", self.unmatched),
        ]
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.dead_letter_reasons.items())) or "none"
        lines = ["| | |", "|---|---:|", *(f"| {k} | {v} |" for k, v in rows)]
        lines.append(f"| dead-letter reasons | {reasons} |")
        return "\n".join(lines)


@dataclass
class Ledger:
    """Outputs by input event id."""

    decisions: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))  # event -> id -> n
    versions: dict[str, str] = field(default_factory=dict)  # decision id -> route-set version
    outcomes: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))  # decision id -> outcomes
    dead: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))  # event -> reason -> n
    unmatched_outputs: list[str] = field(default_factory=list)

    def add_decision(self, body: dict) -> str | None:
        """One decision record; its event id, or None when it is not a decision."""
        event_id, decision_id = body.get("event_id"), body.get("id")
        if not isinstance(event_id, str) or not isinstance(decision_id, str):
            return None
        self.decisions[event_id][decision_id] += 1
        self.versions[decision_id] = str(body.get("route_set_version"))
        self.outcomes[decision_id].add(str(body.get("outcome")))
        return event_id

    def add_dead_letter(self, body: dict) -> str | None:
        """One dead letter; its event id (the letter's, else its record key, else the payload's id)."""
        event_id = body.get("event_id")
        if not isinstance(event_id, str) and body.get("key_b64"):
            event_id = base64.b64decode(body["key_b64"]).decode(errors="replace")
        if not isinstance(event_id, str):
            try:
                event_id = json.loads(base64.b64decode(body.get("payload_b64") or b""))["id"]
            except (ValueError, KeyError, TypeError):
                return None
        self.dead[str(event_id)][str(body.get("reason"))] += 1
        return str(event_id)

    def accounted(self, event_id: str) -> bool:
        """Whether the event has a decision or a dead letter."""
        return event_id in self.decisions or event_id in self.dead

    def verdict(self, produced: set[str]) -> Verdict:
        """Account for every produced id."""
        decided = {e for e in produced if e in self.decisions}
        dead = {e for e in produced if e in self.dead}
        repeats = repeated = version_changes = 0
        conflicting: list[str] = []
        for event_id in sorted(decided):
            ids = self.decisions[event_id]
            extra = sum(n - 1 for n in ids.values())
            repeats += extra
            repeated += extra > 0
            if len(ids) > 1:
                if len({self.versions[d] for d in ids}) == len(ids):
                    version_changes += 1
                else:
                    conflicting.append(event_id)
        mismatches = sorted(
            e for e in decided for d in self.decisions[e] if len(self.outcomes[d]) > 1
        )
        reasons: Counter = Counter()
        for event_id in dead:
            reasons.update(self.dead[event_id])
        others = (set(self.decisions) | set(self.dead)) - produced
        return Verdict(
            produced=len(produced),
            decided=len(decided),
            dead_lettered_only=len(dead - decided),
            decided_and_dead_lettered=len(dead & decided),
            lost=sorted(produced - decided - dead),
            repeats=repeats,
            repeated_events=repeated,
            conflicting=conflicting,
            version_changes=version_changes,
            outcome_mismatches=mismatches,
            dead_letter_reasons=dict(reasons),
            unmatched=len(others),
        )


class OutputWatch:
    """Reads the outputs (and the input, for the record of where each event went) on a thread."""

    def __init__(
        self, kafka: KafkaSettings, outcome_topics: list[str], dead_letter_topic: str, input_topic: str
    ) -> None:
        self.kafka, self.outcome_topics = kafka, outcome_topics
        self.dead_letter_topic, self.input_topic = dead_letter_topic, input_topic
        self.ledger = Ledger()
        self.output_times: list[float] = []  # monotonic arrival of each output record, sorted
        self.input_times: list[float] = []
        self.where: dict[str, tuple[int, int]] = {}  # event id -> first input (partition, offset)
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="output-watch", daemon=True)

    def start(self) -> OutputWatch:
        """Start reading."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop reading; raises what the reader raised, if anything."""
        self._stop.set()
        self._thread.join(30)
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        try:
            asyncio.run(self._read())
        except BaseException as exc:  # noqa: BLE001  (reported by stop())
            self._error = exc

    async def _read(self) -> None:
        consumer = AIOKafkaConsumer(
            *self.outcome_topics, self.dead_letter_topic, self.input_topic,
            **client_kwargs(self.kafka), auto_offset_reset="earliest", enable_auto_commit=False,
            group_id=None, metadata_max_age_ms=2000,
        )
        await consumer.start()
        try:
            while not self._stop.is_set():
                batches = await consumer.getmany(timeout_ms=300, max_records=5000)
                now = time.monotonic()
                with self.lock:
                    for batch in batches.values():
                        for record in batch:
                            self._add(record, now)
        finally:
            await consumer.stop()

    def _add(self, record, now: float) -> None:  # noqa: ANN001
        if record.topic == self.input_topic:
            self.input_times.append(now)
            key = (record.key or b"").decode(errors="replace")
            self.where.setdefault(key, (record.partition, record.offset))
            return
        try:
            body = json.loads(record.value or b"")
        except ValueError:
            self.ledger.unmatched_outputs.append(record.topic)
            return
        if record.topic == self.dead_letter_topic:
            self.ledger.add_dead_letter(body)
        else:
            self.ledger.add_decision(body)
        self.output_times.append(now)

    def outputs_between(self, start: float, end: float) -> int:
        """Output records that arrived in ``[start, end]`` (monotonic seconds)."""
        with self.lock:
            return bisect.bisect_right(self.output_times, end) - bisect.bisect_left(self.output_times, start)

    def inputs_between(self, start: float, end: float) -> int:
        """Input records that arrived in ``[start, end]``."""
        with self.lock:
            return bisect.bisect_right(self.input_times, end) - bisect.bisect_left(self.input_times, start)

    def first_output_after(self, moment: float) -> float | None:
        """Arrival of the first output record after ``moment``, if any yet."""
        with self.lock:
            i = bisect.bisect_right(self.output_times, moment)
            return self.output_times[i] if i < len(self.output_times) else None

    def pending(self, produced: set[str]) -> int:
        """Produced events with no output yet."""
        with self.lock:
            return sum(not self.ledger.accounted(e) for e in produced)

    def last_output(self) -> float:
        """Arrival of the latest output record (0 when none)."""
        with self.lock:
            return self.output_times[-1] if self.output_times else 0.0
