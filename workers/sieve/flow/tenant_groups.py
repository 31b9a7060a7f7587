"""Tenant groups: the route index, policy and head each tenant policy decides with, per space.

A topology with ``tenants`` (:mod:`sieve.tenants`) decides each event with its
tenant's policy; :class:`~sieve.flow.pipeline.RouterPipeline` keeps one
:class:`TenantGroup` per policy (and one for the topology's own, ``policy`` None),
encodes a batch's events together, matches once per distinct route index and decides
per group. Groups that share a route set share its index.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TypeVar

import numpy as np

from sieve.encoders.base import ImageEncoder, TextEncoder
from sieve.flow.decide import Policy
from sieve.flow.head import LearnedHead, head_of
from sieve.flow.match import MatchResult, RouteIndex
from sieve.routeset import Space
from sieve.topology import Topology, TopologyError

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True)
class Active:
    """What one space's events of a group are decided with."""

    index: RouteIndex
    policy: Policy
    head: LearnedHead | None  # the version's own head (checked by head_of), or None


@dataclass(frozen=True)
class TenantGroup:
    """One tenant policy (None: the topology's own) with its per-space :class:`Active`."""

    policy: str | None
    # The policy part of the repeat cache's keys: no two groups share a cached decision.
    cache_policy: str
    active: dict[Space, Active]


def cache_policy(topology: Topology, policy: str | None) -> str:
    """The repeat cache's policy part: the topology's name, ``+<tenant policy>`` for a tenant's."""
    return topology.name if policy is None else f"{topology.name}+{policy}"


def activate(topology: Topology, policy: str | None, index: RouteIndex, space: Space,
             encoder: TextEncoder | ImageEncoder | None) -> Active:
    """A group's :class:`Active` in a space; raises if the index does not fit the encoder or the topology."""
    if index.space != space or encoder is None or index.encoder_id != encoder.id:
        whose = f"tenant {policy!r}: " if policy is not None else ""
        raise ValueError(
            f"{whose}route index of {index.route_set.name!r} ({index.space} space, encoded with "
            f"{index.encoder_id!r}) does not fit the worker's {space} encoder "
            f"{getattr(encoder, 'id', None)!r}: sync the route set with this encoder"
        )
    topology.check_outcomes(index.route_set)
    if space == "text":
        topology.check_tenant_routes(policy, index.route_set)
        overrides, per_route = topology.tenant_overrides(policy)
    else:  # tenants' thresholds are text thresholds
        overrides, per_route = topology.image_thresholds, {}
    decided_by = Policy.for_index(index, overrides, per_route or None)
    crossed = np.flatnonzero(decided_by.review > decided_by.accept)
    if crossed.size:
        route = index.routes[int(crossed[0])].name
        raise TopologyError(
            f"topology {topology.name!r}, tenant {policy!r}: route {route!r} of {index.route_set.name!r} "
            f"has review ({decided_by.review[crossed[0]]:.4g}) above accept "
            f"({decided_by.accept[crossed[0]]:.4g}) once the tenant's thresholds are merged"
        )
    return Active(index, decided_by, head_of(index))


def build_groups(
    topology: Topology, own: Mapping[Space, RouteIndex],
    tenant_indexes: Mapping[tuple[str, Space], RouteIndex],
    encoders: Mapping[Space, TextEncoder | ImageEncoder | None],
) -> dict[str | None, TenantGroup]:
    """Every group: the topology's own (key None) over ``own``, then each tenant policy's.

    A tenant's route set is found in ``tenant_indexes`` by ``(set name, space)`` (the
    topology's own set in ``own``). In the text space it must be there; in the image
    space a tenant whose set has no image index uses the topology's.
    """
    groups: dict[str | None, TenantGroup] = {None: TenantGroup(
        None, cache_policy(topology, None),
        {space: activate(topology, None, index, space, encoders.get(space)) for space, index in own.items()},
    )}
    if topology.tenants is None:
        return groups
    available = dict(tenant_indexes)
    for space, index in own.items():
        available[(index.route_set.name, space)] = index
        available[(topology.route_set.name, space)] = index
    for policy in topology.tenants.policies:
        name = topology.tenant_route_set(policy).name
        active: dict[Space, Active] = {}
        for space, fallback in own.items():
            found = available.get((name, space))
            if found is None and space == "text":
                raise ValueError(f"tenant {policy!r}: no route index for its route set {name!r} in the text "
                                 "space: sync the route set (`sieve routes sync --topology`)")
            active[space] = activate(topology, policy, found if found is not None else fallback, space,
                                     encoders.get(space))
        groups[policy] = TenantGroup(policy, cache_policy(topology, policy), active)
    return groups


def swap_groups(topology: Topology, groups: Mapping[str | None, TenantGroup], index: RouteIndex,
                encoders: Mapping[Space, TextEncoder | ImageEncoder | None]) -> dict[str | None, TenantGroup]:
    """The groups with ``index`` in place of every index of its set's name in its space.

    An index whose set no group uses replaces the topology's own (as before tenants).
    Nothing changes unless every affected group accepts it.
    """
    space, name = index.space, index.route_set.name
    targets = [key for key, group in groups.items()
               if space in group.active and group.active[space].index.route_set.name == name]
    if not targets:
        targets = [None]
    swapped = dict(groups)
    for key in targets:
        group = groups[key]
        active = {**group.active, space: activate(topology, group.policy, index, space, encoders.get(space))}
        swapped[key] = TenantGroup(group.policy, group.cache_policy, active)
    return swapped


def positions_by(keys: Sequence[K]) -> dict[K, list[int]]:
    """Positions grouped by key, keys in order of first appearance, positions ascending."""
    grouped: dict[K, list[int]] = {}
    for position, key in enumerate(keys):
        grouped.setdefault(key, []).append(position)
    return grouped


def take_rows(match: MatchResult, rows: Sequence[int]) -> MatchResult:
    """The match of a subset of its events (``rows``: positions in ``match``)."""
    at = np.asarray(rows, dtype=np.intp)
    return replace(match, route_scores=match.route_scores[at], nearest_index=match.nearest_index[at],
                   nearest_score=match.nearest_score[at])
