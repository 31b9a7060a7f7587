"""``sieve dead-letters ...``: the dead-letter topic."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer

from sieve.cli.base import QuietOpt, console
from sieve.cli.progress import progress_for
from sieve.settings import get_settings

app = typer.Typer(help="The dead-letter topic.", no_args_is_help=True)


@app.command("replay")
def dead_letters_replay(
    topic: Annotated[str, typer.Option(help="The dead-letter topic.")] = "sieve.dead-letter",
    to: Annotated[str | None, typer.Option(help="Send here instead of each letter's source topic.")] = None,
    reason: Annotated[
        list[str] | None, typer.Option(help="Only letters with this reason (repeatable).")
    ] = None,
    group: Annotated[
        str, typer.Option(help="Consumer group that remembers what was replayed.")
    ] = "sieve-dead-letter-replay",
    idle: Annotated[float, typer.Option(help="Stop after this many idle seconds.")] = 3.0,
    dry_run: Annotated[
        bool, typer.Option(help="Only count what would be replayed; remember nothing.")
    ] = False,
    quiet: QuietOpt = False,
) -> None:
    """Re-send dead letters' original bytes (e.g. after a fix); truncated ones are reported, not sent.

    Only what was re-sent and acknowledged is remembered (by --group): letters another
    --reason left out stay replayable, and a failed send is retried by the next replay.
    """
    from sieve.worker.replay import replay_dead_letters

    progress = progress_for(console, quiet=quiet)
    summary = asyncio.run(
        replay_dead_letters(get_settings().kafka, topic, to=to, reasons=set(reason or []),
                            group=group, idle_s=idle, dry_run=dry_run, progress=progress)
    )
    console.print(
        f"replayed {summary.replayed}, skipped {summary.skipped} (filtered, still replayable), "
        f"already replayed {summary.already}, truncated {summary.truncated} (not replayable), "
        f"unreadable {summary.unreadable}"
    )
