"""Wire contracts: what producers send, what Sieve publishes.

These pydantic models are the source of truth; ``schemas/*.json`` are generated
from them (``sieve schemas export``) for producers in other languages, and a test
fails when the committed files drift.

The contracts only grow (docs/contracts.md): a change adds an optional field and
raises that contract's ``schema_version``; an existing field keeps its name, type
and meaning, and an enum keeps its values. What Sieve publishes (decisions, dead
letters) ignores fields it does not know when read back, so an older reader reads
a newer message. Events are Sieve's own input and refuse unknown fields: a
misspelt field name is an error, not a silently missing value.
"""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

NEEDS_REVIEW = "needs_review"

Modality = Literal["text", "image"]
DecidedBy = Literal["router", "llm"]
DecisionReason = Literal["accept", "ambiguous", "review_band", "no_match"]
RouteSetMode = Literal["single", "multi"]
Band = Literal["accept", "review"]
DeadLetterStage = Literal["decode", "validate", "encode", "decide", "publish"]

EventId = Annotated[str, Field(min_length=1, max_length=256)]

# The version of each contract. It goes up by one with each additive change (a new optional
# field); a reader accepts any version, and ignores what it does not know where it may.
EVENT_SCHEMA_VERSION = 1
# 2: novel, novelty; 3: list_hits, from_cache, review.reused;
# 4: mode, routes, categories, category_scores, final, review.routes, review.rejected_routes;
# 5: list_hits[].action; 6: review.moderator, review.moderator_note, review.overrides
DECISION_SCHEMA_VERSION = 6
DEAD_LETTER_SCHEMA_VERSION = 1
LABEL_SCHEMA_VERSION = 1
SCHEMA_VERSION_DOC = ("The contract version the writer followed; it grows by one with each additive "
                      "change (docs/contracts.md). Optional in input.")


_DECISION_NAMESPACE = uuid.UUID("6f1c8a52-7d0e-4f4a-9a49-3d2b0c2f5e11")
_DECISION_NAMESPACE_BYTES = _DECISION_NAMESPACE.bytes
_LABEL_NAMESPACE_BYTES = uuid.UUID("2d8f4b1e-93a7-4c55-b0e2-7a1c5d9e3f60").bytes
LabellerKind = Literal["llm", "human"]


def uuid5_str(namespace: bytes, name: str) -> str:
    """``str(uuid.uuid5(UUID(bytes=namespace), name))``, a third of the cost (it runs per event)."""
    digest = bytearray(hashlib.sha1(namespace + name.encode(), usedforsecurity=False).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = digest.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def utcnow() -> datetime:
    """Timezone-aware now, the only clock the contracts use."""
    return datetime.now(UTC)


class Event(BaseModel):
    """One item to decide, as a producer writes it to an input topic (JSON).

    The Kafka key should be the event id (or the tenant, where per-tenant order
    matters). ``id`` is producer-assigned and is what consumers deduplicate on.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: int = Field(default=EVENT_SCHEMA_VERSION, ge=1, description=SCHEMA_VERSION_DOC)
    id: EventId
    modality: Modality = "text"
    text: str | None = None
    image_b64: str | None = None
    image_uri: str | None = None
    tenant: str | None = Field(default=None, max_length=256)
    metadata: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime | None = None

    @model_validator(mode="after")
    def _payload_matches_modality(self) -> Event:
        if self.modality == "text":
            if self.text is None:
                raise ValueError("a text event needs 'text'")
            if self.image_b64 is not None or self.image_uri is not None:
                raise ValueError("a text event carries no image fields")
        else:
            if (self.image_b64 is None) == (self.image_uri is None):
                raise ValueError("an image event needs exactly one of 'image_b64', 'image_uri'")
            if self.text is not None:
                raise ValueError("an image event carries no 'text'")
        return self


class ImageRef(BaseModel):
    """What a decision carries of an image instead of its pixels."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    sha256: str
    uri: str | None = Field(default=None, description="The event's image_uri; null for inline images.")
    format: str
    width: int
    height: int
    bytes: int


class EventView(BaseModel):
    """The event as a decision carries it: everything but inline image bytes."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    id: EventId
    modality: Modality = "text"
    text: str | None = None
    image_uri: str | None = None
    tenant: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime | None = None

    @classmethod
    def of(cls, event: Event) -> EventView:
        """The view of an event (drops ``image_b64``)."""
        return cls(id=event.id, modality=event.modality, text=event.text, image_uri=event.image_uri,
                   tenant=event.tenant, metadata=event.metadata, created_at=event.created_at)


class RouteScore(BaseModel):
    """A route's aggregated similarity to the event."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    route: str
    outcome: str
    score: float


class NearestExample(BaseModel):
    """One of the route examples closest to the event (the reviewer reads these)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    id: str
    route: str
    text: str
    score: float


class Review(BaseModel):
    """What the LLM reviewer made of a ``needs_review`` decision (``decided_by: llm``, or a hand-off).

    On a verdict, the decision's ``outcome`` and ``route`` are the LLM's and the
    router's scores are kept. On a hand-off to human review, ``verdict`` is null
    (or the LLM's answer that was not used) and ``handoff_reason`` says why.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    model: str = Field(description="The LLM that was asked (or would have been).")
    verdict: str | None = Field(default=None, description="The outcome the LLM chose.")
    route: str | None = Field(default=None, description="The route the LLM chose; null for none.")
    confidence: float | None = Field(default=None, ge=0.0, le=1.0)
    rationale: str | None = None
    handoff_reason: str | None = Field(
        default=None,
        description="Set when the event went to human review: e.g. 'malformed_reply', "
        "'over_daily_token_budget', 'image_not_accepted'.",
    )
    error: str | None = Field(default=None, description="Detail of the hand-off reason.")
    router_decision_id: str = Field(description="The id of the needs_review decision reviewed.")
    tokens_in: int = 0
    tokens_out: int = 0
    attempts: int = Field(default=0, description="HTTP requests made for this review.")
    review_ms: float | None = Field(default=None, description="Time spent reviewing, waits included.")
    reused: bool | None = Field(
        default=None,
        description="True: the verdict of an earlier review of the same content under the same "
        "route-set version (no LLM call for this one).")
    routes: list[str] | None = Field(
        default=None, description="Multi-mode sets: the fired routes the reviewer confirmed.")
    rejected_routes: list[str] | None = Field(
        default=None, description="Multi-mode sets: the fired routes the reviewer rejected.")
    moderator: str | None = Field(
        default=None,
        description="Set on a moderator's verdict (the review console): who decided. Such a verdict keeps "
        "decided_by 'llm' (the review stage, so readers of earlier schema versions parse it) and the LLM's "
        "own answer, if it gave one, in verdict, route and rationale.")
    moderator_note: str | None = Field(default=None, description="The moderator's note, if any.")
    overrides: str | None = Field(
        default=None,
        description="A lead's override: the id of the verdict it replaces (both stay published).")


class ListHitRef(BaseModel):
    """A list entry that fired on the event (term, pattern or image hash)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    list: str = Field(description="The list's name.")
    entry: str = Field(description="The entry's id.")
    route: str | None = Field(default=None, description="The route the entry adds.")
    distance: int | None = Field(default=None, description="Image hash lists: the Hamming distance in bits.")
    action: Literal["accept", "review"] | None = Field(
        default=None, description="accept: the hit accepted its route; review: it held its route for review "
        "(a block list with `action: review`: the event never gets the default outcome automatically).")


class FiredRoute(BaseModel):
    """A route that fired on the event, in a route set with ``mode: multi``."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    route: str
    outcome: str
    score: float
    band: Band = Field(description="accept: at or over its accept threshold; review: in its review band "
                       "(or ambiguous).")
    ambiguous: bool = Field(default=False, description="Over its accept threshold but within its margin "
                            "of the best benign route: sent to review.")
    confirmed: bool | None = Field(default=None, description="Set on a reviewer's verdict: true when it "
                                   "confirms the route, false when it rejects it.")


class Decision(BaseModel):
    """What Sieve decided about one event; self-contained for consumers and the reviewer."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    schema_version: int = Field(default=DECISION_SCHEMA_VERSION, ge=1, description=SCHEMA_VERSION_DOC)
    id: str = Field(description="Deterministic: same event and route-set version, same id.")
    event_id: EventId
    outcome: str = Field(
        description="The route's outcome, the route set's default outcome, or 'needs_review'."
    )
    reason: DecisionReason
    route: str | None = Field(description="The route behind the outcome; null when none matched.")
    score: float
    margin: float = Field(description="Top route score minus the runner-up's.")
    scores: list[RouteScore]
    nearest: list[NearestExample]
    route_set: str
    route_set_version: str
    encoder: str
    decided_by: DecidedBy = "router"
    latency_ms: float | None = Field(
        default=None, description="From the event's Kafka timestamp to the decision."
    )
    decided_at: datetime
    modality: Modality
    event: EventView
    image: ImageRef | None = Field(default=None, description="For image events: the image, by reference.")
    source_topic: str | None = None
    review: Review | None = Field(default=None, description="Set by the LLM reviewer.")
    novel: bool | None = Field(
        default=None,
        description="Farther from every example of the route set than its novelty threshold: such an "
        "event never gets the set's default outcome automatically. Null when the set has no threshold.",
    )
    novelty: float | None = Field(
        default=None,
        description="1 - the best cosine similarity to any example of the route set (higher: less "
        "like anything the set knows). Null when the set has no novelty threshold.",
    )
    list_hits: list[ListHitRef] | None = Field(
        default=None,
        description="The list entries that fired (they decide before the encoder); null when none did.",
    )
    from_cache: bool | None = Field(
        default=None,
        description="True: decided earlier for the same content, route-set version and policy (a "
        "repeat within the cache's time to live); the id, event and times are this event's own.",
    )

    mode: RouteSetMode | None = Field(
        default=None, description="The route set's mode: single (one route decides) or multi (every "
        "route judged on its own). Null from writers before schema version 4.")
    routes: list[FiredRoute] | None = Field(
        default=None, description="Multi mode: every route that fired, best score first (the default-"
        "outcome route behind a default decision included). Null in single mode.")
    categories: dict[str, bool] | None = Field(
        default=None, description="Multi mode: per category (each route whose outcome is not the set's "
        "default), whether it accepted the event. Null in single mode.")
    category_scores: dict[str, float] | None = Field(
        default=None, description="Multi mode: per category, its score. Null in single mode.")
    final: bool | None = Field(
        default=None, description="True: the event's final decision (automatic, or a reviewer's "
        "verdict); false: it waits for review. Null from writers before schema version 4.")

    @staticmethod
    def make_id(event_id: str, route_set_version: str) -> str:
        """The decision id: a UUIDv5 of the event id and the route-set version."""
        return uuid5_str(_DECISION_NAMESPACE_BYTES, f"{event_id}\x00{route_set_version}")


class DeadLetter(BaseModel):
    """An input that could not be decided, with the original bytes and why."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    schema_version: int = Field(default=DEAD_LETTER_SCHEMA_VERSION, ge=1, description=SCHEMA_VERSION_DOC)
    id: str
    stage: DeadLetterStage
    reason: str = Field(description="Short machine-readable code, e.g. 'not_json'.")
    error: str = Field(description="Human-readable detail naming the failing field or step.")
    worker: str
    topology: str
    source_topic: str | None
    partition: int | None
    offset: int | None
    key_b64: str | None
    payload_b64: str = Field(description="The original bytes (or their head when truncated).")
    payload_size: int
    payload_sha256: str
    truncated: bool = False
    event_id: str | None = None
    failed_at: datetime

    @staticmethod
    def make_id(source_topic: str | None, partition: int | None, offset: int | None,
                payload_sha256: str) -> str:
        """Deterministic id: where the bytes came from, and their hash."""
        raw = f"{source_topic}\x00{partition}\x00{offset}\x00{payload_sha256}"
        return hashlib.sha256(raw.encode()).hexdigest()[:32]


class Label(BaseModel):
    """A final verdict as a labelled example, on the labels topic: what the router should have decided.

    Written for every final verdict of the LLM reviewer (and of a human moderator): the
    router learns from them (``sieve labels export`` writes the JSONL that ``eval``, ``fit``
    and ``routes build`` read). The id comes from the verdict's decision id, so a verdict
    published again gives the same label.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    schema_version: int = Field(default=LABEL_SCHEMA_VERSION, ge=1, description=SCHEMA_VERSION_DOC)
    id: str = Field(description="Deterministic: a UUIDv5 of the verdict's decision id.")
    event_id: EventId
    modality: Modality = "text"
    text: str | None = None
    image_uri: str | None = Field(default=None, description="The event's image reference, when it had one.")
    image_sha256: str | None = None
    tenant: str | None = None
    outcome: str = Field(description="The final outcome (a route's outcome or the set's default).")
    route: str | None = Field(default=None, description="The route behind the outcome; null for none.")
    routes: list[str] = Field(default_factory=list, description="Every route the verdict confirmed.")
    labeller_kind: LabellerKind = Field(description="llm: the LLM reviewer; human: a moderator.")
    labeller: str = Field(description="The model's name, or the person.")
    decision_id: str = Field(description="The id of the verdict's decision.")
    router_decision_id: str = Field(description="The id of the router's needs_review decision it settles.")
    router_outcome: str | None = Field(default=None, description="What the router decided: needs_review, "
                                       "or an automatic outcome for an audit (review.audit_share).")
    router_route: str | None = None
    route_set: str
    route_set_version: str = Field(description="The route-set version the label corrects.")
    labelled_at: datetime
    note: str | None = None

    @staticmethod
    def make_id(decision_id: str) -> str:
        """The label id of a verdict: a UUIDv5 of its decision id."""
        return uuid5_str(_LABEL_NAMESPACE_BYTES, decision_id)

    @classmethod
    def of_verdict(cls, verdict: Decision, router: Decision, labelled_at: datetime | None = None) -> Label:
        """The label of a reviewer's final verdict (``verdict``) on the decision it settles (``router``).

        ``router`` is the router's needs_review decision for the LLM reviewer's verdicts, the
        reviewer's hand-off for a moderator's (``review.moderator`` set: a human label).
        """
        review = verdict.review
        if review is None or verdict.decided_by == "router":
            raise ValueError("a label comes from a reviewer's verdict, not a router decision")
        routes = review.routes if review.routes is not None else (
            [verdict.route] if verdict.route is not None else [])
        human = review.moderator is not None
        return cls(
            id=cls.make_id(verdict.id), event_id=verdict.event_id, modality=verdict.modality,
            text=verdict.event.text, image_uri=verdict.event.image_uri,
            image_sha256=verdict.image.sha256 if verdict.image is not None else None,
            tenant=verdict.event.tenant, outcome=verdict.outcome, route=verdict.route, routes=routes,
            labeller_kind="human" if human else "llm", labeller=review.moderator or review.model,
            decision_id=verdict.id, router_decision_id=review.router_decision_id if human else router.id,
            router_outcome=router.outcome, router_route=router.route,
            route_set=verdict.route_set, route_set_version=verdict.route_set_version,
            labelled_at=labelled_at or verdict.decided_at, note=review.moderator_note,
        )
