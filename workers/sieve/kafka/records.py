"""The wire records: one consumed from Kafka (:class:`RawRecord`) and one to send (:class:`Outbound`)."""

from __future__ import annotations

from typing import NamedTuple


class RawRecord(NamedTuple):
    """One consumed Kafka record, before decoding (a named tuple: one is made per event)."""

    topic: str | None
    partition: int | None
    offset: int | None
    key: bytes | None
    value: bytes | None
    timestamp: float | None  # seconds since the epoch (Kafka record timestamp)


class Outbound(NamedTuple):
    """One message to send (a named tuple: a batch makes one or two per event)."""

    topic: str
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = ()


#: ``tuple.__new__``: makes a named tuple from a tuple of its fields, as ``_make`` does but
#: without the generated ``__new__``'s Python frame; used where one is made per event.
new_tuple = tuple.__new__
