"""Prometheus metrics of a worker (served on ``metrics_port``)."""

from __future__ import annotations

import time
from collections import Counter as Tally
from typing import TYPE_CHECKING

import numpy as np
from prometheus_client import Counter, Gauge, Histogram, Info

from sieve.kafka.records import RawRecord

if TYPE_CHECKING:
    from sieve.flow.match import RouteIndex
    from sieve.worker.compute import Computed

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)

EVENTS_IN = Counter("sieve_events_in_total", "Records consumed from input topics.", ["topology", "topic"])
DECISIONS = Counter(
    "sieve_decisions_total", "Decisions published.", ["topology", "outcome", "route", "decided_by"]
)
# Decisions per tenant: the label is the tenant's policy name when the topology has a policy of
# that name, else "_default" (no tenant, an unknown or an invalid one), so it stays bounded.
TENANT_DECISIONS = Counter(
    "sieve_tenant_decisions_total", "Decisions published, by tenant policy.",
    ["topology", "tenant", "outcome"],
)
DEAD_LETTERS = Counter(
    "sieve_dead_letters_total", "Inputs sent to the dead-letter topic.", ["topology", "stage", "reason"]
)
BATCH_SIZE = Histogram("sieve_batch_size", "Records per batch.", ["topology"], buckets=_BATCH_BUCKETS)
STAGE_SECONDS = Histogram(
    "sieve_stage_seconds",
    "Seconds per batch in each stage (decode, encode, match, decide, publish).",
    ["topology", "stage"],
    buckets=_LATENCY_BUCKETS,
)
END_TO_END_SECONDS = Histogram(
    "sieve_end_to_end_seconds",
    "From the event's Kafka timestamp to its decision acknowledged by the broker.",
    ["topology"],
    buckets=_LATENCY_BUCKETS,
)
BATCH_RETRIES = Counter(
    "sieve_batch_retries_total", "Batches retried after a failure.", ["topology", "stage"]
)
ROUTE_SET = Info("sieve_route_set", "Route set in use.")
ROUTE_SET_RELOADS = Counter(
    "sieve_route_set_reloads_total", "New route-set versions picked up.", ["topology"]
)
# The novel share (drift): novel / measured per route set, against the share fitted on
# calibration data. Labelled by topology and route set: tenants deciding with their own
# route sets (docs/tenants.md) have their own series.
NOVELTY_MEASURED = Counter(
    "sieve_novelty_measured_events_total",
    "Decisions whose novelty was measured (the route set has a novelty threshold in the event's space).",
    ["topology", "route_set"],
)
NOVEL_EVENTS = Counter(
    "sieve_novel_events_total",
    "Decisions of events above the route set's novelty threshold (novel: true).",
    ["topology", "route_set"],
)
ROUTE_SET_REFUSED = Gauge(
    "sieve_route_set_refused",
    "1 while the route store's active version is refused (incomplete, forged, or failing to load) "
    "and the worker keeps deciding with the version it runs.",
    ["topology", "space"],
)
CACHE_HITS = Counter(
    "sieve_cache_hits_total",
    "Decisions taken from the repeat cache (from_cache: true); over sieve_decisions_total: the hit ratio.",
    ["topology"],
)
LIST_HITS = Counter(
    "sieve_list_hits_total",
    "List entries that fired (term, pattern or image hash), by list and entry.",
    ["topology", "list", "entry"],
)
NOVEL_BASELINE = Gauge(
    "sieve_novel_baseline",
    "Share of novel events on the calibration data the route set's novelty threshold was fitted on.",
    ["topology", "route_set"],
)
WORKER_FAULT = Gauge(
    "sieve_worker_fault",
    "1 while the worker is in a worker fault (every event failing the same way, or a compute call "
    "timing out): it consumes nothing, is not ready, and exits once the fault outlasts worker_fault_exit_s.",
    ["topology"],
)
WORKER_FAULTS = Counter(
    "sieve_worker_faults_total",
    "Worker faults entered, by the stage and error class every event failed with.",
    ["topology", "stage", "error"],
)
PUBLISH_FAILURES = Counter(
    "sieve_publish_failures_total",
    "Failed attempts to publish a batch, by what was done (retry, dead_letter, create_topic, fatal).",
    ["topology", "action"],
)
# A shadow version (topology route_set.shadow, sieve.flow.shadow) decided beside the active one:
# agreed / events is its agreement, automatic / events its automatic share, novel / events its
# novel share. Labelled by topology and the shadow's version (one at a time per worker).
SHADOW_EVENTS = Counter(
    "sieve_shadow_events_total", "Events the shadow version decided beside the active one.",
    ["topology", "shadow_version"],
)
SHADOW_AGREED = Counter(
    "sieve_shadow_agreed_total", "Shadowed events whose shadow outcome and route were the active decision's.",
    ["topology", "shadow_version"],
)
SHADOW_AUTOMATIC = Counter(
    "sieve_shadow_automatic_total", "Shadowed events the shadow version would have decided automatically "
    "(an outcome other than needs_review).", ["topology", "shadow_version"],
)
SHADOW_NOVEL = Counter(
    "sieve_shadow_novel_total", "Shadowed events novel by the shadow version's novelty threshold.",
    ["topology", "shadow_version"],
)
SHADOW_ACTIVE_AUTOMATIC = Counter(
    "sieve_shadow_active_automatic_total", "Shadowed events the active version decided automatically "
    "(the shadow automatic share's counterpart on the same events).", ["topology", "shadow_version"],
)
SHADOW_BOTH_AUTOMATIC = Counter(
    "sieve_shadow_both_automatic_total", "Shadowed events both versions decided automatically.",
    ["topology", "shadow_version"],
)
SHADOW_BOTH_AUTOMATIC_AGREED = Counter(
    "sieve_shadow_both_automatic_agreed_total", "Shadowed events both versions decided automatically, "
    "alike (outcome and route): the shadow's agreement where the active version was sure.",
    ["topology", "shadow_version"],
)
SHADOW_BOTH_AUTOMATIC_EQUIVALENT = Counter(
    "sieve_shadow_both_automatic_equivalent_total", "Shadowed events both versions decided "
    "automatically with the same outcome, and the same route unless the outcome is the route set's "
    "default (clean through a benign route or through none is the same decision).",
    ["topology", "shadow_version"],
)
IN_FLIGHT = Gauge("sieve_batch_in_flight", "1 while a batch is being processed.", ["topology"])
CONSUMER_LAG = Gauge(
    "sieve_consumer_lag",
    "Records not yet committed per assigned input partition: the high-water mark from the last "
    "Fetch response minus the group's committed offset.",
    ["topology", "topic", "partition"],
)
ASSIGNED_PARTITIONS = Gauge(
    "sieve_assigned_partitions", "Input partitions assigned to this worker.", ["topology"]
)
HEARTBEAT = Gauge(
    "sieve_heartbeat_timestamp_seconds",
    "Unix time of the event loop's last heartbeat (what /healthz checks).",
    ["topology"],
)


def observe_many(histogram: Histogram, values: np.ndarray) -> None:
    """``histogram.observe(v)`` for every value, counted per bucket in one pass.

    The same bucket counts and sum as observing one by one (tested), without a call
    and a lock per event: a batch has thousands. Uses the histogram's bucket
    counters (``_upper_bounds``, ``_buckets``, ``_sum``, prometheus-client >= 0.20).
    """
    if len(values) == 0:
        return
    bounds = histogram._upper_bounds
    # observe() counts a value in the first bucket whose upper bound is >= the value
    counts = np.bincount(np.searchsorted(bounds, values, side="left"), minlength=len(bounds))
    for bucket, count in zip(histogram._buckets, counts.tolist(), strict=True):
        if count:
            bucket.inc(count)
    histogram._sum.inc(float(values.sum()))


def record_batch(
    topology: str, records: list[RawRecord], result: Computed, publish_seconds: float
) -> None:
    """Account for one batch whose messages were all acknowledged by the broker."""
    acked_at = time.time()
    for topic, count in Tally(record.topic or "" for record in records).items():
        EVENTS_IN.labels(topology, topic).inc(count)
    BATCH_SIZE.labels(topology).observe(len(records))
    for stage, seconds in result.seconds.items():
        STAGE_SECONDS.labels(topology, stage).observe(seconds)
    STAGE_SECONDS.labels(topology, "publish").observe(publish_seconds)
    latency = END_TO_END_SECONDS.labels(topology)
    observe_many(latency, np.maximum(0.0, acked_at - np.asarray(result.event_times, dtype=np.float64)))
    for (outcome, route, decided_by), count in result.outcomes.items():
        DECISIONS.labels(topology, outcome, route, decided_by).inc(count)
    for (tenant, outcome), count in result.tenants.items():
        TENANT_DECISIONS.labels(topology, tenant, outcome).inc(count)
    letters = Tally((letter.stage, letter.reason) for letter in result.dead_letters)
    for (stage, reason), count in letters.items():
        DEAD_LETTERS.labels(topology, stage, reason).inc(count)
    for route_set, count in result.novelty_measured.items():
        NOVELTY_MEASURED.labels(topology, route_set).inc(count)
    for route_set, count in result.novel.items():
        NOVEL_EVENTS.labels(topology, route_set).inc(count)
    if result.from_cache:
        CACHE_HITS.labels(topology).inc(result.from_cache)
    for (list_name, entry), count in result.list_hits.items():
        LIST_HITS.labels(topology, list_name, entry).inc(count)
    shadow = result.shadow
    if shadow is not None:
        SHADOW_EVENTS.labels(topology, shadow.version).inc(shadow.events)
        SHADOW_AGREED.labels(topology, shadow.version).inc(shadow.agreed)
        SHADOW_AUTOMATIC.labels(topology, shadow.version).inc(shadow.automatic)
        SHADOW_NOVEL.labels(topology, shadow.version).inc(shadow.novel)
        SHADOW_ACTIVE_AUTOMATIC.labels(topology, shadow.version).inc(shadow.active_automatic)
        SHADOW_BOTH_AUTOMATIC.labels(topology, shadow.version).inc(shadow.both_automatic)
        SHADOW_BOTH_AUTOMATIC_AGREED.labels(topology, shadow.version).inc(shadow.both_automatic_agreed)
        SHADOW_BOTH_AUTOMATIC_EQUIVALENT.labels(topology, shadow.version).inc(
            shadow.both_automatic_equivalent)


def record_route_set(topology: str, index: RouteIndex, *, info: bool = True) -> None:
    """The route-set version in use (on start and on every reload): its info and novelty baseline.

    ``info``: also the ``sieve_route_set`` info (the topology's own set; a tenant's has only its baseline).

    A version without a fitted baseline (no novelty, or a threshold set by hand) has no
    baseline series, so the drift alert has nothing stale to compare against.
    """
    route_set = index.route_set
    if info:
        ROUTE_SET.info({"route_set": route_set.name, "version": index.version, "encoder": index.encoder_id})
    novelty = route_set.defaults.novelty
    if novelty is not None and novelty.baseline is not None:
        NOVEL_BASELINE.labels(topology, route_set.name).set(novelty.baseline)
    else:
        try:
            NOVEL_BASELINE.remove(topology, route_set.name)
        except KeyError:
            pass  # it had none
