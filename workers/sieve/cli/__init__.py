"""The ``sieve`` command line: one module per command group, assembled here.

Each module holds a :class:`typer.Typer` of its commands: a group (``routes``,
``topics``, ``dead-letters``, ``schemas``, ``lists``, ``labels``, ``console``) is added
under its name, the others' commands go to the top level. Commands import models, Kafka clients and Faust
inside their bodies, so ``sieve --help`` loads none of them.
"""

from __future__ import annotations

import typer

from sieve.cli import (
    broker,
    console,
    dead_letters,
    demo,
    encoders,
    labels,
    lists,
    messages,
    quality,
    review,
    routes,
    schemas,
    topics,
    worker,
)

app = typer.Typer(help="Sieve: route and moderate text events by meaning, at stream speed.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
app.add_typer(broker.app)
app.add_typer(routes.app, name="routes")
app.add_typer(encoders.app)
app.add_typer(topics.app, name="topics")
app.add_typer(worker.app)
app.add_typer(review.app)
app.add_typer(console.app, name="console")
app.add_typer(messages.app)
app.add_typer(dead_letters.app, name="dead-letters")
app.add_typer(schemas.app, name="schemas")
app.add_typer(lists.app, name="lists")
app.add_typer(labels.app, name="labels")
app.add_typer(demo.app)
app.add_typer(quality.app)


def main() -> None:
    """Entry point of the ``sieve`` console script."""
    app()
