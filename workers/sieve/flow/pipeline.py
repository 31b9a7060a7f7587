"""The router's batch pipeline: decode, encode, match, decide, plan the messages.

Pure over a batch of raw records (no broker): the Faust agent, ``sieve eval``,
the tests and the benchmarks all call :meth:`RouterPipeline.process`. Text and
image events of one batch are split by modality; each modality is encoded as
one batch by its own encoder and matched against the route set's index in that
encoder's space; their decisions go to the same output topics. When the route-set
version carries a learned head (:mod:`sieve.flow.head`), the policy decides on the
scores combined with it, through the same function ``sieve eval`` measures with.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

import numpy as np

from sieve.contracts import DeadLetter, Decision, ImageRef, utcnow
from sieve.encoders.base import ImageEncoder, TextEncoder
from sieve.flow.dead_letter import make_dead_letter
from sieve.flow.decide import Policy, decision_rows, validate_decisions
from sieve.flow.decode import DecodedEvent, decode_batch
from sieve.flow.dedup import DecisionCache
from sieve.flow.head import LearnedHead, decision_scores, head_of
from sieve.flow.images import ImageRejected, load_image
from sieve.flow.lists import ListHit
from sieve.flow.match import RouteIndex, match_batch
from sieve.flow.prefilter import Prefilter, repeat_rows
from sieve.flow.publish import plan_dead_letters, plan_decisions
from sieve.kafka.records import Outbound
from sieve.routeset import Space
from sieve.settings import ImageFetchSettings
from sieve.topology import Topology

log = logging.getLogger(__name__)


@dataclass
class BatchResult:
    """Everything one batch produced.

    ``rows`` are the decisions as the worker publishes them (plain dicts shaped
    like :class:`Decision`, see :func:`sieve.flow.decide.decision_rows`); ``decisions``
    validates them into models on first use (tests, tools), never on the hot path.
    """

    rows: list[dict[str, Any]]
    dead_letters: list[DeadLetter]
    outbound: list[Outbound]
    seconds: dict[str, float] = field(default_factory=dict)

    @cached_property
    def decisions(self) -> list[Decision]:
        """The rows as validated :class:`Decision` models."""
        return validate_decisions(self.rows)


@dataclass(frozen=True)
class _Active:
    index: RouteIndex
    policy: Policy
    head: LearnedHead | None  # the version's own head (checked by head_of), or None


class RouterPipeline:
    """One topology's stages bound to its encoders and route indexes."""

    def __init__(
        self,
        topology: Topology,
        encoder: TextEncoder,
        index: RouteIndex,
        worker: str,
        *,
        image_encoder: ImageEncoder | None = None,
        image_index: RouteIndex | None = None,
        image_fetch: ImageFetchSettings | None = None,
        cache: DecisionCache | None = None,
    ) -> None:
        self.topology = topology
        self.encoder = encoder
        self.image_encoder = image_encoder
        self.worker = worker
        self.image_fetch = image_fetch or ImageFetchSettings()
        if (image_encoder is None) != (image_index is None):
            raise ValueError("an image encoder and an image index go together")
        self._active: dict[Space, _Active] = {"text": self._activate(index, "text")}
        if image_index is not None:
            self._active["image"] = self._activate(image_index, "image")
        self._fetchers = ThreadPoolExecutor(self.image_fetch.fetch_concurrency,
                                            thread_name_prefix="sieve-fetch")
        # Lists and repeats decide before the encoder (sieve.flow.prefilter).
        self.prefilter = Prefilter(topology.name, cache)

    def _encoder_for(self, space: Space) -> TextEncoder | ImageEncoder | None:
        return self.encoder if space == "text" else self.image_encoder

    def _activate(self, index: RouteIndex, space: Space) -> _Active:
        encoder = self._encoder_for(space)
        if index.space != space or encoder is None or index.encoder_id != encoder.id:
            raise ValueError(
                f"route index ({index.space} space, encoded with {index.encoder_id!r}) does not fit "
                f"the worker's {space} encoder {getattr(encoder, 'id', None)!r}: sync the route set "
                "with this encoder"
            )
        self.topology.check_outcomes(index.route_set)
        overrides = self.topology.thresholds if space == "text" else self.topology.image_thresholds
        return _Active(index, Policy.for_index(index, overrides), head_of(index))

    @property
    def index(self) -> RouteIndex:
        """The text route index decisions are made against now."""
        return self._active["text"].index

    @property
    def indexes(self) -> dict[Space, RouteIndex]:
        """Every space's current index."""
        return {space: active.index for space, active in self._active.items()}

    @property
    def head(self) -> LearnedHead | None:
        """The learned head the text decisions are made with now (the text index's version's), or None."""
        return self._active["text"].head

    def swap_index(self, index: RouteIndex) -> None:
        """Use a new route-set version (in the index's space), and its head, from the next batch on."""
        self._active = {**self._active, index.space: self._activate(index, index.space)}

    def _dead_letter(self, item: DecodedEvent, stage: str, reason: str, error: str) -> DeadLetter:
        return make_dead_letter(
            item.record,
            stage=stage,  # type: ignore[arg-type]
            reason=reason,
            error=error,
            worker=self.worker,
            topology=self.topology.name,
            max_payload_bytes=self.topology.limits.max_dead_letter_payload_bytes,
            event_id=item.event.id,
        )

    def _encode_isolating(
        self, items: list[DecodedEvent], inputs: Sequence[Any], encode: Callable[[list[Any]], np.ndarray],
        dim: int,
    ) -> tuple[list[DecodedEvent], list[int], np.ndarray, list[DeadLetter]]:
        """Encode a batch; if it fails, encode one by one and dead-letter what fails alone."""
        try:
            return items, list(range(len(items))), encode(list(inputs)), []
        except Exception:  # one poison input must not sink the batch: isolate it
            log.exception("batch encode failed; encoding %d events one by one", len(items))
        kept: list[DecodedEvent] = []
        positions: list[int] = []
        rows: list[np.ndarray] = []
        letters: list[DeadLetter] = []
        for position, (item, value) in enumerate(zip(items, inputs, strict=True)):
            try:
                rows.append(encode([value])[0])
                kept.append(item)
                positions.append(position)
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
                letters.append(self._dead_letter(item, "encode", "encode_error", error))
        vectors = np.stack(rows) if rows else np.zeros((0, dim), np.float32)
        return kept, positions, vectors, letters

    def _load_images(self, items: list[DecodedEvent]) -> tuple[list[DecodedEvent], list[Any],
                                                               list[ImageRef], list[DeadLetter]]:
        def load(item: DecodedEvent) -> Any:
            # The rejection leaves as a plain (reason, error): returned from inside the except
            # block, the exception would keep its traceback's frames (and the download buffer
            # they hold) alive in a reference cycle until the cyclic collector ran.
            try:
                return load_image(item.event, self.image_fetch, self.topology.limits)
            except ImageRejected as rejected:
                failure = (rejected.reason, rejected.error)
            return failure

        kept, pictures, refs, letters = [], [], [], []
        for item, loaded in zip(items, self._fetchers.map(load, items), strict=True):
            if isinstance(loaded, tuple):
                letters.append(self._dead_letter(item, "decode", *loaded))
            else:
                kept.append(item)
                pictures.append(loaded.image)
                refs.append(loaded.ref)
        return kept, pictures, refs, letters

    def _decide_space(
        self, space: Space, items: list[DecodedEvent], vectors: np.ndarray,
        images: list[ImageRef | None] | None, seconds: dict[str, float],
    ) -> list[dict[str, Any]]:
        active = self._active[space]
        started = time.perf_counter()
        match = match_batch(vectors, active.index, active.index.aggregation)
        match = replace(match, route_scores=decision_scores(match.route_scores, vectors, active.index,
                                                            active.head))
        matched = time.perf_counter()
        decisions = decision_rows(
            [d.event for d in items],
            match,
            active.index,
            active.policy,
            decided_at=utcnow(),
            event_times=[d.record.timestamp for d in items],
            source_topics=[d.record.topic for d in items],
            images=images,
        )
        seconds["match"] = seconds.get("match", 0.0) + matched - started
        seconds["decide"] = seconds.get("decide", 0.0) + time.perf_counter() - matched
        return decisions

    def _encode_and_decide(
        self, space: Space, items: list[DecodedEvent], inputs: Sequence[Any], keys: list[bytes | None],
        hits: Sequence[list[ListHit]], refs: list[ImageRef] | None, seconds: dict[str, float],
    ) -> tuple[list[dict[str, Any]], list[DeadLetter]]:
        """Lists and repeats first; the rest encoded once per distinct content, decided, remembered."""
        index = self._active[space].index
        decided_at = utcnow()
        rows, todo, repeats = self.prefilter.split(items, keys, hits, index, decided_at, refs)
        encoder = self._encoder_for(space)
        assert encoder is not None
        encode = encoder.encode if space == "text" else encoder.encode_images  # type: ignore[union-attr]
        if not todo:  # every event decided by a list or a repeat
            return rows, []
        started = time.perf_counter()
        kept, positions, vectors, letters = self._encode_isolating(
            [items[p] for p in todo], [inputs[p] for p in todo], encode, encoder.dim
        )
        stage = "encode" if space == "text" else "image_encode"
        seconds[stage] = seconds.get(stage, 0.0) + time.perf_counter() - started
        decided: dict[int, dict[str, Any]] = {}
        if kept:
            kept_at = [todo[p] for p in positions]
            kept_refs: list[ImageRef | None] | None = [refs[p] for p in kept_at] if refs is not None else None
            fresh = self._decide_space(space, kept, vectors, kept_refs, seconds)
            self.prefilter.remember([keys[p] for p in kept_at], fresh)
            decided = dict(zip(kept_at, fresh, strict=True))
            rows += fresh
        rows += repeat_rows(items, repeats, decided, index.version, decided_at, refs)
        for position, first in repeats.items():
            if first not in decided:  # the same content failed to encode: so does the repeat
                letters.append(self._dead_letter(items[position], "encode", "encode_error",
                                                 "the same content failed to encode in this batch"))
        return rows, letters

    def process(self, records: Sequence[Any]) -> BatchResult:
        """Run one batch of raw records through every stage."""
        seconds: dict[str, float] = {}
        t0 = time.perf_counter()
        decoded, letters = decode_batch(
            list(records), self.topology.limits, worker=self.worker, topology=self.topology.name,
            modalities=self.topology.modalities,
        )
        seconds["decode"] = time.perf_counter() - t0
        decisions: list[dict[str, Any]] = []
        texts = [d for d in decoded if d.event.modality == "text"]
        if texts:
            index = self._active["text"].index
            matcher = self.prefilter.terms_for(index)
            hits: list[list[ListHit]] = [[] for _ in texts]
            if matcher:
                t1 = time.perf_counter()
                hits = matcher.match_batch([d.event.text for d in texts])
                seconds["lists"] = time.perf_counter() - t1
            rows, more_letters = self._encode_and_decide(
                "text", texts, [d.event.text or "" for d in texts], self.prefilter.text_keys(texts, index),
                hits, None, seconds,
            )
            decisions += rows
            letters.extend(more_letters)
        images = [d for d in decoded if d.event.modality == "image"]
        if images and self.image_encoder is not None:
            index = self._active["image"].index
            t2 = time.perf_counter()
            loaded, pictures, refs, failed = self._load_images(images)
            letters.extend(failed)
            t3 = time.perf_counter()
            seconds["image_load"] = t3 - t2
            matcher_h = self.prefilter.hashes_for(index)
            hits = [[] for _ in loaded]
            if matcher_h:
                hits = matcher_h.match_batch(pictures)
                seconds["lists"] = seconds.get("lists", 0.0) + time.perf_counter() - t3
            rows, more_letters = self._encode_and_decide(
                "image", loaded, pictures, self.prefilter.image_keys(refs, index), hits, refs, seconds,
            )
            decisions += rows
            letters.extend(more_letters)
        output = self.topology.output
        outbound = plan_decisions(decisions, output) + plan_dead_letters(letters, output)
        return BatchResult(decisions, letters, outbound, seconds)
