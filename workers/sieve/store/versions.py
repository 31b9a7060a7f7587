"""How route-set versions are laid out in the route store.

A version is immutable and complete. Its content hash (:attr:`RouteSet.version`:
examples, thresholds, image bytes, the head's bytes, the lists) names it; every one of its
examples is a point of its own, whose id is derived from the version and the
example (:func:`point_id`), so versions never share or overwrite points. Its
*version record* (:func:`version_record_id`) in the meta collection holds the
definition, the head, the lists and the number of points; it is written only after all the
points, so a record means a complete version. The *active pointer*
(:func:`pointer_id`, one per set and encoder space) names the version workers
load; it carries a copy of that version's record and is switched last.
"""

from __future__ import annotations

import base64
import re
import uuid
from dataclasses import dataclass
from typing import Any

from sieve.contracts import utcnow
from sieve.flow.match import example_id, example_key
from sieve.lists import ListError, parse_list
from sieve.routeset import RouteSet, Space
from sieve.store.connect import RouteStoreError

_META_NAMESPACE = uuid.UUID("2a1d4b7e-9c3f-4e5a-8b6d-7f0e1c2d3a4b")
_POINT_NAMESPACE = uuid.UUID("6c0f7d52-3b1e-4f8a-9d2c-5e4b3a1f0c9d")

ACTIVE = "active"  # the ``record`` field of the active pointer
VERSION = "version"  # the ``record`` field of a version record


def space_name(encoder_id: str) -> str:
    """A collection-safe name for an encoder space: ``st:all-MiniLM-L6-v2`` -> ``st-all-minilm-l6-v2``."""
    return re.sub(r"[^a-z0-9]+", "-", encoder_id.lower()).strip("-")


def pointer_id(set_name: str, encoder_id: str) -> str:
    """Id of the active pointer of a set in one encoder space."""
    return str(uuid.uuid5(_META_NAMESPACE, f"{set_name}\x00{space_name(encoder_id)}"))


def version_record_id(set_name: str, encoder_id: str, version: str) -> str:
    """Id of the record of one version of a set in one encoder space."""
    return str(uuid.uuid5(_META_NAMESPACE, f"{set_name}\x00{space_name(encoder_id)}\x00{version}"))


def point_id(version: str, example: str) -> str:
    """Id of one example's point in one version (``example`` is its :func:`example_id`)."""
    return str(uuid.uuid5(_POINT_NAMESPACE, f"{version}\x00{example}"))


def version_points(route_set: RouteSet, space: Space) -> dict[str, dict[str, Any]]:
    """The points of the set's version in one space, in the set's order: point id -> payload."""
    version = route_set.version
    points: dict[str, dict[str, Any]] = {}
    for route in route_set.routes:
        for kind, value in route.examples(space):
            key = example_key(route_set, kind, value)
            example = example_id(route_set.name, route.name, key)
            points.setdefault(point_id(version, example), {
                "set": route_set.name,
                "version": version,
                "example": example,
                "route": route.name,
                "outcome": route.outcome,
                "text": value,
                "kind": kind,
                "key": key,
            })
    return points


def version_record(route_set: RouteSet, encoder_id: str, space: Space, points: int) -> dict[str, Any]:
    """The record that marks a version complete: everything that decides, and its point count."""
    head = route_set.head_bytes
    return {
        "record": VERSION,
        "set": route_set.name,
        "encoder": encoder_id,
        "space": space,
        "image_digests": {
            path: route_set.image_digest(path) for route in route_set.routes for path in route.images
        },
        "version": route_set.version,
        "definition": route_set.model_dump_json(),
        "head": base64.b64encode(head).decode("ascii") if head is not None else None,
        "lists": [item.model_dump(mode="json") for item in route_set.loaded_lists],
        "points": points,
        "synced_at": utcnow().isoformat(),
    }


PROMOTION = "promotion"  # the ``record`` field of an entry of the promotion log


def pointer_record(record: dict[str, Any], previous: str | None = None) -> dict[str, Any]:
    """The active pointer to a version: a copy of its record, marked active, naming the version before."""
    return {**record, "record": ACTIVE, "activated_at": utcnow().isoformat(), "previous": previous}


def promotion_record(set_name: str, encoder_id: str, version: str, previous: str | None,
                     evidence: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """An entry of the promotion log (its id and payload): which version became active, from which, why."""
    at = utcnow().isoformat()
    name = f"{PROMOTION}\x00{set_name}\x00{space_name(encoder_id)}\x00{at}"
    record_id = str(uuid.uuid5(_META_NAMESPACE, name))
    return record_id, {"record": PROMOTION, "set": set_name, "encoder": encoder_id, "version": version,
                       "previous": previous, "evidence": evidence, "at": at}


def route_set_of(record: dict[str, Any]) -> RouteSet:
    """The route set a record holds; refused when its content does not hash to the record's version."""
    route_set = RouteSet.model_validate_json(record["definition"])
    route_set._image_digests = dict(record.get("image_digests") or {})
    if record.get("head"):
        route_set._head_bytes = base64.b64decode(record["head"])
    try:
        route_set._lists = tuple(parse_list(item, f"the stored lists of {route_set.name!r}")
                                 for item in record.get("lists") or [])
    except ListError as exc:
        raise RouteStoreError(str(exc)) from None
    if route_set.version != record["version"]:
        stored = [name for name in ("head", "lists") if record.get(name)]
        what = "stored " + (" and ".join(stored) if stored else "definition")
        raise RouteStoreError(
            f"route set {route_set.name!r} version {record['version']}: its {what} hashes to version "
            f"{route_set.version}; sync the route file again"
        )
    return route_set


@dataclass(frozen=True)
class StoredVersion:
    """One complete version of a set in one encoder space."""

    version: str
    points: int
    synced_at: str
    active: bool
