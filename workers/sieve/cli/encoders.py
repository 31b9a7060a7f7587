"""``sieve tiny-clip``: a tiny open_clip model for tests and the offline image demo."""

from __future__ import annotations

from pathlib import Path

import typer

from sieve.cli.base import console

app = typer.Typer()


@app.command("tiny-clip")
def tiny_clip(directory: Path, seed: int = 0) -> None:
    """Write a tiny open_clip model with seeded random weights (tests and the offline image demo)."""
    from sieve.encoders.clip import save_tiny_clip

    save_tiny_clip(directory, seed)
    console.print(f"wrote a tiny open_clip model to {directory}; use model: local-dir:{directory.resolve()}")
