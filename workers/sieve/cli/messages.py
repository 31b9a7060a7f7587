"""``sieve produce`` and ``sieve tail``: send JSON lines to a topic, print a topic's messages."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from sieve.cli.base import console
from sieve.settings import get_settings

app = typer.Typer()


@app.command()
def produce(
    path: Annotated[Path, typer.Argument(help="JSONL file, one event per line ('-' for stdin).")],
    topic: Annotated[str, typer.Option("--topic", "-t")],
) -> None:
    """Send each line of a JSONL file as one message (keyed by its 'id'); bad lines go as they are."""
    from sieve.kafka.client import produce as send_all

    lines = sys.stdin.buffer.read().splitlines() if str(path) == "-" else path.read_bytes().splitlines()
    messages = []
    for line in lines:
        if not line.strip():
            continue
        key = None
        try:
            event_id = json.loads(line).get("id")
            key = str(event_id).encode() if event_id is not None else None
        except (ValueError, AttributeError):
            pass
        messages.append((key, line))
    count = asyncio.run(send_all(get_settings().kafka, topic, messages))
    console.print(f"produced {count} messages to {topic}")


@app.command()
def tail(
    topics: Annotated[list[str], typer.Argument(help="Topics to read.")],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep waiting for messages.")] = False,
    idle: Annotated[float, typer.Option(help="Without --follow: stop after this many idle seconds.")] = 2.0,
    limit: Annotated[int | None, typer.Option(help="Stop after this many messages.")] = None,
) -> None:
    """Print messages of topics as JSON lines (from the beginning; commits nothing)."""
    from sieve.kafka.client import read_topic

    async def run() -> None:
        count = 0
        async for record in read_topic(get_settings().kafka, topics, idle_timeout_s=None if follow else idle):
            value = record.value.decode("utf-8", "replace") if record.value else ""
            sys.stdout.write(json.dumps({"topic": record.topic, "partition": record.partition,
                                         "offset": record.offset, "value": _maybe_json(value)}) + "\n")
            count += 1
            if limit is not None and count >= limit:
                return

    asyncio.run(run())


def _maybe_json(text: str) -> object:
    try:
        return json.loads(text)
    except ValueError:
        return text
