"""The router worker: one topology's Faust agent around its compute, and its route refresh.

:func:`build_compute` picks where the batches are computed (``settings.compute_mode``:
:mod:`sieve.worker.compute`); :class:`RouterWorker` takes batches
(:class:`~sieve.worker.batch_worker.BatchWorker`), computes, publishes, and polls the
route store for a new route-set version.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import faust

from sieve.encoders.base import ImageEncoder, TextEncoder
from sieve.flow.dead_letter import make_dead_letter
from sieve.flow.match import RouteIndex
from sieve.flow.publish import plan_dead_letters
from sieve.kafka.records import RawRecord
from sieve.routeset import Space
from sieve.settings import Settings
from sieve.store.qdrant import RouteStore, RouteStoreError
from sieve.topology import Topology
from sieve.worker import metrics
from sieve.worker.app import build_app
from sieve.worker.batch_worker import BatchWorker
from sieve.worker.compute import Compute, Computed, ComputeTimeout, ThreadCompute, build_pipeline, run_bounded
from sieve.worker.compute_child import ProcessCompute

log = logging.getLogger(__name__)

_MAX_PROCESS_ATTEMPTS = 3


def build_compute(topology: Topology, settings: Settings, indexes: dict[Space, RouteIndex],
                  encoders: tuple[TextEncoder, ImageEncoder | None] | None = None,
                  tenant_indexes: dict[tuple[str, Space], RouteIndex] | None = None,
                  shadow_index: RouteIndex | None = None) -> Compute:
    """``settings.compute_mode``: a child that builds its own encoders, or the pipeline on a thread.

    On a thread the pipeline uses ``encoders`` when given (built here otherwise); a
    child always builds its own, so a worker in process mode need not load a model.
    ``tenant_indexes``: the tenants' route sets by (set name, space) (docs/tenants.md);
    ``shadow_index``: a version of the topology's own text route set to shadow (:mod:`sieve.flow.shadow`).
    """
    if settings.compute_mode == "process":
        return ProcessCompute(topology, settings, indexes, tenant_indexes, shadow_index)
    return ThreadCompute(build_pipeline(topology, settings, indexes, encoders, tenant_indexes, shadow_index))


def load_shadow_index(topology: Topology, store: RouteStore, ids: dict[Space, str]) -> RouteIndex | None:
    """The version ``route_set.shadow`` names, from the store in the text space; None without one.

    A version the store lacks (or refuses) is a :class:`RouteStoreError`: the worker does not start.
    """
    version = topology.route_set.shadow
    if version is None:
        return None
    try:
        return store.load(topology.route_set.name, ids["text"], version)
    except RouteStoreError as exc:
        raise RouteStoreError(
            f"route_set.shadow: version {version} of {topology.route_set.name!r}: {exc}") from None


def load_tenant_indexes(topology: Topology, store: RouteStore,
                        ids: dict[Space, str]) -> dict[tuple[str, Space], RouteIndex]:
    """The tenants' route sets (other than the topology's own) from the store, by (set name, space).

    A set missing from the store (or refused) is a :class:`RouteStoreError` naming its
    tenants. Its image index is loaded only when the set has image routes; without
    one the tenant's image events use the topology's (docs/tenants.md).
    """
    loaded: dict[tuple[str, Space], RouteIndex] = {}
    for ref in topology.tenant_route_sets()[1:]:
        tenants = ", ".join(topology.tenants_using(ref.name))
        try:
            text = loaded[(ref.name, "text")] = store.load(ref.name, ids["text"])
            if "image" in ids and text.route_set.routes_in("image"):
                loaded[(ref.name, "image")] = store.load(ref.name, ids["image"])
        except RouteStoreError as exc:
            raise RouteStoreError(f"tenant(s) {tenants}: route set {ref.name!r}: {exc}") from None
    return loaded


class RouterWorker(BatchWorker):
    """One topology's router: the Faust agent, route refresh and graceful drain.

    ``compute`` runs the batches (:mod:`sieve.worker.compute`: on a thread, or in a child process).
    """

    def __init__(
        self,
        topology: Topology,
        settings: Settings,
        compute: Compute,
        store: RouteStore | None = None,
        app: faust.App | None = None,
    ) -> None:
        super().__init__(topology.name, settings, app or build_app(topology, settings), topology.batching)
        self.topology = topology
        self.compute = compute
        self.store = store
        self._add_agent(topology.input.topics, topology.input.partitions, f"sieve.{topology.name}.router")
        if store is not None:
            self.app.timer(settings.route_refresh_s)(self._refresh_route_set)
        self._io = ThreadPoolExecutor(1, thread_name_prefix="sieve-store")
        # per (route set, space): the version last refused (logged once)
        self._refused: dict[tuple[str, Space], str] = {}

    async def handle(self, records: list[RawRecord]) -> Computed:
        """Process one batch to the end: it returns only once every output is acknowledged."""
        metrics.IN_FLIGHT.labels(self.topology.name).set(1)
        try:
            try:
                result = await self.faults.check(records, self._process)  # a worker fault waits here
            finally:
                self.compute_done()  # the next batch may be gathered while this one is published
            started = time.perf_counter()
            await self._publish(result.outbound, records)
            publish_seconds = time.perf_counter() - started
            metrics.record_batch(self.topology.name, records, result, publish_seconds)
            return result
        finally:
            metrics.IN_FLIGHT.labels(self.topology.name).set(0)

    async def _process(self, records: list[RawRecord]) -> Computed:
        """Compute the batch; retry; isolate a record that keeps failing (a compute timeout is raised)."""
        timeout = self.settings.compute_timeout_s
        for attempt in range(1, _MAX_PROCESS_ATTEMPTS + 1):
            try:
                return await run_bounded(self.compute, records, timeout)
            except ComputeTimeout:
                raise
            except Exception:
                log.exception("batch of %d failed (attempt %d)", len(records), attempt)
                metrics.BATCH_RETRIES.labels(self.topology.name, "process").inc()
                await asyncio.sleep(0.1 * 2**attempt)
        # The batch keeps failing: process record by record; dead-letter what fails alone.
        merged = Computed([], [], {}, {}, [])
        for record in records:
            try:
                one = await run_bounded(self.compute, [record], timeout)
            except ComputeTimeout:
                raise
            except Exception as exc:
                letter = make_dead_letter(
                    record,
                    stage="decide",
                    reason="pipeline_error",
                    error=f"{type(exc).__name__}: {exc}",
                    worker=self.settings.worker_name,
                    topology=self.topology.name,
                    max_payload_bytes=self.topology.limits.max_dead_letter_payload_bytes,
                )
                one = Computed(plan_dead_letters([letter], self.topology.output), [letter], {}, {}, [])
            merged.add(one)
        return merged

    # -- route-set refresh -------------------------------------------------------------------

    async def _refresh_route_set(self) -> None:
        """Pick up newly activated route-set versions, and the heads they carry, without a restart.

        Every route set the worker decides with is polled: the topology's own and each
        tenant's. Only a complete version loads (:meth:`RouteStore.load`); one the store
        or the pipeline refuses leaves the running version in place (``sieve_route_set_refused``
        is 1 for its space), and is tried again at the next refresh.
        """
        assert self.store is not None
        loop = asyncio.get_running_loop()
        own = self.topology.route_set.name
        for (name, space), current in self.compute.tenant_indexes.items():
            encoder_id = current.encoder_id
            try:
                version = await loop.run_in_executor(
                    self._io, self.store.current_version, name, encoder_id
                )
                if version is None or version == current.version:
                    continue
                try:
                    index = await loop.run_in_executor(self._io, self.store.load, name, encoder_id, version)
                    # the pipeline refuses a version that does not fit (ValueError: its encoder, its
                    # outcomes' topics, its head, a tenant's per-route thresholds naming a lost route)
                    await self.compute.swap_index(index)
                except (RouteStoreError, ValueError) as exc:
                    level = logging.DEBUG if self._refused.get((name, space)) == version else logging.ERROR
                    self._refused[(name, space)] = version
                    log.log(level, "route set %s (%s space): version %s refused, keeping version %s: %s",
                            name, space, version, current.version, exc)
                    metrics.ROUTE_SET_REFUSED.labels(self.topology.name, space).set(1)
                    continue
                self._refused.pop((name, space), None)
                if not any(refused_space == space for _, refused_space in self._refused):
                    metrics.ROUTE_SET_REFUSED.labels(self.topology.name, space).set(0)
                metrics.ROUTE_SET_RELOADS.labels(self.topology.name).inc()
                metrics.record_route_set(self.topology.name, index, info=name == own)
                head = " with its learned head" if space == "text" and index.route_set.head_bytes else ""
                log.info("route set %s (%s space): now at version %s%s", name, space, index.version, head)
            except Exception:
                log.exception("route-set %s refresh failed; keeping version %s", name, current.version)
