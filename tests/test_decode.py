"""Decode and validate: every record comes out as an event or a dead letter, never an exception."""

from __future__ import annotations

import base64
import hashlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sieve.contracts import DeadLetter
from sieve.flow.dead_letter import dead_letter_payload
from sieve.flow.decode import _checked, _parse_and_validate, _Rejected, decode_batch, decode_one
from sieve.kafka.records import RawRecord
from sieve.topology import LimitsSpec

LIMITS = LimitsSpec(max_text_chars=100, max_event_bytes=2_000, max_dead_letter_payload_bytes=1_000)


def record(value: bytes | None, offset: int = 0, key: bytes | None = b"k") -> RawRecord:
    return RawRecord(topic="events.in", partition=3, offset=offset, key=key, value=value,
                     timestamp=1_700_000_000.0 + offset)


def event_bytes(**fields) -> bytes:
    return json.dumps(fields).encode()


def decode(records: list[RawRecord], limits: LimitsSpec = LIMITS, **kwargs):
    return decode_batch(records, limits, worker="w-1", topology="moderation", **kwargs)


def single_letter(value: bytes | None, limits: LimitsSpec = LIMITS) -> DeadLetter:
    oks, errs = decode([record(value)], limits)
    assert oks == []
    assert len(errs) == 1
    return errs[0]


# --------------------------------------------------------------------------- every reason


@pytest.mark.parametrize(
    ("value", "reason", "stage", "event_id", "detail"),
    [
        pytest.param(b"", "empty_payload", "decode", None, "no value", id="empty"),
        pytest.param(None, "empty_payload", "decode", None, "no value", id="none"),
        pytest.param(b"x" * 2_001, "event_too_large", "decode", None, "2001 bytes",
                     id="too-large"),
        pytest.param(b"\xff\xfe", "invalid_utf8", "decode", None, "at byte 0", id="utf8"),
        pytest.param(b'{"id": "s", "text": "x", "metadata": {"m": "\\ud800"}}', "invalid_utf8", "decode", "s",
                     "lone surrogate", id="lone-surrogate-escape"),
        pytest.param(b'{"id": "a", "text": "caf\xc3"}', "invalid_utf8", "decode", None,
                     "at byte", id="utf8-truncated"),
        pytest.param(b"{not json", "not_json", "decode", None, "not JSON", id="not-json"),
        pytest.param(b'{"id": "a", "text": "x"} trailing', "not_json", "decode", None,
                     "Extra data", id="trailing-garbage"),
        pytest.param(event_bytes(text="no id"), "schema", "validate", None, "id: Field required",
                     id="missing-id"),
        pytest.param(event_bytes(id=5, text="x"), "schema", "validate", None, "id:",
                     id="id-wrong-type"),
        pytest.param(event_bytes(id="e1", text=["a", "list"]), "schema", "validate", "e1",
                     "text:", id="text-wrong-type"),
        pytest.param(b'[{"id": "e1", "text": "x"}]', "schema", "validate", None,
                     "got list", id="json-array"),
        pytest.param(b'"just text"', "schema", "validate", None, "got str", id="json-string"),
        pytest.param(event_bytes(id="e1", text="x", priority="high"), "schema", "validate", "e1",
                     "priority: Extra inputs", id="extra-field"),
        pytest.param(event_bytes(id="e1"), "schema", "validate", "e1", "text", id="no-text"),
        pytest.param(event_bytes(id="img", modality="image", image_uri="s3://b/k.png"),
                     "unsupported_modality", "validate", "img", "'image'", id="image"),
        pytest.param(event_bytes(id="ws", text=" \n\t "), "empty_text", "validate", "ws",
                     "whitespace", id="whitespace"),
        pytest.param(event_bytes(id="empty", text=""), "empty_text", "validate", "empty",
                     "empty", id="empty-text"),
        pytest.param(event_bytes(id="long", text="y" * 101), "text_too_long", "validate", "long",
                     "101 characters", id="too-long"),
    ],
)
def test_each_rejection_reason(value, reason, stage, event_id, detail):
    letter = single_letter(value)
    assert letter.reason == reason
    assert letter.stage == stage
    assert letter.event_id == event_id
    assert detail in letter.error
    assert letter.worker == "w-1" and letter.topology == "moderation"


def test_escaped_surrogate_pair_is_accepted():
    # json.dumps escapes an emoji as a surrogate pair: a valid character, not a lone surrogate
    oks, errs = decode([record(event_bytes(id="emoji", text="ok \U0001F600", metadata={"m": "\U0001F600"}))])
    assert errs == [] and oks[0].event.text == "ok \U0001F600"


def test_text_at_the_limit_is_accepted():
    oks, errs = decode([record(event_bytes(id="ok", text="y" * 100))])
    assert errs == [] and oks[0].event.text == "y" * 100


def test_text_limit_counts_characters_not_bytes():
    text = "é" * 100  # 200 bytes, 100 characters
    oks, errs = decode([record(event_bytes(id="ok", text=text))])
    assert errs == [] and oks[0].event.text == text


def test_image_event_accepted_when_the_topology_handles_images():
    value = event_bytes(id="img", modality="image", image_b64="aGk=")
    oks, errs = decode([record(value)], modalities=frozenset({"text", "image"}))
    assert errs == [] and oks[0].event.modality == "image"


# --------------------------------------------------------------------------- dead letter content


def test_dead_letter_carries_the_original_record():
    value = b'{"id": "e9", "text": "   "}'
    source = RawRecord(topic="events.in", partition=2, offset=41, key=b"\x00key",
                       value=value, timestamp=None)
    _, [letter] = decode([source])
    digest = hashlib.sha256(value).hexdigest()
    assert base64.b64decode(letter.payload_b64) == value
    assert dead_letter_payload(letter) == value
    assert letter.payload_size == len(value)
    assert letter.payload_sha256 == digest
    assert letter.truncated is False
    assert letter.source_topic == "events.in"
    assert letter.partition == 2 and letter.offset == 41
    assert base64.b64decode(letter.key_b64) == b"\x00key"
    assert letter.event_id == "e9"
    assert letter.id == DeadLetter.make_id("events.in", 2, 41, digest)
    assert letter.failed_at.tzinfo is not None
    # it survives its own wire format
    assert DeadLetter.model_validate_json(letter.model_dump_json()) == letter


def test_dead_letter_without_key_or_position():
    _, [letter] = decode([RawRecord(None, None, None, None, b"nope", None)])
    assert letter.key_b64 is None
    assert letter.source_topic is None and letter.partition is None and letter.offset is None
    assert letter.id == DeadLetter.make_id(None, None, None, hashlib.sha256(b"nope").hexdigest())


def test_large_payload_is_truncated_with_full_size_and_hash():
    limits = LimitsSpec(max_event_bytes=10_000, max_dead_letter_payload_bytes=64)
    value = b"<" + b"not json at all " * 40
    _, [letter] = decode([record(value)], limits)
    assert letter.reason == "not_json"
    assert letter.truncated is True
    assert dead_letter_payload(letter) == value[:64]
    assert letter.payload_size == len(value)
    assert letter.payload_sha256 == hashlib.sha256(value).hexdigest()


def test_oversized_event_dead_letter_is_truncated():
    value = b"z" * 5_000
    _, [letter] = decode([record(value)])  # over max_event_bytes (2,000) and the 1,000 kept
    assert letter.reason == "event_too_large"
    assert letter.truncated is True
    assert len(dead_letter_payload(letter)) == 1_000
    assert letter.payload_size == 5_000


def test_payload_at_the_dead_letter_limit_is_not_truncated():
    limits = LimitsSpec(max_dead_letter_payload_bytes=64)
    value = b"x" * 64
    _, [letter] = decode([record(value)], limits)
    assert letter.truncated is False and dead_letter_payload(letter) == value


def test_long_error_detail_is_capped():
    _, [letter] = decode([record(b'{"id": "' + b"q" * 1_500 + b'"}')])
    assert letter.reason == "schema"
    assert len(letter.error) <= 2_000


# --------------------------------------------------------------------------- batches


def test_valid_events_come_out_in_order_with_their_records():
    records = [
        record(event_bytes(id="a", text="first"), offset=0),
        record(b"garbage", offset=1),
        record(event_bytes(id="b", text="second", tenant="t1", metadata={"x": 1}), offset=2),
        record(event_bytes(id="c", text="   "), offset=3),
        record(event_bytes(id="d", text="third"), offset=4),
    ]
    oks, errs = decode(records)
    assert [ok.event.id for ok in oks] == ["a", "b", "d"]
    assert [ok.record for ok in oks] == [records[0], records[2], records[4]]
    assert all(ok.record is original for ok, original in zip(oks, [records[0], records[2],
                                                                     records[4]], strict=True))
    assert oks[1].event.tenant == "t1" and oks[1].event.metadata == {"x": 1}
    assert [(err.offset, err.reason) for err in errs] == [(1, "not_json"), (3, "empty_text")]


def test_empty_batch():
    assert decode([]) == ([], [])


_json_leaf = st.none() | st.booleans() | st.integers(-(10**6), 10**6) | st.floats(
    allow_nan=False
) | st.text(max_size=20)
_json = st.recursive(
    _json_leaf,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
_event_like = st.fixed_dictionaries(
    {},
    optional={
        "id": st.text(max_size=5) | st.integers(),
        "modality": st.sampled_from(["text", "image", "video"]),
        "text": st.text(max_size=150) | _json,
        "image_uri": st.text(max_size=5),
        "metadata": _json,
        "extra": _json,
    },
)
_payloads = (
    st.none()
    | st.binary(max_size=300)
    | _json.map(lambda v: json.dumps(v).encode())
    | _event_like.map(lambda v: json.dumps(v).encode())
)


@settings(deadline=None, max_examples=300)
@given(st.lists(_payloads, max_size=8))
def test_decode_batch_never_raises_and_accounts_for_every_record(values):
    records = [record(value, offset=i) for i, value in enumerate(values)]
    oks, errs = decode(records)
    assert len(oks) + len(errs) == len(records)
    seen = sorted([ok.record.offset for ok in oks] + [err.offset for err in errs])
    assert seen == list(range(len(records)))
    for ok in oks:
        assert ok.event.text is not None and ok.event.text.strip()
    cap = LIMITS.max_dead_letter_payload_bytes
    for err in errs:
        original = records[err.offset].value or b""
        assert dead_letter_payload(err) == original[:cap]
        assert err.truncated == (len(original) > cap)
        assert err.payload_size == len(original)
        assert err.payload_sha256 == hashlib.sha256(original).hexdigest()


def _outcome(decode_it):
    try:
        return decode_it()
    except _Rejected as rejected:
        return ("rejected", rejected.reason, rejected.event_id)


_specials = st.sampled_from([
    b'{"id": "a", "text": "x", "metadata": {"v": NaN}}',
    b'{"id": "a", "text": "x", "metadata": {"v": -Infinity}}',
    b'{"id": "a", "text": "x", "id": "b"}', b'{"id": "a", "text": "\\ud800"}',
    b'{"id": "a", "text": "\\ud83d\\ude00"}', b'{"id": "a", "text": "x"} ',
    b'{"id": "a", "text": "x"} {}', b'{"id": "a", "text": "x", "created_at": 1700000000}',
    b'{"id": "a", "text": "x", "created_at": "2026-11-22T10:00:00+01:00"}', b'{"id": 7, "text": "x"}',
    b'{"id": "a", "text": "x", "metadata": {"n": 1e400}}', b'{"id": "a", "text": "x", "tenant": null}',
])


@settings(deadline=None, max_examples=400)
@given(_specials | _json.map(lambda v: json.dumps(v).encode())
       | _event_like.map(lambda v: json.dumps(v).encode())
       | _event_like.map(lambda v: json.dumps(v, ensure_ascii=False).encode()))
def test_one_step_decode_agrees_with_the_standard_library_parse(value):
    # decode_one parses with pydantic-core and falls back to json.loads only to name an error:
    # whatever it accepts, json.loads + validation accepts as the same event, and it rejects the rest alike.
    modalities = frozenset({"text"})
    one_step = _outcome(lambda: decode_one(record(value), LIMITS, modalities))
    reference = _outcome(lambda: _checked(_parse_and_validate(value.decode()), value, LIMITS, modalities))
    if isinstance(reference, tuple) and reference[1] == "event_too_large":
        return
    if len(value) > LIMITS.max_event_bytes:
        assert one_step[1] == "event_too_large"
        return
    if isinstance(one_step, tuple) or isinstance(reference, tuple):
        assert one_step == reference
    else:
        assert repr(one_step.model_dump()) == repr(reference.model_dump())  # repr: NaN equals NaN


# --------------------------------------------------------------------------- poison JSON


@pytest.mark.parametrize("value", [b"[" * 5_000 + b"]" * 5_000,
                                   b'{"id": "n", "text": "x", "metadata": ' + b'{"a": ' * 5_000
                                   + b"1" + b"}" * 5_001])
def test_deeply_nested_json_is_a_dead_letter(value):
    limits = LimitsSpec(max_event_bytes=1_000_000)
    oks, errs = decode([record(value)], limits)
    assert oks == [] and errs[0].stage == "decode"


def test_huge_integer_literal_is_a_dead_letter():
    value = b'{"id": "big", "text": "x", "metadata": {"n": ' + b"9" * 5_000 + b"}}"
    oks, errs = decode([record(value)], LimitsSpec(max_event_bytes=1_000_000))
    assert oks == [] and len(errs) == 1
