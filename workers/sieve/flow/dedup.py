"""Duplicate waves: an exact-content cache of decisions, bounded in memory, with a time to live.

Spam and raids repeat the same text thousands of times. The cache keys a decision by the
policy it was made under (the topology and its tenant's policy), the route-set version and
the exact content — the text after Unicode NFC (not the evasion-normalised text: the encoder
sees the raw one), or the SHA-256 of an image's bytes — and returns the earlier decision for
a repeat within ``ttl_s``. The repeat's decision is its own: its id, event, times and source
come from the repeat; ``from_cache`` says where the rest came from.

Entries are evicted least recently used first once their estimated size passes ``max_bytes``.
"""

from __future__ import annotations

import hashlib
import time
import unicodedata
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# The fields of a decision row that belong to the event, not to what was decided about it.
PER_EVENT = ("id", "event_id", "event", "latency_ms", "decided_at", "source_topic", "image")


def text_key(policy: str, version: str, text: str) -> bytes:
    """The cache key of a text event."""
    content = unicodedata.normalize("NFC", text)
    data = f"t\x00{policy}\x00{version}\x00{content}".encode("utf-8", "surrogatepass")
    return hashlib.sha256(data).digest()


def image_key(policy: str, version: str, image_sha256: str) -> bytes:
    """The cache key of an image event (its bytes' SHA-256)."""
    return hashlib.sha256(f"i\x00{policy}\x00{version}\x00{image_sha256}".encode()).digest()


@dataclass
class CacheStats:
    """Counters since start: look-ups that hit and missed, entries evicted."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0

    @property
    def hit_ratio(self) -> float:
        """Hits over look-ups (0 before any)."""
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


class DecisionCache:
    """Decision rows by content key; LRU within ``max_bytes``, entries older than ``ttl_s`` dropped."""

    def __init__(self, max_bytes: int, ttl_s: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self._clock = clock
        self._entries: OrderedDict[bytes, tuple[float, int, dict[str, Any]]] = OrderedDict()
        self.bytes = 0
        self.stats = CacheStats()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes) -> dict[str, Any] | None:
        """The decided part of the row cached under ``key`` (None: a miss or expired)."""
        entry = self._entries.get(key)
        if entry is None or self._clock() - entry[0] > self.ttl_s:
            if entry is not None:
                self._drop(key)
            self.stats.misses += 1
            return None
        self._entries.move_to_end(key)
        self.stats.hits += 1
        return entry[2]

    def put(self, key: bytes, row: dict[str, Any]) -> None:
        """Remember what ``row`` decided (its per-event fields left out)."""
        decided = {k: v for k, v in row.items() if k not in PER_EVENT}
        size = estimated_bytes(decided)
        if size > self.max_bytes:
            return
        if key in self._entries:
            self._drop(key)
        self._entries[key] = (self._clock(), size, decided)
        self.bytes += size
        while self.bytes > self.max_bytes:
            oldest = next(iter(self._entries))
            self._drop(oldest)
            self.stats.evictions += 1

    def _drop(self, key: bytes) -> None:
        _, size, _ = self._entries.pop(key)
        self.bytes -= size


def estimated_bytes(decided: dict[str, Any]) -> int:
    """A cheap estimate of an entry's memory.

    Fixed fields, each route score, each nearest example, and a multi-label decision's fired
    routes and categories.
    """
    nearest = decided.get("nearest") or ()
    multi = 200 * len(decided.get("routes") or ()) + 150 * len(decided.get("categories") or ())
    return (1024 + 200 * len(decided.get("scores") or ()) + multi
            + sum(300 + 2 * len(n["text"]) for n in nearest))


def repeat_row(decided: dict[str, Any], per_event: dict[str, Any]) -> dict[str, Any]:
    """A repeat's decision row: what was decided, with the repeat's own per-event fields."""
    return {**decided, **per_event, "from_cache": True}


def review_key(version: str, text: str | None, image_sha256: str | None) -> str | None:
    """The content key of a needs-review decision: its Kafka key, and the reviewer's memo key.

    Repeats of one text (after NFC) or one image under one route-set version share it, so they
    land on one partition of the needs-review topic and meet in one reviewer. None for an event
    with neither (an image with no digest).
    """
    if text is not None:
        content = "t\x00" + unicodedata.normalize("NFC", text)
    elif image_sha256 is not None:
        content = "i\x00" + image_sha256
    else:
        return None
    return hashlib.sha256(f"{version}\x00{content}".encode("utf-8", "surrogatepass")).hexdigest()[:32]
