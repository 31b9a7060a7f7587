"""The published contracts only grow (docs/contracts.md).

``tests/fixtures/contracts/v1/`` is a frozen copy of the schemas as version 1 published
them; it is never regenerated. Messages made by today's code must validate against it,
a newer message (fields added) must still validate against it and be readable by
today's models, and today's schemas must be an additive extension of it: every frozen
property still there with the same type, format, constraints and enum values; no
property newly required; no object newly closed to extra properties.
"""

from __future__ import annotations

import copy
import json
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator, FormatChecker

from sieve.contracts import (
    DEAD_LETTER_SCHEMA_VERSION,
    DECISION_SCHEMA_VERSION,
    EVENT_SCHEMA_VERSION,
    DeadLetter,
    Decision,
    Event,
    Review,
)
from sieve.encoders.trivial import TrivialEncoder
from sieve.flow.dead_letter import make_dead_letter
from sieve.flow.match import RouteIndex
from sieve.flow.pipeline import BatchResult, RouterPipeline
from sieve.kafka.records import RawRecord
from sieve.routeset import ROUTE_SET_SCHEMA_VERSION, load_route_set, parse_route_set
from sieve.schema_export import SCHEMAS, render_schema
from sieve.topology import TOPOLOGY_SCHEMA_VERSION, load_topology, load_topology_route_set

REPO = Path(__file__).resolve().parents[1]
FROZEN = Path(__file__).resolve().parent / "fixtures" / "contracts" / "v1"
TOPIC = "sieve.events.text"
NOW = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
# Messages Sieve publishes: readers must be able to read newer ones (extra fields allowed).
PUBLISHED = ("decision", "dead-letter")

FORMATS = FormatChecker()


@FORMATS.checks("date-time", raises=ValueError)
def _date_time(value: object) -> bool:
    if not isinstance(value, str):
        return True
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        raise ValueError(f"{value!r} has no time zone")
    return True


def frozen(name: str) -> dict[str, Any]:
    return json.loads((FROZEN / f"{name}.schema.json").read_text(encoding="utf-8"))


def current(name: str) -> dict[str, Any]:
    return json.loads(render_schema(name, SCHEMAS[name]))


def assert_valid(name: str, message: dict[str, Any]) -> None:
    """``message`` is valid under the frozen v1 schema ``name`` (every error listed)."""
    validator = Draft202012Validator(frozen(name), format_checker=FORMATS)
    errors = [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
              for e in validator.iter_errors(message)]
    assert errors == [], f"not a v1 {name}:\n" + "\n".join(errors)


# --------------------------------------------------------------------------- the additive check

# Keywords that must not change for a property that was published: a value of the frozen
# schema must mean the same, and be accepted (or produced) the same way, by the current one.
_SAME = ("type", "format", "pattern", "const", "minimum", "maximum", "exclusiveMinimum",
         "exclusiveMaximum", "minLength", "maxLength", "minItems", "maxItems")


def _resolve(node: dict[str, Any], root: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    ref = node.get("$ref")
    if ref is None:
        return node, None
    name = ref.removeprefix("#/$defs/")
    return root["$defs"][name], name


def breaking_changes(old_root: dict[str, Any], new_root: dict[str, Any], *,
                     published: bool = False) -> list[str]:
    """How ``new_root`` breaks readers or writers of ``old_root`` (empty: an additive extension).

    ``published``: the schema of messages Sieve writes, whose readers also rely on every
    required field staying required.
    """
    problems: list[str] = []
    seen: set[tuple[str, str]] = set()

    def compare(old_node: dict[str, Any], new_node: dict[str, Any], where: str) -> None:
        old, old_ref = _resolve(old_node, old_root)
        new, new_ref = _resolve(new_node, new_root)
        if old_ref is not None and new_ref is not None:
            if (old_ref, new_ref) in seen:
                return
            seen.add((old_ref, new_ref))
        for key in _SAME:
            if old.get(key) != new.get(key):
                problems.append(f"{where}: {key} {old.get(key)!r} became {new.get(key)!r}")
        if "enum" in old or "enum" in new:
            if sorted(map(repr, old.get("enum", []))) != sorted(map(repr, new.get("enum", []))):
                problems.append(f"{where}: enum {old.get('enum')!r} became {new.get('enum')!r} "
                                "(an enum keeps its values: a new cause gets a new field)")
        if old.get("additionalProperties") is not False and new.get("additionalProperties") is False:
            problems.append(f"{where}: extra properties became forbidden")
        for key in ("additionalProperties", "items"):
            if isinstance(old.get(key), dict) and isinstance(new.get(key), dict):
                compare(old[key], new[key], f"{where}.{key}")
        for key in ("anyOf", "oneOf", "allOf", "prefixItems"):
            old_options, new_options = old.get(key, []), new.get(key, [])
            if len(old_options) != len(new_options):
                problems.append(f"{where}: {key} has {len(new_options)} options, was {len(old_options)}")
                continue
            for i, (a, b) in enumerate(zip(old_options, new_options, strict=True)):
                compare(a, b, f"{where}.{key}[{i}]")
        old_props, new_props = old.get("properties", {}), new.get("properties", {})
        for prop, schema in old_props.items():
            if prop not in new_props:
                problems.append(f"{where}.{prop}: removed")
            else:
                compare(schema, new_props[prop], f"{where}.{prop}")
        old_required, new_required = set(old.get("required", [])), set(new.get("required", []))
        if new_required - old_required:
            problems.append(f"{where}: newly required {sorted(new_required - old_required)}")
        if published and old_required - new_required:
            problems.append(f"{where}: no longer required {sorted(old_required - new_required)}")

    compare(old_root, new_root, "$")
    return problems


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_current_schema_is_an_additive_extension_of_v1(name: str) -> None:
    assert breaking_changes(frozen(name), current(name), published=name in PUBLISHED) == []


def test_the_frozen_copy_is_complete_and_versioned() -> None:
    assert sorted(p.name for p in FROZEN.glob("*.schema.json")) == sorted(f"{n}.schema.json" for n in SCHEMAS)
    for name in SCHEMAS:
        version = frozen(name)["properties"]["schema_version"]
        assert version["type"] == "integer" and version["default"] == 1
        assert "schema_version" not in frozen(name).get("required", []), "optional in input"


def test_current_versions_are_at_least_v1() -> None:
    versions = (EVENT_SCHEMA_VERSION, DECISION_SCHEMA_VERSION, DEAD_LETTER_SCHEMA_VERSION,
                ROUTE_SET_SCHEMA_VERSION, TOPOLOGY_SCHEMA_VERSION)
    assert all(isinstance(v, int) and v >= 1 for v in versions)
    for name in SCHEMAS:
        assert current(name)["properties"]["schema_version"]["default"] >= 1


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_messages_stay_open_to_new_fields(name: str) -> None:
    """No object in a published message's v1 schema refuses properties it does not name."""
    closed = []

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            if node.get("additionalProperties") is False:
                closed.append(where)
            for key, value in node.items():
                walk(value, f"{where}/{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{where}/{i}")

    walk(frozen(name), "#")
    assert closed == []


# The checker must be able to fail: each edit below breaks the v1 decision contract.
def _remove_outcome(s: dict) -> None:
    del s["properties"]["outcome"]


def _retype_score(s: dict) -> None:
    s["properties"]["score"]["type"] = "string"


def _drop_reason_value(s: dict) -> None:
    s["properties"]["reason"]["enum"].remove("no_match")


def _add_reason_value(s: dict) -> None:
    s["properties"]["reason"]["enum"].append("new_cause")


def _require_source_topic(s: dict) -> None:
    s["required"].append("source_topic")


def _optional_outcome(s: dict) -> None:
    s["required"].remove("outcome")


def _close_route_score(s: dict) -> None:
    s["$defs"]["RouteScore"]["additionalProperties"] = False


def _nullable_route_set(s: dict) -> None:
    s["properties"]["route_set"] = {"anyOf": [{"type": "string"}, {"type": "null"}]}


def _tighter_image_width(s: dict) -> None:
    s["$defs"]["ImageRef"]["properties"]["width"]["minimum"] = 1


@pytest.mark.parametrize("edit", [_remove_outcome, _retype_score, _drop_reason_value, _add_reason_value,
                                  _require_source_topic, _optional_outcome, _close_route_score,
                                  _nullable_route_set, _tighter_image_width])
def test_breaking_changes_are_caught(edit) -> None:
    old = frozen("decision")
    new = copy.deepcopy(old)
    edit(new)
    assert breaking_changes(old, new, published=True) != []


def test_a_new_optional_field_is_additive() -> None:
    old = frozen("decision")
    new = copy.deepcopy(old)
    new["properties"]["added_later"] = {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None}
    new["$defs"]["Review"]["properties"]["also_added"] = {"type": "integer", "default": 0}
    assert breaking_changes(old, new, published=True) == []


# --------------------------------------------------------------------------- today's messages


def text_record(offset: int, value: dict[str, Any] | bytes, key: bytes | None = b"k") -> RawRecord:
    payload = value if isinstance(value, bytes) else json.dumps(value).encode()
    return RawRecord(TOPIC, 0, offset, key, payload, NOW.timestamp() - 0.25)


@pytest.fixture(scope="module")
def batch() -> BatchResult:
    """A batch through the router's pure pipeline (the shipped moderation set, trivial encoder)."""
    topology = load_topology(REPO / "topologies" / "moderation.yaml")
    encoder = TrivialEncoder()
    index = RouteIndex.build(load_route_set(REPO / "routes" / "moderation.yaml"), encoder)
    pipeline = RouterPipeline(topology=topology, encoder=encoder, index=index, worker="compat")
    samples = (REPO / "routes" / "samples" / "demo-messages.jsonl").read_text(encoding="utf-8")
    events = [json.loads(line) for line in samples.splitlines() if line.strip()][:12]
    events.append({"id": "full", "schema_version": 1, "text": "all the fields", "tenant": "t",
                   "metadata": {"nested": {"n": [1, 2.5, None]}}, "created_at": "2024-01-02T03:04:00Z"})
    records = [text_record(i, event) for i, event in enumerate(events)]
    records += [
        text_record(100, b"{not json"),  # decode
        text_record(101, {"id": "x", "text": "hi", "colour": "red"}, key=None),  # validate
        text_record(102, {"id": "img", "modality": "image", "image_uri": "https://example.org/a.png"}),
    ]
    return pipeline.process(records)


def _messages(batch: BatchResult, *, dead: bool) -> list[dict[str, Any]]:
    return [json.loads(m.value) for m in batch.outbound if (m.topic == "sieve.dead-letter") == dead]


def test_decisions_of_todays_pipeline_are_v1_decisions(batch: BatchResult) -> None:
    published = _messages(batch, dead=False)
    assert len({d["event_id"] for d in published}) == 13
    assert {d["reason"] for d in published} >= {"no_match"}
    for decision in published:
        assert decision["schema_version"] == DECISION_SCHEMA_VERSION
        assert_valid("decision", decision)


def test_dead_letters_of_todays_pipeline_are_v1_dead_letters(batch: BatchResult) -> None:
    letters = _messages(batch, dead=True)
    assert sorted(letter["stage"] for letter in letters) == ["decode", "validate", "validate"]
    for letter in letters:
        assert letter["schema_version"] == DEAD_LETTER_SCHEMA_VERSION
        assert_valid("dead-letter", letter)


def test_reviewed_and_image_decisions_are_v1_decisions(batch: BatchResult) -> None:
    router = batch.decisions[0]
    reviewed = router.model_copy(update={
        "outcome": "violating", "decided_by": "llm", "decided_at": NOW,
        "review": Review(model="m", verdict="violating", route="threat", confidence=0.9, rationale="r",
                         router_decision_id=router.id, tokens_in=120, tokens_out=30, attempts=1,
                         review_ms=80.0),
    })
    handoff = router.model_copy(update={"review": Review(
        model="m", handoff_reason="malformed_reply", error="not JSON", router_decision_id=router.id)})
    image = Decision.model_validate({
        **router.model_dump(), "modality": "image",
        "event": {"id": "img", "modality": "image", "image_uri": "s3://b/k.png"},
        "image": {"sha256": "0" * 64, "uri": "s3://b/k.png", "format": "PNG", "width": 8, "height": 8,
                  "bytes": 100},
    })
    for decision in (reviewed, handoff, image):
        assert_valid("decision", json.loads(decision.model_dump_json()))


def test_dead_letters_made_directly_are_v1_dead_letters() -> None:
    record = RawRecord(None, None, None, None, b"\xff" * 300, None)
    letter = make_dead_letter(record, stage="publish", reason="too_large", error="e", worker="w",
                              topology="t", max_payload_bytes=100, event_id="e1")
    assert letter.truncated
    assert_valid("dead-letter", json.loads(letter.model_dump_json()))


@pytest.mark.parametrize("event", [
    Event(id="t1", text="hello"),
    Event(id="t2", text="hello", tenant="acme", metadata={"a": [1, {"b": None}]}, created_at=NOW),
    Event(id="i1", modality="image", image_b64="aGk="),
    Event(id="i2", modality="image", image_uri="https://example.org/a.png"),
], ids=["text", "text-full", "image-inline", "image-uri"])
def test_events_made_by_todays_models_are_v1_events(event: Event) -> None:
    assert_valid("event", json.loads(event.model_dump_json()))
    assert_valid("event", json.loads(event.model_dump_json(exclude_unset=True)))


def test_shipped_demo_events_are_v1_events_and_need_no_version() -> None:
    lines = (REPO / "routes" / "samples" / "demo-messages.jsonl").read_text(encoding="utf-8").splitlines()
    events = [json.loads(line) for line in lines if line.strip()]
    assert events and all("schema_version" not in e for e in events)
    for data in events:
        assert_valid("event", data)
        assert Event.model_validate(data).schema_version == EVENT_SCHEMA_VERSION


def _yaml(name: str) -> dict[str, Any]:
    return yaml.safe_load((FROZEN / name).read_text(encoding="utf-8"))


def test_v1_route_set_file_still_loads_to_the_same_version(tmp_path: Path) -> None:
    """Decision ids depend on the route-set version: a v1 file keeps its version."""
    data = _yaml("route-set.yaml")
    assert_valid("route-set", data)
    route_set = load_route_set(FROZEN / "route-set.yaml")
    assert route_set.schema_version == ROUTE_SET_SCHEMA_VERSION
    assert route_set.version == "28c3f3211d9dfb43"
    declared = tmp_path / "declared.yaml"
    declared.write_text(yaml.safe_dump({"schema_version": 1, **data}), encoding="utf-8")
    assert load_route_set(declared).version == route_set.version, "the file format is not content"


def test_v1_topology_file_still_loads(tmp_path: Path) -> None:
    data = _yaml("topology.yaml")
    assert_valid("topology", data)
    topology = load_topology(FROZEN / "topology.yaml")
    assert topology.schema_version == TOPOLOGY_SCHEMA_VERSION
    assert load_topology_route_set(topology).name == "frozen-v1"
    assert topology.modalities == {"text", "image"}
    declared = tmp_path / "declared.yaml"
    declared.write_text(yaml.safe_dump({"schema_version": 1, **data, "route_set": {"name": "frozen-v1"}}),
                        encoding="utf-8")
    assert load_topology(declared).schema_version == 1


# --------------------------------------------------------------------------- newer messages


def _newer(message: dict[str, Any]) -> dict[str, Any]:
    """``message`` as a later version might write it: a higher version, fields added at every level."""
    newer = copy.deepcopy(message)
    newer["schema_version"] = message["schema_version"] + 1
    newer["added_later"] = {"any": ["shape"]}
    for key in ("event", "image", "review"):
        if isinstance(newer.get(key), dict):
            newer[key]["added_later"] = 1
    for key in ("scores", "nearest"):
        for item in newer.get(key, []):
            item["added_later"] = True
    return newer


def test_a_newer_decision_is_valid_v1_and_readable_today(batch: BatchResult) -> None:
    router = batch.decisions[0]
    reviewed = router.model_copy(update={"review": Review(model="m", router_decision_id=router.id)})
    for decision in (router, reviewed):
        newer = _newer(json.loads(decision.model_dump_json()))
        assert_valid("decision", newer)
        read = Decision.model_validate_json(json.dumps(newer))
        assert read.schema_version == DECISION_SCHEMA_VERSION + 1
        assert read.model_copy(update={"schema_version": decision.schema_version}) == decision


def test_a_newer_dead_letter_is_valid_v1_and_readable_today(batch: BatchResult) -> None:
    letter = batch.dead_letters[0]
    newer = _newer(json.loads(letter.model_dump_json()))
    assert_valid("dead-letter", newer)
    read = DeadLetter.model_validate_json(json.dumps(newer))
    assert read.model_copy(update={"schema_version": letter.schema_version}) == letter


# --------------------------------------------------------------------------- ids


def test_decision_ids_are_the_v1_scheme() -> None:
    """Consumers deduplicate on decision ids: a UUIDv5 of the event id and the route-set version."""
    namespace = uuid.UUID("6f1c8a52-7d0e-4f4a-9a49-3d2b0c2f5e11")
    assert Decision.make_id("event-1", "0123456789abcdef") == str(
        uuid.uuid5(namespace, "event-1\x000123456789abcdef"))
    assert Decision.make_id("event-1", "0123456789abcdef") == "b4f6736b-a9e9-542d-87c4-2867cefbe6c5"


def test_dead_letter_ids_are_the_v1_scheme() -> None:
    """Where the bytes came from and their hash, so a redelivered input gets the same id."""
    assert DeadLetter.make_id("sieve.events.text", 3, 42, "0" * 64) == "297b495e9e9c959a6f4c86a8c90cad68"


# --------------------------------------------------------------------------- novelty (decision v2)


def test_novel_decisions_are_v1_decisions() -> None:
    """Decision v2 adds `novel` and `novelty`: optional, so a v2 decision is still a valid v1 decision."""
    topology = load_topology(REPO / "topologies" / "moderation.yaml")
    encoder = TrivialEncoder()
    shipped = load_route_set(REPO / "routes" / "moderation.yaml")
    data = shipped.model_dump(mode="json")
    data["defaults"]["novelty"] = {"threshold": 0.0, "baseline": 0.05}  # everything unseen is novel
    index = RouteIndex.build(parse_route_set(data), encoder)
    pipeline = RouterPipeline(topology=topology, encoder=encoder, index=index, worker="compat")
    events = [{"id": f"n{i}", "text": f"nothing like any example {i}"} for i in range(5)]
    published = _messages(pipeline.process([text_record(i, e) for i, e in enumerate(events)]), dead=False)
    assert {d["event_id"] for d in published} == {f"n{i}" for i in range(5)}  # decisions, review copies
    for decision in published:
        assert decision["schema_version"] == DECISION_SCHEMA_VERSION >= 3
        assert decision["novel"] is True and decision["novelty"] > 0.0
        assert decision["outcome"] != shipped.default_outcome
        assert_valid("decision", decision)
        assert Decision.model_validate(decision).novel is True
    # a v1 reader's message (no novelty keys) still reads today, as not known
    old = {k: v for k, v in published[0].items() if k not in ("novel", "novelty")} | {"schema_version": 1}
    assert_valid("decision", old)
    read = Decision.model_validate(old)
    assert read.novel is None and read.novelty is None
