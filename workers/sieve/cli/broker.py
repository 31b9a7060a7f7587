"""``sieve broker``: the dev broker in the foreground."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from sieve.cli.base import console
from sieve.settings import get_settings

app = typer.Typer()


@app.command()
def broker(
    port: Annotated[int | None, typer.Option(help="Port; default: settings dev_broker.port.")] = None,
) -> None:
    """Run the dev broker (tansu, memory storage) on 127.0.0.1 in the foreground."""
    from sieve.kafka.broker import broker_command

    settings = get_settings()
    command = broker_command(settings.dev_broker.host, port or settings.dev_broker.port)
    console.print(f"dev broker on {settings.dev_broker.host}:{port or settings.dev_broker.port}")
    os.execv(command[0], command)
