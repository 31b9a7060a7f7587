"""``sieve topics ...``: a topology's Kafka topics."""

from __future__ import annotations

import asyncio
from pathlib import Path

import typer

from sieve.cli.base import console
from sieve.routeset import RouteSet
from sieve.settings import get_settings
from sieve.topology import Topology

app = typer.Typer(help="Kafka topics of a topology.", no_args_is_help=True)


@app.command("create")
def topics_create(topology_path: Path) -> None:
    """Create a topology's input and output topics (those missing) with their partition counts."""
    from sieve.topology import load_tenant_route_sets, load_topology, load_topology_route_set

    topology = load_topology(topology_path)
    created = asyncio.run(create_topics(topology, load_topology_route_set(topology),
                                        *load_tenant_route_sets(topology)))
    console.print(f"created {len(created)} topics: {', '.join(created) or '-'}")


async def create_topics(topology: Topology, route_set: RouteSet, *more: RouteSet) -> list[str]:
    """Create the topology's input and output topics that are missing; their names (``more``: tenants')."""
    from sieve.kafka.client import ensure_topics

    settings = get_settings()
    wanted = {topic: topology.input.partitions for topic in topology.input.topics}
    wanted |= {topic: topology.output.partitions for topic in topology.output_topics(route_set, *more)}
    return await ensure_topics(settings.kafka, wanted, topology.output.replication_factor)
