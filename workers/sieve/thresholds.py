"""Thresholds: when a route's score accepts, goes to review, or is too close to call.

A route set's defaults, a topology's overrides and a route's own values merge in
that order (:meth:`sieve.routeset.RouteSet.thresholds_for`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)


class Aggregation(BaseModel):
    """How a route's score is made from its examples' cosine similarities."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["max", "top_k_mean"] = "max"
    k: int = Field(default=3, ge=1, le=100)


class Thresholds(BaseModel):
    """A full set of thresholds (the route set's defaults)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    accept: float = Field(default=0.55, ge=-1.0, le=1.0)
    review: float = Field(default=0.40, ge=-1.0, le=1.0)
    margin: float = Field(default=0.04, ge=0.0, le=2.0)

    @model_validator(mode="after")
    def _review_below_accept(self) -> Thresholds:
        if self.review > self.accept:
            raise ValueError(f"review ({self.review}) must not exceed accept ({self.accept})")
        return self


class ThresholdOverrides(BaseModel):
    """A route's (or a topology's) overrides of the route set's defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    accept: float | None = Field(default=None, ge=-1.0, le=1.0)
    review: float | None = Field(default=None, ge=-1.0, le=1.0)
    margin: float | None = Field(default=None, ge=0.0, le=2.0)

    def over(self, base: Thresholds) -> Thresholds:
        """These overrides applied on top of ``base``."""
        return base.model_copy(update=self.model_dump(exclude_none=True))


class Novelty(BaseModel):
    """When an event is *novel*: farther from every example of the set than calibration traffic.

    An event's novelty is ``1 -`` its best cosine similarity to any example of the set
    (every route's, default-outcome routes included): :func:`sieve.flow.decide.novelty_scores`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    # An event whose novelty is above this is novel. `sieve fit` sets it from calibration data.
    threshold: float = Field(ge=0.0, le=2.0)
    # The share of calibration events that were novel when fitted: the drift alert's reference.
    baseline: float | None = Field(default=None, ge=0.0, le=1.0)
    # needs_review: a novel event never gets the set's default outcome automatically.
    # default: the set declares novel events safe (only when `sieve fit` showed it on held-out data).
    on_novel: Literal["needs_review", "default"] = "needs_review"


class RouteDefaults(Thresholds):
    """The set's default thresholds plus the score aggregation."""

    aggregation: Aggregation = Aggregation()
    # What an event that is not novel but far from every route gets (no route accepts it, none
    # has it in its review band): the set's default outcome, or needs_review. `sieve fit` chooses it.
    no_match: Literal["default", "needs_review"] = "default"
    # None: no novelty threshold (no event is flagged novel).
    novelty: Novelty | None = None
    # None: off. A number: an event gets the set's default outcome automatically only when its
    # best default-outcome route scores at least this much above its best route of any other
    # outcome (clean because close to clean examples, not because far from violating ones).
    default_lead: float | None = Field(default=None, ge=0.0, le=2.0)

    @model_serializer(mode="wrap")
    def _without_unset_options(self, handler: SerializerFunctionWrapHandler) -> dict[str, object]:
        """Unset novelty and lead left out: defaults dump (and hash) as before these existed."""
        data: dict[str, object] = handler(self)
        for key in ("novelty", "default_lead"):
            if data.get(key, False) is None:
                del data[key]
        return data

    @property
    def thresholds(self) -> Thresholds:
        """Just the thresholds."""
        return Thresholds(accept=self.accept, review=self.review, margin=self.margin)
