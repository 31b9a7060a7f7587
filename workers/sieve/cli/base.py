"""What the commands share: the stderr console, failing with a message, logging, common options."""

from __future__ import annotations

import logging
import shlex
import sys
from typing import Annotated, NoReturn

import typer
from rich.console import Console

from sieve.settings import get_settings

console = Console(stderr=True)

EncoderKind = Annotated[
    str, typer.Option("--encoder", help="sentence-transformers (default) or trivial (no model).")
]
ModelOpt = Annotated[
    str | None, typer.Option("--model", help="sentence-transformers model path; default: bundled MiniLM.")
]
BackendOpt = Annotated[
    str,
    typer.Option("--backend", help="auto (default: torch on CUDA, openvino on the CPU), torch, onnx (fp32), "
                                   "onnx-int8, openvino (bf16 where the CPU has it) or openvino-int8: how "
                                   "the sentence-transformers model runs; torch, onnx, openvino and auto "
                                   "share one vector space, each int8 backend has its own (route vectors, "
                                   "thresholds)."),
]
QuietOpt = Annotated[
    bool, typer.Option("--quiet", "-q", help="Draw no progress bar (none is drawn off a terminal either).")
]


def fail(message: str) -> NoReturn:
    """Print ``error: message`` and exit with status 2."""
    console.print(f"[red]error:[/red] {message}", soft_wrap=True)  # a long message stays one line
    raise typer.Exit(2)


def setup_logging() -> None:
    """Log to stderr at the settings' ``log_level``."""
    logging.basicConfig(
        level=get_settings().log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def command_line() -> str:
    """The ``sieve ...`` command line of this process, quoted (recorded in reports and built files)."""
    return "sieve " + shlex.join(sys.argv[1:])
