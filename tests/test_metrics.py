"""Worker metrics: batch observation of the latency histogram equals observing one by one; the
novel share (drift) is counted per route set and its fitted baseline follows the version in use."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import REGISTRY, CollectorRegistry, Histogram

from sieve.encoders.trivial import TrivialEncoder
from sieve.flow.match import RouteIndex
from sieve.flow.pipeline import BatchResult
from sieve.routeset import RouteSet
from sieve.worker.compute import Computed, summarise
from sieve.worker.metrics import observe_many, record_batch, record_route_set

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


# --------------------------------------------------------------------------- the novel share (drift)

DECIDED_AT = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)


def _row(route_set: str, novel: bool | None, outcome: str = "clean") -> dict[str, Any]:
    """The keys of a decision row that summarise reads."""
    return {"outcome": outcome, "route": None, "decided_by": "router", "latency_ms": None,
            "decided_at": DECIDED_AT, "route_set": route_set, "novel": novel,
            "novelty": None if novel is None else (0.9 if novel else 0.1)}


def _route_set(novelty: dict[str, Any] | None, name: str = "drift") -> RouteSet:
    defaults: dict[str, Any] = {} if novelty is None else {"novelty": novelty}
    return RouteSet.model_validate({
        "name": name, "default_outcome": "clean", "defaults": defaults,
        "routes": [{"name": "threat", "outcome": "violating", "utterances": ["I will hurt you"]},
                   {"name": "news", "outcome": "clean", "utterances": ["the council voted today"]}],
    })


def _value(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def test_summarise_counts_measured_and_novel_decisions_per_route_set() -> None:
    rows = [_row("a", True, "needs_review"), _row("a", False), _row("a", False), _row("a", None),
            _row("b", True, "needs_review"), _row("b", True, "needs_review"), _row("c", None)]
    summary = summarise(BatchResult(rows=rows, dead_letters=[], outbound=[]))
    assert summary.novelty_measured == {"a": 3, "b": 2}  # None: not measured, in no denominator
    assert summary.novel == {"a": 1, "b": 2}
    assert sum(summary.outcomes.values()) == len(rows)


def test_add_merges_the_novel_counts_of_record_by_record_batches() -> None:
    merged = Computed([], [], {}, {}, [])
    for rows in ([_row("a", True, "needs_review")], [_row("a", False)], [_row("b", False), _row("b", True)]):
        merged.add(summarise(BatchResult(rows=rows, dead_letters=[], outbound=[])))
    assert merged.novelty_measured == {"a": 2, "b": 2}
    assert merged.novel == {"a": 1, "b": 1}
    assert merged.outcomes == {("needs_review", "", "router"): 1, ("clean", "", "router"): 3}


def test_record_batch_exports_the_novel_share_per_route_set() -> None:
    rows = [_row("drift-a", True, "needs_review"), _row("drift-a", False), _row("drift-a", False),
            _row("drift-a", None)]
    computed = summarise(BatchResult(rows=rows, dead_letters=[], outbound=[]))
    for _ in range(2):
        record_batch("metrics-novel", [], computed, 0.01)
    labels = {"topology": "metrics-novel", "route_set": "drift-a"}
    assert _value("sieve_novelty_measured_events_total", **labels) == 6
    assert _value("sieve_novel_events_total", **labels) == 2


def test_the_baseline_follows_the_route_set_version_in_use() -> None:
    encoder = TrivialEncoder()
    labels = {"topology": "metrics-baseline", "route_set": "drift"}
    fitted = RouteIndex.build(_route_set({"threshold": 0.6, "baseline": 0.04}), encoder)
    record_route_set("metrics-baseline", fitted)
    assert _value("sieve_novel_baseline", **labels) == pytest.approx(0.04)
    assert _value("sieve_route_set_info", route_set="drift", version=fitted.version,
                  encoder=encoder.id) == 1
    refitted = RouteIndex.build(_route_set({"threshold": 0.55, "baseline": 0.07}), encoder)
    record_route_set("metrics-baseline", refitted)  # a reload
    assert _value("sieve_novel_baseline", **labels) == pytest.approx(0.07)
    # a version without a fitted baseline leaves no stale one for the alert to compare against
    record_route_set("metrics-baseline", RouteIndex.build(_route_set({"threshold": 0.5}), encoder))
    assert _value("sieve_novel_baseline", **labels) is None
    record_route_set("metrics-baseline", RouteIndex.build(_route_set(None), encoder))
    assert _value("sieve_novel_baseline", **labels) is None
