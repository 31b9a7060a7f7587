"""Generate ``schemas/*.schema.json`` from the pydantic contracts.

The contracts only grow (docs/contracts.md); tests/test_contract_compat.py checks each
schema against a frozen copy of version 1.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel

from sieve.contracts import DeadLetter, Decision, Event, Label
from sieve.lists import HashList, TermList
from sieve.routeset import RouteSet
from sieve.topology import Topology

SCHEMAS: dict[str, type[BaseModel]] = {
    "event": Event,
    "decision": Decision,
    "dead-letter": DeadLetter,
    "label": Label,
    "route-set": RouteSet,
    "topology": Topology,
    "term-list": TermList,
    "hash-list": HashList,
}


def render_schema(name: str, model: type[BaseModel]) -> str:
    """One model's JSON Schema as the text committed under ``schemas/``."""
    schema = model.model_json_schema(mode="validation")
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema",
              "$id": f"sieve/{name}.schema.json", **schema}
    return json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def export_schemas(directory: Path, *, check: bool = False) -> list[str]:
    """Write (or, with ``check``, compare) every schema; returns the names that differ."""
    drift = []
    directory.mkdir(parents=True, exist_ok=True)
    for name, model in SCHEMAS.items():
        path = directory / f"{name}.schema.json"
        text = render_schema(name, model)
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current != text:
            drift.append(path.name)
            if not check:
                path.write_text(text, encoding="utf-8")
    return drift
