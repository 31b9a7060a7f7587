"""The command line: its assembly, ``--quiet`` on the long commands, and the rich progress display."""

from __future__ import annotations

import io
import re

import pytest
from rich.console import Console
from typer.main import get_command
from typer.testing import CliRunner

from sieve.cli import app
from sieve.cli.progress import RichProgress, progress_for
from sieve.progress import SILENT

LONG_COMMANDS = [
    ["routes", "sync"],
    ["routes", "build"],
    ["eval"],
    ["fit"],
    ["dead-letters", "replay"],
    ["worker"],  # exports an ONNX backend's model and syncs routes (--sync) before it starts
]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def plain(text: str) -> str:
    return ANSI.sub("", text)


def test_every_command_group_is_assembled() -> None:
    cli = get_command(app)
    assert set(cli.commands) == {  # type: ignore[attr-defined]
        "broker", "routes", "tiny-clip", "topics", "worker", "review", "produce", "tail",
        "dead-letters", "schemas", "demo", "eval", "fit", "lists", "labels", "console",
    }
    routes = cli.commands["routes"]  # type: ignore[attr-defined]
    assert set(routes.commands) == {"check", "sync", "build", "learn", "versions", "promote", "rollback"}
    assert set(cli.commands["console"].commands) == {"serve", "users"}  # type: ignore[attr-defined]


@pytest.mark.parametrize("command", LONG_COMMANDS, ids=" ".join)
def test_long_commands_take_quiet(command: list[str]) -> None:
    result = CliRunner().invoke(app, [*command, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert re.search(r"--quiet\s+-q\b", plain(result.output)), result.output


def test_quiet_is_parsed_and_the_command_runs(tmp_path) -> None:
    result = CliRunner().invoke(app, ["routes", "sync", str(tmp_path / "nope.yaml"), "-q",
                                      "--encoder", "trivial"])
    assert result.exit_code == 2, result.output
    assert "nope.yaml" in result.output


def terminal() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=True, width=100), out


def test_rich_progress_advances_a_task_to_its_total() -> None:
    console, out = terminal()
    with RichProgress(console).task("encoding examples", total=3) as advance:
        advance(1)
        advance(2)
    drawn = plain(out.getvalue())
    assert "encoding examples" in drawn
    assert "3/3" in drawn


def test_rich_progress_shows_where_an_unfinished_task_stopped() -> None:
    console, out = terminal()
    with RichProgress(console).task("replaying", total=5) as advance:
        advance(2)
    drawn = plain(out.getvalue())
    assert "2/5" in drawn and "5/5" not in drawn


def test_rich_progress_closes_a_task_of_unknown_size_at_its_count() -> None:
    console, out = terminal()
    with RichProgress(console).task("reading", total=None) as advance:
        advance(4)
    assert "4/4" in plain(out.getvalue())


def test_nested_tasks_share_one_display() -> None:
    console, out = terminal()
    progress = RichProgress(console)
    with progress.task("route files", total=2) as outer:
        for _ in range(2):
            with progress.task("encoding", total=3) as inner:
                inner(3)
            outer(1)
    drawn = plain(out.getvalue())
    assert "2/2" in drawn and drawn.count("encoding") >= 2


def test_progress_is_drawn_only_on_a_terminal_and_not_when_quiet(monkeypatch) -> None:
    for variable in ("FORCE_COLOR", "TTY_COMPATIBLE"):
        monkeypatch.delenv(variable, raising=False)
    assert progress_for(Console(file=io.StringIO())) is SILENT
    console, _ = terminal()
    assert progress_for(console, quiet=True) is SILENT
    drawing = progress_for(console)
    assert isinstance(drawing, RichProgress) and drawing.console is console
