"""What decides before the encoder: repeats of content already decided, and list hits.

Order, per event of a batch (documented in docs/lists.md):

1. **Repeats.** With a :class:`~sieve.flow.dedup.DecisionCache`, an event whose content was
   decided under the same policy and route-set version within the cache's time to live gets
   that decision (``from_cache: true``), with its own id, event and times; it already holds
   its content's list hits. Repeats within one batch are encoded once.
2. **Lists**, on the rest. The route set's term and pattern lists (text events) and image
   hash lists (image events, once the image is loaded). A block or hash-list hit decides the
   event by its route (``reason: accept``, score 1, the entry in ``list_hits``) and the event
   skips the encoder. In a ``multi`` set a hit accepts its route and the event is still
   scored (:func:`sieve.flow.list_policy.with_list_hits`): another route may fire beside it.
   A hit of a block list with ``action: review`` never decides here: the event is encoded,
   and the hit holds its route for review (:func:`sieve.flow.list_policy.decide_with_lists`).
3. Everything else is encoded, matched and decided, and its decision remembered.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from sieve.contracts import DECISION_SCHEMA_VERSION, Decision, ImageRef
from sieve.flow.decode import DecodedEvent
from sieve.flow.dedup import DecisionCache, image_key, repeat_row, text_key
from sieve.flow.image_hashes import HashMatcher
from sieve.flow.lists import ListHit, TermMatcher
from sieve.flow.match import RouteIndex
from sieve.flow.rows import event_view_row, list_hit_rows
from sieve.lists import HashList, TermList


def per_event_fields(item: DecodedEvent, version: str, decided_at: datetime,
                     image: ImageRef | None = None) -> dict[str, Any]:
    """The fields of a decision row that belong to its event."""
    event_time = item.record.timestamp
    return {
        "id": Decision.make_id(item.event.id, version),
        "event_id": item.event.id,
        "event": event_view_row(item.event),
        "latency_ms": (decided_at.timestamp() - event_time) * 1000.0 if event_time else None,
        "decided_at": decided_at,
        "source_topic": item.record.topic,
        "image": image.model_dump() if image is not None else None,
    }


def list_row(item: DecodedEvent, hits: list[ListHit], index: RouteIndex, decided_at: datetime,
             image: ImageRef | None = None) -> dict[str, Any]:
    """The decision of an event a block-list entry decided: the first block hit's route, every hit named."""
    route = next(hit.route for hit in hits if hit.action == "accept")
    assert route is not None
    outcome = index.route_set.route(route).outcome
    return {
        "schema_version": DECISION_SCHEMA_VERSION,
        **per_event_fields(item, index.version, decided_at, image),
        "outcome": outcome,
        "reason": "accept",
        "route": route,
        "score": 1.0,
        "margin": 1.0,
        "scores": [{"route": route, "outcome": outcome, "score": 1.0}],
        "nearest": [],
        "route_set": index.route_set.name,
        "route_set_version": index.version,
        "encoder": index.encoder_id,
        "decided_by": "router",
        "modality": item.event.modality,
        "review": None,
        "novel": None,
        "novelty": None,
        "list_hits": list_hit_rows(hits),
        "from_cache": None,
        "mode": "single",  # a hit decides alone only in single-mode sets
        "routes": None,
        "categories": None,
        "category_scores": None,
        "final": True,
    }


class Prefilter:
    """Lists and the repeat cache of one topology, bound to the current route-set versions."""

    def __init__(self, policy: str, cache: DecisionCache | None) -> None:
        self.policy = policy
        self.cache = cache
        self._terms: dict[str, TermMatcher] = {}
        self._hashes: dict[str, HashMatcher] = {}

    def terms_for(self, index: RouteIndex) -> TermMatcher:
        """The term matcher of an index's version (built once per version)."""
        matcher = self._terms.get(index.version)
        if matcher is None:
            lists = [item for item in index.route_set.loaded_lists if isinstance(item, TermList)]
            matcher = self._terms[index.version] = TermMatcher(lists)
        return matcher

    def hashes_for(self, index: RouteIndex) -> HashMatcher:
        """The image hash matcher of an index's version (built once per version)."""
        matcher = self._hashes.get(index.version)
        if matcher is None:
            lists = [item for item in index.route_set.loaded_lists if isinstance(item, HashList)]
            matcher = self._hashes[index.version] = HashMatcher(lists)
        return matcher

    def split(self, items: Sequence[DecodedEvent], keys: Sequence[bytes | None],
              hits_of: Callable[[int], list[ListHit]], index: RouteIndex, decided_at: datetime,
              images: Sequence[ImageRef | None] | None = None,
              ) -> tuple[list[dict[str, Any]], list[int], dict[int, int], list[list[ListHit]]]:
        """Rows decided here, the positions still to encode, repeats (position -> first), and hits.

        ``keys`` are the events' cache keys (None: not cached). Repeats are answered first: a
        repeat's decision already holds its content's list hits, so the lists
        (``hits_of(position)``) run only on content the cache did not answer. In a ``single``
        set a block hit then decides; in a ``multi`` set, or with a review hit, the event is
        still scored, and the caller hands its hits (``[]`` for positions not matched) to
        :func:`sieve.flow.rows.decision_rows`.
        """
        decides = index.route_set.mode != "multi"
        rows: list[dict[str, Any]] = []
        todo: list[int] = []
        repeats: dict[int, int] = {}
        hits: list[list[ListHit]] = [[] for _ in items]
        first_of: dict[bytes, int] = {}
        for position, item in enumerate(items):
            image = images[position] if images is not None else None
            key = keys[position]
            if key is not None and self.cache is not None:
                if key in first_of:  # a repeat within the batch: decided with its first
                    repeats[position] = first_of[key]
                    self.cache.stats.hits += 1
                    continue
                decided = self.cache.get(key)
                if decided is not None:
                    rows.append(repeat_row(decided, per_event_fields(item, index.version, decided_at, image)))
                    continue
            hits[position] = hits_of(position)
            if decides and any(hit.action == "accept" for hit in hits[position]):
                # never a "first": its repeats in the batch are decided by the list too
                rows.append(list_row(item, hits[position], index, decided_at, image))
                continue
            if key is not None and self.cache is not None:
                first_of[key] = position
            todo.append(position)
        return rows, todo, repeats, hits

    def text_keys(self, items: Sequence[DecodedEvent], index: RouteIndex) -> list[bytes | None]:
        """Each text event's cache key (all None without a cache)."""
        if self.cache is None:
            return [None] * len(items)
        return [text_key(self.policy, index.version, item.event.text or "") for item in items]

    def image_keys(self, refs: Sequence[ImageRef], index: RouteIndex) -> list[bytes | None]:
        """Each loaded image's cache key, by its bytes' SHA-256 (all None without a cache)."""
        if self.cache is None:
            return [None] * len(refs)
        return [image_key(self.policy, index.version, ref.sha256) for ref in refs]

    def remember(self, keys: Sequence[bytes | None], rows: Sequence[dict[str, Any]]) -> None:
        """Cache what was decided (rows aligned with keys)."""
        if self.cache is None:
            return
        for key, row in zip(keys, rows, strict=True):
            if key is not None:
                self.cache.put(key, row)


def repeat_rows(items: Sequence[DecodedEvent], repeats: dict[int, int], decided: dict[int, dict[str, Any]],
                version: str, decided_at: datetime,
                images: Sequence[ImageRef | None] | None = None) -> list[dict[str, Any]]:
    """The rows of repeats within the batch, from their first occurrence's row (when it was decided)."""
    rows = []
    for position, first in repeats.items():
        row = decided.get(first)
        if row is None:  # the first failed to encode: the repeat is dead-lettered with it by the caller
            continue
        image = images[position] if images is not None else None
        per_event = per_event_fields(items[position], version, decided_at, image)
        rows.append(repeat_row({k: v for k, v in row.items() if k not in per_event}, per_event))
    return rows
