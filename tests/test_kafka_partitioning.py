"""``send_batched`` picks partitions as the producer's default partitioner would: murmur2, vectorised."""

from __future__ import annotations

import random

from aiokafka.partitioner import DefaultPartitioner, murmur2
from hypothesis import given, settings
from hypothesis import strategies as st

from sieve.kafka.client import murmur2_many, partitions_for_keys


@settings(deadline=None, max_examples=300)
@given(st.lists(st.binary(max_size=70), max_size=40))
def test_murmur2_many_equals_the_clients_murmur2(keys):
    assert murmur2_many(keys).tolist() == [murmur2(key) for key in keys]


def test_murmur2_many_on_event_ids_of_one_length():
    keys = [f"evt-{i:032x}".encode() for i in range(2000)]  # one length group, 9 words + 0 tail bytes
    assert murmur2_many(keys).tolist() == [murmur2(key) for key in keys]
    assert murmur2_many([]).tolist() == []


@settings(deadline=None, max_examples=200)
@given(st.lists(st.one_of(st.none(), st.binary(max_size=40)), max_size=30), st.integers(1, 12))
def test_partitions_for_keys_match_the_default_partitioner(keys, count):
    everything = list(range(count))
    available = everything[: max(1, count // 2)]
    chosen = partitions_for_keys(keys, everything, available)
    partitioner = DefaultPartitioner()
    for key, partition in zip(keys, chosen, strict=True):
        if key is None:
            assert partition in available  # random among the available ones, as the client does
        else:
            assert partition == partitioner(key, everything, available)


def test_partitions_for_keys_use_the_sorted_partition_ids_given():
    everything = [3, 5, 8]
    keys = [random.Random(i).randbytes(16) for i in range(100)]
    partitioner = DefaultPartitioner()
    assert partitions_for_keys(keys, everything, everything) == [partitioner(k, everything, everything)
                                                                 for k in keys]
