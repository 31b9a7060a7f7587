"""The route store: route examples as vectors in Qdrant, one collection per encoder space.

``sync`` writes a route set (only what changed); ``load`` reads a set back into
a :class:`~sieve.flow.match.RouteIndex` for in-memory matching; ``current_version``
is the cheap check a worker polls to pick up a new version without a restart.
A set's learned head (:mod:`sieve.flow.head`) is part of its version: its bytes
are kept in the version's record and come back with the set on ``load``.

The embedded default is qdrant-client's local mode, which one process at a time
may open: so every operation opens the store, does its work and closes it,
retrying while another process holds the lock. A Qdrant server has no such limit.
"""

from __future__ import annotations

import base64
import logging
import re
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from qdrant_client import QdrantClient, models

from sieve.contracts import utcnow
from sieve.encoders.base import ImageEncoder, TextEncoder
from sieve.flow.head import LearnedHead
from sieve.flow.match import RouteIndex, encode_examples, example_id, example_key
from sieve.progress import SILENT, Progress
from sieve.routeset import RouteSet, Space
from sieve.settings import QdrantSettings

log = logging.getLogger(__name__)

_META_NAMESPACE = uuid.UUID("2a1d4b7e-9c3f-4e5a-8b6d-7f0e1c2d3a4b")
_PAGE = 512  # points per scroll or upsert request
_ENCODE_CHUNK = 1024  # examples per encoder call while syncing (so its progress advances)


class RouteStoreError(RuntimeError):
    """The store is unreachable, locked for too long, or lacks the asked-for set."""


@dataclass(frozen=True)
class SyncReport:
    """What a sync changed."""

    route_set: str
    version: str
    previous_version: str | None
    collection: str
    added: int
    updated: int
    deleted: int
    unchanged: int


def space_name(encoder_id: str) -> str:
    """A collection-safe name for an encoder space: ``st:all-MiniLM-L6-v2`` -> ``st-all-minilm-l6-v2``."""
    return re.sub(r"[^a-z0-9]+", "-", encoder_id.lower()).strip("-")


class RouteStore:
    """Route sets in Qdrant (local path or server)."""

    def __init__(self, settings: QdrantSettings) -> None:
        self.settings = settings

    def collection(self, encoder_id: str) -> str:
        """The collection holding the examples of one encoder space."""
        return f"{self.settings.collection_prefix}__{space_name(encoder_id)}"

    @property
    def meta_collection(self) -> str:
        """The collection holding one record per (route set, encoder space)."""
        return f"{self.settings.collection_prefix}__route_sets"

    @contextmanager
    def client(self) -> Iterator[QdrantClient]:
        """An open client; in local mode, waits while another process holds the path."""
        if self.settings.url is not None:
            api_key = self.settings.api_key.get_secret_value() if self.settings.api_key else None
            client = QdrantClient(
                url=self.settings.url, api_key=api_key, prefer_grpc=self.settings.prefer_grpc
            )
        else:
            self.settings.path.mkdir(parents=True, exist_ok=True)
            deadline = time.monotonic() + self.settings.lock_wait_s
            delay = 0.05
            while True:
                try:
                    client = QdrantClient(path=str(self.settings.path))
                    break
                except RuntimeError as exc:
                    if "already accessed" not in str(exc) or time.monotonic() > deadline:
                        raise RouteStoreError(
                            f"route store at {self.settings.path} is locked by another "
                            f"process for over {self.settings.lock_wait_s}s (local mode "
                            "allows one process at a time; use a Qdrant server to share it)"
                        ) from exc
                    time.sleep(delay)
                    delay = min(delay * 2, 0.5)
        try:
            yield client
        finally:
            client.close()

    def _meta_id(self, set_name: str, encoder_id: str) -> str:
        return str(uuid.uuid5(_META_NAMESPACE, f"{set_name}\x00{space_name(encoder_id)}"))

    def _ensure_collections(self, client: QdrantClient, encoder: TextEncoder | ImageEncoder) -> str:
        name = self.collection(encoder.id)
        if not client.collection_exists(name):
            client.create_collection(
                name,
                vectors_config=models.VectorParams(size=encoder.dim, distance=models.Distance.COSINE),
            )
            if self.settings.url is not None:  # local mode has no payload indexes
                client.create_payload_index(name, "set", models.PayloadSchemaType.KEYWORD)
        if not client.collection_exists(self.meta_collection):
            client.create_collection(
                self.meta_collection,
                vectors_config=models.VectorParams(size=1, distance=models.Distance.DOT),
            )
        return name

    @staticmethod
    def _set_filter(set_name: str) -> models.Filter:
        return models.Filter(
            must=[models.FieldCondition(key="set", match=models.MatchValue(value=set_name))]
        )

    def _scroll_set(
        self, client: QdrantClient, collection: str, set_name: str, *, with_vectors: bool
    ) -> list[models.Record]:
        records: list[models.Record] = []
        offset = None
        while True:
            page, offset = client.scroll(
                collection,
                scroll_filter=self._set_filter(set_name),
                limit=_PAGE,
                offset=offset,
                with_payload=True,
                with_vectors=with_vectors,
            )
            records.extend(page)
            if offset is None:
                return records

    def _read_meta(self, client: QdrantClient, set_name: str, encoder_id: str) -> dict | None:
        if not client.collection_exists(self.meta_collection):
            return None
        found = client.retrieve(self.meta_collection, [self._meta_id(set_name, encoder_id)])
        return dict(found[0].payload or {}) if found else None

    def sync(
        self, route_set: RouteSet, encoder: TextEncoder | ImageEncoder, *, progress: Progress = SILENT
    ) -> SyncReport:
        """Write ``route_set``'s examples in the encoder's space: new ones encoded, stale ones deleted.

        A text encoder takes the utterances; an image encoder the example images and
        the CLIP prompts. Reports its steps: encoding the new examples, upserting their
        points, updating the payloads of changed ones.
        """
        version = route_set.version
        space: Space = "image" if isinstance(encoder, ImageEncoder) else "text"
        head = route_set.head_bytes
        if head is not None and space == "text":
            trained_on = LearnedHead.from_bytes(head, f"the head of route set {route_set.name!r}").encoder_id
            if trained_on != encoder.id:
                raise RouteStoreError(
                    f"route set {route_set.name!r}: its head was trained on {trained_on!r} vectors, not "
                    f"{encoder.id!r}: train it with this encoder or remove the head file"
                )
        with self.client() as client:
            collection = self._ensure_collections(client, encoder)
            previous = self._read_meta(client, route_set.name, encoder.id)
            existing = {
                str(r.id): dict(r.payload or {})
                for r in self._scroll_set(client, collection, route_set.name, with_vectors=False)
            }
            wanted: dict[str, dict] = {}
            for route in route_set.routes:
                for kind, value in route.examples(space):
                    key = example_key(route_set, kind, value)
                    wanted[example_id(route_set.name, route.name, key)] = {
                        "set": route_set.name,
                        "route": route.name,
                        "outcome": route.outcome,
                        "text": value,
                        "kind": kind,
                        "key": key,
                    }
            new_ids = [pid for pid in wanted if pid not in existing]
            changed_ids = [
                pid
                for pid in wanted
                if pid in existing
                and any(existing[pid].get(k) != v for k, v in wanted[pid].items())
            ]
            stale_ids = [pid for pid in existing if pid not in wanted]
            if new_ids:
                items = [(wanted[p]["route"], wanted[p]["kind"], wanted[p]["text"]) for p in new_ids]
                chunks: list[np.ndarray] = []
                with progress.task("encoding examples", total=len(items)) as advance:
                    for start in range(0, len(items), _ENCODE_CHUNK):
                        chunk = items[start:start + _ENCODE_CHUNK]
                        chunks.append(encode_examples(route_set, space, encoder, chunk))
                        advance(len(chunk))
                vectors = np.concatenate(chunks)
                with progress.task("upserting points", total=len(new_ids)) as advance:
                    for start in range(0, len(new_ids), _PAGE):
                        page = new_ids[start:start + _PAGE]
                        points = [
                            models.PointStruct(
                                id=pid, vector=vector.tolist(), payload={**wanted[pid], "version": version}
                            )
                            for pid, vector in zip(page, vectors[start:start + _PAGE], strict=True)
                        ]
                        client.upsert(collection, points=points)
                        advance(len(page))
            if changed_ids:
                with progress.task("updating changed examples", total=len(changed_ids)) as advance:
                    for pid in changed_ids:
                        client.set_payload(collection, {**wanted[pid], "version": version}, points=[pid])
                        advance(1)
            if stale_ids:
                stale: list[models.ExtendedPointId] = list(stale_ids)
                client.delete(collection, points_selector=models.PointIdsList(points=stale))
            client.upsert(
                self.meta_collection,
                points=[
                    models.PointStruct(
                        id=self._meta_id(route_set.name, encoder.id),
                        vector=[1.0],
                        payload={
                            "set": route_set.name,
                            "encoder": encoder.id,
                            "space": space,
                            "image_digests": {
                                path: route_set.image_digest(path)
                                for route in route_set.routes for path in route.images
                            },
                            "version": version,
                            "definition": route_set.model_dump_json(),
                            "head": base64.b64encode(head).decode("ascii") if head is not None else None,
                            "synced_at": utcnow().isoformat(),
                        },
                    )
                ],
            )
        return SyncReport(
            route_set=route_set.name,
            version=version,
            previous_version=previous.get("version") if previous else None,
            collection=collection,
            added=len(new_ids),
            updated=len(changed_ids),
            deleted=len(stale_ids),
            unchanged=len(wanted) - len(new_ids) - len(changed_ids),
        )

    def current_version(self, set_name: str, encoder_id: str) -> str | None:
        """The version last synced for this set and encoder space, or None."""
        with self.client() as client:
            meta = self._read_meta(client, set_name, encoder_id)
        return meta.get("version") if meta else None

    def load(self, set_name: str, encoder_id: str) -> RouteIndex:
        """Read a synced set and its vectors into memory."""
        with self.client() as client:
            meta = self._read_meta(client, set_name, encoder_id)
            if meta is None:
                raise RouteStoreError(
                    f"route set {set_name!r} has not been synced for encoder {encoder_id!r}: "
                    f"run `sieve routes sync` on its route file first"
                )
            records = self._scroll_set(
                client, self.collection(encoder_id), set_name, with_vectors=True
            )
        route_set = RouteSet.model_validate_json(meta["definition"])
        route_set._image_digests = dict(meta.get("image_digests") or {})
        if meta.get("head"):
            route_set._head_bytes = base64.b64decode(meta["head"])
            if route_set.version != meta["version"]:  # the head stored is not the one the version hashed
                raise RouteStoreError(
                    f"route set {set_name!r} version {meta['version']}: its stored head hashes to version "
                    f"{route_set.version}; sync the route file again"
                )
        space: Space = meta.get("space", "text")
        examples: dict[str, list[tuple[str, str, np.ndarray]]] = {}
        for record in records:
            payload = record.payload or {}
            vector = record.vector
            if isinstance(vector, dict):  # named vectors are not used by Sieve
                raise RouteStoreError(f"unexpected named vectors in {self.collection(encoder_id)}")
            examples.setdefault(payload["route"], []).append(
                (str(record.id), payload["text"], np.asarray(vector, dtype=np.float32))
            )
        # Keep the set's own example order so loads are reproducible.
        order = {
            example_id(route_set.name, route.name, example_key(route_set, kind, value)): i
            for route in route_set.routes
            for i, (kind, value) in enumerate(route.examples(space))
        }
        for rows in examples.values():
            rows.sort(key=lambda row: order.get(row[0], len(order)))
        return RouteIndex.from_examples(route_set, meta["version"], encoder_id, examples, space)
