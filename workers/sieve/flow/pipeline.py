"""The router's batch pipeline: decode, encode, match, decide, plan the messages.

Pure over a batch of raw records (no broker): the Faust agent, ``sieve eval``,
the tests and the benchmarks all call :meth:`RouterPipeline.process`. Text and
image events of one batch are split by modality; each modality is encoded as
one batch by its own encoder and matched against the route set's index in that
encoder's space; their decisions go to the same output topics. When the route-set
version carries a learned head (:mod:`sieve.flow.head`), the policy decides on the
scores combined with it, through the same function ``sieve eval`` measures with.

A topology with ``tenants`` decides each event with its tenant's policy (route set and
thresholds, :mod:`sieve.flow.tenant_groups`): a batch's events of every tenant are
still encoded together, once; then matched once per distinct route index and decided
per tenant policy. Decisions come back in the batch's order.

A shadow version of the topology's own route set (:mod:`sieve.flow.shadow`) decides the
text events of the topology's own policy encoded in the batch again, from the same vectors.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

import numpy as np

from sieve.contracts import DeadLetter, Decision, ImageRef, utcnow
from sieve.encoders.base import ImageEncoder, TextEncoder
from sieve.flow.dead_letter import make_dead_letter
from sieve.flow.decode import DecodedEvent, decode_batch
from sieve.flow.dedup import DecisionCache, image_key, text_key
from sieve.flow.head import LearnedHead, decision_scores
from sieve.flow.images import ImageRejected, load_image
from sieve.flow.lists import ListHit
from sieve.flow.match import RouteIndex, match_batch
from sieve.flow.prefilter import Prefilter, repeat_rows
from sieve.flow.publish import audited, plan_audits, plan_dead_letters, plan_decisions
from sieve.flow.rows import decision_rows, validate_decisions
from sieve.flow.shadow import Shadow, ShadowBatch, ShadowStats
from sieve.flow.tenant_groups import TenantGroup, build_groups, positions_by, swap_groups, take_rows
from sieve.kafka.records import Outbound
from sieve.routeset import Space
from sieve.settings import ImageFetchSettings
from sieve.topology import Topology

log = logging.getLogger(__name__)


@dataclass
class BatchResult:
    """Everything one batch produced.

    ``rows`` are the decisions as the worker publishes them (plain dicts shaped
    like :class:`Decision`, see :func:`sieve.flow.rows.decision_rows`); ``decisions``
    validates them into models on first use (tests, tools), never on the hot path.
    """

    rows: list[dict[str, Any]]
    dead_letters: list[DeadLetter]
    outbound: list[Outbound]
    seconds: dict[str, float] = field(default_factory=dict)
    # the shadow version's counts (None: no shadow); its disagreement messages are in ``outbound``
    shadow: ShadowStats | None = None

    @cached_property
    def decisions(self) -> list[Decision]:
        """The rows as validated :class:`Decision` models."""
        return validate_decisions(self.rows)


class RouterPipeline:
    """One topology's stages bound to its encoders and route indexes.

    ``tenant_indexes``: the tenants' route sets' indexes by (set name, space), for a
    topology with ``tenants`` (the topology's own set is ``index`` / ``image_index``).
    ``shadow_index``: a text version of the topology's own set to shadow (:mod:`sieve.flow.shadow`),
    sending at most ``shadow_messages`` disagreements a batch.
    """

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
        tenant_indexes: Mapping[tuple[str, Space], RouteIndex] | None = None,
        shadow_index: RouteIndex | None = None,
        shadow_messages: int = 20,
    ) -> None:
        self.topology = topology
        self.encoder = encoder
        self.image_encoder = image_encoder
        self.worker = worker
        self.image_fetch = image_fetch or ImageFetchSettings()
        if (image_encoder is None) != (image_index is None):
            raise ValueError("an image encoder and an image index go together")
        own: dict[Space, RouteIndex] = {"text": index}
        if image_index is not None:
            own["image"] = image_index
        self._encoders: dict[Space, TextEncoder | ImageEncoder | None] = {"text": encoder,
                                                                          "image": image_encoder}
        self._groups = build_groups(topology, own, tenant_indexes or {}, self._encoders)
        self._fetchers = ThreadPoolExecutor(self.image_fetch.fetch_concurrency,
                                            thread_name_prefix="sieve-fetch")
        # Lists and repeats decide before the encoder (sieve.flow.prefilter).
        self.prefilter = Prefilter(topology.name, cache)
        self.shadow_messages = shadow_messages
        self._shadow: Shadow | None = None
        self.set_shadow(shadow_index)

    @property
    def shadow_index(self) -> RouteIndex | None:
        """The version shadowed beside the topology's own text route set, or None."""
        return self._shadow.index if self._shadow is not None else None

    def set_shadow(self, index: RouteIndex | None) -> None:
        """Shadow ``index`` (None: none) from the next batch on; refused (ValueError) if it does not fit."""
        self._shadow = (Shadow(self.topology, index, self.encoder, self.shadow_messages)
                        if index is not None else None)

    def _encoder_for(self, space: Space) -> TextEncoder | ImageEncoder | None:
        return self._encoders[space]

    @property
    def index(self) -> RouteIndex:
        """The text route index decisions are made against now (the topology's own route set)."""
        return self._groups[None].active["text"].index

    @property
    def indexes(self) -> dict[Space, RouteIndex]:
        """Every space's current index of the topology's own route set."""
        return {space: active.index for space, active in self._groups[None].active.items()}

    @property
    def tenant_indexes(self) -> dict[tuple[str, Space], RouteIndex]:
        """Every route set's current index, the topology's own and its tenants', by (set name, space)."""
        return {(active.index.route_set.name, space): active.index
                for group in self._groups.values() for space, active in group.active.items()}

    @property
    def head(self) -> LearnedHead | None:
        """The learned head the text decisions are made with now (the text index's version's), or None."""
        return self._groups[None].active["text"].head

    def group_for(self, tenant: str | None) -> TenantGroup:
        """The group an event's tenant is decided by (the default policy's for an unknown or invalid one)."""
        tenants = self.topology.tenants
        return self._groups[tenants.policy_for(tenant) if tenants is not None else None]

    def swap_index(self, index: RouteIndex) -> None:
        """Use a new route-set version (in the index's space), and its head, from the next batch on.

        Every tenant policy (and the topology itself) deciding with a set of that name
        gets it; one that no policy uses replaces the topology's own.
        """
        self._groups = swap_groups(self.topology, self._groups, index, self._encoders)

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

    def _prefilter_group(
        self, space: Space, group: TenantGroup, items: list[DecodedEvent], inputs: list[Any],
        refs: list[ImageRef] | None, decided_at: Any, seconds: dict[str, float],
    ) -> tuple[list[tuple[int, dict[str, Any]]], list[int], dict[int, int], list[bytes | None],
               list[list[ListHit]]]:
        """One group's repeats and lists: rows by position, positions to encode, repeats, cache keys, hits.

        In a multi-mode set a list hit does not decide: its event is encoded, and its hits go
        with it to :func:`~sieve.flow.rows.decision_rows`.
        """
        index = group.active[space].index
        matcher = self.prefilter.terms_for(index) if space == "text" else self.prefilter.hashes_for(index)

        def hits_of(position: int) -> list[ListHit]:
            if not matcher:
                return []
            started = time.perf_counter()
            found = matcher.match_batch([inputs[position]])[0]
            seconds["lists"] = seconds.get("lists", 0.0) + time.perf_counter() - started
            return found

        keys: list[bytes | None] = [None] * len(items)
        if self.prefilter.cache is not None:
            policy, version = group.cache_policy, index.version
            keys = ([text_key(policy, version, text) for text in inputs] if space == "text"
                    else [image_key(policy, version, ref.sha256) for ref in refs or ()])
        rows, todo, repeats, hits = self.prefilter.split(items, keys, hits_of, index, decided_at, refs)
        skipped = set(todo) | set(repeats)
        done = [position for position in range(len(items)) if position not in skipped]
        return list(zip(done, rows, strict=True)), todo, repeats, keys, hits

    def _decide_encoded(
        self, space: Space, items: list[DecodedEvent], groups: list[TenantGroup], at: list[int],
        vectors: np.ndarray, refs: list[ImageRef] | None, seconds: dict[str, float],
        hits: dict[int, list[ListHit]] | None = None,
    ) -> dict[int, dict[str, Any]]:
        """Encoded events (``at``: their positions) matched once per distinct index, decided per group."""
        decided: dict[int, dict[str, Any]] = {}
        by_index = positions_by([id(groups[p].active[space].index) for p in at])
        for rows in by_index.values():
            first = groups[at[rows[0]]].active[space]
            index = first.index
            started = time.perf_counter()
            some = vectors[rows]
            match = match_batch(some, index, index.aggregation)
            words = first.head is not None and first.head.words is not None  # only such a head reads texts
            texts = [items[at[r]].event.text or "" for r in rows] if words else None
            match = replace(match, route_scores=decision_scores(match.route_scores, some, index, first.head,
                                                                texts))
            matched = time.perf_counter()
            for members in positions_by([groups[at[r]].cache_policy for r in rows]).values():
                positions = [at[rows[m]] for m in members]
                policy = groups[positions[0]].active[space].policy
                fresh = decision_rows(
                    [items[p].event for p in positions], take_rows(match, members), index, policy,
                    decided_at=utcnow(), event_times=[items[p].record.timestamp for p in positions],
                    source_topics=[items[p].record.topic for p in positions],
                    images=[refs[p] for p in positions] if refs is not None else None,
                    list_hits=[hits.get(p, []) for p in positions] if hits else None,
                )
                decided.update(zip(positions, fresh, strict=True))
            seconds["match"] = seconds.get("match", 0.0) + matched - started
            seconds["decide"] = seconds.get("decide", 0.0) + time.perf_counter() - matched
        return decided

    def _encode_and_decide(
        self, space: Space, items: list[DecodedEvent], inputs: list[Any], refs: list[ImageRef] | None,
        seconds: dict[str, float], shadow: ShadowBatch | None = None,
    ) -> tuple[list[dict[str, Any]], list[DeadLetter]]:
        """Lists and repeats first (per tenant group); the rest encoded together, decided, remembered.

        ``shadow``: what the shadow version makes of the encoded events of the topology's own policy.
        """
        decided_at = utcnow()
        groups = [self.group_for(item.event.tenant) for item in items]
        placed: list[tuple[int, dict[str, Any]]] = []
        todo: list[int] = []
        keys: list[bytes | None] = [None] * len(items)
        repeats: list[tuple[TenantGroup, dict[int, int]]] = []
        hits: dict[int, list[ListHit]] = {}  # events still to encode that a list fired on (multi sets)
        for positions in positions_by([group.cache_policy for group in groups]).values():
            group = groups[positions[0]]
            sub_refs = [refs[p] for p in positions] if refs is not None else None
            rows, sub_todo, sub_repeats, sub_keys, sub_hits = self._prefilter_group(
                space, group, [items[p] for p in positions], [inputs[p] for p in positions], sub_refs,
                decided_at, seconds)
            placed += [(positions[i], row) for i, row in rows]
            todo += [positions[i] for i in sub_todo]
            hits.update((positions[i], sub_hits[i]) for i in sub_todo if sub_hits[i])
            repeats.append((group, {positions[i]: positions[j] for i, j in sub_repeats.items()}))
            for i, key in zip(positions, sub_keys, strict=True):
                keys[i] = key
        todo.sort()
        letters: list[DeadLetter] = []
        decided: dict[int, dict[str, Any]] = {}
        if todo:
            encoder = self._encoder_for(space)
            assert encoder is not None
            encode = encoder.encode if space == "text" else encoder.encode_images  # type: ignore[union-attr]
            started = time.perf_counter()
            kept, kept_positions, vectors, letters = self._encode_isolating(
                [items[p] for p in todo], [inputs[p] for p in todo], encode, encoder.dim
            )
            stage = "encode" if space == "text" else "image_encode"
            seconds[stage] = seconds.get(stage, 0.0) + time.perf_counter() - started
            if kept:
                at = [todo[p] for p in kept_positions]
                decided = self._decide_encoded(space, items, groups, at, vectors, refs, seconds, hits)
                self.prefilter.remember([keys[p] for p in at], [decided[p] for p in at])
                if shadow is not None and self._shadow is not None:
                    started = time.perf_counter()
                    own = [k for k, p in enumerate(at) if groups[p].policy is None]
                    self._shadow.decide(shadow, vectors[own], [decided[at[k]] for k in own],
                                        [hits.get(at[k], []) for k in own],
                                        [items[at[k]].event.text or "" for k in own])
                    seconds["shadow"] = seconds.get("shadow", 0.0) + time.perf_counter() - started
                placed += decided.items()
        for group, group_repeats in repeats:
            version = group.active[space].index.version
            copied = repeat_rows(items, group_repeats, decided, version, decided_at, refs)
            placed += zip([p for p, first in group_repeats.items() if first in decided], copied, strict=True)
            for position, first in group_repeats.items():
                if first not in decided:  # the same content failed to encode: so does the repeat
                    letters.append(self._dead_letter(items[position], "encode", "encode_error",
                                                     "the same content failed to encode in this batch"))
        placed.sort(key=lambda pair: pair[0])
        return [row for _, row in placed], letters

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
        shadow = self._shadow.start() if self._shadow is not None else None
        texts = [d for d in decoded if d.event.modality == "text"]
        if texts:
            rows, more_letters = self._encode_and_decide(
                "text", texts, [d.event.text or "" for d in texts], None, seconds, shadow)
            decisions += rows
            letters.extend(more_letters)
        images = [d for d in decoded if d.event.modality == "image"]
        if images and self.image_encoder is not None:
            t2 = time.perf_counter()
            loaded, pictures, refs, failed = self._load_images(images)
            letters.extend(failed)
            seconds["image_load"] = time.perf_counter() - t2
            rows, more_letters = self._encode_and_decide("image", loaded, pictures, refs, seconds)
            decisions += rows
            letters.extend(more_letters)
        output = self.topology.output
        outbound = plan_decisions(decisions, output) + plan_dead_letters(letters, output)
        review = self.topology.review
        if review is not None and review.audit_share > 0:
            outbound += plan_audits(decisions, review.audit_topic, review.audit_share)
        if review is not None and shadow is not None and shadow.disputed and review.shadow_audit_share > 0:
            disputed = [row for row in decisions if row["id"] in shadow.disputed
                        and not audited(row["id"], review.audit_share)]  # not twice
            outbound += plan_audits(disputed, review.audit_topic, review.shadow_audit_share)
        if shadow is None:
            return BatchResult(decisions, letters, outbound, seconds)
        return BatchResult(decisions, letters, outbound + shadow.messages, seconds, shadow.stats)
