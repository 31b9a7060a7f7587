"""A route set as YAML a person can read and edit (``sieve routes build`` and ``fit`` write it)."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from sieve.routeset import RouteSet

_YAML_BREAKS = ("\x85", "\u2028", "\u2029")


class _RouteSetDumper(yaml.SafeDumper):
    """Safe YAML, but strings holding YAML's extra line breaks are double-quoted (escaped)."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = '"' if any(ch in value for ch in _YAML_BREAKS) else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_RouteSetDumper.add_representer(str, _represent_str)


def dump_route_set(route_set: RouteSet, to_dir: Path | None = None) -> str:
    """The route set as YAML a person can read and edit (round-trips exactly).

    ``to_dir``: the folder the YAML will be written in; the set's list files (``lists``,
    relative to the route file) are then named relative to it, so a route file written
    elsewhere (``sieve fit``'s output) still finds them.
    """
    data = route_set.model_dump(mode="json", exclude_none=True)
    if to_dir is not None and data.get("lists"):
        data["lists"] = [os.path.relpath(route_set.list_path(name), Path(to_dir).resolve())
                         for name in data["lists"]]
    for route in data["routes"]:
        for key in ("utterances", "images", "prompts"):
            if not route.get(key):
                route.pop(key, None)
    if not route_set.routes_in("image"):
        data.pop("image_defaults", None)
    return yaml.dump(data, Dumper=_RouteSetDumper, sort_keys=False, allow_unicode=True, width=100)
