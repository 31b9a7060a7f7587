"""Per-tenant policies of a topology: which route set and thresholds decide a tenant's events.

A topology's optional ``tenants`` (docs/tenants.md)::

    tenants:
      default: forum      # no/unknown/invalid tenant; null: the topology's own set and thresholds
      policies:
        kids:  {route_set: {name: moderation-strict, file: ../routes/moderation-strict.yaml}}
        forum: {thresholds: {violence: {accept: 0.7}}, defaults: {review: 0.45}}

Text thresholds, lowest precedence first: the set's defaults < the topology's
``thresholds`` < the tenant's ``defaults`` < the route's own < the tenant's per-route
``thresholds``. Image events use the topology's ``image_thresholds``.
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from sieve.routeset import NAME_PATTERN, RouteSet
from sieve.thresholds import ThresholdOverrides

# The metrics label of an event with no tenant, or a tenant no policy is named after.
DEFAULT_TENANT_LABEL = "_default"


class RouteSetRef(BaseModel):
    """Which route set to match against: its name in the store, and its file for syncing."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=NAME_PATTERN)
    file: Path | None = None


class TenantPolicy(BaseModel):
    """What one tenant's events are decided with.

    ``route_set``: the set to match against (null: the topology's). ``defaults``:
    overrides of the whole set's text thresholds, over the topology's ``thresholds``.
    ``thresholds``: per-route overrides (route name -> overrides), over the route's own.
    Both apply in the text space.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    route_set: RouteSetRef | None = None
    thresholds: dict[str, ThresholdOverrides] = Field(default_factory=dict)
    defaults: ThresholdOverrides | None = None


class TenantsSpec(BaseModel):
    """Per-tenant policies, chosen by each event's ``tenant`` field.

    ``default`` names the policy of an event with no tenant, a tenant not in
    ``policies``, or one that is not a valid name; null: the topology's own route
    set and thresholds.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    default: str | None = None
    policies: dict[str, TenantPolicy] = Field(default_factory=dict)

    @field_validator("policies")
    @classmethod
    def _policy_names(cls, policies: dict[str, TenantPolicy]) -> dict[str, TenantPolicy]:
        bad = [name for name in policies if not re.match(NAME_PATTERN, name)]
        if bad:
            raise ValueError(
                f"tenant name(s) {', '.join(repr(n) for n in bad)} are not valid: lower-case letters, "
                "digits, '_' and '-', starting with a letter or digit, at most 64 characters"
            )
        return policies

    @model_validator(mode="after")
    def _default_is_a_policy(self) -> TenantsSpec:
        if self.default is not None and self.default not in self.policies:
            raise ValueError(
                f"tenants.default {self.default!r} names no policy (policies: "
                f"{', '.join(sorted(self.policies)) or 'none'})"
            )
        return self

    def policy_for(self, tenant: str | None) -> str | None:
        """The policy an event's tenant is decided with (None: the topology's own)."""
        if tenant is not None and tenant in self.policies:
            return tenant
        return self.default

    def label_for(self, tenant: str | None) -> str:
        """The bounded metrics label of a tenant: its name when a policy has it, else ``_default``."""
        if tenant is not None and tenant in self.policies:
            return tenant
        return DEFAULT_TENANT_LABEL

    def route_set_of(self, policy: str | None, own: RouteSetRef) -> RouteSetRef:
        """The route set a policy (None: the topology's own, ``own``) matches against."""
        if policy is None:
            return own
        return self.policies[policy].route_set or own

    def distinct_route_sets(self, own: RouteSetRef) -> list[RouteSetRef]:
        """``own`` first, then each other route set a policy names (by name, first seen)."""
        refs: dict[str, RouteSetRef] = {own.name: own}
        for policy in self.policies.values():
            ref = policy.route_set
            if ref is not None and (ref.name not in refs or refs[ref.name].file is None):
                refs[ref.name] = refs[ref.name] if ref.name == own.name else ref
        return list(refs.values())

    def check_files(self, own: RouteSetRef) -> None:
        """Refuse one route-set name read from two files."""
        files: dict[str, Path | None] = {own.name: own.file}
        for tenant, policy in self.policies.items():
            ref = policy.route_set
            if ref is None:
                continue
            known = files.get(ref.name)
            if known is not None and ref.file is not None and known != ref.file:
                raise ValueError(f"tenants.policies.{tenant}.route_set: route set {ref.name!r} is already "
                                 f"read from {known}, not {ref.file}: one name, one file")
            files.setdefault(ref.name, ref.file)
            if files[ref.name] is None:
                files[ref.name] = ref.file

    def overrides(
        self, policy: str | None, base: ThresholdOverrides | None
    ) -> tuple[ThresholdOverrides | None, dict[str, ThresholdOverrides]]:
        """A policy's text overrides: set-wide (``base``, the topology's, < the tenant's) and per route."""
        if policy is None:
            return base, {}
        tenant = self.policies[policy]
        if tenant.defaults is None:
            return base, dict(tenant.thresholds)
        merged = {**(base.model_dump(exclude_none=True) if base is not None else {}),
                  **tenant.defaults.model_dump(exclude_none=True)}
        return ThresholdOverrides(**merged), dict(tenant.thresholds)

    def unknown_routes(self, policy: str | None, route_set: RouteSet) -> list[str]:
        """The routes a policy's per-route thresholds name that ``route_set`` lacks."""
        if policy is None:
            return []
        names = {route.name for route in route_set.routes}
        return sorted(set(self.policies[policy].thresholds) - names)
