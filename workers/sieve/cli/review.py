"""``sieve review``: an LLM reviewer for a topology's needs-review topic."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sieve.cli.base import console, fail, setup_logging
from sieve.settings import get_settings

app = typer.Typer()


@app.command()
def review(
    topology_path: Annotated[Path, typer.Argument(help="Topology YAML, e.g. topologies/moderation.yaml")],
) -> None:
    """Run an LLM reviewer for a topology's needs-review topic (settings: SIEVE_LLM__*)."""
    from sieve.kafka.startup import BrokerUnavailable
    from sieve.review.worker import run_reviewer
    from sieve.routeset import RouteSetError
    from sieve.topology import TopologyError, load_topology, load_topology_route_set

    setup_logging()
    try:
        topology = load_topology(topology_path)
        route_set = load_topology_route_set(topology)
        get_settings().llm.check_key_transport()
    except (TopologyError, RouteSetError, ValueError) as exc:
        fail(str(exc))
    try:
        run_reviewer(topology, route_set, get_settings(), console.print)
    except BrokerUnavailable as exc:
        fail(str(exc))
