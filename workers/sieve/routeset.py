"""Route sets: named routes of example utterances, their outcomes and thresholds.

A route set is written in YAML (see ``routes/*.yaml``)::

    schema_version: 1               # optional: the file format (docs/contracts.md)
    name: moderation
    default_outcome: clean          # when no route matches
    defaults:
      aggregation: {method: top_k_mean, k: 3}
      accept: 0.55                  # score >= accept: the route's outcome
      review: 0.40                  # review <= score < accept: needs_review
      margin: 0.04                  # top two differ in outcome by less: needs_review
      no_match: default             # far from every example: default outcome (or needs_review)
      novelty: {threshold: 0.62, baseline: 0.05}  # novel (novelty above it): never the default outcome
    lists: [lists/slurs.yaml]       # optional: term, pattern and image hash lists (sieve.lists)
    routes:
      - name: hate
        outcome: violating
        policy: What the category covers (the LLM reviewer reads it).
        thresholds: {accept: 0.6}   # optional, overrides the defaults
        utterances: ["...", "..."]
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SerializerFunctionWrapHandler,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from sieve.contracts import NEEDS_REVIEW, SCHEMA_VERSION_DOC
from sieve.lists import HashList, ListError, TermList, content_bytes, load_lists
from sieve.thresholds import Aggregation, RouteDefaults, ThresholdOverrides, Thresholds

NAME_PATTERN = r"^[a-z0-9][a-z0-9_\-]{0,63}$"
# The route-set file format's version: up by one with each additive change (a new optional field).
ROUTE_SET_SCHEMA_VERSION = 4  # 2: defaults.novelty; 3: lists; 4: mode, severity
# Fields of a route set that are not its content: its version hash and equality leave them out.
_NOT_CONTENT = {"schema_version"}

Space = Literal["text", "image"]
Mode = Literal["single", "multi"]
ExampleKind = Literal["utterance", "prompt", "image"]


class RouteSetError(ValueError):
    """A route file that cannot be used; the message names file, route and field."""


def head_path_for(route_file: str | Path) -> Path:
    """Where a route file's learned head lives: ``x.yaml`` -> ``x.head.npz`` (:mod:`sieve.flow.head`)."""
    return Path(route_file).with_name(Path(route_file).stem + ".head.npz")


class Route(BaseModel):
    """One route: a named set of examples with an outcome."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=NAME_PATTERN)
    outcome: str = Field(pattern=NAME_PATTERN)
    policy: str | None = None
    thresholds: ThresholdOverrides | None = None
    utterances: list[str] = Field(default_factory=list)
    # The image (CLIP) space: example images (paths relative to the route file) and text
    # prompts encoded by the CLIP text tower, e.g. "a photo of a rifle".
    images: list[str] = Field(default_factory=list)
    prompts: list[str] = Field(default_factory=list)
    image_thresholds: ThresholdOverrides | None = None

    @model_validator(mode="after")
    def _has_examples(self) -> Route:
        if not (self.utterances or self.images or self.prompts):
            raise ValueError("a route needs examples: 'utterances', 'images' or 'prompts'")
        return self

    def examples(self, space: Space) -> list[tuple[ExampleKind, str]]:
        """The route's examples in one space: ``(kind, text or image path)``."""
        if space == "text":
            return [("utterance", u) for u in self.utterances]
        return [("image", path) for path in self.images] + [("prompt", p) for p in self.prompts]

    @field_validator("outcome")
    @classmethod
    def _outcome_not_reserved(cls, value: str) -> str:
        if value == NEEDS_REVIEW:
            raise ValueError(f"'{NEEDS_REVIEW}' is Sieve's own outcome, not a route's")
        return value

    @field_validator("utterances", "prompts", "images")
    @classmethod
    def _examples_clean(cls, values: list[str], info: ValidationInfo) -> list[str]:
        noun = {"utterances": "utterance", "prompts": "prompt", "images": "image"}[str(info.field_name)]
        seen: set[str] = set()
        for index, text in enumerate(values):
            if not text.strip():
                raise ValueError(f"{noun} {index} is empty")
            if text in seen:
                raise ValueError(f"{noun} {index} repeats an earlier one: {text[:60]!r}")
            seen.add(text)
        return values


class RouteSet(BaseModel):
    """A named, versioned set of routes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: int = Field(default=ROUTE_SET_SCHEMA_VERSION, ge=1, description=SCHEMA_VERSION_DOC)
    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = None
    default_outcome: str = Field(pattern=NAME_PATTERN)
    defaults: RouteDefaults = RouteDefaults()
    # Thresholds in the image (CLIP) space, which lives on another scale than MiniLM's.
    image_defaults: RouteDefaults = RouteDefaults(accept=0.85, review=0.75, margin=0.02)
    routes: list[Route] = Field(min_length=1)
    lists: list[str] = Field(default_factory=list, description=(
        "Term, pattern and image hash list files (sieve.lists), relative to the route file; "
        "they run before the encoder and belong to the version."))
    mode: Mode = Field(default="single", description=(
        "single: one route decides (intent routing). multi: each route is judged on its own "
        "thresholds and the decision carries every route that fired (moderation)."))
    severity: list[str] | None = Field(default=None, description=(
        "multi mode: outcomes, most severe first; the decision's outcome is the most severe one "
        "accepted. Null: the routes' outcomes in order of first appearance, the default last."))
    # Set by load_route_set: the route file's folder and the SHA-256 of each example image.
    _base_dir: Path | None = PrivateAttr(default=None)
    _image_digests: dict[str, str] = PrivateAttr(default_factory=dict)
    # Set by load_route_set (or the route store): the bytes of the learned head beside the route file.
    _head_bytes: bytes | None = PrivateAttr(default=None)
    # Set by load_route_set (or the route store): the loaded list files, in ``lists`` order.
    _lists: tuple[TermList | HashList, ...] = PrivateAttr(default=())

    @model_serializer(mode="wrap")
    def _without_empty_lists(self, handler: SerializerFunctionWrapHandler) -> dict[str, object]:
        data = handler(self)
        # A set without lists, mode or severity dumps (and hashes) as before they existed.
        if not data.get("lists"):
            data.pop("lists", None)
        if data.get("mode") == "single":
            data.pop("mode", None)
        if data.get("severity", False) is None:
            data.pop("severity", None)
        return data

    @model_validator(mode="after")
    def _unique_route_names(self) -> RouteSet:
        first_at: dict[str, int] = {}
        for index, route in enumerate(self.routes):
            if route.name in first_at:
                raise ValueError(
                    f"route {route.name!r} (routes[{index}]), field 'name': repeats the name "
                    f"of routes[{first_at[route.name]}]; route names must be unique"
                )
            first_at[route.name] = index
            for field, own, base in (
                ("thresholds", route.thresholds, self.defaults),
                ("image_thresholds", route.image_thresholds, self.image_defaults),
            ):
                merged = (own or ThresholdOverrides()).over(base.thresholds)
                if merged.review > merged.accept:
                    raise ValueError(
                        f"route {route.name!r} (routes[{index}]), field {field!r}: review "
                        f"({merged.review}) exceeds accept ({merged.accept}) once merged with the defaults"
                    )
        return self

    @model_validator(mode="after")
    def _severity_names_the_outcomes(self) -> RouteSet:
        if self.severity is None:
            return self
        named = set(self.severity)
        outcomes = {route.outcome for route in self.routes} | {self.default_outcome}
        if len(named) != len(self.severity) or named != outcomes:
            raise ValueError(
                f"field 'severity': must list each outcome of the set once ({', '.join(sorted(outcomes))}); "
                f"got {', '.join(self.severity)}"
            )
        return self

    @property
    def severity_order(self) -> tuple[str, ...]:
        """Outcomes, most severe first: ``severity``, else the routes' by appearance, default last."""
        if self.severity is not None:
            return tuple(self.severity)
        seen = dict.fromkeys(r.outcome for r in self.routes if r.outcome != self.default_outcome)
        return (*seen, self.default_outcome)

    @property
    def version(self) -> str:
        """Content hash: any change to routes, examples (image bytes too), thresholds or the head changes it.

        The file format's ``schema_version`` is not content: it does not count, nor do the
        paths of loaded list files (their content does). A set without a learned head
        hashes exactly as before heads counted.
        """
        content = {"set": self.model_dump(mode="json", exclude=self._not_content()),
                   "images": self._image_digests}
        if self._head_bytes is not None:
            content["head"] = hashlib.sha256(self._head_bytes).hexdigest()  # type: ignore[assignment]
        if self._lists:
            content["lists"] = hashlib.sha256(content_bytes(list(self._lists))).hexdigest()  # type: ignore[assignment]
        canonical = json.dumps(content, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    @property
    def loaded_lists(self) -> tuple[TermList | HashList, ...]:
        """The list files' content (``lists``), as loaded with the set."""
        return self._lists

    @property
    def head_bytes(self) -> bytes | None:
        """The learned head's file (``<routes>.head.npz``) as bytes, when the set has one."""
        return self._head_bytes

    def _not_content(self) -> set[str]:
        return _NOT_CONTENT | {"lists"} if self._lists else _NOT_CONTENT

    def __eq__(self, other: object) -> bool:
        """Equal content: where the file and its lists were read from, and the format version, don't count."""
        return isinstance(other, RouteSet) and self._lists == other._lists and (
            self.model_dump(exclude=self._not_content()) == other.model_dump(exclude=other._not_content())
        )

    def __hash__(self) -> int:
        return hash(self.version)

    def list_path(self, relative: str) -> Path:
        """Where a list file named in ``lists`` lies (relative paths resolve against the route file)."""
        return self.file_path(relative)

    def image_path(self, relative: str) -> Path:
        """Where an example image lies (relative paths resolve against the route file)."""
        return self.file_path(relative)

    def file_path(self, relative: str) -> Path:
        """Where a file the set names lies: relative paths resolve against the route file."""
        path = Path(relative)
        if path.is_absolute() or self._base_dir is None:
            return path
        return self._base_dir / path

    def image_digest(self, relative: str) -> str:
        """SHA-256 of an example image's bytes."""
        digest = self._image_digests.get(relative)
        if digest is None:
            digest = hashlib.sha256(self.image_path(relative).read_bytes()).hexdigest()
            self._image_digests[relative] = digest
        return digest

    def routes_in(self, space: Space) -> list[Route]:
        """The routes that have examples in a space."""
        return [route for route in self.routes if route.examples(space)]

    def aggregation_for(self, space: Space) -> Aggregation:
        """How route scores are aggregated in a space."""
        return (self.defaults if space == "text" else self.image_defaults).aggregation

    def route(self, name: str) -> Route:
        """The route called ``name``."""
        for route in self.routes:
            if route.name == name:
                return route
        raise KeyError(name)

    def thresholds_for(
        self, route: Route, overrides: ThresholdOverrides | None = None, space: Space = "text"
    ) -> Thresholds:
        """The route's thresholds in a space: set defaults < topology overrides < the route's own."""
        merged = (self.defaults if space == "text" else self.image_defaults).thresholds
        if overrides is not None:
            merged = overrides.over(merged)
        own = route.thresholds if space == "text" else route.image_thresholds
        if own is not None:
            merged = own.over(merged)
        return merged

    @property
    def outcomes(self) -> set[str]:
        """Every outcome a decision under this set can have."""
        return {route.outcome for route in self.routes} | {self.default_outcome, NEEDS_REVIEW}


def _describe_location(data: object, loc: tuple[int | str, ...]) -> str:
    """Turn a pydantic error location into 'route 'hate' (routes[3]), field 'x''."""
    parts: list[str] = []
    rest = list(loc)
    if len(rest) >= 2 and rest[0] == "routes" and isinstance(rest[1], int):
        index = rest[1]
        name = None
        if isinstance(data, dict) and isinstance(data.get("routes"), list):
            routes = data["routes"]
            if index < len(routes) and isinstance(routes[index], dict):
                name = routes[index].get("name")
        parts.append(f"route {name!r} (routes[{index}])" if name else f"routes[{index}]")
        rest = rest[2:]
    if rest:
        parts.append("field " + repr(".".join(str(p) for p in rest)))
    return ", ".join(parts) if parts else "top level"


def parse_route_set(data: object, source: str = "<memory>") -> RouteSet:
    """Validate route-set data, raising :class:`RouteSetError` naming what is wrong."""
    if not isinstance(data, dict):
        raise RouteSetError(f"{source}: a route set is a mapping, got {type(data).__name__}")
    try:
        return RouteSet.model_validate(data)
    except ValidationError as exc:
        lines = [
            f"{source}: {_describe_location(data, tuple(err['loc']))}: {err['msg']}"
            if err["loc"]
            else f"{source}: {err['msg'].removeprefix('Value error, ')}"
            for err in exc.errors()
        ]
        raise RouteSetError("\n".join(lines)) from None


def load_route_set(path: str | Path) -> RouteSet:
    """Read and validate a route-set YAML file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RouteSetError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RouteSetError(f"{path}: not valid YAML: {exc}") from None
    route_set = parse_route_set(data, str(path))
    route_set._base_dir = path.resolve().parent
    for index, route in enumerate(route_set.routes):
        for image in route.images:
            try:
                route_set.image_digest(image)
            except OSError as exc:
                raise RouteSetError(
                    f"{path}: route {route.name!r} (routes[{index}]), field 'images': cannot read "
                    f"{image!r} ({exc.strerror or exc}); paths are relative to the route file"
                ) from None
    head = head_path_for(path)
    route_set._head_bytes = head.read_bytes() if head.exists() else None
    try:
        names = {r.name for r in route_set.routes}
        route_set._lists = load_lists(route_set._base_dir, route_set.lists, names)
    except ListError as exc:
        raise RouteSetError(f"{path}: field 'lists': {exc}") from None
    return route_set
