"""Decode and validate: raw Kafka records in, ``(events, dead letters)`` out.

The records are :class:`~sieve.kafka.records.RawRecord`, the wire record the worker
makes of each consumed message. Bad input is data, not an exception: every record
comes out either as a valid :class:`~sieve.contracts.Event` or as a
:class:`~sieve.contracts.DeadLetter` naming the reason.
"""

from __future__ import annotations

import json
from typing import NamedTuple

from pydantic import ValidationError
from pydantic_core import PydanticSerializationError, to_json

from sieve.contracts import DeadLetter, Event
from sieve.flow.dead_letter import make_dead_letter
from sieve.kafka.records import RawRecord, new_tuple
from sieve.topology import LimitsSpec


class DecodedEvent(NamedTuple):
    """A valid event and the record it came from (a named tuple: one is made per event)."""

    event: Event
    record: RawRecord


class _Rejected(Exception):
    def __init__(self, reason: str, error: str, event_id: str | None = None) -> None:
        super().__init__(error)
        self.reason = reason
        self.error = error
        self.event_id = event_id


def _validation_summary(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        field = ".".join(str(p) for p in err["loc"]) or "(event)"
        parts.append(f"{field}: {err['msg']}")
    return "; ".join(parts)


MAX_JSON_DEPTH = 64


def nesting_depth(payload: bytes, stop_at: int = MAX_JSON_DEPTH + 1) -> int:
    """How deep JSON arrays/objects nest (strings skipped); stops counting at ``stop_at``.

    Checked before ``json.loads`` so deep nesting is refused without a RecursionError
    (after which CPython 3.11 can fail later ``ast.parse`` calls in the same thread).
    """
    if payload.count(b"[") + payload.count(b"{") < stop_at:
        return 0  # cannot nest deeper than the number of openers
    depth = deepest = 0
    in_string = escaped = False
    for byte in payload:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest >= stop_at:
                    return deepest
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return deepest


def decode_one(record: RawRecord, limits: LimitsSpec, modalities: frozenset[str]) -> Event:
    """Decode one record or raise ``_Rejected`` with a reason code."""
    payload = record.value
    if not payload:
        raise _Rejected("empty_payload", "the record has no value")
    if len(payload) > limits.max_event_bytes:
        raise _Rejected(
            "event_too_large",
            f"event is {len(payload)} bytes, over the limit of {limits.max_event_bytes}",
        )
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Rejected("invalid_utf8", f"payload is not UTF-8 at byte {exc.start}") from None
    depth = nesting_depth(payload)
    if depth > MAX_JSON_DEPTH:
        raise _Rejected("not_json", f"JSON nested {depth} levels deep, over the limit of {MAX_JSON_DEPTH}")
    try:  # the common case in one step: pydantic-core parses and validates the JSON itself
        event = Event.model_validate_json(text)
    except ValidationError:  # the parse below names what is wrong, as it would on its own
        event = _parse_and_validate(text)
    return _checked(event, payload, limits, modalities)


def _parse_and_validate(text: str) -> Event:
    """The event in ``text`` (parsed by the standard library, then validated) or ``_Rejected``."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _Rejected("not_json", f"payload is not JSON: {exc.msg} at {exc.pos}") from None
    except (RecursionError, ValueError) as exc:  # integers too long, or a nesting we missed
        raise _Rejected("not_json", f"payload is not usable JSON: {type(exc).__name__}: {exc}") from None
    if not isinstance(data, dict):
        raise _Rejected("schema", f"an event is a JSON object, got {type(data).__name__}")
    event_id = _utf8_id(data.get("id"))
    try:
        return Event.model_validate(data)
    except ValidationError as exc:
        raise _Rejected("schema", _validation_summary(exc), event_id) from None


def _utf8_id(raw: object) -> str | None:
    """A rejected payload's ``id`` when it is a string UTF-8 can carry (the dead letter's key), else None."""
    if not isinstance(raw, str):
        return None
    try:
        raw.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, escaped in the JSON
        return None
    return raw


def _checked(event: Event, payload: bytes, limits: LimitsSpec, modalities: frozenset[str]) -> Event:
    """``event`` (decoded from ``payload``) if this topology handles it, else ``_Rejected``."""
    if (b"\\ud" in payload or b"\\uD" in payload) and _has_lone_surrogate(event):
        # JSON may escape a lone surrogate; no UTF-8 encodes it, so no decision could carry it.
        raise _Rejected("invalid_utf8", "payload escapes a lone surrogate (\\ud800-\\udfff), "
                        "which has no UTF-8 form", event.id)
    if event.modality not in modalities:
        raise _Rejected(
            "unsupported_modality",
            f"modality {event.modality!r} is not handled by this topology",
            event.id,
        )
    if event.modality == "text":
        assert event.text is not None
        if event.text.isspace() or not event.text:  # (no stripped copy of the text)
            raise _Rejected("empty_text", "text is empty or only whitespace", event.id)
        if len(event.text) > limits.max_text_chars:
            raise _Rejected(
                "text_too_long",
                f"text has {len(event.text)} characters, over the limit of "
                f"{limits.max_text_chars}",
                event.id,
            )
    return event


def _has_lone_surrogate(event: Event) -> bool:
    # The event as plain data: the model's own serialiser would replace a surrogate in a
    # metadata key with U+FFFD, where the decision's serialiser (a plain dict) raises.
    try:
        to_json(event.model_dump())
    except PydanticSerializationError:
        return True
    return False




def decode_batch(
    records: list[RawRecord],
    limits: LimitsSpec,
    *,
    worker: str,
    topology: str,
    modalities: frozenset[str] = frozenset({"text"}),
) -> tuple[list[DecodedEvent], list[DeadLetter]]:
    """Split a batch of records into valid events and dead letters."""
    oks: list[DecodedEvent] = []
    errs: list[DeadLetter] = []
    for record in records:
        try:
            oks.append(new_tuple(DecodedEvent, (decode_one(record, limits, modalities), record)))
        except _Rejected as rejected:
            errs.append(
                make_dead_letter(
                    record,
                    stage="decode" if rejected.reason in _DECODE_REASONS else "validate",
                    reason=rejected.reason,
                    error=rejected.error,
                    worker=worker,
                    topology=topology,
                    max_payload_bytes=limits.max_dead_letter_payload_bytes,
                    event_id=rejected.event_id,
                )
            )
    return oks, errs


_DECODE_REASONS = frozenset({"empty_payload", "event_too_large", "invalid_utf8", "not_json"})
