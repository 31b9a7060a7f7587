"""``sieve labels ...``: the labels topic (final verdicts) as labelled data."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from sieve.cli.base import console, fail

if TYPE_CHECKING:
    from sieve.contracts import Label

app = typer.Typer(help="Labels: final verdicts (the reviewer's, moderators') as labelled data.",
                  no_args_is_help=True)


async def _read_messages(topics: list[str], idle_s: float) -> list[bytes]:
    from sieve.kafka.client import read_topic
    from sieve.settings import get_settings

    return [record.value async for record in read_topic(get_settings().kafka, topics, idle_timeout_s=idle_s)
            if record.value is not None]


@app.command("export")
def labels_export(
    out: Annotated[Path, typer.Option("--out", help="The labelled JSONL to write.")],
    topic: Annotated[str, typer.Option(help="The labels topic.")] = "sieve.labels",
    from_file: Annotated[Path | None, typer.Option(
        "--from-file", help="Read label messages from this JSONL file instead of the topic.")] = None,
    idle: Annotated[float, typer.Option(help="Stop reading the topic after this many idle seconds.")] = 3.0,
) -> None:
    """Write one labelled row per content (eval, fit and routes build read it); report repeats and conflicts.

    Labels that disagree about the same content are a conflict: a human's label wins over
    an LLM's, then the latest; each conflict is listed, and the export goes on.
    """
    from sieve.quality.labels import LabelReport, export_rows, parse_labels, write_jsonl

    report = LabelReport()
    if from_file is not None:
        try:
            lines: list[bytes] = from_file.read_bytes().splitlines()
        except OSError as exc:
            fail(f"{from_file}: cannot read: {exc.strerror or exc}")
    else:
        lines = asyncio.run(_read_messages([topic], idle))
    rows, report = export_rows(parse_labels(lines, report), report)
    if not rows:
        fail(f"no labels to export ({report.read} messages read, {report.unreadable} unreadable)")
    write_jsonl(rows, out)
    console.print(
        f"wrote {report.exported} labelled rows to {out}: {report.read} messages, {report.repeats} repeats, "
        f"{report.duplicates} duplicates, {len(report.conflicts)} conflicts, {report.unreadable} unreadable, "
        f"{report.no_content} without content (inline images), {report.not_final} not final"
    )
    for conflict in report.conflicts[:20]:
        lost = ", ".join(_verdict(o) for o in conflict.overruled)
        console.print(f"  conflict {conflict.content[:60]!r}: kept {_verdict(conflict.kept)}; "
                      f"overruled {lost}")


@app.command("anchors")
def labels_anchors(
    out: Annotated[Path, typer.Option("--out", help="The labelled JSONL to write.")],
    topic: Annotated[list[str], typer.Option(help="An outcome topic (repeatable), e.g. sieve.clean.")],
    version: Annotated[str | None, typer.Option(
        help="Keep only this route-set version's decisions (the active one's).")] = None,
    idle: Annotated[float, typer.Option(help="Stop reading the topics after this many idle seconds.")] = 3.0,
) -> None:
    """Write the router's own automatic decisions as labelled rows, one per text (`routes learn --anchors`).

    A candidate learned with them keeps what the active version decides by itself, which
    reviewers' labels never cover. They are the router's word: the file may be empty.
    """
    from sieve.quality.anchors import anchor_rows
    from sieve.quality.labels import write_jsonl

    rows, report = anchor_rows(asyncio.run(_read_messages(topic, idle)), version)
    write_jsonl(rows, out)
    console.print(
        f"wrote {report.exported} anchors to {out}: {report.read} decisions, {report.other_version} of "
        f"other versions, {report.not_automatic} not automatic, {report.no_text} without text, "
        f"{report.repeats} repeated texts, {report.unreadable} unreadable"
    )


def _verdict(label: Label) -> str:
    return f"{label.outcome} {sorted(label.routes)} by {label.labeller_kind}:{label.labeller}"
