"""Topologies: the declarative pipeline one worker runs.

A topology binds input topics, a route set, an encoder, batching, threshold
overrides and the mapping from outcomes to output topics. The Faust app and its
topics are built from it (:mod:`sieve.worker.app`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sieve.contracts import SCHEMA_VERSION_DOC
from sieve.routeset import NAME_PATTERN, RouteSet, load_route_set
from sieve.tenants import DEFAULT_TENANT_LABEL as DEFAULT_TENANT_LABEL  # re-exported
from sieve.tenants import RouteSetRef as RouteSetRef
from sieve.tenants import TenantPolicy as TenantPolicy
from sieve.tenants import TenantsSpec as TenantsSpec
from sieve.thresholds import ThresholdOverrides

TOPIC_PATTERN = r"^[A-Za-z0-9._\-]{1,249}$"
TopicName = Annotated[str, Field(pattern=TOPIC_PATTERN)]
# The topology file format's version: up by one with each additive change (a new optional field).
TOPOLOGY_SCHEMA_VERSION = 5  # 2: tenants; 3: shadow; 4: review.audit_*; 5: review.shadow_audit_share


class TopologyError(ValueError):
    """A topology file that cannot be used; the message names the file and field."""


class TopologyRouteSetRef(RouteSetRef):
    """The topology's own route set; ``shadow``: a stored version of it decided beside the active one.

    The shadow decides the same encoded text events as the active version, never for real:
    its agreement, automatic and novel shares are metrics, its disagreements go to
    ``output.shadow_topic`` (:mod:`sieve.flow.shadow`, docs/routes.md). Tenants' sets have none.
    """

    shadow: str | None = Field(default=None, pattern=r"^[A-Za-z0-9._\-]{1,128}$")


class InputSpec(BaseModel):
    """Where events come from."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    topics: list[TopicName] = Field(min_length=1)
    partitions: int = Field(default=4, ge=1, le=10_000)
    replication_factor: int = Field(default=1, ge=1, le=16)


class EncoderSpec(BaseModel):
    """The text encoder.

    ``sentence-transformers`` with ``model`` null loads the bundled
    all-MiniLM-L6-v2; ``trivial`` is a hashing encoder with no model, for
    measuring the streaming machinery alone.

    ``backend`` (sentence-transformers only) runs the model with ``torch`` (fp32
    on CPU, fp16 on CUDA), ``onnx`` (fp32 ONNX Runtime on the CPU: torch's vectors,
    faster), ``onnx-int8`` (ONNX Runtime with int8 attention
    weights, every row at cosine >= 0.99 to fp32), ``openvino`` (the same export on
    OpenVINO, bf16 on CPUs with AVX512-BF16 or AMX, f32 elsewhere: torch's vectors to
    cosine >= 0.9999), ``openvino-int8`` (OpenVINO, every matmul int8, activations per
    token group: cosine >= 0.99, the fastest on the CPU) or ``auto`` (the default:
    torch on CUDA, openvino on the CPU). The ONNX models are exported on first use and
    cached on disk (settings ``onnx_cache_dir``); load-tests/bench_encoders.py
    measures them. torch, onnx, openvino and auto share one vector space (encoder id
    ``st:<model>``); each int8 recipe is its own (``st:<model>+onnx-int8``,
    ``+openvino-int8``): route vectors, fitted thresholds and heads are kept per space,
    so sync with the topology (``sieve routes sync --topology``) and fit with the
    backend it runs (``sieve fit --backend openvino-int8``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["sentence-transformers", "trivial"] = "sentence-transformers"
    backend: Literal["auto", "torch", "onnx", "onnx-int8", "openvino", "openvino-int8"] = "auto"
    model: str | None = None
    batch_size: int = Field(default=64, ge=1, le=4096)
    max_seq_length: int | None = Field(default=None, ge=8, le=8192)


class ImageEncoderSpec(BaseModel):
    """The image encoder: an open_clip model.

    ``model`` is an open_clip model name (``ViT-B-32``) with ``pretrained`` a tag
    (``laion2b_s34b_b79k``), or ``local-dir:/abs/path`` holding
    ``open_clip_config.json`` + ``open_clip_model.safetensors`` (``pretrained`` null).
    Relative ``local-dir:`` paths resolve against the topology file.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["open_clip"] = "open_clip"
    model: str = "ViT-B-32"
    pretrained: str | None = "laion2b_s34b_b79k"
    batch_size: int = Field(default=32, ge=1, le=4096)


class BatchingSpec(BaseModel):
    """How events are gathered: up to ``max_events``, or what came in ``max_wait_s``.

    ``max_wait_s`` counts from the batch's first event's timestamp (its Kafka
    record time), not from when the worker started gathering: an event that
    already waited while the previous batch was encoded closes its batch at
    once, with whatever else is queued. A clock ahead of the worker's cannot
    make it wait longer than ``max_wait_s`` after the worker takes the event.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_events: int = Field(default=256, ge=1, le=100_000)
    max_wait_s: float = Field(default=0.2, gt=0, le=60)


class LimitsSpec(BaseModel):
    """Input limits; an event over them goes to the dead-letter topic."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_text_chars: int = Field(default=8000, ge=1)
    max_event_bytes: int = Field(default=1_000_000, ge=64)
    # A dead letter whose payload is larger carries a truncated copy plus size and hash.
    max_dead_letter_payload_bytes: int = Field(default=512_000, ge=64)
    # Images: encoded size (inline or downloaded), pixels (decompression bombs), formats.
    max_image_bytes: int = Field(default=10_000_000, ge=64)
    max_image_pixels: int = Field(default=40_000_000, ge=64)
    max_image_frames: int = Field(default=1000, ge=1)
    image_formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP")


class OutputSpec(BaseModel):
    """Which outcome goes to which topic."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Explicit outcome -> topic pairs, e.g. {clean: sieve.clean, needs_review: sieve.needs-review}.
    outcome_topics: dict[str, TopicName] = Field(default_factory=dict)
    # For outcomes not listed: a template with {outcome}, e.g. "support.{outcome}". Null: none.
    outcome_topic_template: str | None = None
    # Every decision with a route also goes to <prefix><route>; null turns it off.
    route_topic_prefix: str | None = "route."
    dead_letter_topic: TopicName = "sieve.dead-letter"
    # Where a shadow version's disagreements with the active one go (route_set.shadow); null: nowhere.
    shadow_topic: TopicName | None = None
    partitions: int = Field(default=4, ge=1, le=10_000)
    replication_factor: int = Field(default=1, ge=1, le=16)

    def topic_for(self, outcome: str) -> str:
        """The topic a decision with this outcome goes to."""
        topic = self.outcome_topics.get(outcome)
        if topic is None and self.outcome_topic_template is not None:
            topic = self.outcome_topic_template.format(outcome=outcome.replace("_", "-"))
        if topic is None:
            raise KeyError(f"no output topic for outcome {outcome!r}")
        return topic


class ReviewSpec(BaseModel):
    """The LLM reviewer of this topology's needs-review topic (``sieve review``).

    Token budgets count prompt plus completion tokens. ``daily_token_budget`` is
    per reviewer process (a UTC day): the cluster's budget is the sum over replicas.
    What is over a budget goes to ``human_review_topic``, never dropped.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Null: the topic the needs_review outcome maps to in ``output``.
    input_topic: TopicName | None = None
    # Null: "<the topology's consumer group>-review".
    group_id: str | None = None
    human_review_topic: TopicName = "sieve.human-review"
    # Every final verdict as a labelled example (sieve.contracts.Label); null: none published.
    labels_topic: TopicName | None = "sieve.labels"
    batching: BatchingSpec = BatchingSpec(max_events=32, max_wait_s=0.5)
    max_concurrency: int = Field(default=8, ge=1, le=1024)
    max_reviews_per_s: float = Field(default=10.0, gt=0)
    # Sent as the completion limit of each request.
    max_output_tokens: int = Field(default=300, ge=16)
    # Estimated prompt tokens + max_output_tokens; a review that would need more is handed off.
    max_tokens_per_review: int = Field(default=8000, ge=64)
    # Null: no daily limit.
    daily_token_budget: int | None = Field(default=5_000_000, ge=1)
    # A verdict below this confidence goes to human review (with the LLM's answer attached).
    min_confidence: float = Field(default=0.0, ge=0.0, le=1.0)
    # Image events: attached to the request when true, else handed to human review.
    accepts_images: bool = False
    # Nearest route examples (carried in the decision) shown to the LLM.
    max_examples: int = Field(default=8, ge=0, le=100)
    # Audit: this share of the router's automatic decisions (chosen by decision id) is also
    # copied to audit_topic; the reviewer labels them (labels_topic) and publishes no verdict.
    # The labels then cover what the router decides alone, not only what it was unsure of.
    audit_share: float = Field(default=0.0, ge=0.0, le=1.0)
    audit_topic: TopicName = "sieve.audit"
    shadow_audit_share: float = Field(default=0.0, ge=0.0, le=1.0)

    @property
    def audits(self) -> bool:
        """Audits on: audit_share, or shadow_audit_share (of what route_set.shadow decides otherwise)."""
        return self.audit_share > 0 or self.shadow_audit_share > 0


class Topology(BaseModel):
    """One worker's pipeline."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: int = Field(default=TOPOLOGY_SCHEMA_VERSION, ge=1, description=SCHEMA_VERSION_DOC)
    name: str = Field(pattern=NAME_PATTERN)
    group_id: str | None = None
    input: InputSpec
    route_set: TopologyRouteSetRef
    encoder: EncoderSpec = EncoderSpec()
    # Set to route image events; without it they go to the dead-letter topic.
    image_encoder: ImageEncoderSpec | None = None
    batching: BatchingSpec = BatchingSpec()
    limits: LimitsSpec = LimitsSpec()
    thresholds: ThresholdOverrides | None = None
    image_thresholds: ThresholdOverrides | None = None
    output: OutputSpec
    # The LLM reviewer of the needs-review topic; null: `sieve review` runs with the defaults.
    review: ReviewSpec | None = None
    # Per-tenant route sets and thresholds (docs/tenants.md); null: every event is decided alike.
    tenants: TenantsSpec | None = None

    @property
    def modalities(self) -> frozenset[str]:
        """The event modalities this topology decides."""
        return frozenset({"text", "image"} if self.image_encoder is not None else {"text"})

    @property
    def consumer_group(self) -> str:
        """The Kafka consumer group (Faust app id) of this topology's workers."""
        return self.group_id or f"sieve-{self.name}"

    @model_validator(mode="after")
    def _one_file_per_route_set(self) -> Topology:
        if self.tenants is not None:
            self.tenants.check_files(self.route_set)
        return self

    def tenant_route_sets(self) -> list[RouteSetRef]:
        """The distinct route sets this topology decides with: its own first, then each tenant's."""
        if self.tenants is None:
            return [self.route_set]
        return self.tenants.distinct_route_sets(self.route_set)

    def tenant_route_set(self, policy: str | None) -> RouteSetRef:
        """The route set a tenant policy (None: the topology's own) matches against."""
        return self.route_set if self.tenants is None else self.tenants.route_set_of(policy, self.route_set)

    def tenants_using(self, set_name: str) -> list[str]:
        """The tenant policies that match against the route set ``set_name``."""
        policies = self.tenants.policies if self.tenants is not None else {}
        return [name for name in policies if self.tenant_route_set(name).name == set_name]

    def tenant_overrides(
        self, policy: str | None
    ) -> tuple[ThresholdOverrides | None, dict[str, ThresholdOverrides]]:
        """A tenant policy's text-space overrides: set-wide (topology < tenant) and per route."""
        if self.tenants is None:
            return self.thresholds, {}
        return self.tenants.overrides(policy, self.thresholds)

    def check_tenant_routes(self, policy: str | None, route_set: RouteSet) -> None:
        """Raise :class:`TopologyError` if a tenant's per-route thresholds name a route the set lacks."""
        unknown = self.tenants.unknown_routes(policy, route_set) if self.tenants is not None else []
        if unknown:
            raise TopologyError(
                f"topology {self.name!r}, field 'tenants.policies.{policy}.thresholds': route(s) "
                f"{', '.join(unknown)} are not in route set {route_set.name!r}"
            )

    def check_outcomes(self, route_set: RouteSet, *more: RouteSet) -> None:
        """Raise :class:`TopologyError` if some outcome of the sets (the tenants' too) has no topic."""
        for one in (route_set, *more):
            self._check_outcomes(one)

    def _check_outcomes(self, route_set: RouteSet) -> None:
        missing = []
        for outcome in sorted(route_set.outcomes):
            try:
                self.output.topic_for(outcome)
            except KeyError:
                missing.append(outcome)
        bad = [t for t in self.output_topics(route_set, check=False) if not re.match(TOPIC_PATTERN, t)]
        if bad:
            raise TopologyError(
                f"topology {self.name!r}: output topic name(s) {', '.join(bad)} are not legal "
                "Kafka topic names (letters, digits, '.', '_', '-')"
            )
        if missing:
            raise TopologyError(
                f"topology {self.name!r}: output has no topic for outcome(s) "
                f"{', '.join(missing)} of route set {route_set.name!r}; add them to "
                "output.outcome_topics or set output.outcome_topic_template"
            )

    def output_topics(self, route_set: RouteSet, *more: RouteSet, check: bool = True) -> list[str]:
        """Every topic this topology may write to, for creating them up front (``more``: tenants' sets)."""
        if check:
            self.check_outcomes(route_set, *more)
        topics = set()
        for one in (route_set, *more):
            for outcome in one.outcomes:
                try:
                    topics.add(self.output.topic_for(outcome))
                except KeyError:
                    continue
            if self.output.route_topic_prefix is not None:
                topics |= {self.output.route_topic_prefix + r.name for r in one.routes}
        topics.add(self.output.dead_letter_topic)
        if self.output.shadow_topic is not None:
            topics.add(self.output.shadow_topic)
        if self.review is not None and self.review.audits:
            topics.add(self.review.audit_topic)
        return sorted(topics)


def _resolved(ref: RouteSetRef, topology_file: Path) -> RouteSetRef:
    """A route-set reference whose relative file is made absolute against the topology file."""
    if ref.file is not None and not ref.file.is_absolute():
        return ref.model_copy(update={"file": (topology_file.parent / ref.file).resolve()})
    return ref


def load_topology(path: str | Path) -> Topology:
    """Read and validate a topology YAML; the route-set file paths (tenants' too) are made absolute."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise TopologyError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise TopologyError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise TopologyError(f"{path}: a topology is a mapping")
    try:
        topology = Topology.model_validate(data)
    except ValidationError as exc:
        lines = [
            f"{path}: field {'.'.join(str(p) for p in err['loc'])!r}: {err['msg']}"
            for err in exc.errors()
        ]
        raise TopologyError("\n".join(lines)) from None
    topology = topology.model_copy(update={"route_set": _resolved(topology.route_set, path)})
    if topology.tenants is not None:
        policies = {
            name: policy if policy.route_set is None
            else policy.model_copy(update={"route_set": _resolved(policy.route_set, path)})
            for name, policy in topology.tenants.policies.items()
        }
        topology = topology.model_copy(update={"tenants": topology.tenants.model_copy(
            update={"policies": policies})})
    spec = topology.image_encoder
    if spec is not None and spec.model.startswith("local-dir:"):
        local = Path(spec.model.removeprefix("local-dir:"))
        if not local.is_absolute():
            spec = spec.model_copy(update={"model": f"local-dir:{(path.parent / local).resolve()}"})
            topology = topology.model_copy(update={"image_encoder": spec})
    return topology


def _load_checked(topology: Topology, ref: RouteSetRef, whose: str) -> RouteSet:
    """The set ``ref`` names, from its file, checked against the outputs and its tenants' overrides."""
    if ref.file is None:
        raise TopologyError(f"topology {topology.name!r}: route set {ref.name!r} of {whose} names no file "
                            "(route_set.file)")
    route_set = load_route_set(ref.file)
    if route_set.name != ref.name:
        raise TopologyError(
            f"topology {topology.name!r}: {whose} expects route set {ref.name!r}, "
            f"but {ref.file} defines {route_set.name!r}"
        )
    topology.check_outcomes(route_set)
    for policy in topology.tenants_using(route_set.name):
        topology.check_tenant_routes(policy, route_set)
    return route_set


def load_topology_route_set(topology: Topology) -> RouteSet:
    """The route set named by the topology's file, checked against its outputs."""
    return _load_checked(topology, topology.route_set, "the topology")


def load_tenant_route_sets(topology: Topology) -> list[RouteSet]:
    """The tenants' route sets other than the topology's own, from their files, each checked.

    A tenant set without a file, or whose file defines another name, is refused; so
    is a tenant's per-route threshold naming a route its set lacks.
    """
    return [_load_checked(topology, ref, "tenant(s) " + ", ".join(topology.tenants_using(ref.name)))
            for ref in topology.tenant_route_sets()[1:]]

