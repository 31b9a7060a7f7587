"""A topology whose route set carries a learned head: for runs with the head on.

Copies the topology and its route file into a folder, trains a head
(:mod:`sieve.flow.head`) on the route file's own examples with the topology's text
encoder, and saves it beside the copied routes (``<routes>.head.npz``); the copied
topology points at the copied routes. The head is then part of the route-set version:
``sieve routes sync`` stores it and the worker decides with it. Run on the copy for
"head on" and on the original for "head off":

    .venv/bin/python load-tests/with_head.py topologies/moderation.yaml /tmp/head-on
    .venv/bin/sieve demo --topology /tmp/head-on/moderation.yaml     # head on
    .venv/bin/sieve demo --topology topologies/moderation.yaml        # head off

``load-tests/bench_stream.py --head`` does the same for its own runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import yaml

from sieve.encoders.base import TextEncoder
from sieve.flow.head import train_head
from sieve.routeset import head_path_for, load_route_set
from sieve.routeset_dump import dump_route_set
from sieve.settings import Settings
from sieve.topology import load_topology


def copy_with_head(routes: Path, folder: Path, encoder: TextEncoder, weight: float = 0.5,
                   words: bool = False) -> Path:
    """A copy of ``routes`` in ``folder`` with a head trained on its own utterances beside it.

    ``words``: the head scores the texts' words too (``sieve routes build --head-words``).
    """
    folder.mkdir(parents=True, exist_ok=True)
    copy = folder / routes.name  # its list files named from there (the originals)
    copy.write_text(dump_route_set(load_route_set(routes), folder), encoding="utf-8")
    route_set = load_route_set(copy)
    rows = [(position, text) for position, route in enumerate(route_set.routes) for text in route.utterances]
    membership = np.eye(len(route_set.routes), dtype=bool)[[position for position, _ in rows]]
    texts = [text for _, text in rows]
    names = [route.name for route in route_set.routes]
    head = train_head(encoder.encode(texts), membership, names, encoder.id, weight=weight,
                      texts=texts if words else None)
    head.save(head_path_for(copy))
    return copy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("topology", type=Path)
    parser.add_argument("folder", type=Path, help="where the copied topology, routes and head go")
    parser.add_argument("--weight", type=float, default=0.5, help="the head's weight in a route's score")
    parser.add_argument("--words", action="store_true", help="the head scores the texts' words too")
    args = parser.parse_args()

    from sieve.worker.compute import build_encoders

    topology = load_topology(args.topology)  # paths in it resolved
    assert topology.route_set.file is not None, "the topology names no route file"
    encoder, _ = build_encoders(topology.model_copy(update={"image_encoder": None}), Settings())
    routes = copy_with_head(topology.route_set.file, args.folder / "routes", encoder, args.weight, args.words)
    data = topology.model_dump(mode="json", exclude_none=True)
    data["route_set"]["file"] = str(routes.resolve())
    out = args.folder / args.topology.name
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    load_topology(out)  # the copy is a valid topology
    route_set = load_route_set(routes)
    print(f"{out}: route set {route_set.name}@{route_set.version} with a head beside {routes} "
          f"(weight {args.weight:g}, encoder {encoder.id}{', words' if args.words else ''})")


if __name__ == "__main__":
    main()
