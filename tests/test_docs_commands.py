"""The docs show only commands that exist.

Every ``sieve ...`` command line in README.md and docs/*.md — in code blocks and in inline
code spans — must name a real subcommand path of the ``sieve`` CLI, and every ``--option``
(or ``-o``) it shows must be an option of that command. Every ``make TARGET`` shown must be a
target of the Makefile. The checks read the typer app itself, so a renamed command or option
fails here until the docs follow.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import typer

from sieve.cli import app

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.M | re.S)
# Inline code: one backtick each side; a span may wrap onto the next line.
SPAN = re.compile(r"(?<!`)`([^`\n]+(?:\n[^`\n]+)?)`(?!`)")
SEPARATORS = {";", "&", "&&", "|", "||"}
SIEVE = {"sieve", ".venv/bin/sieve", "$(BIN)/sieve"}
PYTHON = re.compile(r"(.*/)?python3?$")
ENV_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")
OPTION = re.compile(r"--[A-Za-z0-9][A-Za-z0-9-]*|-[A-Za-z]")


@dataclass(frozen=True)
class Shown:
    """A command as a doc shows it: the program's arguments, and where it is."""

    where: str
    args: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.where}: {' '.join(self.args)}"


def _line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def code_snippets(text: str) -> list[tuple[int, str]]:
    """(line number, code) for every code-block line and every inline code span."""
    snippets: list[tuple[int, str]] = []
    for block in FENCE.finditer(text):
        body = block.group(1).replace("\\\n", " ")  # shell line continuations
        first = _line_of(text, block.start(1))
        for i, line in enumerate(body.split("\n")):
            snippets.append((first + i, line))
    prose = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    for span in SPAN.finditer(prose):
        snippets.append((_line_of(prose, span.start(1)), span.group(1).replace("\n", " ")))
    return snippets


def _tokens(code: str) -> list[str]:
    lexer = shlex.shlex(code, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    try:
        return list(lexer)
    except ValueError:  # an unbalanced quote in prose: plain words will do
        return code.split()


def _segments(tokens: list[str]) -> list[list[str]]:
    segments: list[list[str]] = [[]]
    for token in tokens:
        if token in SEPARATORS:
            segments.append([])
        else:
            segments[-1].append(token)
    return [s for s in segments if s]


def invocations(code: str, program: str) -> list[tuple[str, ...]]:
    """The arguments of each call of ``program`` (``sieve`` or ``make``) in one snippet."""
    found = []
    for segment in _segments(_tokens(code)):
        while segment and ENV_ASSIGNMENT.match(segment[0]):
            segment = segment[1:]
        if not segment:
            continue
        if program == "sieve":
            if segment[0] in SIEVE:
                found.append(tuple(segment[1:]))
            elif PYTHON.match(segment[0]) and segment[1:3] == ["-m", "sieve"]:
                found.append(tuple(segment[3:]))
        elif segment[0] == program:
            found.append(tuple(segment[1:]))
    return found


def shown_commands(text: str, where: str, program: str = "sieve") -> list[Shown]:
    return [
        Shown(f"{where}:{line}", args)
        for line, code in code_snippets(text)
        for args in invocations(code, program)
    ]


def check_sieve_command(root: Any, shown: Shown) -> list[str]:
    """What is wrong with one shown ``sieve`` command: an unknown subcommand or option."""
    command, path = root, ["sieve"]
    args = [a.strip("[](){},") for a in shown.args]
    i = 0
    while hasattr(command, "commands") and i < len(args) and not args[i].startswith("-"):
        name = args[i]
        default = getattr(command, "default_command", None)  # `sieve console TOPOLOGY`: serve
        if name not in command.commands and default in command.commands:
            command, path = command.commands[default], [*path, default]
            continue
        if name not in command.commands:
            return [f"{shown}: no command '{' '.join([*path, name])}'"]
        command, path, i = command.commands[name], [*path, name], i + 1
    known = {"--help"}
    for param in command.params:
        known |= {o for o in (*param.opts, *param.secondary_opts) if o.startswith("-")}
    problems = []
    for arg in args[i:]:
        option = arg.split("=", 1)[0]
        if OPTION.fullmatch(option) and option not in known:
            problems.append(f"{shown}: '{' '.join(path)}' has no option {option}")
    return problems


def makefile_targets(makefile: str) -> set[str]:
    return set(re.findall(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", makefile, re.M))


def check_make_command(targets: set[str], shown: Shown) -> list[str]:
    wanted = [a for a in shown.args if not a.startswith("-") and "=" not in a]
    return [f"{shown}: no make target '{t}'" for t in wanted if t not in targets]


@pytest.fixture(scope="module")
def cli() -> Any:
    return typer.main.get_command(app)


@pytest.fixture(scope="module")
def targets() -> set[str]:
    return makefile_targets((REPO / "Makefile").read_text(encoding="utf-8"))


def _shown_in(doc: Path, program: str = "sieve") -> list[Shown]:
    return shown_commands(doc.read_text(encoding="utf-8"), str(doc.relative_to(REPO)), program)


def test_the_readme_shows_the_tour_commands() -> None:
    """The extraction finds what the README shows, so the checks below are not vacuous."""
    shown = {s.args[:2] for s in _shown_in(REPO / "README.md")}
    assert {("routes", "sync"), ("routes", "check"), ("topics", "create")} <= shown
    assert {a[:1] for a in shown} >= {("broker",), ("worker",), ("produce",), ("tail",)}
    assert {s.args for s in _shown_in(REPO / "README.md", "make")} >= {("demo",), ("test",)}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_sieve_command_shown_exists_with_its_options(doc: Path, cli: Any) -> None:
    problems = [p for shown in _shown_in(doc) for p in check_sieve_command(cli, shown)]
    assert problems == []


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_make_target_shown_exists(doc: Path, targets: set[str]) -> None:
    problems = [p for shown in _shown_in(doc, "make") for p in check_make_command(targets, shown)]
    assert problems == []


def test_a_made_up_command_or_option_is_reported(cli: Any, targets: set[str]) -> None:
    text = (
        "Run `sieve tail sieve.clean --follow -f` and `sieve routes frobnicate x.yaml`.\n"
        "```bash\n"
        "SIEVE_X=1 .venv/bin/sieve worker t.yaml --sync --no-such-option 3  # a comment --nope\n"
        "make demo && make no-such-target\n"
        "python -m sieve fit data --routes r.yaml \\\n"
        "    --min-accuracy=0.9 --bogus\n"
        "```\n"
    )
    sieve_problems = [p for s in shown_commands(text, "x.md") for p in check_sieve_command(cli, s)]
    assert sieve_problems == [
        "x.md:3: worker t.yaml --sync --no-such-option 3: 'sieve worker' has no option --no-such-option",
        "x.md:5: fit data --routes r.yaml --min-accuracy=0.9 --bogus: 'sieve fit' has no option --bogus",
        "x.md:1: routes frobnicate x.yaml: no command 'sieve routes frobnicate'",
    ]
    make_problems = [p for s in shown_commands(text, "x.md", "make") for p in check_make_command(targets, s)]
    assert make_problems == ["x.md:4: no-such-target: no make target 'no-such-target'"]
