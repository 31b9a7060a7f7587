"""The route store: route-set versions as vectors in Qdrant, one collection per encoder space.

Versions are immutable and complete (:mod:`sieve.store.versions`): ``sync`` writes a
version's points, then its record (which marks it complete, with its point count),
then switches the set's active pointer to it; earlier versions stay. ``load`` reads
the active version (or a named one) into a :class:`~sieve.flow.match.RouteIndex` and
refuses one that is not complete; ``current_version`` is the cheap check a worker
polls to pick up a new version without a restart. A set's learned head
(:mod:`sieve.flow.head`) is part of its version: its bytes are in the version's
record and come back with the set on ``load``.

The embedded default is qdrant-client's local mode, which one process at a time
may open: so every operation opens the store, does its work and closes it,
retrying while another process holds the lock. A Qdrant server has no such limit;
the first operation waits for it to answer (:mod:`sieve.store.connect`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from qdrant_client import QdrantClient, models

from sieve.encoders.base import ImageEncoder, TextEncoder
from sieve.flow.head import LearnedHead
from sieve.flow.match import RouteIndex, encode_examples
from sieve.progress import SILENT, Progress
from sieve.routeset import RouteSet, Space
from sieve.settings import QdrantSettings
from sieve.store.connect import RouteStoreError, open_local, open_server, store_failures, wait_for_server
from sieve.store.versions import (
    ACTIVE,
    PROMOTION,
    VERSION,
    StoredVersion,
    pointer_id,
    pointer_record,
    promotion_record,
    route_set_of,
    space_name,
    version_points,
    version_record,
    version_record_id,
)

__all__ = ["RouteStore", "RouteStoreError", "StoredVersion", "SyncReport", "space_name"]

log = logging.getLogger(__name__)

_PAGE = 512  # points per scroll, retrieve or upsert request
_ENCODE_CHUNK = 1024  # examples per encoder call while syncing (so its progress advances)


@dataclass(frozen=True)
class SyncReport:
    """What a sync did: the examples compared with the previously active version, and the writes."""

    route_set: str
    version: str
    previous_version: str | None
    collection: str
    added: int
    updated: int
    deleted: int
    unchanged: int
    points: int = 0  # the version's points
    written: int = 0  # points written by this sync (0: the version was already complete)
    encoded: int = 0  # examples encoded (the others' vectors came from the previous version)


def _examples(points: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Example id -> what describes it (without the version), for comparing two versions."""
    return {p["example"]: {k: v for k, v in p.items() if k != "version"} for p in points.values()}


class RouteStore:
    """Route sets in Qdrant (local path or server)."""

    def __init__(self, settings: QdrantSettings) -> None:
        self.settings = settings
        self._server_answered = False

    def collection(self, encoder_id: str) -> str:
        """The collection holding the examples of one encoder space (all versions)."""
        return f"{self.settings.collection_prefix}__{space_name(encoder_id)}"

    @property
    def meta_collection(self) -> str:
        """The collection holding the version records and the active pointers."""
        return f"{self.settings.collection_prefix}__route_sets"

    @contextmanager
    def client(self) -> Iterator[QdrantClient]:
        """An open client; failed requests raise RouteStoreError.

        In local mode it waits while another process holds the path; a server is
        waited for (``startup_timeout_s``) the first time.
        """
        if self.settings.url is None:
            client = open_local(self.settings)
        else:
            client = open_server(self.settings)
        try:
            if self.settings.url is not None and not self._server_answered:
                wait_for_server(client, self.settings)
                self._server_answered = True
            with store_failures(str(self.settings.url or self.settings.path)):
                yield client
        finally:
            client.close()

    def _meta_id(self, set_name: str, encoder_id: str) -> str:
        """Id of the set's active pointer in one encoder space."""
        return pointer_id(set_name, encoder_id)

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

    def _read(self, client: QdrantClient, record_id: str, fields: list[str] | None = None) -> dict | None:
        if not client.collection_exists(self.meta_collection):
            return None
        found = client.retrieve(self.meta_collection, [record_id], with_payload=fields or True)
        return dict(found[0].payload or {}) if found else None

    def _write(self, client: QdrantClient, record_id: str, payload: dict[str, Any]) -> None:
        point = models.PointStruct(id=record_id, vector=[1.0], payload=payload)
        client.upsert(self.meta_collection, points=[point])

    def _retrieve(self, client: QdrantClient, collection: str, ids: list[str], *,
                  with_vectors: bool) -> dict[str, models.Record]:
        """The points among ``ids`` that exist, by id."""
        if not client.collection_exists(collection):
            return {}
        found: dict[str, models.Record] = {}
        for start in range(0, len(ids), _PAGE):
            page: list[models.ExtendedPointId] = list(ids[start:start + _PAGE])
            for record in client.retrieve(collection, page, with_payload=with_vectors,
                                          with_vectors=with_vectors):
                found[str(record.id)] = record
        return found

    def _complete(self, client: QdrantClient, collection: str, record: dict | None,
                  points: dict[str, dict[str, Any]]) -> bool:
        """Whether a version record is present and all the points it counts are stored."""
        if record is None or record.get("record") != VERSION or record.get("points") != len(points):
            return False
        return len(self._retrieve(client, collection, list(points), with_vectors=False)) == len(points)

    def sync(
        self, route_set: RouteSet, encoder: TextEncoder | ImageEncoder, *, progress: Progress = SILENT,
        activate: bool = True,
    ) -> SyncReport:
        """Make ``route_set``'s version complete in the encoder's space, then (``activate``) the active one.

        Writes the version's points (encoding only examples the previously active
        version lacks, skipping points an interrupted sync already wrote), then its
        record, then the active pointer. A version already complete and active is left
        as it is. A text encoder takes the utterances; an image encoder the example
        images and the CLIP prompts. Reports its steps: encoding, upserting points.
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
        wanted = version_points(route_set, space)
        with self.client() as client:
            collection = self._ensure_collections(client, encoder)
            pointer = self._read(client, pointer_id(route_set.name, encoder.id))
            previous_version = pointer.get("version") if pointer else None
            previous: RouteSet | None = None
            if pointer is not None and pointer.get("definition"):
                try:
                    previous = route_set_of(pointer)
                except RouteStoreError:
                    log.warning("route set %s: the active pointer's record does not hash to its version %s",
                                route_set.name, previous_version)
            before = _examples(version_points(previous, space)) if previous is not None else {}
            after = _examples(wanted)
            record = self._read(client, version_record_id(route_set.name, encoder.id, version))
            written = encoded = 0
            if not self._complete(client, collection, record, wanted):
                written, encoded = self._write_points(client, collection, route_set, space, encoder,
                                                      wanted, previous, progress)
                record = version_record(route_set, encoder.id, space, len(wanted))
                self._write(client, version_record_id(route_set.name, encoder.id, version), record)
            assert record is not None
            if activate and (previous_version != version or written or pointer is None
                             or pointer.get("record") != ACTIVE):
                self._activate(client, record, previous_version, {"via": "sync"})
        updated = sum(1 for e in after if e in before and before[e] != after[e])
        added = sum(1 for e in after if e not in before)
        return SyncReport(
            route_set=route_set.name,
            version=version,
            previous_version=previous_version,
            collection=collection,
            added=added,
            updated=updated,
            deleted=sum(1 for e in before if e not in after),
            unchanged=len(after) - added - updated,
            points=len(wanted),
            written=written,
            encoded=encoded,
        )

    def _write_points(self, client: QdrantClient, collection: str, route_set: RouteSet, space: Space,
                      encoder: TextEncoder | ImageEncoder, wanted: dict[str, dict[str, Any]],
                      previous: RouteSet | None, progress: Progress) -> tuple[int, int]:
        """Write the version's missing points; returns (points written, examples encoded)."""
        stored = self._retrieve(client, collection, list(wanted), with_vectors=False)
        missing = [pid for pid in wanted if pid not in stored]
        keys = {wanted[pid]["key"] for pid in missing}
        reused: dict[str, list[float]] = {}
        if previous is not None:  # the same example (by key) has the same vector in this space
            earlier = {pid: p for pid, p in version_points(previous, space).items() if p["key"] in keys}
            for pid, found in self._retrieve(client, collection, list(earlier), with_vectors=True).items():
                if isinstance(found.vector, list):
                    reused.setdefault(earlier[pid]["key"], [float(x) for x in found.vector])  # type: ignore[arg-type]
        to_encode = [pid for pid in missing if wanted[pid]["key"] not in reused]
        vectors: dict[str, list[float]] = {}
        if to_encode:
            items = [(wanted[p]["route"], wanted[p]["kind"], wanted[p]["text"]) for p in to_encode]
            with progress.task("encoding examples", total=len(items)) as advance:
                for start in range(0, len(items), _ENCODE_CHUNK):
                    chunk = items[start:start + _ENCODE_CHUNK]
                    encoded = encode_examples(route_set, space, encoder, chunk)
                    for pid, vector in zip(to_encode[start:start + _ENCODE_CHUNK], encoded, strict=True):
                        vectors[pid] = np.asarray(vector, dtype=np.float32).tolist()
                    advance(len(chunk))
        if missing:
            with progress.task("upserting points", total=len(missing)) as advance:
                for start in range(0, len(missing), _PAGE):
                    page = missing[start:start + _PAGE]
                    points = [
                        models.PointStruct(id=pid, payload=wanted[pid],
                                           vector=vectors.get(pid) or reused[wanted[pid]["key"]])
                        for pid in page
                    ]
                    client.upsert(collection, points=points)
                    advance(len(page))
        if len(self._retrieve(client, collection, list(wanted), with_vectors=False)) != len(wanted):
            raise RouteStoreError(f"route set {route_set.name!r} version {route_set.version}: not all of "
                                  f"its {len(wanted)} points were stored in {collection}; sync again")
        return len(missing), len(to_encode)

    def _activate(self, client: QdrantClient, record: dict[str, Any], previous: str | None,
                  evidence: dict[str, Any]) -> None:
        """Switch the active pointer to ``record``'s version and log the promotion with its evidence."""
        set_name, encoder_id = record["set"], record["encoder"]
        log_id, entry = promotion_record(set_name, encoder_id, record["version"], previous, evidence)
        self._write(client, log_id, entry)
        self._write(client, pointer_id(set_name, encoder_id), pointer_record(record, previous))

    def set_active(self, set_name: str, encoder_id: str, version: str,
                   evidence: dict[str, Any] | None = None) -> str | None:
        """Point the set's active pointer at a complete stored version (what workers load next).

        Logged (:meth:`promotions`) with ``evidence``; returns the version that was active.
        """
        with self.client() as client:
            record = self._read(client, version_record_id(set_name, encoder_id, version))
            points = version_points(route_set_of(record), record.get("space", "text")) if record else {}
            if record is None or not self._complete(client, self.collection(encoder_id), record, points):
                raise RouteStoreError(f"route set {set_name!r} has no complete version {version} "
                                      f"for encoder {encoder_id!r}")
            pointer = self._read(client, pointer_id(set_name, encoder_id), ["version"]) or {}
            previous = pointer.get("version")
            self._activate(client, record, previous, evidence or {})
        return previous

    def rollback(self, set_name: str, encoder_id: str, evidence: dict[str, Any] | None = None) -> str:
        """Make the version that was active before the current one active again; returns it."""
        with self.client() as client:
            pointer = self._read(client, pointer_id(set_name, encoder_id), ["version", "previous"]) or {}
        if not pointer.get("previous"):
            raise RouteStoreError(f"route set {set_name!r} has no earlier active version for encoder "
                                  f"{encoder_id!r} to roll back to")
        self.set_active(set_name, encoder_id, pointer["previous"],
                        {"rollback_from": pointer["version"], **(evidence or {})})
        return str(pointer["previous"])

    def promotions(self, set_name: str, encoder_id: str) -> list[dict[str, Any]]:
        """The promotion log of a set in one encoder space, oldest first."""
        match: list[models.Condition] = [models.FieldCondition(key=key, match=models.MatchValue(value=value))
                 for key, value in (("record", PROMOTION), ("set", set_name), ("encoder", encoder_id))]
        with self.client() as client:
            if not client.collection_exists(self.meta_collection):
                return []
            page, _ = client.scroll(self.meta_collection, scroll_filter=models.Filter(must=match),
                                    limit=10_000, with_payload=True)
        return sorted((dict(r.payload or {}) for r in page), key=lambda entry: entry["at"])

    def list_versions(self, set_name: str, encoder_id: str) -> list[StoredVersion]:
        """The set's stored versions in one encoder space (those with a record), oldest first."""
        fields = ["version", "points", "synced_at"]
        match: list[models.Condition] = [models.FieldCondition(key=key, match=models.MatchValue(value=value))
                 for key, value in (("record", VERSION), ("set", set_name), ("encoder", encoder_id))]
        with self.client() as client:
            if not client.collection_exists(self.meta_collection):
                return []
            active = (self._read(client, pointer_id(set_name, encoder_id), ["version"]) or {}).get("version")
            rows: list[dict] = []
            offset = None
            while True:
                page, offset = client.scroll(self.meta_collection, scroll_filter=models.Filter(must=match),
                                             limit=_PAGE, offset=offset, with_payload=fields)
                rows.extend(dict(r.payload or {}) for r in page)
                if offset is None:
                    break
        versions = [StoredVersion(r["version"], r["points"], r["synced_at"], r["version"] == active)
                    for r in rows]
        return sorted(versions, key=lambda v: v.synced_at)

    def current_version(self, set_name: str, encoder_id: str) -> str | None:
        """The version the set's active pointer names in this encoder space, or None."""
        with self.client() as client:
            pointer = self._read(client, pointer_id(set_name, encoder_id), ["version"])
        return pointer.get("version") if pointer else None

    def load(self, set_name: str, encoder_id: str, version: str | None = None) -> RouteIndex:
        """Read the active version of a set (or ``version``) into memory; only a complete one.

        Refused (RouteStoreError): no record for the version, content that does not
        hash to it, or stored points that are not exactly the ones its record counts.
        """
        collection = self.collection(encoder_id)
        with self.client() as client:
            if version is None:
                pointer = self._read(client, pointer_id(set_name, encoder_id))
                if pointer is None:
                    raise RouteStoreError(
                        f"route set {set_name!r} has not been synced for encoder {encoder_id!r}: "
                        f"run `sieve routes sync` on its route file first"
                    )
                version = str(pointer["version"])
                route_set_of(pointer)  # the pointer's copy must be the version it names
            record = self._read(client, version_record_id(set_name, encoder_id, version))
            if record is None or record.get("record") != VERSION or "points" not in record:
                raise RouteStoreError(
                    f"route set {set_name!r} version {version} is not complete in the route store for "
                    f"encoder {encoder_id!r} (no version record: its sync did not finish, or an older "
                    "Sieve wrote it): run `sieve routes sync` on its route file again"
                )
            route_set = route_set_of(record)
            space: Space = record.get("space", "text")
            wanted = version_points(route_set, space)
            found = self._retrieve(client, collection, list(wanted), with_vectors=True)
        if len(found) != len(wanted) or record["points"] != len(wanted):
            raise RouteStoreError(
                f"route set {set_name!r} version {version} is incomplete in {collection}: {len(found)} of "
                f"{record['points']} points stored ({len(wanted)} in its definition); refusing to load it: "
                "run `sieve routes sync` on its route file again"
            )
        examples: dict[str, list[tuple[str, str, np.ndarray]]] = {}
        for pid, payload in wanted.items():  # in the set's own order, so loads are reproducible
            vector = found[pid].vector
            if not isinstance(vector, list) or (found[pid].payload or {}).get("version") != version:
                raise RouteStoreError(f"route set {set_name!r} version {version}: point {pid} in "
                                      f"{collection} is not one of its points")
            examples.setdefault(payload["route"], []).append(
                (payload["example"], payload["text"], np.asarray(vector, dtype=np.float32))
            )
        return RouteIndex.from_examples(route_set, version, encoder_id, examples, space)
