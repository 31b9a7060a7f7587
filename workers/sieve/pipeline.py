"""The router's batch pipeline: decode, encode, match, decide, plan the messages.

Pure over a batch of raw records (no broker): the Faust agent, ``sieve eval``,
the tests and the benchmarks all call :meth:`RouterPipeline.process`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from sieve.contracts import DeadLetter, Decision, utcnow
from sieve.dead_letter import RawRecord, make_dead_letter
from sieve.decide import Policy, decide
from sieve.decode import DecodedEvent, decode_batch
from sieve.encoders import TextEncoder
from sieve.match import RouteIndex, match_batch
from sieve.publish import Outbound, plan_dead_letters, plan_decisions
from sieve.topology import Topology

log = logging.getLogger(__name__)


@dataclass
class BatchResult:
    """Everything one batch produced."""

    decisions: list[Decision]
    dead_letters: list[DeadLetter]
    outbound: list[Outbound]
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class _Active:
    index: RouteIndex
    policy: Policy


class RouterPipeline:
    """One topology's stages bound to an encoder and a route index."""

    def __init__(
        self, topology: Topology, encoder: TextEncoder, index: RouteIndex, worker: str
    ) -> None:
        self.topology = topology
        self.encoder = encoder
        self.worker = worker
        self._active = self._activate(index)

    def _activate(self, index: RouteIndex) -> _Active:
        if index.encoder_id != self.encoder.id:
            raise ValueError(
                f"route index was encoded with {index.encoder_id!r}, the worker runs "
                f"{self.encoder.id!r}: sync the route set with this encoder"
            )
        self.topology.check_outcomes(index.route_set)
        return _Active(index, Policy.for_index(index, self.topology.thresholds))

    @property
    def index(self) -> RouteIndex:
        """The route index decisions are made against now."""
        return self._active.index

    def swap_index(self, index: RouteIndex) -> None:
        """Use a new route-set version from the next batch on (one atomic assignment)."""
        self._active = self._activate(index)

    def _encode(self, decoded: list[DecodedEvent]) -> tuple[list[DecodedEvent], np.ndarray, list[DeadLetter]]:
        texts = [d.event.text or "" for d in decoded]
        try:
            return decoded, self.encoder.encode(texts), []
        except Exception:  # one poison text must not sink the batch: isolate it
            log.exception("batch encode failed; encoding %d events one by one", len(texts))
        kept: list[DecodedEvent] = []
        rows: list[np.ndarray] = []
        letters: list[DeadLetter] = []
        for item, text in zip(decoded, texts, strict=True):
            try:
                rows.append(self.encoder.encode([text])[0])
                kept.append(item)
            except Exception as exc:
                letters.append(
                    make_dead_letter(
                        item.record,
                        stage="encode",
                        reason="encode_error",
                        error=f"{type(exc).__name__}: {exc}",
                        worker=self.worker,
                        topology=self.topology.name,
                        max_payload_bytes=self.topology.limits.max_dead_letter_payload_bytes,
                        event_id=item.event.id,
                    )
                )
        vectors = np.stack(rows) if rows else np.zeros((0, self.encoder.dim), np.float32)
        return kept, vectors, letters

    def process(self, records: list[RawRecord]) -> BatchResult:
        """Run one batch of raw records through every stage."""
        active = self._active
        seconds: dict[str, float] = {}
        t0 = time.perf_counter()
        decoded, letters = decode_batch(
            records, self.topology.limits, worker=self.worker, topology=self.topology.name
        )
        t1 = time.perf_counter()
        decoded, vectors, encode_letters = self._encode(decoded) if decoded else (decoded, None, [])
        letters.extend(encode_letters)
        t2 = time.perf_counter()
        decisions: list[Decision] = []
        if decoded and vectors is not None:
            match = match_batch(vectors, active.index, active.index.route_set.defaults.aggregation)
            t3 = time.perf_counter()
            decisions = decide(
                [d.event for d in decoded],
                match,
                active.index,
                active.policy,
                decided_at=utcnow(),
                event_times=[d.record.timestamp for d in decoded],
                source_topics=[d.record.topic for d in decoded],
            )
            seconds["match"] = t3 - t2
            seconds["decide"] = time.perf_counter() - t3
        output = self.topology.output
        outbound = plan_decisions(decisions, output) + plan_dead_letters(letters, output)
        seconds["decode"] = t1 - t0
        if decoded:
            seconds["encode"] = t2 - t1
        return BatchResult(decisions, letters, outbound, seconds)
