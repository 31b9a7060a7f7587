"""Kafka plumbing shared by the worker and the CLI: client settings, topics, produce, tail."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError
from aiokafka.partitioner import DefaultPartitioner

from sieve.kafka.records import Outbound
from sieve.settings import KafkaSettings

log = logging.getLogger(__name__)


def ssl_context(settings: KafkaSettings) -> ssl.SSLContext | None:
    """An SSL context from the CA/cert/key settings, when the protocol uses TLS."""
    if settings.security_protocol not in ("SSL", "SASL_SSL"):
        return None
    context = ssl.create_default_context(
        cafile=str(settings.ssl_cafile) if settings.ssl_cafile else None
    )
    if settings.ssl_certfile:
        context.load_cert_chain(
            str(settings.ssl_certfile), str(settings.ssl_keyfile) if settings.ssl_keyfile else None
        )
    return context


def client_kwargs(settings: KafkaSettings) -> dict[str, Any]:
    """Connection keyword arguments for any aiokafka client."""
    kwargs: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap_servers,
        "security_protocol": settings.security_protocol,
        "client_id": settings.client_id,
    }
    context = ssl_context(settings)
    if context is not None:
        kwargs["ssl_context"] = context
    if settings.sasl_mechanism is not None:
        kwargs["sasl_mechanism"] = settings.sasl_mechanism
        kwargs["sasl_plain_username"] = settings.sasl_username
        kwargs["sasl_plain_password"] = (
            settings.sasl_password.get_secret_value() if settings.sasl_password else None
        )
    return kwargs


async def ensure_topics(
    settings: KafkaSettings, topics: dict[str, int], replication_factor: int = 1,
    configs: dict[str, dict[str, str]] | None = None,
) -> list[str]:
    """Create the topics that do not exist yet (``{name: partitions}``); returns those created.

    ``configs`` gives a topic its settings at creation (e.g. ``cleanup.policy: compact``).
    """
    admin = AIOKafkaAdminClient(**client_kwargs(settings))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [name for name in topics if name not in existing]
        if not missing:
            return []
        try:
            await admin.create_topics(
                [NewTopic(name, topics[name], replication_factor, topic_configs=(configs or {}).get(name, {}))
                 for name in missing]
            )
        except TopicAlreadyExistsError:  # another worker won the race
            pass
        return missing
    finally:
        await admin.close()


async def produce(
    settings: KafkaSettings,
    topic: str,
    messages: Iterable[tuple[bytes | None, bytes]],
    *,
    linger_ms: int = 5,
) -> int:
    """Send ``(key, value)`` pairs with acks=all, queued and awaited together; returns the count."""
    producer = AIOKafkaProducer(
        **client_kwargs(settings), acks="all", linger_ms=linger_ms, max_batch_size=256 * 1024
    )
    await producer.start()
    try:
        pending = []
        count = 0
        for key, value in messages:
            pending.append(await producer.send(topic, value=value, key=key))
            count += 1
            if len(pending) >= 5000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
        return count
    finally:
        await producer.stop()


_PARTITIONER = DefaultPartitioner()
_M = np.uint32(0x5BD1E995)


def murmur2_many(keys: Sequence[bytes]) -> np.ndarray:
    """Kafka's murmur2 of each key (``aiokafka.partitioner.murmur2``, the Java client's), vectorised.

    Keys are grouped by length and hashed a 4-byte word at a time across the
    group (uint32 arithmetic wraps as the Java code's int does), instead of one
    pure-Python call per key: a worker partitions every message it sends.
    """
    out = np.empty(len(keys), dtype=np.uint32)
    by_length: dict[int, list[int]] = {}
    for i, key in enumerate(keys):
        by_length.setdefault(len(key), []).append(i)
    for length, rows in by_length.items():
        data = np.frombuffer(b"".join([keys[i] for i in rows]), dtype=np.uint8).reshape(len(rows), length)
        h = np.full(len(rows), 0x9747B28C ^ length, dtype=np.uint32)
        whole = length // 4 * 4
        words = np.ascontiguousarray(data[:, :whole]).view("<u4")
        for j in range(whole // 4):
            k = words[:, j] * _M
            k ^= k >> np.uint32(24)
            k *= _M
            h *= _M
            h ^= k
        tail = length - whole
        if tail >= 3:
            h ^= data[:, whole + 2].astype(np.uint32) << np.uint32(16)
        if tail >= 2:
            h ^= data[:, whole + 1].astype(np.uint32) << np.uint32(8)
        if tail >= 1:
            h ^= data[:, whole].astype(np.uint32)
            h *= _M
        h ^= h >> np.uint32(13)
        h *= _M
        h ^= h >> np.uint32(15)
        out[rows] = h
    return out


def partitions_for_keys(
    keys: Sequence[bytes | None], everything: list[int], available: list[int]
) -> list[int]:
    """The default partitioner's choice per key: ``DefaultPartitioner()(key, everything, available)``."""
    hashed = murmur2_many([key for key in keys if key is not None])
    positions = iter(((hashed & np.uint32(0x7FFFFFFF)) % np.uint32(len(everything))).tolist())
    # A key's partition from its hash; no key: random among the available ones, as the client does.
    return [everything[next(positions)] if key is not None else _PARTITIONER(None, everything, available)
            for key in keys]


async def send_batched(producer: AIOKafkaProducer, messages: Sequence[Outbound]) -> None:
    """Send ``messages`` as record batches, one per topic-partition; return when all are acknowledged.

    ``producer.send`` costs a future, an accumulator lookup and a log call per
    message; here a batch of events becomes a handful of record batches (each up
    to the producer's ``max_batch_size``) and a handful of futures. Partitions
    are chosen by the producer's own default partitioner (murmur2 of the key, as
    Java clients do), so a key lands where ``send`` would have put it. Raises when
    any batch fails; the caller re-sends everything (at-least-once).
    """
    if not messages:
        return
    grouped: dict[tuple[str, int], list[Outbound]] = {}
    by_topic: dict[str, list[Outbound]] = {}
    for message in messages:
        by_topic.setdefault(message.topic, []).append(message)
    cluster = producer.client.cluster
    for topic, outbound in by_topic.items():
        everything = sorted(await producer.partitions_for(topic))
        available = sorted(cluster.available_partitions_for_topic(topic) or everything)
        chosen = partitions_for_keys([message.key for message in outbound], everything, available)
        for message, partition in zip(outbound, chosen, strict=True):
            grouped.setdefault((topic, partition), []).append(message)
    pending = []
    for (topic, partition), group in grouped.items():
        batch = producer.create_batch()
        for message in group:
            while batch.append(timestamp=None, key=message.key, value=message.value,
                               headers=list(message.headers)) is None:  # the batch is full
                if batch.record_count() == 0:
                    raise ValueError(f"a {len(message.value)}-byte message does not fit in a record batch")
                pending.append(await producer.send_batch(batch, topic, partition=partition))
                batch = producer.create_batch()
        if batch.record_count():
            pending.append(await producer.send_batch(batch, topic, partition=partition))
    await asyncio.gather(*pending)


async def send_messages(settings: KafkaSettings, messages: Sequence[Outbound]) -> None:
    """Send ``messages`` (any topics, headers kept) with acks=all on a producer of its own; await them all."""
    producer = AIOKafkaProducer(**client_kwargs(settings), acks="all")
    await producer.start()
    try:
        await send_batched(producer, messages)
    finally:
        await producer.stop()


async def read_topic(
    settings: KafkaSettings,
    topics: list[str],
    *,
    idle_timeout_s: float | None = 2.0,
    from_beginning: bool = True,
    group_id: str | None = None,
) -> AsyncIterator[Any]:
    """Yield records from ``topics`` until none arrives for ``idle_timeout_s`` (None: forever).

    Without a group the consumer commits nothing. The end is found by idleness, not
    by asking the broker for the latest offsets: the dev broker (tansu) answers
    ListOffsets(latest) with the base offset of the partition's last record batch + 1,
    not its high-water mark, so a reader that stopped there would miss the rest of that
    batch. (The high-water mark that Fetch responses carry is right; the worker's
    consumer-lag gauge uses it.)
    """
    consumer = AIOKafkaConsumer(
        *topics,
        **client_kwargs(settings),
        group_id=group_id,
        auto_offset_reset="earliest" if from_beginning else "latest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        loop = asyncio.get_running_loop()
        last = loop.time()
        while True:
            batches = await consumer.getmany(timeout_ms=200, max_records=2000)
            got = False
            for records in batches.values():
                for record in records:
                    got = True
                    yield record
            if got:
                last = loop.time()
                if group_id is not None:
                    await consumer.commit()
            elif idle_timeout_s is not None and loop.time() - last > idle_timeout_s:
                return
    finally:
        await consumer.stop()


def _group_consumer(settings: KafkaSettings, group: str) -> AIOKafkaConsumer:
    """A consumer in ``group`` that never commits by itself; partitions are assigned, not joined."""
    return AIOKafkaConsumer(
        **client_kwargs(settings), group_id=group, auto_offset_reset="earliest", enable_auto_commit=False
    )


async def _assign_all(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    """Assign every partition of ``topic`` to ``consumer`` (none when the topic does not exist)."""
    await consumer.topics()  # fetches the cluster's metadata
    partitions = sorted(consumer.partitions_for_topic(topic) or ())
    assigned = [TopicPartition(topic, partition) for partition in partitions]
    consumer.assign(assigned)
    return assigned


async def read_from_group(
    settings: KafkaSettings, topic: str, group: str, *, idle_timeout_s: float
) -> AsyncIterator[Any]:
    """Yield ``topic``'s records from ``group``'s committed offsets until none arrives for ``idle_timeout_s``.

    A partition the group has no offset for is read from its beginning. Nothing is
    committed, and no group is joined (every partition is assigned directly): the
    caller commits, with :func:`commit_offsets`, only what it has finished with.
    """
    consumer = _group_consumer(settings, group)
    await consumer.start()
    try:
        await _assign_all(consumer, topic)
        loop = asyncio.get_running_loop()
        last = loop.time()
        while True:
            batches = await consumer.getmany(timeout_ms=200, max_records=2000)
            got = False
            for records in batches.values():
                for record in records:
                    got = True
                    yield record
            if got:
                last = loop.time()
            elif loop.time() - last > idle_timeout_s:
                return
    finally:
        await consumer.stop()


async def committed_offsets(settings: KafkaSettings, topic: str, group: str) -> dict[int, int]:
    """``group``'s committed offset per partition of ``topic``; partitions without one are left out."""
    consumer = _group_consumer(settings, group)
    await consumer.start()
    try:
        offsets = {}
        for tp in await _assign_all(consumer, topic):
            offset = await consumer.committed(tp)
            if offset is not None:
                offsets[tp.partition] = offset
        return offsets
    finally:
        await consumer.stop()


async def commit_offsets(settings: KafkaSettings, topic: str, group: str, offsets: dict[int, int]) -> None:
    """Commit ``{partition: next offset}`` of ``topic`` for ``group`` (a group no member has joined)."""
    if not offsets:
        return
    consumer = _group_consumer(settings, group)
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topic, partition) for partition in offsets])
        await consumer.commit({TopicPartition(topic, p): offset for p, offset in offsets.items()})
    finally:
        await consumer.stop()
