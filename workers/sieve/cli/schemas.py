"""``sieve schemas ...``: the JSON Schema files of the wire contracts."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sieve.cli.base import console, fail

app = typer.Typer(help="JSON Schema files of the wire contracts.", no_args_is_help=True)


@app.command("export")
def schemas_export(
    directory: Annotated[Path, typer.Argument()] = Path("schemas"),
    check: Annotated[bool, typer.Option(help="Fail if the files differ instead of writing.")] = False,
) -> None:
    """Write schemas/*.schema.json from the pydantic models."""
    from sieve.schema_export import export_schemas

    drift = export_schemas(directory, check=check)
    if check and drift:
        fail(f"schemas out of date: {', '.join(drift)}; run `sieve schemas export`")
    console.print("schemas up to date" if check else f"wrote schemas to {directory}")
