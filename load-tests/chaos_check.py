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

With reviewers in the run, it reads the human-review topic too, and :meth:`Ledger.settlement`
proves every router decision sent to review (outcome ``needs_review``) was settled: an LLM
verdict (``decided_by: llm``, ``review.router_decision_id`` naming it) on an outcome topic,
or a hand-off on the human-review topic. A verdict repeated under its id is allowed; two
verdict ids for one router decision, or one verdict id with two fates, are defects.
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
class Settlement:
    """The reviewers' figures: what became of every router decision sent to review."""

    needs_review: int  # router decisions (distinct ids) of produced events with outcome needs_review
    verdicts: int  # of those, settled by an LLM verdict on an outcome topic
    handoffs: int  # settled by a hand-off on the human-review topic
    unsettled: list[str]  # router decision ids with neither (a defect)
    repeats: int  # verdict and hand-off records beyond the first under the same id (allowed)
    two_ids: list[str]  # router decisions with two different verdict ids (a defect)
    two_fates: list[str]  # verdict ids with two outcomes, or both a verdict and a hand-off (a defect)
    orphans: int  # verdicts and hand-offs of no router decision seen
    handoff_reasons: dict[str, int] = field(default_factory=dict)  # hand-off records by reason

    @property
    def ok(self) -> bool:
        """Every review settled, one verdict id per router decision, one fate per verdict id."""
        return not self.unsettled and not self.two_ids and not self.two_fates

    def rows(self) -> list[tuple[str, int]]:
        """The table rows."""
        return [
            ("needs_review decisions (router)", self.needs_review),
            ("settled by an LLM verdict", self.verdicts),
            ("settled by a hand-off to human review", self.handoffs),
            ("**unsettled** (neither)", len(self.unsettled)),
            ("repeated verdicts or hand-offs under one id (allowed)", self.repeats),
            ("**two verdict ids for one router decision**", len(self.two_ids)),
            ("**one verdict id, two fates**", len(self.two_fates)),
            ("verdicts or hand-offs of no router decision seen", self.orphans),
        ]

    def reasons(self) -> str:
        """The hand-off reasons, one line."""
        return ", ".join(f"{k}: {v}" for k, v in sorted(self.handoff_reasons.items())) or "none"


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
    review: Settlement | None = None  # None: the run had no reviewers

    @property
    def ok(self) -> bool:
        """Nothing lost, no conflicting decision ids, no outcome mismatch, every review settled."""
        return (not self.lost and not self.conflicting and not self.outcome_mismatches
                and (self.review is None or self.review.ok))

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
            *(self.review.rows() if self.review is not None else []),
        ]
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.dead_letter_reasons.items())) or "none"
        lines = ["| | |", "|---|---:|", *(f"| {k} | {v} |" for k, v in rows)]
        lines.append(f"| dead-letter reasons | {reasons} |")
        if self.review is not None:
            lines.append(f"| hand-off reasons (records) | {self.review.reasons()} |")
        return "\n".join(lines)


@dataclass
class Ledger:
    """Outputs by input event id."""

    decisions: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))  # event -> id -> n
    versions: dict[str, str] = field(default_factory=dict)  # decision id -> route-set version
    outcomes: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))  # decision id -> outcomes
    dead: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))  # event -> reason -> n
    unmatched_outputs: list[str] = field(default_factory=list)
    to_review: dict[str, str] = field(default_factory=dict)  # router needs_review decision id -> event
    # router decision id -> verdict id -> n, for LLM verdicts and for hand-offs
    verdicts: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    handoffs: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    fates: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))  # verdict id -> fates
    handoff_reasons: Counter = field(default_factory=Counter)

    def add_decision(self, body: dict) -> str | None:
        """One decision record; its event id, or None when it is not a decision.

        An LLM's verdict (``decided_by: llm``) is kept apart, under the router decision it
        settles; a router decision with outcome ``needs_review`` is noted as awaiting one.
        """
        event_id, decision_id = body.get("event_id"), body.get("id")
        if not isinstance(event_id, str) or not isinstance(decision_id, str):
            return None
        if body.get("decided_by") == "llm":
            return self._add_review(body, self.verdicts, str(body.get("outcome")))
        if body.get("outcome") == "needs_review":
            self.to_review[decision_id] = event_id
        self.decisions[event_id][decision_id] += 1
        self.versions[decision_id] = str(body.get("route_set_version"))
        self.outcomes[decision_id].add(str(body.get("outcome")))
        return event_id

    def add_handoff(self, body: dict) -> str | None:
        """One record of the human-review topic; its event id, or None when it is not a hand-off."""
        if not isinstance(body.get("event_id"), str) or not isinstance(body.get("id"), str):
            return None
        review = body.get("review")
        self.handoff_reasons[str(review.get("handoff_reason") if isinstance(review, dict) else None)] += 1
        return self._add_review(body, self.handoffs, "handoff")

    def _add_review(self, body: dict, where: dict[str, Counter], fate: str) -> str | None:
        review = body.get("review")
        router_id = review.get("router_decision_id") if isinstance(review, dict) else None
        if not isinstance(router_id, str):
            self.unmatched_outputs.append(str(body.get("id")))
            return None
        where[router_id][body["id"]] += 1
        self.fates[body["id"]].add(fate)
        return str(body["event_id"])

    def settled(self, router_decision_id: str) -> bool:
        """Whether a router decision sent to review has a verdict or a hand-off."""
        return router_decision_id in self.verdicts or router_decision_id in self.handoffs

    def settlement(self, produced: set[str]) -> Settlement:
        """What became of the router decisions of produced events that were sent to review."""
        asked = {d for d, e in self.to_review.items() if e in produced}
        by_verdict = {d for d in asked if d in self.verdicts}
        repeats = sum(n - 1 for c in (*self.verdicts.values(), *self.handoffs.values()) for n in c.values())
        two_ids = sorted(d for d in asked
                         if len(set(self.verdicts.get(d, ())) | set(self.handoffs.get(d, ()))) > 1)
        return Settlement(
            needs_review=len(asked),
            verdicts=len(by_verdict),
            handoffs=len({d for d in asked if d in self.handoffs} - by_verdict),
            unsettled=sorted(d for d in asked if not self.settled(d)),
            repeats=repeats,
            two_ids=two_ids,
            two_fates=sorted({v for d in asked for v in (*self.verdicts.get(d, ()), *self.handoffs.get(d, ()))
                              if len(self.fates[v]) > 1}),
            orphans=len((set(self.verdicts) | set(self.handoffs)) - set(self.to_review)),
            handoff_reasons=dict(self.handoff_reasons),
        )

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

    def verdict(self, produced: set[str], reviewed: bool = False) -> Verdict:
        """Account for every produced id (and, when ``reviewed``, for every review)."""
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
            review=self.settlement(produced) if reviewed else None,
        )


class OutputWatch:
    """Reads the outputs (and the input, for the record of where each event went) on a thread."""

    def __init__(
        self, kafka: KafkaSettings, outcome_topics: list[str], dead_letter_topic: str, input_topic: str,
        human_review_topic: str | None = None,
    ) -> None:
        self.kafka, self.outcome_topics = kafka, outcome_topics
        self.dead_letter_topic, self.input_topic = dead_letter_topic, input_topic
        self.human_review_topic = human_review_topic  # None: no reviewers in the run
        self.ledger = Ledger()
        self.output_times: list[float] = []  # monotonic arrival of each output record, sorted
        self.review_times: list[float] = []  # of each reviewer output (verdict or hand-off)
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
            *([self.human_review_topic] if self.human_review_topic else []),
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
        elif record.topic == self.human_review_topic:
            self.ledger.add_handoff(body)
            self.review_times.append(now)
        else:
            self.ledger.add_decision(body)
            if body.get("decided_by") == "llm":
                self.review_times.append(now)
        self.output_times.append(now)

    def outputs_between(self, start: float, end: float, reviews: bool = False) -> int:
        """Output records (``reviews``: reviewer outputs only) that arrived in ``[start, end]``."""
        with self.lock:
            times = self.review_times if reviews else self.output_times
            return bisect.bisect_right(times, end) - bisect.bisect_left(times, start)

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
        """Produced events with no output yet, and (with reviewers) router decisions not yet settled."""
        with self.lock:
            waiting = sum(not self.ledger.accounted(e) for e in produced)
            if self.human_review_topic is not None:
                waiting += sum(not self.ledger.settled(d) for d in self.ledger.to_review)
            return waiting

    def last_output(self) -> float:
        """Arrival of the latest output record (0 when none)."""
        with self.lock:
            return self.output_times[-1] if self.output_times else 0.0
