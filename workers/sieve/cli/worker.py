"""``sieve worker``: a router worker for one topology."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer

from sieve.cli.base import QuietOpt, console, fail, setup_logging
from sieve.cli.progress import progress_for
from sieve.cli.topics import create_topics
from sieve.settings import get_settings

app = typer.Typer()


@app.command()
def worker(
    topology_path: Annotated[Path, typer.Argument(help="Topology YAML, e.g. topologies/moderation.yaml")],
    sync: Annotated[bool, typer.Option(help="Sync the topology's route files (its tenants' too) before "
                                            "starting.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Run a router worker for one topology (joins its consumer group)."""
    from sieve.encoders.base import release_device_memory
    from sieve.kafka.startup import BrokerUnavailable, wait_for_broker
    from sieve.routeset import RouteSetError
    from sieve.store.qdrant import RouteStore, RouteStoreError
    from sieve.topology import TopologyError, load_tenant_route_sets, load_topology, load_topology_route_set
    from sieve.worker.app import DrainingWorker
    from sieve.worker.compute import build_encoders, encoder_ids, limit_blas_threads, settle_heap
    from sieve.worker.health import attach_router, serve
    from sieve.worker.metrics import record_route_set
    from sieve.worker.router import RouterWorker, build_compute, load_shadow_index, load_tenant_indexes

    setup_logging()
    settings = get_settings()
    limit_blas_threads(settings)
    progress = progress_for(console, quiet=quiet)
    try:
        topology = load_topology(topology_path)
        route_set = load_topology_route_set(topology)
        tenant_sets = load_tenant_route_sets(topology)  # the tenants' other route sets (docs/tenants.md)
        # the brokers first: a worker started before them waits (kafka.startup_timeout_s)
        asyncio.run(wait_for_broker(settings.kafka))
        store = RouteStore(settings.qdrant)
        # Models load here only to embed routes (--sync) or to run on a thread; with
        # compute=process the child loads its own, and the index is found by encoder id.
        encoders = None
        if sync or settings.compute_mode == "thread":
            encoders = build_encoders(topology, settings)
        if sync:
            assert encoders is not None
            for model in encoders:
                if model is not None:
                    store.sync(route_set, model, progress=progress)
            for tenant_set in tenant_sets:
                store.sync(tenant_set, encoders[0], progress=progress)
                if encoders[1] is not None and tenant_set.routes_in("image"):
                    store.sync(tenant_set, encoders[1], progress=progress)
        ids = encoder_ids(topology)
        indexes = {space: store.load(topology.route_set.name, model_id) for space, model_id in ids.items()}
        tenant_indexes = load_tenant_indexes(topology, store, ids)
        shadow_index = load_shadow_index(topology, store, ids)  # route_set.shadow (docs/routes.md)
        compute = build_compute(topology, settings, indexes, encoders, tenant_indexes, shadow_index)
    except (TopologyError, RouteSetError, RouteStoreError, BrokerUnavailable, ValueError) as exc:
        fail(str(exc))
    if encoders is not None and compute.mode == "process":
        del encoders
        release_device_memory()  # the compute child built its own encoders
    index = indexes["text"]
    tenant_route_sets = [i.route_set for (_, space), i in tenant_indexes.items() if space == "text"]
    asyncio.run(create_topics(topology, index.route_set, *tenant_route_sets))
    record_route_set(topology.name, index)
    for tenant_index in tenant_indexes.values():
        record_route_set(topology.name, tenant_index, info=False)
    router = RouterWorker(topology, settings, compute, store)
    attach_router(router)  # /healthz heartbeat, /readyz checks, consumer-lag gauges
    serve(settings.metrics_host, settings.metrics_port, settings.health)
    console.print(
        f"worker {settings.worker_name}: topology {topology.name}, route set "
        f"{index.route_set.name}@{index.version}"
        + "".join(f", tenant set {i.route_set.name}@{i.version}" for (_, sp), i in tenant_indexes.items()
                  if sp == "text")
        + (f", shadow {shadow_index.version}" if shadow_index is not None else "")
        + f", encoder {', '.join(ids.values())}, compute {compute.mode}, "
        f"metrics :{settings.metrics_port}"
    )
    settle_heap()
    DrainingWorker(router, loglevel=settings.log_level, quiet=True).execute_from_commandline()
