"""Where the router computes a batch: on a thread of the worker, or in a child process.

The pipeline (decode, encode, match, decide, serialise, plan) is pure per-event
Python around the encoder call. On a thread (``compute: thread``,
:class:`ThreadCompute`) it shares the interpreter lock with the event loop that runs
Faust's consumer and the producer: both stages take turns on one core. In a child
process (``compute: process``, :class:`~sieve.worker.compute_child.ProcessCompute`)
it runs on its own core and interpreter, and the worker's process keeps only the
Kafka side. The default, ``auto``, is the child when the worker may use two CPUs or
more (:func:`sieve.settings.usable_cpus`) and the thread otherwise
(:func:`sieve.worker.router.build_compute` picks). The child pays where the per-event
Python is the bound (a fast encoder, or a model on a GPU); where the encoder is the
bound (a transformer on the CPU) both modes make the same events/s and the child
costs a second interpreter.

Both return a :class:`Computed`: the messages to publish and what the metrics
count, never the decision rows (pickling those would cost more than the child saves).
The worker loads the route indexes by the encoder ids the topology names
(:func:`encoder_ids`), so it loads no model itself unless it embeds routes
(``--sync``) or computes on a thread; the pipeline checks the ids against its loaded
encoders (:func:`build_pipeline`).
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from threadpoolctl import threadpool_limits
from typing_extensions import override

from sieve.contracts import DeadLetter
from sieve.encoders.base import ImageEncoder, TextEncoder
from sieve.encoders.clip import clip_encoder_id
from sieve.encoders.factory import encoders_for, text_encoder_id
from sieve.flow.dedup import DecisionCache
from sieve.flow.match import RouteIndex
from sieve.flow.pipeline import BatchResult, RouterPipeline
from sieve.flow.shadow import ShadowStats
from sieve.kafka.records import Outbound, RawRecord
from sieve.routeset import Space
from sieve.settings import Settings
from sieve.topology import DEFAULT_TENANT_LABEL, TenantsSpec, Topology


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc: nothing to trim
        return None


_LIBC = _libc()


def settle_heap(gen0_threshold: int = 50_000) -> None:
    """Keep the garbage collector off the per-event path.

    A worker holds millions of long-lived objects after start-up (torch, the
    model, Faust); a batch allocates tens of objects per event that live until
    the batch is published. With CPython's default thresholds the collector runs
    every 700 allocations and the older generations walk that whole heap. So:
    collect once, freeze the start-up heap (never scanned again) and collect the
    young generation every ``gen0_threshold`` allocations instead (image batches collect
    after themselves: :func:`release_heap`).
    """
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(gen0_threshold, gen1, gen2)


def release_heap() -> None:
    """Collect the cycles a batch of image fetches leaves, and hand free heap pages back.

    Each fetch runs its own event loop and HTTP client on a fetch thread; what a failed one
    leaves is in reference cycles (tasks, tracebacks, frames), which the young-generation
    threshold of :func:`settle_heap` lets pile up, and the heap arenas of the fetch threads
    keep the pages of what was freed. ``malloc_trim`` returns those pages to the system.
    """
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


@dataclass
class Computed:
    """What the worker needs of a computed batch: the messages, and what the metrics count.

    ``outcomes`` counts decisions by ``(outcome, route or "", decided_by)``;
    ``event_times`` are the Kafka timestamps (s) of the decided events that had one
    (end-to-end latency is measured from them once the batch is acknowledged).
    ``novelty_measured`` counts, per route set, the decisions whose novelty was measured
    (``novel`` not None: the set has a novelty threshold in the event's space), and
    ``novel`` those of them that were novel: the novel share the drift alert watches.
    ``tenants`` counts decisions by ``(tenant label, outcome)``: the tenant's policy name
    when the topology has one of that name, else ``_default``. ``shadow``: the shadow
    version's counts (:mod:`sieve.flow.shadow`), None without one.
    """

    outbound: list[Outbound]
    dead_letters: list[DeadLetter]
    seconds: dict[str, float]
    outcomes: dict[tuple[str, str, str], int]
    event_times: list[float]
    novelty_measured: dict[str, int] = field(default_factory=dict)
    novel: dict[str, int] = field(default_factory=dict)
    from_cache: int = 0  # decisions taken from the repeat cache
    list_hits: dict[tuple[str, str], int] = field(default_factory=dict)  # (list, entry) -> hits
    tenants: dict[tuple[str, str], int] = field(default_factory=dict)  # (tenant label, outcome) -> decisions
    shadow: ShadowStats | None = None

    def add(self, other: Computed) -> None:
        """Take ``other``'s messages and counts into this one (a batch computed record by record)."""
        self.outbound += other.outbound
        self.dead_letters += other.dead_letters
        self.event_times += other.event_times
        _tally(self.outcomes, other.outcomes)
        _tally(self.novelty_measured, other.novelty_measured)
        _tally(self.novel, other.novel)
        self.from_cache += other.from_cache
        _tally(self.list_hits, other.list_hits)
        _tally(self.tenants, other.tenants)
        if other.shadow is not None:
            if self.shadow is None or self.shadow.version != other.shadow.version:
                self.shadow = ShadowStats(other.shadow.version)  # counts of a replaced shadow end here
            self.shadow.add(other.shadow)


def _tally(into: dict[Any, int], counts: dict[Any, int]) -> None:
    for key, count in counts.items():
        into[key] = into.get(key, 0) + count


def summarise(result: BatchResult, tenants: TenantsSpec | None = None) -> Computed:
    """A pipeline result reduced to what leaves the compute stage (``tenants``: the topology's)."""
    outcomes: dict[tuple[str, str, str], int] = {}
    event_times: list[float] = []
    measured: dict[str, int] = {}
    novel: dict[str, int] = {}
    from_cache = 0
    list_hits: dict[tuple[str, str], int] = {}
    by_tenant: dict[tuple[str, str], int] = {}
    for row in result.rows:
        tenant = tenants.label_for(row["event"]["tenant"]) if tenants is not None else DEFAULT_TENANT_LABEL
        by_tenant[(tenant, row["outcome"])] = by_tenant.get((tenant, row["outcome"]), 0) + 1
        if row.get("from_cache"):
            from_cache += 1
        for hit in row.get("list_hits") or ():
            key_hit = (hit["list"], hit["entry"])
            list_hits[key_hit] = list_hits.get(key_hit, 0) + 1
        key = (row["outcome"], row["route"] or "", row["decided_by"])
        outcomes[key] = outcomes.get(key, 0) + 1
        if row["latency_ms"] is not None:
            event_times.append(row["decided_at"].timestamp() - row["latency_ms"] / 1000.0)
        flag = row.get("novel")
        if flag is not None:
            route_set = row["route_set"]
            measured[route_set] = measured.get(route_set, 0) + 1
            if flag:
                novel[route_set] = novel.get(route_set, 0) + 1
    return Computed(
        result.outbound, result.dead_letters, result.seconds, outcomes, event_times, measured, novel,
        from_cache, list_hits, by_tenant, result.shadow,
    )


def limit_blas_threads(settings: Settings) -> None:
    """Cap numpy's BLAS thread pool at ``settings.blas_threads`` for this process (worker or child)."""
    threadpool_limits(limits=settings.blas_threads, user_api="blas")


def build_encoders(topology: Topology, settings: Settings) -> tuple[TextEncoder, ImageEncoder | None]:
    """The topology's text encoder and, when it has one, its image encoder (settings: device, threads)."""
    encoder, image_encoder = encoders_for(topology.encoder, topology.image_encoder, settings)
    assert encoder is not None
    return encoder, image_encoder


def encoder_ids(topology: Topology) -> dict[Space, str]:
    """Each space's encoder id, from the topology alone: what to load its route index by, no model loaded."""
    ids: dict[Space, str] = {"text": text_encoder_id(topology.encoder)}
    if topology.image_encoder is not None:
        ids["image"] = clip_encoder_id(topology.image_encoder.model, topology.image_encoder.pretrained)
    return ids


def build_pipeline(topology: Topology, settings: Settings, indexes: dict[Space, RouteIndex],
                   encoders: tuple[TextEncoder, ImageEncoder | None] | None = None,
                   tenant_indexes: dict[tuple[str, Space], RouteIndex] | None = None,
                   shadow_index: RouteIndex | None = None) -> RouterPipeline:
    """The topology's pipeline over ``indexes`` and ``tenant_indexes``, with ``encoders`` or ones built here.

    ``shadow_index``: a version of the topology's own text route set to shadow (:mod:`sieve.flow.shadow`).

    The pipeline refuses an index whose encoder id is not its encoder's, so ids taken
    from :func:`encoder_ids` are checked once the models load.
    """
    encoder, image_encoder = encoders or build_encoders(topology, settings)
    cache = None
    if settings.dedup_cache_mb > 0:
        cache = DecisionCache(int(settings.dedup_cache_mb * 2**20), settings.dedup_ttl_s)
    return RouterPipeline(topology, encoder, indexes["text"], settings.worker_name,
                          image_encoder=image_encoder, image_index=indexes.get("image"),
                          image_fetch=settings.images, cache=cache, tenant_indexes=tenant_indexes,
                          shadow_index=shadow_index, shadow_messages=settings.shadow_messages)


class Compute:
    """Runs batches through a topology's pipeline; holds the route indexes it decides against."""

    mode: str  # "thread" or "process"

    @property
    def indexes(self) -> dict[Space, RouteIndex]:
        """Every space's current route index."""
        raise NotImplementedError

    @property
    def tenant_indexes(self) -> dict[tuple[str, Space], RouteIndex]:
        """Every route set's current index (the topology's own and its tenants'), by (set name, space)."""
        return {(index.route_set.name, space): index for space, index in self.indexes.items()}

    async def run(self, records: list[RawRecord]) -> Computed:
        """One batch through every stage."""
        raise NotImplementedError

    async def swap_index(self, index: RouteIndex) -> None:
        """Decide against ``index`` (in its space) from the next batch on."""
        raise NotImplementedError

    def close(self) -> None:
        """Stop the thread or the child."""
        raise NotImplementedError


class ComputeTimeout(TimeoutError):
    """A compute call ran longer than ``compute_timeout_s``: a worker fault (:mod:`sieve.worker.faults`)."""


async def run_bounded(compute: Compute, records: list[RawRecord], timeout_s: float) -> Computed:
    """``compute.run(records)``, failing with :class:`ComputeTimeout` after ``timeout_s``.

    The call is abandoned, not stopped: a thread keeps running until the encoder returns,
    and the calls after it queue behind it (a hung encoder makes every later call time
    out too, which the worker treats as a fault and exits on).
    """
    try:
        async with asyncio.timeout(timeout_s) as scope:
            return await compute.run(records)
    except TimeoutError:
        if not scope.expired():  # the computation's own error, not the bound
            raise
        raise ComputeTimeout(f"computing a batch of {len(records)} took longer than "
                             f"compute_timeout_s ({timeout_s:g}s)") from None


def run_pipeline(pipeline: RouterPipeline, records: list[RawRecord]) -> Computed:
    """One batch through ``pipeline``, reduced to what leaves the compute stage.

    A batch that loaded images gives its memory back afterwards (:func:`release_heap`).
    """
    result = pipeline.process(records)
    if "image_load" in result.seconds:
        release_heap()
    return summarise(result, pipeline.topology.tenants)


class ThreadCompute(Compute):
    """The pipeline on one thread of the worker's process, a batch at a time."""

    mode = "thread"

    def __init__(self, pipeline: RouterPipeline) -> None:
        self.pipeline = pipeline
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="sieve-encode")

    @property
    @override
    def indexes(self) -> dict[Space, RouteIndex]:
        return self.pipeline.indexes

    @property
    @override
    def tenant_indexes(self) -> dict[tuple[str, Space], RouteIndex]:
        return self.pipeline.tenant_indexes

    @override
    async def run(self, records: list[RawRecord]) -> Computed:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, run_pipeline, self.pipeline, records)

    @override
    async def swap_index(self, index: RouteIndex) -> None:
        self.pipeline.swap_index(index)

    @override
    def close(self) -> None:
        self._executor.shutdown(wait=False)
