"""Batch observation of the end-to-end latency histogram equals observing one by one."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram

from sieve.worker.metrics import observe_many

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


def _samples(histogram: Histogram) -> dict[str, float]:
    return {f"{s.name}{sorted(s.labels.items())}": s.value
            for metric in histogram.collect() for s in metric.samples if not s.name.endswith("_created")}


@given(st.lists(st.one_of(st.sampled_from(BUCKETS),  # exactly on a bound: counted in that bucket
                          st.floats(min_value=0, max_value=1000, allow_nan=False)), max_size=200))
def test_observe_many_counts_every_bucket_as_observe_does(values: list[float]) -> None:
    one_by_one = Histogram("one", "x", ["t"], buckets=BUCKETS, registry=CollectorRegistry()).labels("a")
    batched = Histogram("one", "x", ["t"], buckets=BUCKETS, registry=CollectorRegistry()).labels("a")
    for value in values:
        one_by_one.observe(value)
    observe_many(batched, np.asarray(values, dtype=np.float64))
    expected, got = _samples(one_by_one), _samples(batched)
    assert expected.keys() == got.keys()
    for name, value in expected.items():
        if name.startswith("one_sum"):
            assert got[name] == pytest.approx(value, rel=1e-9, abs=1e-9)
        else:
            assert got[name] == value, name
