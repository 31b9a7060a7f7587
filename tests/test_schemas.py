"""Wire contracts: committed JSON Schemas match the models; Event rules; deterministic ids."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from sieve.contracts import (
    DEAD_LETTER_SCHEMA_VERSION,
    DECISION_SCHEMA_VERSION,
    EVENT_SCHEMA_VERSION,
    DeadLetter,
    Decision,
    Event,
)
from sieve.schema_export import SCHEMAS, export_schemas, render_schema

REPO = Path(__file__).resolve().parents[1]
SCHEMA_DIR = REPO / "schemas"
FILES = sorted(f"{name}.schema.json" for name in SCHEMAS)


# --------------------------------------------------------------------------- committed schemas


def test_committed_schemas_match_the_models():
    drift = export_schemas(SCHEMA_DIR, check=True)
    assert drift == [], f"regenerate with `sieve schemas export`: {drift}"


def test_committed_schemas_are_json_schemas():
    assert sorted(p.name for p in SCHEMA_DIR.glob("*.schema.json")) == FILES
    for name in SCHEMAS:
        schema = json.loads((SCHEMA_DIR / f"{name}.schema.json").read_text(encoding="utf-8"))
        assert schema["$id"] == f"sieve/{name}.schema.json"
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        assert schema["type"] == "object"
    event = json.loads((SCHEMA_DIR / "event.schema.json").read_text(encoding="utf-8"))
    assert event["additionalProperties"] is False  # extra fields are refused, as in the model
    assert event["required"] == ["id"]
    for name in ("decision", "dead-letter"):  # readers of published messages ignore new fields
        published = (SCHEMA_DIR / f"{name}.schema.json").read_text(encoding="utf-8")
        assert '"additionalProperties": false' not in published, name


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_every_schema_carries_an_optional_schema_version(name):
    schema = json.loads((SCHEMA_DIR / f"{name}.schema.json").read_text(encoding="utf-8"))
    version = schema["properties"]["schema_version"]
    assert version["type"] == "integer" and version["minimum"] == 1
    assert version["default"] == SCHEMAS[name].model_fields["schema_version"].default >= 1
    assert "schema_version" not in schema.get("required", [])


def test_messages_carry_their_schema_version():
    event = json.loads(Event(id="e1", text="x").model_dump_json())
    assert event["schema_version"] == EVENT_SCHEMA_VERSION
    assert Event.model_validate({"id": "e1", "text": "x"}).schema_version == EVENT_SCHEMA_VERSION
    assert Event.model_validate({"id": "e1", "text": "x", "schema_version": 3}).schema_version == 3
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        Event.model_validate({"id": "e1", "text": "x", "schema_version": 0})
    assert DECISION_SCHEMA_VERSION >= 1 and DEAD_LETTER_SCHEMA_VERSION >= 1


def test_decisions_and_dead_letters_ignore_fields_they_do_not_know():
    letter = DeadLetter(id="d", stage="decode", reason="not_json", error="e", worker="w", topology="t",
                        source_topic=None, partition=None, offset=None, key_b64=None, payload_b64="",
                        payload_size=0, payload_sha256="0" * 64, failed_at="2024-01-01T00:00:00Z")
    data = json.loads(letter.model_dump_json())
    assert data["schema_version"] == DEAD_LETTER_SCHEMA_VERSION
    assert DeadLetter.model_validate({**data, "added_later": 1}) == letter


@pytest.fixture
def schema_copy(tmp_path) -> Path:
    target = tmp_path / "schemas"
    shutil.copytree(SCHEMA_DIR, target)
    return target


def test_drift_is_detected_and_check_writes_nothing(schema_copy):
    path = schema_copy / "decision.schema.json"
    schema = json.loads(path.read_text(encoding="utf-8"))
    schema["properties"]["outcome"]["description"] = "edited by hand"
    altered = json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    path.write_text(altered, encoding="utf-8")

    assert export_schemas(schema_copy, check=True) == ["decision.schema.json"]
    assert path.read_text(encoding="utf-8") == altered  # check mode leaves files alone


def test_whitespace_only_change_is_drift(schema_copy):
    path = schema_copy / "event.schema.json"
    path.write_text(path.read_text(encoding="utf-8").rstrip("\n"), encoding="utf-8")
    assert export_schemas(schema_copy, check=True) == ["event.schema.json"]


def test_missing_schema_is_drift(schema_copy):
    (schema_copy / "topology.schema.json").unlink()
    assert export_schemas(schema_copy, check=True) == ["topology.schema.json"]
    assert not (schema_copy / "topology.schema.json").exists()


def test_export_rewrites_drifted_files(schema_copy):
    (schema_copy / "route-set.schema.json").write_text("{}\n", encoding="utf-8")
    (schema_copy / "dead-letter.schema.json").unlink()
    assert sorted(export_schemas(schema_copy)) == ["dead-letter.schema.json",
                                                   "route-set.schema.json"]
    assert export_schemas(schema_copy, check=True) == []
    for name, model in SCHEMAS.items():
        assert (schema_copy / f"{name}.schema.json").read_text(encoding="utf-8") == render_schema(
            name, model
        )


def test_export_into_an_empty_directory(tmp_path):
    target = tmp_path / "new" / "schemas"
    assert sorted(export_schemas(target)) == FILES
    assert export_schemas(target, check=True) == []


# --------------------------------------------------------------------------- Event


def test_text_event_defaults():
    event = Event(id="e1", text="hello")
    assert event.modality == "text"
    assert event.metadata == {}
    assert event.image_b64 is None and event.image_uri is None


@pytest.mark.parametrize(
    ("data", "message"),
    [
        pytest.param({"id": "e1"}, "a text event needs 'text'", id="text-missing"),
        pytest.param({"id": "e1", "modality": "text", "text": "x", "image_uri": "s3://b/k"},
                     "a text event carries no image fields", id="text-with-image"),
        pytest.param({"id": "e1", "modality": "image"},
                     "exactly one of 'image_b64', 'image_uri'", id="image-missing"),
        pytest.param({"id": "e1", "modality": "image", "image_b64": "aGk=",
                      "image_uri": "s3://b/k"},
                     "exactly one of 'image_b64', 'image_uri'", id="image-both"),
        pytest.param({"id": "e1", "modality": "image", "image_uri": "s3://b/k", "text": "cap"},
                     "an image event carries no 'text'", id="image-with-text"),
        pytest.param({"id": "e1", "text": "x", "colour": "red"}, "Extra inputs",
                     id="extra-field"),
        pytest.param({"id": "", "text": "x"}, "at least 1 character", id="empty-id"),
        pytest.param({"id": "x" * 257, "text": "x"}, "at most 256", id="long-id"),
        pytest.param({"id": "e1", "text": "x", "modality": "audio"}, "modality",
                     id="unknown-modality"),
        pytest.param({"id": 7, "text": "x"}, "valid string", id="id-not-a-string"),
    ],
)
def test_event_validation(data, message):
    with pytest.raises(ValidationError, match=message):
        Event.model_validate(data)


@pytest.mark.parametrize("payload", [{"image_b64": "aGk="}, {"image_uri": "https://x/y.png"}])
def test_image_event_with_exactly_one_source(payload):
    event = Event.model_validate({"id": "i1", "modality": "image", **payload})
    assert event.modality == "image" and event.text is None


def test_event_is_frozen():
    event = Event(id="e1", text="hello")
    with pytest.raises(ValidationError):
        event.text = "changed"  # type: ignore[misc]


@settings(deadline=None, max_examples=50)
@given(
    event_id=st.text(st.characters(codec="utf-8"), min_size=1, max_size=40),
    text=st.text(st.characters(codec="utf-8"), max_size=200),
    tenant=st.none() | st.text(st.characters(codec="utf-8"), max_size=20),
)
def test_event_json_round_trip(event_id, text, tenant):
    event = Event(id=event_id, text=text, tenant=tenant, metadata={"n": 1, "tags": ["a"]})
    assert Event.model_validate_json(event.model_dump_json()) == event


# --------------------------------------------------------------------------- ids


def test_decision_id_is_deterministic_per_event_and_version():
    first = Decision.make_id("event-1", "0123456789abcdef")
    assert first == Decision.make_id("event-1", "0123456789abcdef")
    assert uuid.UUID(first).version == 5
    assert first != Decision.make_id("event-1", "fedcba9876543210")
    assert first != Decision.make_id("event-2", "0123456789abcdef")
    # the separator keeps ("ab", "c") and ("a", "bc") apart
    assert Decision.make_id("ab", "c") != Decision.make_id("a", "bc")


def test_dead_letter_id_is_deterministic():
    digest = "0" * 64
    first = DeadLetter.make_id("topic", 1, 42, digest)
    assert first == DeadLetter.make_id("topic", 1, 42, digest)
    assert len(first) == 32
    assert first != DeadLetter.make_id("topic", 1, 43, digest)
    assert first != DeadLetter.make_id("topic", 2, 42, digest)
    assert first != DeadLetter.make_id("topic", 1, 42, "1" * 64)
